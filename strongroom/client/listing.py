"""Walking the model store's ListModels pages to their end, and no further.

The store chooses each ``next_page_token``; a broken or hostile store that repeats one (or never
stops handing out new ones) would keep a caller's loop going for ever. Every walk here stops with
an error when a token repeats or after :data:`MAX_PAGES` pages.

A page also names the index entries the store cannot read (``corrupt_entries``): a tool acting
on every model must walk them with :func:`iter_entries` and account for each as a model it could
not judge; :func:`iter_models` leaves them out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as store_grpc
from strongroom.errors import FailedPrecondition
from strongroom.reasons import Reason

# 100,000 pages of up to 1,000 models: far beyond any store this walks.
MAX_PAGES = 100_000


def iter_entries(
    store: store_grpc.ModelStoreServiceStub,
    *,
    name_prefix: str = "",
    page_size: int = 0,
    timeout: float,
    max_pages: int = MAX_PAGES,
) -> Iterator[store_pb.ModelInfo | store_pb.CorruptEntry]:
    """Yields every model the store lists (``page_size`` 0: the store's default page), and every
    unreadable index entry it names, each page's models before its corrupt entries.

    Raises ``grpc.RpcError`` as the store answers, and ``FailedPrecondition(STORE_LISTING_LOOPS)``
    if a page token repeats or the walk passes ``max_pages`` pages.
    """
    # Digests, not the tokens: a store could make each token megabytes long.
    seen: set[bytes] = set()
    token = ""
    for _ in range(max_pages):
        page = store.ListModels(
            store_pb.ListModelsRequest(
                name_prefix=name_prefix, page_size=page_size, page_token=token
            ),
            timeout=timeout,
        )
        yield from page.models
        yield from page.corrupt_entries
        token = page.next_page_token
        if not token:
            return
        digest = hashlib.sha256(token.encode()).digest()
        if digest in seen:
            raise FailedPrecondition(
                f"the model store's listing does not advance (a page token repeated after "
                f"{len(seen) + 1} pages); stopped",
                reason=Reason.STORE_LISTING_LOOPS,
            )
        seen.add(digest)
    raise FailedPrecondition(
        f"the model store's listing did not end within {max_pages} pages; stopped",
        reason=Reason.STORE_LISTING_LOOPS,
    )


def iter_models(
    store: store_grpc.ModelStoreServiceStub,
    *,
    name_prefix: str = "",
    page_size: int = 0,
    timeout: float,
    max_pages: int = MAX_PAGES,
) -> Iterator[store_pb.ModelInfo]:
    """Yields every readable model the store lists (:func:`iter_entries` without the corrupt
    entries: only for a caller that need not account for every model)."""
    for entry in iter_entries(
        store, name_prefix=name_prefix, page_size=page_size, timeout=timeout, max_pages=max_pages
    ):
        if isinstance(entry, store_pb.ModelInfo):
            yield entry

"""Loading a multi-part ONNX model: parts decrypted in parallel into memory, then one session.

The parts of an ONNX model with external data (:mod:`strongroom.artifact.manifest`) are fetched and
decrypted by :class:`strongroom.client.fetch.ModelFetcher`, several at once, each straight into its
own in-memory buffer and each checked against the authenticated manifest. The graph (part 0) is
handed to ONNX Runtime as ``bytes`` without a copy, and every other part as an in-memory external
data "file" under the ``location`` name the graph uses
(``SessionOptions.add_external_initializers_from_files_in_memory``), so nothing is read from disk.
ONNX Runtime copies the initializers into its own tensors while it builds the session; every
decrypted buffer is then overwritten with zeros, whether the load succeeded or not.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext

from strongroom.artifact.manifest import ManifestLayout
from strongroom.client.fetch import DecryptedModel, ModelFetcher
from strongroom.errors import FailedPrecondition
from strongroom.inference.models import ModelRepository, VersionStatus
from strongroom.inference.signature import SignaturePolicy
from strongroom.reasons import Reason

log = logging.getLogger(__name__)

__all__ = ["load_multipart"]


def load_multipart(
    repository: ModelRepository,
    fetcher: ModelFetcher,
    name: str,
    version: str,
    *,
    signature: SignaturePolicy | None = None,
    loading: VersionStatus | None = None,
    fetching: AbstractContextManager[object] | None = None,
    timeout: float | None = None,
    header_sha256: bytes | None = None,
) -> tuple[dict[str, float], str]:
    """Fetches, decrypts and loads ``name``/``version``; returns (timings, release decision id).
    ``loading`` is the load's status from ``repository.begin_load`` (see ModelRepository.load);
    ``fetching``, if given, is entered for the fetch alone (the loader defers the next ephemeral
    key's generation with it); ``timeout`` (seconds), if given, bounds the fetch instead of the
    fetcher's own; ``header_sha256`` pins the manifest (see ModelFetcher.fetch).

    Raises DataLoss for a part that is not the one the manifest names, FailedPrecondition for a
    manifest whose layout is not an ONNX model (MODEL_LAYOUT_UNSUPPORTED, before any part is
    downloaded), or the load's error.
    """
    if signature is not None and signature.required:
        # Signatures cover one file; a multi-part model carries none (yet), so it cannot satisfy
        # a server that requires one.
        raise FailedPrecondition(
            "multi-part models are not signed, and a signature is required",
            reason=Reason.MODEL_SIGNATURE_MISSING,
        )
    with fetching if fetching is not None else nullcontext():
        # Another layout is refused once the manifest is read, before its parts are downloaded.
        fetched: DecryptedModel = fetcher.fetch(
            name,
            version,
            timeout=timeout,
            header_sha256=header_sha256,
            layouts=(ManifestLayout.ONNX_EXTERNAL_DATA,),
        )
    with fetched:
        graph, *data = fetched.parts
        started = time.perf_counter()
        repository.load(
            name,
            version,
            graph.as_bytes(),
            external_data={p.name: p.view for p in data},
            loading=loading,
        )
        timings = dict(fetched.timings)
        timings["load"] = time.perf_counter() - started
    log.info(
        "multi-part model loaded",
        extra={"model": name, "version": version, "parts": len(fetched.parts)},
    )
    return timings, fetched.decision_id

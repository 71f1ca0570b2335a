"""Re-wrap every stored model under a KEK to its current version, without touching a model's body.

For each stored artifact under the key (format 2, naming an older KEK version):

1. read its head from the store (at most 68 KiB: prefix, header, key slot) and parse it keylessly;
2. ask the broker to re-wrap the data key (``ReWrap``: unwrap under the old version and wrap under
   the current one, both inside the HSM; the plaintext key never leaves it);
3. ask the store to replace the slot (``ReplaceKeySlot``: compare-and-swap on the old version and
   the wrapped key that was re-wrapped).

Every step is idempotent and each artifact is replaced atomically by the store, so an interrupted
run (this process, the broker or the store killed at any point) leaves every artifact whole under
the old or the new slot, and running again finishes the job: artifacts already at the current
version are reported as ``current``. Format-1 artifacts cannot be re-wrapped (their wrapped key is
bound into the body) and are reported as ``format_1``; they keep needing the old KEK version until
re-published. An index entry the store lists as corrupt (``corrupt_entries``: edited or damaged,
its key and version unknown) is reported as ``corrupt`` after every readable model has been
re-wrapped: it may need the old version, and nothing is judged by it.

:func:`models_needing` lists the stored models that still need one KEK version (or any version of
a key), and the corrupt entries, which might: ``strongroom keys disable`` refuses while there are
any, since a disabled version cannot be enabled again and such a model could no longer be loaded
(a model published with a data key generated before a rotation lands under the old version even
after a re-wrap run has finished).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from strongroom.api.keybroker.v1 import keybroker_pb2 as kb_pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as kb_grpc
from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as store_grpc
from strongroom.artifact import InvalidArtifact, parse_header
from strongroom.artifact.format import FORMAT_V1, MAX_HEAD_SIZE
from strongroom.client.listing import iter_entries
from strongroom.client.whole_streams import ending
from strongroom.reasons import METADATA_KEY as REASON_TRAILER
from strongroom.reasons import Reason

__all__ = ["MAX_HEAD_SIZE", "KeyVersionUse", "RewrapResult", "models_needing", "rewrap_models"]


PAGE_SIZE = 200


@dataclass(frozen=True)
class RewrapResult:
    """What happened to one stored model.

    ``outcome``: ``rewrapped``, ``current`` (already at ``to_version`` or newer), ``format_1`` (not
    re-wrappable), ``gone`` (deleted since it was listed: nothing to re-wrap), ``failed``
    (``reason`` says why; the model is unchanged) or ``corrupt`` (an index entry the store cannot
    read, reason INDEX_CORRUPT, ``problem`` what is wrong with it: not re-wrapped, its versions
    0, not known).
    """

    name: str
    version: str
    outcome: str
    from_version: int
    to_version: int
    reason: str = ""
    problem: str = ""


@dataclass(frozen=True)
class KeyVersionUse:
    """What the store holds that needs a KEK version: ``models`` under it, and ``corrupt``, the
    entries the store cannot read (any of which might be under it)."""

    models: list[store_pb.ModelInfo] = field(default_factory=list)
    corrupt: list[store_pb.CorruptEntry] = field(default_factory=list)


def _reason(exc: grpc.RpcError) -> str:
    trailers: tuple[tuple[str, str | bytes], ...] = (
        tuple(exc.trailing_metadata() or ()) if isinstance(exc, grpc.Call) else ()
    )
    for key, value in trailers:
        if key == REASON_TRAILER:
            return str(value)
    return exc.code().name if isinstance(exc, grpc.Call) else "RPC_FAILED"


def _refused(exc: grpc.RpcError) -> str:
    """The outcome of an RPC error: ``gone`` for the store's answer for a model deleted since it
    was listed, else ``failed`` (a key the broker does not know is NOT_FOUND too, with another
    reason, and stays a failure)."""
    return "gone" if _reason(exc) == Reason.MODEL_NOT_FOUND else "failed"


def _read_head(
    store: store_grpc.ModelStoreServiceStub, model: store_pb.ModelInfo, timeout: float
) -> bytes:
    length = min(model.artifact_size, MAX_HEAD_SIZE)
    request = store_pb.GetModelRequest(
        name=model.name, version=model.version, offset=0, length=length
    )
    head = bytearray()
    with ending(store.GetModel(request, timeout=timeout)) as call:
        for response in call:
            head += response.data
            if len(head) > length:  # a store sending more than asked for: stop reading it
                raise InvalidArtifact(
                    f"the model store sent more than the {length} bytes asked for",
                    reason=Reason.ARTIFACT_MISMATCH,
                )
    return bytes(head)


def rewrap_models(
    key_id: str,
    *,
    current_version: int,
    broker: grpc.Channel,
    store: grpc.Channel,
    timeout: float = 60.0,
) -> Iterator[RewrapResult]:
    """Re-wraps every stored model under ``key_id`` to ``current_version``; yields one result each,
    then one ``corrupt`` result for each index entry the store listed as unreadable.

    Failures of one model (a refused unwrap, a concurrent change) are yielded and the run goes on;
    transport failures of the listing itself raise ``grpc.RpcError``.
    """
    store_stub = store_grpc.ModelStoreServiceStub(store)
    broker_stub = kb_grpc.KeyBrokerServiceStub(broker)
    corrupt: list[store_pb.CorruptEntry] = []
    for model in _models_under(store_stub, key_id, timeout, corrupt):
        yield _rewrap_one(store_stub, broker_stub, model, current_version, timeout)
    for entry in corrupt:
        yield RewrapResult(
            entry.name, entry.version, "corrupt", 0, 0, Reason.INDEX_CORRUPT, entry.problem
        )


def models_needing(
    key_id: str, version: int, *, store: grpc.Channel, timeout: float = 60.0
) -> KeyVersionUse:
    """The stored models whose data key is wrapped under ``version`` of ``key_id`` (under any of
    its versions if ``version`` is 0), as the store lists them, and every corrupt entry it lists
    (its key unknown, it might be). Raises ``grpc.RpcError`` if the store cannot be listed."""
    store_stub = store_grpc.ModelStoreServiceStub(store)
    use = KeyVersionUse()
    use.models.extend(
        model
        for model in _models_under(store_stub, key_id, timeout, use.corrupt)
        if version in (0, model.key_version)
    )
    return use


def _models_under(
    store: store_grpc.ModelStoreServiceStub,
    key_id: str,
    timeout: float,
    corrupt: list[store_pb.CorruptEntry],
) -> Iterator[store_pb.ModelInfo]:
    """The listed models under ``key_id``; the corrupt entries listed go to ``corrupt``."""
    for entry in iter_entries(store, page_size=PAGE_SIZE, timeout=timeout):
        if isinstance(entry, store_pb.CorruptEntry):
            corrupt.append(entry)
        elif entry.key_id == key_id:
            yield entry


# The slowest copy a store's ReplaceKeySlot is given time for: it rewrites the whole artifact
# (a new blob with the new slot, then the record), on a slow disk or across an object store.
REPLACE_MIN_BYTES_PER_SECOND = 16 * 1024 * 1024


def replace_timeout(artifact_size: int, timeout: float) -> float:
    """ReplaceKeySlot's deadline: ``timeout`` plus the time to copy ``artifact_size`` bytes at
    :data:`REPLACE_MIN_BYTES_PER_SECOND`. One fixed deadline (60 s) failed the rotation of every
    model above a few GB, reported ``failed`` while the store went on to finish the copy."""
    return timeout + artifact_size / REPLACE_MIN_BYTES_PER_SECOND


def _rewrap_one(
    store: store_grpc.ModelStoreServiceStub,
    broker: kb_grpc.KeyBrokerServiceStub,
    model: store_pb.ModelInfo,
    current_version: int,
    timeout: float,
) -> RewrapResult:
    def result(outcome: str, from_version: int, to_version: int, reason: str = "") -> RewrapResult:
        return RewrapResult(model.name, model.version, outcome, from_version, to_version, reason)

    try:
        header = parse_header(_read_head(store, model, timeout))
    except grpc.RpcError as exc:
        return result(_refused(exc), model.key_version, model.key_version, _reason(exc))
    except InvalidArtifact as exc:
        return result("failed", model.key_version, model.key_version, exc.reason)
    if header.format_version == FORMAT_V1:
        return result("format_1", header.key_version, header.key_version)
    if header.key_version >= current_version:
        return result("current", header.key_version, header.key_version)
    try:
        rewrapped = broker.ReWrap(
            kb_pb.ReWrapRequest(
                key_id=header.key_id,
                key_version=header.key_version,
                wrapped_data_key=header.wrapped_dek,
            ),
            timeout=timeout,
        )
        store.ReplaceKeySlot(
            store_pb.ReplaceKeySlotRequest(
                name=model.name,
                version=model.version,
                expected_key_version=header.key_version,
                key_version=rewrapped.key_version,
                wrapped_data_key=rewrapped.wrapped_data_key,
                # The slot must still hold the key just re-wrapped: the model may have been
                # deleted and published again (another data key, same KEK version) meanwhile.
                expected_wrapped_data_key=header.wrapped_dek,
            ),
            timeout=replace_timeout(model.artifact_size, timeout),
        )
    except grpc.RpcError as exc:
        return result(_refused(exc), header.key_version, header.key_version, _reason(exc))
    return result("rewrapped", header.key_version, rewrapped.key_version)

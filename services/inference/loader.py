"""Loading a model inside the confidential VM: fetch, attest, release, decrypt in memory, serve.

The artifact streams from the model store into a decryptor that works on both cores as the data
arrives (:func:`strongroom.artifact.decrypt_download`). As soon as the header is in, the data key
is obtained from the key broker by attested release (:mod:`strongroom.client.keyrelease`) on
another thread while the download goes on, and the plaintext buffer is faulted in meanwhile. The
plaintext exists only in one in-memory buffer that ONNX Runtime loads from and that is then
overwritten. A failure at any step leaves the model NOT ready, with the reason recorded for
ModelReady/metadata and the logs.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as store_grpc
from strongroom.artifact import ArtifactHeader, decrypt_download
from strongroom.artifact.manifest import is_manifest
from strongroom.client.fetch import DEFAULT_PARALLEL_PARTS, ModelFetcher
from strongroom.client.keyrelease import KeyReleaseClient, ReleasedDataKey
from strongroom.errors import FailedPrecondition, StrongroomError, Unavailable
from strongroom.inference.models import ModelRepository
from strongroom.inference.multipart import load_multipart
from strongroom.inference.signature import SignaturePolicy
from strongroom.runtime.metrics import MODEL_LOAD_DURATION

log = logging.getLogger(__name__)

_GRPC_TO_ERROR = {
    grpc.StatusCode.PERMISSION_DENIED: "KEY_RELEASE_DENIED",
    grpc.StatusCode.UNAUTHENTICATED: "UNAUTHENTICATED",
    grpc.StatusCode.NOT_FOUND: "MODEL_NOT_IN_STORE",
}


@dataclass
class LoadResult:
    """A completed load: timings per step (seconds) and the key release's audit decision."""

    timings: dict[str, float] = field(default_factory=dict)
    decision_id: str = ""


_REASON = re.compile(r"^([A-Z][A-Z0-9_]+): ")


def _remote_error(step: str, exc: grpc.RpcError) -> StrongroomError:
    """A peer's refusal as a domain error: its own reason code when it sent one (``REASON: …``)."""
    code = exc.code()
    details = exc.details() or code.name
    sent = _REASON.match(details)
    tag = step.upper().replace(" ", "_")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"{step}: {details}", reason=sent[1] if sent else f"{tag}_UNAVAILABLE")
    reason = sent[1] if sent else _GRPC_TO_ERROR.get(code, f"{tag}_FAILED")
    return FailedPrecondition(f"{step}: {details}", reason=reason)


class ModelLoader:
    """Loads model versions into a :class:`ModelRepository`; one load per model at a time."""

    def __init__(
        self,
        repository: ModelRepository,
        *,
        store_channel: grpc.Channel,
        key_release: KeyReleaseClient,
        tracer_provider: TracerProvider | None = None,
        decrypt_threads: int = 2,
        timeout: float = 600.0,
        signature: SignaturePolicy | None = None,
        parallel_parts: int = DEFAULT_PARALLEL_PARTS,
    ) -> None:
        self._repository = repository
        self._store = store_grpc.ModelStoreServiceStub(store_channel)
        self._release = key_release
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        self._threads = decrypt_threads
        self._timeout = timeout
        self._signature = signature
        # Multi-part models (a manifest and its parts): see strongroom.inference.multipart.
        self._fetcher = ModelFetcher(
            store_channel,
            self._release_key,
            parallel=parallel_parts,
            decrypt_threads=decrypt_threads,
            timeout=timeout,
        )
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    def load(self, name: str, version: str) -> LoadResult:
        """Loads ``name``/``version`` and makes it the default version; raises on failure."""
        with (
            self._lock(name),
            self._tracer.start_as_current_span(
                "strongroom.inference.load_model",
                attributes={"model.name": name, "model.version": version},
            ) as span,
        ):
            self._repository.begin_load(name, version)
            started = time.perf_counter()
            try:
                if self._is_multipart(name, version):
                    result = self._load_multipart(name, version)
                else:
                    result = self._load(name, version)
            except StrongroomError as exc:
                MODEL_LOAD_DURATION.record(
                    time.perf_counter() - started, {"model": name, "outcome": exc.reason}
                )
                span.set_attribute("error.reason", exc.reason)
                self._repository.fail(name, version, exc)
                raise
            except Exception as exc:  # a bug must still leave the model not ready, with a reason
                log.exception("model load crashed")
                self._repository.fail(
                    name, version, StrongroomError(f"internal error: {type(exc).__name__}")
                )
                raise
            MODEL_LOAD_DURATION.record(
                time.perf_counter() - started, {"model": name, "outcome": "loaded"}
            )
            for step, seconds in result.timings.items():
                span.set_attribute(f"timing.{step}", seconds)
            log.info(
                "model loaded",
                extra={
                    "model": name,
                    "version": version,
                    "timings": result.timings,
                    "decision_id": result.decision_id,
                },
            )
            return result

    def _is_multipart(self, name: str, version: str) -> bool:
        """Whether the store holds a manifest for ``name``/``version`` (its claim; the fetch
        authenticates the manifest's header before trusting anything in it)."""
        try:
            info = self._store.StatModel(
                store_pb.StatModelRequest(name=name, version=version), timeout=self._timeout
            ).model
        except grpc.RpcError as exc:
            raise _remote_error("fetch", exc) from None
        return is_manifest(info.content_type)

    def _load_multipart(self, name: str, version: str) -> LoadResult:
        timings, decision_id = load_multipart(
            self._repository, self._fetcher, name, version, signature=self._signature
        )
        return LoadResult(timings=timings, decision_id=decision_id)

    def _responses(self, name: str, version: str) -> Iterator[bytes]:
        try:
            for response in self._store.GetModel(
                store_pb.GetModelRequest(name=name, version=version), timeout=self._timeout
            ):
                yield response.data
        except grpc.RpcError as exc:
            raise _remote_error("fetch", exc) from None

    def _load(self, name: str, version: str) -> LoadResult:
        def check_header(header: ArtifactHeader) -> None:
            if (header.model_name, header.model_version) != (name, version):
                raise FailedPrecondition(
                    f"the store returned {header.model_name}/{header.model_version} for "
                    f"{name}/{version}",
                    reason="ARTIFACT_MISMATCH",
                )

        def release(header: ArtifactHeader) -> ReleasedDataKey:
            return self._release_key(header.key_id, header.key_version, header.wrapped_dek)

        # The plaintext lives only in the artifact's buffer, which ONNX Runtime loads from (bytes,
        # no copy) and which is overwritten on leaving this block.
        with decrypt_download(
            self._responses(name, version),
            release,
            check_header=check_header,
            threads=self._threads,
        ) as artifact:
            self._check_signature(artifact.header, artifact.plaintext)
            result = LoadResult(dict(artifact.timings), artifact.key.decision_id)
            fetched = time.perf_counter()
            self._repository.load(name, version, artifact.plaintext)
            result.timings["load"] = time.perf_counter() - fetched
        return result

    def _check_signature(self, header: ArtifactHeader, plaintext: bytes | bytearray) -> None:
        if self._signature is not None:
            self._signature.check(
                header.signature_bundle, header.signature_bundle_media_type, plaintext
            )
        elif header.signature_bundle:
            log.info("model carries a signature, but no signing key is configured to verify it")

    def _release_key(self, key_id: str, key_version: int, wrapped: bytes) -> ReleasedDataKey:
        try:
            return self._release.release(key_id, key_version, wrapped)
        except grpc.RpcError as exc:
            raise _remote_error("key release", exc) from None

"""ModelControlService: load and unload models on request (admin identity)."""

from __future__ import annotations

import time

import grpc

from strongroom.api.inference.v1 import model_control_pb2 as pb
from strongroom.api.inference.v1 import model_control_pb2_grpc as pb_grpc
from strongroom.client.cancel import CallScope
from strongroom.errors import InvalidArgument
from strongroom.identifiers import is_sha256_hex, validate_name, validate_version
from strongroom.inference.loader import LOAD_RETRY_SECONDS, ModelLoader
from strongroom.inference.models import ModelNotFound, ModelRepository
from strongroom.reasons import Reason

CONTROL_SERVICE = "strongroom.api.inference.v1.ModelControlService"


class ModelControlServicer(pb_grpc.ModelControlServiceServicer):
    """Thin adapter over :class:`ModelLoader` and :class:`ModelRepository`."""

    def __init__(
        self,
        loader: ModelLoader,
        repository: ModelRepository,
        *,
        retry_seconds: float = LOAD_RETRY_SECONDS,
    ) -> None:
        self._loader = loader
        self._repository = repository
        self._retry_seconds = retry_seconds

    def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.ServicerContext
    ) -> pb.LoadModelResponse:
        name = validate_name(request.name)
        version = validate_version(request.version)
        pin = None
        if request.header_sha256:
            if not is_sha256_hex(request.header_sha256):
                raise InvalidArgument(
                    "header_sha256 must be 64 lower-case hexadecimal digits",
                    reason=Reason.INVALID_SHA256,
                )
            pin = bytes.fromhex(request.header_sha256)
        # Read before the time remaining, so that this deadline falls at or before gRPC's own:
        # when gRPC ends the call at its deadline, the scope has expired too (LOAD_DEADLINE_EXCEEDED,
        # not LOAD_CANCELLED).
        now = time.monotonic()
        remaining = context.time_remaining()
        # Retry brief unavailability, but answer before the caller's own deadline; and stop the
        # load itself at that deadline, or as soon as the caller cancels: nobody waits for it any
        # more. gRPC reports the cancellation on a thread of its own, where the scope reaches
        # every call the load has in flight (strongroom.client.cancel).
        within = self._retry_seconds
        scope = CallScope()
        if remaining is not None:
            within = min(within, remaining - 1)
            scope = CallScope(now + remaining)
        if not context.add_callback(scope.cancel):
            scope.cancel()  # the call has already ended
        result = self._loader.load_with_retry(
            name, version, within=within, scope=scope, header_sha256=pin
        )
        return pb.LoadModelResponse(timings=result.timings, decision_id=result.decision_id)

    def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.ServicerContext
    ) -> pb.UnloadModelResponse:
        """Stops serving the version (or every version), aborts its loads not yet begun and stops
        the one under way (MODEL_UNLOADED); NOT_FOUND when there was none of these."""
        name = validate_name(request.name)
        version = validate_version(request.version) if request.version else None
        # Loads of it still waiting for the model's lock are aborted first: one would otherwise
        # load the version again as soon as the running load let go, after this call returned.
        aborted = self._loader.abort_queued(name, version)
        try:
            self._repository.unload(name, version)
        except ModelNotFound:
            if not aborted:  # nothing held and nothing queued: there was nothing to unload
                raise
        finally:
            # And once more after: a retry registered between the two found its failure still
            # listed (its check comes after its registration, so one registered later finds it
            # gone), and only this reaches it.
            self._loader.abort_queued(name, version)
        return pb.UnloadModelResponse()

"""ModelControlService: load and unload models on request (admin identity)."""

from __future__ import annotations

import time

import grpc

from strongroom.api.inference.v1 import model_control_pb2 as pb
from strongroom.api.inference.v1 import model_control_pb2_grpc as pb_grpc
from strongroom.errors import InvalidArgument
from strongroom.identifiers import is_sha256_hex, validate_name, validate_version
from strongroom.inference.loader import LOAD_RETRY_SECONDS, ModelLoader
from strongroom.inference.models import ModelRepository
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
        remaining = context.time_remaining()
        # Retry brief unavailability, but answer before the caller's own deadline; and stop the
        # load itself at that deadline: nobody waits for it any more.
        within = self._retry_seconds
        deadline = None
        if remaining is not None:
            within = min(within, remaining - 1)
            deadline = time.monotonic() + remaining
        result = self._loader.load_with_retry(
            name, version, within=within, deadline=deadline, header_sha256=pin
        )
        return pb.LoadModelResponse(timings=result.timings, decision_id=result.decision_id)

    def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.ServicerContext
    ) -> pb.UnloadModelResponse:
        name = validate_name(request.name)
        version = validate_version(request.version) if request.version else None
        self._repository.unload(name, version)
        return pb.UnloadModelResponse()

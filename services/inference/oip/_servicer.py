"""The Open Inference Protocol v2 gRPC servicer (``inference.GRPCInferenceService``).

A thin adapter: it converts protobuf to domain calls on the :class:`ModelRepository` and back.
Failures are raised as :class:`~strongroom.errors.StrongroomError`; the service host's
``ErrorMappingInterceptor`` turns them into statuses (unknown model NOT_FOUND, loading UNAVAILABLE,
failed load FAILED_PRECONDITION, malformed request INVALID_ARGUMENT, over a limit
RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Mapping, Sequence

import grpc

from strongroom.api.oip.v2 import grpc_service_pb2 as pb
from strongroom.api.oip.v2 import grpc_service_pb2_grpc as pb_grpc
from strongroom.errors import (
    REFUSAL_LINE,
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
)
from strongroom.identifiers import name_rule_matches
from strongroom.inference.models import ModelRepository, TensorSpec
from strongroom.inference.models._ort import ort
from strongroom.inference.oip._budget import CallEnded, Reservation, ResponseBudget
from strongroom.inference.oip._codec import (
    InferLimits,
    check_request_parameters,
    decode_inputs,
    encode_outputs,
    output_shapes_check,
    requested_outputs,
)
from strongroom.inference.oip._wire import parse_infer_request
from strongroom.pki.authz import verified_caller
from strongroom.reasons import Reason
from strongroom.runtime.callers import caller_key, certificate_key
from strongroom.runtime.gave_up import CallEnd, GaveUp
from strongroom.runtime.grpc_types import HandlerCollector
from strongroom.runtime.unsent import UnsentResponses

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
"""The OIP service's gRPC name (``inference.GRPCInferenceService``)."""
SERVER_NAME = "strongroom-inference"
ATTESTATION_EXTENSION = "strongroom_attestation"
"""Advertised in ServerMetadata: the server answers ``InferenceAttestationService.GetEvidence``."""


def _package_version() -> str:
    try:
        return importlib.metadata.version("strongroom")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves the models of a :class:`ModelRepository` over OIP v2.

    ``clients`` (SPIFFE ID -> model-name rules; None: any caller, any model) scopes what each
    caller may infer, describe and ask the readiness of; callers in ``unscoped`` (admins) are not
    scoped. The server's readiness is a scoped caller's own models' (another tenant's model not
    ready yet is none of its business); liveness and metadata name no model and are everyone's.
    ``response_budget`` bounds the memory every response being built or sent holds together
    (:mod:`~strongroom.inference.oip._budget`; one per process: the server's one servicer);
    ``unsent`` cancels a ModelInfer whose client does not take its response in time, so that its
    reservation comes back (:mod:`~strongroom.runtime.unsent`; default: the stream settings'
    defaults).
    """

    def __init__(
        self,
        repository: ModelRepository,
        *,
        server_version: str | None = None,
        extensions: Sequence[str] = (ATTESTATION_EXTENSION,),
        limits: InferLimits | None = None,
        live: Callable[[], bool] | None = None,
        clients: Mapping[str, tuple[str, ...]] | None = None,
        unscoped: frozenset[str] = frozenset(),
        response_budget: ResponseBudget | None = None,
        unsent: UnsentResponses | None = None,
    ) -> None:
        self._repository = repository
        self._budget = response_budget or ResponseBudget()
        self._unsent = unsent or UnsentResponses()
        self._version = server_version or _package_version()
        self._extensions = tuple(extensions)
        self._limits = limits or InferLimits()
        self._live = live or (lambda: True)
        self._clients = clients
        self._unscoped = unscoped

    @property
    def limits(self) -> InferLimits:
        """The request limits (see :meth:`InferLimits.grpc_server_options`)."""
        return self._limits

    @property
    def response_budget(self) -> ResponseBudget:
        """The budget of memory responses hold while they are built and sent."""
        return self._budget

    def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.ServicerContext
    ) -> pb.ServerLiveResponse:
        """Live while the process can answer."""
        return pb.ServerLiveResponse(live=self._live())

    def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.ServicerContext
    ) -> pb.ServerReadyResponse:
        """Ready when every configured model the caller may use has a ready version: the
        answer over every tenant's models told any client whether another tenant's were
        loaded yet (one listed as configured and failing kept it False for everyone)."""
        return pb.ServerReadyResponse(ready=self._repository.server_ready(self.visible_to(context)))

    def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.ServicerContext
    ) -> pb.ModelReadyResponse:
        """Whether the model (version) can serve; an unknown model is simply not ready (as Triton)."""
        _require_name(request.name)
        self._check_client(context, request.name)
        return pb.ModelReadyResponse(ready=self._repository.is_ready(request.name, request.version))

    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """Name, version and extensions (including the attestation extension)."""
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self._version, extensions=self._extensions
        )

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """Inputs, outputs, platform and ready versions of a servable model."""
        _require_name(request.name)
        self._check_client(context, request.name)
        model = self._repository.get(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=self._repository.versions(model.name),
            platform=model.platform,
            inputs=[_tensor_metadata(t) for t in model.inputs],
            outputs=[_tensor_metadata(t) for t in model.outputs],
        )

    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        """Runs one inference; outputs come back raw when the inputs did (or must: FP16)."""
        _require_name(request.model_name)
        self._check_client(context, request.model_name)
        model = self._repository.get(request.model_name, request.model_version)
        check_request_parameters(request)
        inputs, used_raw = decode_inputs(request, model, self._limits)
        names = requested_outputs(request, model, self._limits)
        stop = _StopOnEnd(context, wake=self._budget.wake)
        memory = _ResponseMemory(self._budget, context, stop, model.name)
        try:
            arrays = model.infer(
                inputs,
                names,
                run_options=stop.options,
                check_shapes=output_shapes_check(
                    model, names, raw=used_raw, limits=self._limits, reserve=memory.reserve
                ),
                stopped_by=stop.end.gave_up,
            )
            response = pb.ModelInferResponse(
                model_name=model.name, model_version=model.version, id=request.id
            )
            size = encode_outputs(
                response,
                model,
                names,
                arrays,
                raw=used_raw,
                limits=self._limits,
                reserve=memory.reserve,
            )
            # Its reservation lasts until the call ends, which a client that never takes the
            # response put off until its deadline or its connection's age (some 40 minutes).
            self._unsent.watch(context, size)
        except BaseException:
            memory.release()  # nothing of it is sent: no need to wait for the call's end
            raise
        # The reservation stays until the call ends: gRPC serialises the message after this
        # returns, copies it into its core and sends it, the message alive meanwhile.
        return response

    def visible_to(self, context: grpc.ServicerContext) -> Callable[[str], bool] | None:
        """Which model names this caller may use (``clients``); None: every name."""
        if self._clients is None:
            return None
        caller = str(verified_caller(context).spiffe_id)
        if caller in self._unscoped:
            return None
        rules = self._clients.get(caller, ())
        return lambda name: any(name_rule_matches(rule, name) for rule in rules)

    def _check_client(self, context: grpc.ServicerContext, name: str) -> None:
        """PermissionDenied unless this caller may use model ``name`` (``clients``): the same
        answer whether or not the model exists or is loaded, so that no client learns another
        tenant's model names, metadata or readiness, nor runs its model."""
        visible = self.visible_to(context)
        if visible is None or visible(name):
            return
        caller = str(verified_caller(context).spiffe_id)
        log.warning(
            "refused model %s to client %s",
            name[:128],
            caller,
            extra={
                "model": name[:128],
                "reason": Reason.MODEL_NAME_NOT_ALLOWED,
                REFUSAL_LINE: True,
            },
        )
        raise PermissionDenied(
            f"this client may not use model {name[:128]!r}",
            reason=Reason.MODEL_NAME_NOT_ALLOWED,
        )


def add_to_server(servicer: OipServicer, server: grpc.Server) -> None:
    """Registers ``servicer`` like ``add_GRPCInferenceServiceServicer_to_server``, except that
    ModelInfer's requests are counted on the wire before the protobuf runtime builds them
    (:mod:`strongroom.inference.oip._wire`): every server of this servicer registers it so.

    The count and the parse are ModelInfer's deserialiser, which the service runtime calls after
    the authoriser and the admission checks, like every unary request's
    (:class:`~strongroom.runtime.interceptors.RequestDecodingInterceptor`): gRPC itself would call
    it before any interceptor, for callers the authoriser then refuses.
    """
    collector = HandlerCollector()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, collector)  # type: ignore[arg-type]
    handlers = dict(collector.handlers)
    limits = servicer.limits
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=_InferRequestParser(limits).parse,
        response_serializer=pb.ModelInferResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


class _InferRequestParser:
    """ModelInfer's deserialiser (:meth:`parse`: the wire count, then the parse). Its
    ``DESCRIPTOR`` names the message in the runtime's refusal of bytes that are not one, as a
    generated message class's ``FromString`` does."""

    DESCRIPTOR = pb.ModelInferRequest.DESCRIPTOR

    def __init__(self, limits: InferLimits) -> None:
        self._limits = limits

    def parse(self, data: bytes) -> pb.ModelInferRequest:
        """``data`` counted on the wire, then parsed (:func:`parse_infer_request`)."""
        return parse_infer_request(data, self._limits)


class _StopOnEnd:
    """Run options whose run stops when the call ends: a caller that cancels, or whose deadline
    passes, no longer leaves a worker thread and the cores computing an answer nobody reads (a
    certified caller could otherwise start any number of long runs and walk away at once).
    How the caller gave up is the call's :class:`~strongroom.runtime.gave_up.CallEnd`'s
    (``end``), judged when the call ends; ``wake`` is then called too (a wait for response
    memory looks at :attr:`ended` again)."""

    __slots__ = ("_wake", "end", "options")

    def __init__(
        self, context: grpc.ServicerContext, wake: Callable[[], None] | None = None
    ) -> None:
        self.options = ort.RunOptions()
        self._wake = wake
        self.end = CallEnd(context, on_end=self._stop)

    def ended(self) -> bool:
        """Whether the call has ended."""
        return bool(self.options.terminate)

    def _stop(self) -> None:
        self.options.terminate = True
        if self._wake is not None:
            self._wake()


class _ResponseMemory:
    """One ModelInfer's reservation in the response budget: taken before its outputs are copied
    out of ONNX Runtime's arena, grown when their exact size is known, given back when the call
    ends (its response sent, or the call cancelled or failed) or at once when it fails here."""

    __slots__ = ("_budget", "_context", "_model", "_reservation", "_stop")

    def __init__(
        self, budget: ResponseBudget, context: grpc.ServicerContext, stop: _StopOnEnd, model: str
    ) -> None:
        self._budget = budget
        self._context = context
        self._stop = stop
        self._model = model
        self._reservation: Reservation | None = None

    def reserve(self, size: int, *, arena: int = 0) -> None:
        """Holds at least ``size`` bytes (the budget's refusals raised as they are); ``arena``:
        what the run holds in ONNX Runtime's arena while the first reservation waits."""
        try:
            if self._reservation is None:
                # Counted in its caller's share: a client that never takes its responses keeps
                # their calls, and their reservations, open until its deadline or its
                # connection's age, and held the whole budget so.
                caller = caller_key(self._context)
                # And in its certificate's share of that: a fleet's replicas share one SPIFFE
                # ID, and one stuck replica held its whole share.
                self._reservation = self._budget.reserve(
                    size,
                    caller=caller,
                    ended=self._stop.ended,
                    certificate=certificate_key(self._context, caller),
                    arena=arena,
                )
                if not self._context.add_callback(self._reservation.release):
                    self._reservation.release()  # the call has already ended
            else:
                self._reservation.grow_to(size, ended=self._stop.ended)
        except CallEnded:
            self._call_ended()
        if self._stop.ended():
            self._call_ended()

    def release(self) -> None:
        """Gives the reservation back now (again: nothing)."""
        if self._reservation is not None:
            self._reservation.release()

    def _call_ended(self) -> None:
        # Its caller is gone: the answer is for the log, which says how the call ended.
        if self._stop.end.gave_up() is GaveUp.DEADLINE:
            raise DeadlineExceeded(
                f"inference on {self._model} stopped: the caller's deadline passed",
                reason=Reason.INFERENCE_DEADLINE_EXCEEDED,
            )
        raise Cancelled(
            f"inference on {self._model} stopped: the call was cancelled",
            reason=Reason.INFERENCE_CANCELLED,
        )


def _require_name(name: str) -> None:
    if not name:
        raise InvalidArgument("model name is required", reason=Reason.MODEL_NAME_MISSING)


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=spec.shape
    )

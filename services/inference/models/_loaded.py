"""One ONNX model loaded into ONNX Runtime from plaintext bytes in memory.

Plaintext never touches disk: the session is created from bytes, external initializers (for big
models) are handed over as in-memory "files", ORT's telemetry is off (see ``_ort``), and the
session options switch off everything in ORT that can write a file (optimised-model dump,
profiling, EP context cache) and pin the external-data folder to a directory that cannot exist,
so a model cannot make ORT read files either.

Copies in memory (all inside the confidential VM's encrypted memory): ORT's Python API takes only
``bytes``, so a ``bytearray``/``memoryview`` is copied once; ORT parses it and keeps its own tensors.
The wrapper would also keep a reference to the serialized model for the session's lifetime; we drop
it so a big model does not cost twice its size for as long as it is served. In-memory external
initializer buffers are copied by ORT during session creation: the caller may wipe them afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import numpy as np

from strongroom.errors import (
    REFUSAL_LINE,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
)
from strongroom.identifiers import name_rule_matches
from strongroom.inference.models._arena import SHRINK_CPU, SHRINK_OPTION, ArenaReturn
from strongroom.inference.models._datatypes import BY_ORT_TYPE, DATATYPES, DataType
from strongroom.inference.models._graph import (
    DEFAULT_MAX_GRAPH_NODES,
    GraphTooLarge,
    walk_model,
)
from strongroom.inference.models._ort import ignore_config_from_model, ort, ort_state
from strongroom.inference.models._strings import StringBounds
from strongroom.reasons import Reason
from strongroom.runtime.gave_up import GaveUp

log = logging.getLogger(__name__)

ModelBuffer = bytes | bytearray | memoryview
"""Plaintext model bytes, as decrypted into memory."""

PLATFORM = "onnxruntime_onnx"
"""The OIP platform name (Triton's name for ONNX Runtime models)."""

# A directory that can never exist (procfs does not allow creating entries): relative external-data
# locations resolve against it, so any reference not supplied in memory fails instead of being read.
_NO_EXTERNAL_DATA_DIR = "/proc/self/strongroom-external-data-must-come-from-memory"

_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


DEFAULT_MAX_INFERENCE_MEMORY_BYTES = 2 << 30
"""Default cap on what ONNX Runtime holds for inference runs, every session's together."""
MIN_INFERENCE_MEMORY_BYTES = 16 << 20
"""The least cap one may configure (below it no usual model runs)."""
INFERENCE_MEMORY_SETTING = "inference.max_inference_memory_bytes"
"""The configuration key of the cap, named in the refusal (the models layer has no config)."""
DEFAULT_MAX_REQUEST_BYTES = 64 << 20
"""Default bound on a request's tensor bytes (``inference.max_input_bytes``'s default)."""
GRAPH_NODES_SETTING = "inference.max_graph_nodes"
"""The configuration key of the node budget of a model's graph as inlined, named in the refusal."""
STRING_EXPANSION_SETTINGS = "inference.string_expansion_models or inference.allow_string_expansion"
"""The configuration keys that let a model through the string check, named in its refusal."""

# ORT's refusals when an allocation does not fit: the capped arena's, the arena's allocator's,
# and the C++ runtime's (malloc itself failed).
_ARENA_FULL = re.compile(
    r"Available memory of \d+ is smaller than requested bytes of \d+"
    r"|Failed to allocate memory for requested buffer of size \d+"
    r"|std::bad_alloc"
)


# One capped CPU arena for every session (ORT's environment keeps it; registering another
# replaces it for sessions created afterwards, while sessions created before keep theirs).
class _Arena:
    guard = threading.Lock()
    cap: int | None = None
    # What frees the current arena's unused regions (its sessions' LoadedModel keep theirs).
    give_back: ArenaReturn | None = None


def use_inference_memory_cap(max_bytes: int) -> None:
    """Registers ONNX Runtime's shared CPU arena capped at ``max_bytes`` (process-wide; idempotent).

    Every session made by :func:`session_options` allocates its runs' tensors (inputs it copies,
    intermediates, outputs until they are copied out) from this arena, and an allocation past
    the cap fails that run only. Without it a model whose output size comes from an input *value*
    (``ConstantOfShape``, ``Expand``, ``Tile``, ``Range``) let one small request allocate gigabytes
    and the VM kill the process. The arena grows by exactly what is asked for (never by doubling
    beyond the cap), and each request hands back the regions no tensor uses any more once its
    outputs are copied out (:meth:`LoadedModel.infer`, :class:`~._arena.ArenaReturn`), so a big
    request does not leave its peak held. Initializers (the model's weights) are not counted: ORT
    places them outside this arena.
    """
    if max_bytes < MIN_INFERENCE_MEMORY_BYTES:
        raise ValueError(f"the inference memory cap must be at least {MIN_INFERENCE_MEMORY_BYTES}")
    with _Arena.guard:
        if _Arena.cap == max_bytes:
            return
        config = ort.OrtArenaCfg({"max_mem": max_bytes, "arena_extend_strategy": 1})
        memory = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        ort.create_and_register_allocator(memory, config)
        # The cap last: if the hand-back cannot be made, the next call registers the arena
        # again rather than have sessions run with the previous arena's (which frees nothing).
        _Arena.give_back = ArenaReturn()
        _Arena.cap = max_bytes


def inference_memory_cap() -> int | None:
    """The cap of the arena sessions made now use (None before any is registered)."""
    return _Arena.cap


UNCAPPED_OPERATORS = frozenset({"NonZero", "Unique", "com.microsoft.Unique"})
"""Operators whose CPU kernels build their result in memory of their own, outside the
capped arena, before it is copied to an arena tensor: a multiple of their input's size (measured
under a 16 MiB cap: ``NonZero`` of 12 M booleans held 104 MiB, 8 bytes a coordinate;
``Unique`` of 1.5 M integers 196 MiB, ~130 bytes an element in its hash map; under a 64 MiB cap
ONNX Runtime's own ``com.microsoft.Unique`` of 4 M floats 313 MiB). Their input can
come from a request's *value* (``ConstantOfShape``, ``Range``), so the cap bounded them at
several times itself. A model using one is refused unless :attr:`RuntimeOptions.allow_uncapped_operators`.
Named as ``models._graph.operator_name`` names them: a standard operator by its type, any other
with its domain."""
UNCAPPED_OPERATORS_SETTING = "inference.allow_uncapped_operators"
"""The configuration key that lets models with :data:`UNCAPPED_OPERATORS` load."""


OutputCheck = Callable[[Mapping[str, tuple[int, ...]]], None]
"""What :meth:`LoadedModel.infer` shows the outputs' shapes (by name) before it copies any: it
raises to refuse them."""


class ModelLoadError(FailedPrecondition):
    """ONNX Runtime could not load the model (malformed, unsupported, or needs files from disk)."""

    default_reason = Reason.MODEL_INVALID


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A model input or output as OIP describes it; a dimension of -1 is variable."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def type(self) -> DataType:
        """The datatype's numpy/ORT details."""
        return DATATYPES[self.datatype]


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """ONNX Runtime settings for every session (0 threads = ORT's default, one per core)."""

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    # Idle ORT worker threads spin by default; with several models sharing few cores that burns
    # the CPU other requests need, so spinning is off unless asked for.
    allow_spinning: bool = False
    # What ORT may hold for runs, every session made with this value together (use_inference_memory_cap).
    max_inference_memory_bytes: int = DEFAULT_MAX_INFERENCE_MEMORY_BYTES
    # Whether a model may use UNCAPPED_OPERATORS, whose kernels allocate outside that cap.
    allow_uncapped_operators: bool = False
    # The most a request's tensors may bring (inference.max_input_bytes): the string characters
    # a request gives a model, which the string check (models._strings) bounds the graph by.
    max_input_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # Models whose strings the arena does not bound are refused (MODEL_STRING_EXPANSION) unless
    # named here (a model name, or ``name/`` for every model under it) or allowed for all.
    string_expansion_models: tuple[str, ...] = ()
    allow_string_expansion: bool = False
    # The most nodes a model's graph may have once its model-local functions are inlined
    # (models._graph.inlined_nodes): functions calling functions several times each inline to a
    # number of nodes exponential in their depth, and ONNX Runtime took minutes to load one.
    max_graph_nodes: int = DEFAULT_MAX_GRAPH_NODES

    def __post_init__(self) -> None:
        if self.graph_optimization not in _OPTIMIZATION_LEVELS:
            raise ValueError(f"graph_optimization must be one of {', '.join(_OPTIMIZATION_LEVELS)}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("thread counts cannot be negative")
        if self.max_inference_memory_bytes < MIN_INFERENCE_MEMORY_BYTES:
            raise ValueError(
                f"max_inference_memory_bytes must be at least {MIN_INFERENCE_MEMORY_BYTES}"
            )
        if self.max_input_bytes < 1:
            raise ValueError("max_input_bytes must be positive")
        if self.max_graph_nodes < 1:
            raise ValueError("max_graph_nodes must be positive")

    def allows_string_expansion(self, name: str) -> bool:
        """Whether model ``name`` may load though its strings escape the memory cap."""
        return self.allow_string_expansion or any(
            name_rule_matches(rule, name) for rule in self.string_expansion_models
        )


def session_options(options: RuntimeOptions) -> ort.SessionOptions:
    """Session options that keep ORT from writing or reading any file for the model."""
    ignore_config_from_model()  # or the model's metadata would set what follows over ours
    so = ort.SessionOptions()
    so.optimized_model_filepath = ""  # never serialise the optimised graph (it holds the weights)
    so.enable_profiling = False
    so.add_session_config_entry("ep.context_enable", "0")
    # ONNX protobuf only, never ORT's own flatbuffer format: the graph checks (models._graph)
    # read the graph as ONNX, and a model they cannot read must not load some other way.
    so.add_session_config_entry("session.load_model_format", "ONNX")
    so.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", _NO_EXTERNAL_DATA_DIR
    )
    so.graph_optimization_level = _OPTIMIZATION_LEVELS[options.graph_optimization]
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Runs allocate from the one capped arena of ORT's environment (use_inference_memory_cap),
    # not from a per-session arena: a per-session arena has no cap ORT's Python API can set, and
    # it kept the most any run made the session allocate for the session's life (one 3.2 MB
    # request through a 256-wide layer left ~220 MiB). The shared arena grows by what is asked
    # and each request hands back what it no longer uses (LoadedModel.infer), so it holds what
    # running requests need.
    use_inference_memory_cap(options.max_inference_memory_bytes)
    so.add_session_config_entry("session.use_env_allocators", "1")
    spin = "1" if options.allow_spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    so.log_severity_level = 3
    return so


class LoadedModel:
    """A ready ONNX Runtime session and its OIP metadata; :meth:`infer` is thread-safe."""

    def __init__(
        self,
        name: str,
        version: str,
        session: ort.InferenceSession,
        *,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        load_seconds: float,
        give_back: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.inputs = inputs
        self.outputs = outputs
        self.load_seconds = load_seconds
        self.platform = PLATFORM
        self._session = session
        self._inputs_by_name = {t.name: t for t in inputs}
        self._outputs_by_name = {t.name: t for t in outputs}
        self._output_names = tuple(t.name for t in outputs)
        # Frees the unused regions of the arena this session allocates from (_arena).
        self._give_back = give_back

    def __repr__(self) -> str:
        return f"LoadedModel(name={self.name!r}, version={self.version!r})"

    @classmethod
    def from_bytes(
        cls,
        name: str,
        version: str,
        model: ModelBuffer,
        *,
        external_data: Mapping[str, ModelBuffer] | None = None,
        options: RuntimeOptions | None = None,
    ) -> LoadedModel:
        """Creates a session from a serialized ONNX model in memory.

        ``external_data`` maps the ``location`` names of the model's external initializers to
        their file contents in memory (ONNX external-data layout); ORT copies them while loading.
        """
        options = options or RuntimeOptions()
        serialized = model if isinstance(model, bytes) else bytes(model)
        started = time.perf_counter()
        try:
            try:
                # Before ORT reads it (and before a session's options are made): a refused
                # model never gets a session.
                _check_graph(name, version, serialized, options)
            except ModelLoadError:
                raise
            except Exception as exc:
                raise _rejected(name, version, exc) from None
            so = session_options(options)
            give_back = _Arena.give_back  # the arena the session made with ``so`` uses
            if external_data:
                names = list(external_data)
                buffers = [memoryview(external_data[n]).cast("B") for n in names]
                so.add_external_initializers_from_files_in_memory(
                    names, buffers, [b.nbytes for b in buffers]
                )
            try:
                session = ort.InferenceSession(serialized, so, providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise _rejected(name, version, exc) from None
        finally:
            del serialized
        # The wrapper keeps the serialized model only to re-create the session when providers
        # change, which we never do; without this it would pin a second copy of the model.
        if getattr(session, "_model_bytes", None) is not None:
            session._model_bytes = None
        load_seconds = time.perf_counter() - started
        input_args, output_args = session.get_inputs(), session.get_outputs()
        try:
            # ORT's Python API reads a name as UTF-8 text; a model's need not be (ONNX protobuf
            # does not check them), and the decode raised out of the load as a bug.
            for arg in (*input_args, *output_args):
                _ = arg.name
        except UnicodeDecodeError:
            raise ModelLoadError(
                "a tensor name of the model is not UTF-8 text", reason=Reason.MODEL_INVALID
            ) from None
        inputs = tuple(_spec(arg, "input") for arg in input_args)
        outputs: list[TensorSpec] = []
        for arg in output_args:
            try:
                outputs.append(_spec(arg, "output"))
            except ModelLoadError as exc:
                log.warning(
                    "model output not servable over OIP; omitted",
                    extra={"model": name, "output": arg.name, "detail": exc.message},
                )
        if not outputs:
            raise ModelLoadError(
                "the model has no output with an OIP datatype",
                reason=Reason.MODEL_UNSUPPORTED_DATATYPE,
            )
        log.info(
            "model loaded",
            extra={"model": name, "version": version, "seconds": round(load_seconds, 3)},
        )
        return cls(
            name,
            version,
            session,
            inputs=inputs,
            outputs=tuple(outputs),
            load_seconds=load_seconds,
            give_back=give_back,
        )

    def input_spec(self, name: str) -> TensorSpec | None:
        """The input called ``name``, if any."""
        return self._inputs_by_name.get(name)

    def output_spec(self, name: str) -> TensorSpec | None:
        """The output called ``name``, if any."""
        return self._outputs_by_name.get(name)

    def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        run_options: ort.RunOptions | None = None,
        check_shapes: OutputCheck | None = None,
        stopped_by: Callable[[], GaveUp | None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Runs the model; BYTES tensors are object arrays of ``bytes`` both ways.

        The caller validates names, datatypes and shapes against :attr:`inputs` (the OIP layer
        does); ORT still rejects what does not fit, as InvalidArgument. A run whose
        ``run_options.terminate`` is set (the OIP layer sets it when the call ends early) stops
        at ORT's next check and raises Cancelled ``INFERENCE_CANCELLED``, or DeadlineExceeded
        ``INFERENCE_DEADLINE_EXCEEDED`` when ``stopped_by`` says the caller's deadline ended the
        call (the OIP layer judges it by the runtime's one rule). ``check_shapes`` is shown every output's
        shape before any output is copied out of ONNX Runtime (the OIP layer refuses there a
        response its bound cannot hold): a string output becomes a Python object per element,
        several times what ORT holds of a short one, and an output refused after that copy
        had cost it anyway. A model with a string input is run through ORT's ``run``, which
        copies its string outputs before they can be seen (ORT's Python API makes no string
        tensor of its own): for those the check comes before the ``bytes`` copy only.

        The outputs are copied out of ORT's arena, and when this returns (or raises) nothing of
        the request is left there: every region of the arena no other running request uses is
        freed (``_arena``), so a big request does not leave its memory held.
        """
        feeds: dict[str, Any] = {}
        strings_in = False
        for name, array in inputs.items():
            spec = self._inputs_by_name.get(name)
            if spec is None:
                raise InvalidArgument(f"model has no input {name!r}", reason=Reason.INPUT_UNKNOWN)
            if spec.datatype == "BYTES":
                strings_in = True
                feeds[name] = _to_ort_strings(name, array)
            else:
                feeds[name] = array
        names = list(outputs) if outputs is not None else list(self._output_names)
        run_options = run_options if run_options is not None else ort.RunOptions()
        # Hand back, at the end of the run, the arena's regions no live tensor uses (a big
        # request's intermediates), before its outputs are copied out: the copies and those
        # regions are not held together. The regions its outputs are in go when infer returns.
        run_options.add_run_config_entry(SHRINK_OPTION, SHRINK_CPU)
        # ORT's own line for a failed run (its executor's ERROR naming the node, on stderr, in
        # no log format) doubled the service's, which logs every failure once with its reason
        # and ORT's words. Only the run's logging: a session's (the model's load) stays on.
        run_options.log_severity_level = _ORT_FATAL
        results: list[Any] = []
        values: dict[str, Any] = {}
        try:
            try:
                if strings_in:
                    results = self._session.run(names, feeds, run_options)
                else:
                    # The outputs stay ONNX Runtime's tensors (in the capped arena) until checked.
                    values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in feeds.items()}
                    results = _run_with_ort_values(self._session, names, values, run_options)
            except UnicodeDecodeError:
                # ``run`` reads the string outputs as ``str`` (it has copied them out).
                raise self._output_not_text(None) from None
            except Exception as exc:
                if _ARENA_FULL.search(str(exc)):
                    raise self._out_of_memory(exc) from None
                self._refused(exc, run_options, stopped_by)
            if check_shapes is not None:
                check_shapes(
                    {
                        name: tuple(np.shape(r) if strings_in else r.shape())
                        for name, r in zip(names, results, strict=True)
                    }
                )
            return self._copied_out(names, results, strings_in=strings_in)
        finally:
            # The run's tensors lose their last references here (a refusal's traceback keeps
            # this frame), then the arena frees every region no tensor is in. ORT placed this
            # request's outputs in whatever free chunk fitted best, often inside the region a big
            # request's intermediates had left, and the next requests' tensors went there too:
            # that region, alive at each run's own shrink, stayed held (~200 MiB after one 3.2 MB
            # request).
            results, values = [], {}
            if self._give_back is not None:
                self._give_back()

    def _copied_out(
        self, names: Sequence[str], results: Sequence[Any], *, strings_in: bool
    ) -> dict[str, np.ndarray]:
        """The outputs as numpy arrays of their own, outside ORT's arena (BYTES as ``bytes``)."""
        out: dict[str, np.ndarray] = {}
        for name, value in zip(names, results, strict=True):
            try:
                array = np.asarray(value) if strings_in else value.numpy()
            except UnicodeDecodeError:
                raise self._output_not_text(name) from None
            if self._outputs_by_name[name].datatype == "BYTES":
                array = _from_ort_strings(array)
            else:
                # A numeric output, ``run``'s array or an OrtValue's, is a view of ORT's tensor
                # (``run``'s keeps the tensor alive through its base): copied, so that nothing of
                # the request stays in the arena once it returns. (A graph input returned as it
                # is also came back as the caller's own array's memory, which the view did not
                # keep alive: read after the caller dropped it, it crashed.)
                array = array.copy()
            out[name] = array
        return out

    def _output_not_text(self, output: str | None) -> FailedPrecondition:
        """The refusal of a run whose string output (``output``; None: not known) is not UTF-8.

        ONNX strings are bytes, but ONNX Runtime's Python API hands string outputs over only as
        ``str``, decoded as UTF-8, so this server can return no other: the model's (its
        publisher's) doing, whatever the request. The decode raised UnicodeDecodeError, which
        was INTERNAL and a traceback, or an ERROR line, on every request: a line within its
        caller's budget now, since any caller of the model can repeat it.
        """
        which = f"output {output!r}" if output is not None else "a string output"
        log.warning(
            "inference refused (%s): the model's %s is not UTF-8 text",
            Reason.MODEL_OUTPUT_NOT_UTF8,
            which,
            extra={
                "model": self.name,
                "version": self.version,
                "output": output,
                "reason": Reason.MODEL_OUTPUT_NOT_UTF8,
                REFUSAL_LINE: True,
            },
        )
        return FailedPrecondition(
            f"model {self.name} version {self.version} gave {which} that is not UTF-8 text: "
            "ONNX Runtime hands this server strings as text, so a BYTES output must be UTF-8; "
            "the model must be fixed and published again",
            reason=Reason.MODEL_OUTPUT_NOT_UTF8,
        )

    def _out_of_memory(self, exc: Exception) -> ResourceExhausted:
        """The refusal of a run that needed more than ONNX Runtime may hold for runs (or than
        the process could get): the caller's request, not the server's fault, so a WARNING."""
        cap = inference_memory_cap()
        log.warning(
            "inference refused (%s): it needs more memory than runs may use",
            Reason.INFERENCE_MEMORY_EXHAUSTED,
            extra={
                "model": self.name,
                "version": self.version,
                "reason": Reason.INFERENCE_MEMORY_EXHAUSTED,
                "ort_error": _run_error(exc),
                REFUSAL_LINE: True,  # the caller's request: within its budget of such lines
            },
        )
        limit = f"{INFERENCE_MEMORY_SETTING} = {cap} bytes" if cap else INFERENCE_MEMORY_SETTING
        return ResourceExhausted(
            f"the inference on {self.name} needs more memory than the server lets ONNX Runtime "
            f"hold for inference ({limit}, every request running at the moment together): "
            "send smaller inputs or retry later",
            reason=Reason.INFERENCE_MEMORY_EXHAUSTED,
        )

    def _refused(
        self,
        exc: Exception,
        run_options: ort.RunOptions,
        stopped_by: Callable[[], GaveUp | None] | None,
    ) -> NoReturn:
        """Raises what a failed run means for its caller."""
        rejected = isinstance(exc, ort_state.InvalidArgument | ort_state.Fail)
        if not rejected and not _UNPARSABLE_TEXT.search(str(exc)):
            log.error(
                "inference failed (%s)",
                Reason.INFERENCE_FAILED,
                extra={
                    "model": self.name,
                    "version": self.version,
                    "reason": Reason.INFERENCE_FAILED,
                    "ort_error": _run_error(exc),
                },
            )
            raise Internal("inference failed", reason=Reason.INFERENCE_FAILED) from None
        if run_options.terminate:
            # Which way the caller gave up: the line said only that the call had ended.
            deadline = stopped_by is not None and stopped_by() is GaveUp.DEADLINE
            reason = Reason.INFERENCE_DEADLINE_EXCEEDED if deadline else Reason.INFERENCE_CANCELLED
            log.info(
                "inference stopped: %s",
                "its caller's deadline passed" if deadline else "its call was cancelled",
                extra={
                    "model": self.name,
                    "version": self.version,
                    "reason": reason,
                    REFUSAL_LINE: True,  # its caller ended it: within its budget of such lines
                },
            )
            if deadline:
                raise DeadlineExceeded(
                    f"inference on {self.name} stopped: the caller's deadline passed",
                    reason=reason,
                ) from None
            raise Cancelled(
                f"inference on {self.name} stopped: the call was cancelled", reason=reason
            ) from None
        # Inputs that match the advertised shapes can still clash inside the graph (two
        # variable dimensions that must agree, a Reshape that does not fit, an index past a
        # Gather's table): ORT reports those as FAIL or INVALID_ARGUMENT (and text that does not
        # parse as the number a Cast asks for as RUNTIME_EXCEPTION: _UNPARSABLE_TEXT). They are the caller's,
        # not the server's, so no ERROR line per request. The caller learns which operator
        # refused, never ORT's message: it states the model's internals (a Gather's message
        # gives its table's row count, e.g. a tokenizer's vocabulary size); the log keeps it.
        log.warning(
            "inference refused its inputs (%s)",
            Reason.INFERENCE_INPUT_REJECTED,
            extra={
                "model": self.name,
                "version": self.version,
                "reason": Reason.INFERENCE_INPUT_REJECTED,
                "ort_error": _run_error(exc),
                REFUSAL_LINE: True,  # the caller's inputs: within its budget of such lines
            },
        )
        raise InvalidArgument(
            f"the model could not run on these inputs{_failed_operator(str(exc))}: their "
            "shapes or values do not fit the graph",
            reason=Reason.INFERENCE_INPUT_REJECTED,
        ) from None


def _run_with_ort_values(
    session: ort.InferenceSession,
    names: Sequence[str],
    values: Mapping[str, Any],
    run_options: ort.RunOptions,
) -> list[Any]:
    """``session.run_with_ort_values`` (the outputs ONNX Runtime's tensors), without its Python
    wrapper's cost: the wrapper walks the output vector to its end, and a pybind11 vector's end
    is a C++ exception turned into ``IndexError``, ~40 us a run (a small model's run took five
    times its 10 us, and ModelInfer's median 433 -> 578 us); the outputs are taken by index."""
    native = getattr(session, "_sess", None)
    if native is None:  # a wrapper without it: its own way
        return list(session.run_with_ort_values(list(names), dict(values), run_options))
    inputs = {name: value._get_c_value() for name, value in values.items()}
    vector = native.run_with_ort_values(inputs, list(names), run_options)
    return [vector[i] for i in range(len(names))]


def _rejected(name: str, version: str, exc: Exception) -> ModelLoadError:
    """The load failure of a model ONNX Runtime (or the graph walk) could not read, logged."""
    # ORT's message names nodes and initializers, never their values: fine for the log.
    log.error(
        "onnxruntime rejected the model",
        extra={"model": name, "version": version, "ort_error": str(exc)[:2000]},
    )
    return ModelLoadError(
        f"ONNX Runtime rejected the model ({type(exc).__name__}): {_first_line(str(exc))}",
        reason=Reason.MODEL_INVALID,
    )


def _check_graph(name: str, version: str, model: bytes, options: RuntimeOptions) -> None:
    """The load-time checks of the model's graph, both made on one walk of it (``models._graph``:
    every node of the graph, its subgraphs and its model-local functions).

    A graph with more than :attr:`RuntimeOptions.max_graph_nodes` nodes once its functions are
    inlined is refused ``MODEL_GRAPH_TOO_LARGE`` before either (the walk inlines them).
    Then the operators: a model using one of :data:`UNCAPPED_OPERATORS` is refused
    ``MODEL_OPERATOR_UNCAPPED`` (unless :attr:`RuntimeOptions.allow_uncapped_operators`), even if
    its strings would be refused too; then the strings, ``MODEL_STRING_EXPANSION`` (unless the
    model is let through by name or all are). So a model that trips both is refused for its
    operators whatever ``inference.string_expansion_models`` says, as it was when the operator
    check ran first."""
    strings = StringBounds(
        max_input_bytes=options.max_input_bytes, max_chars=options.max_inference_memory_bytes
    )
    try:
        operators = walk_model(model, strings, max_nodes=options.max_graph_nodes)
    except GraphTooLarge as exc:
        _refuse_graph_too_large(name, version, exc)
    except ValueError:
        raise ModelLoadError(
            "the model is not a serialized ONNX model", reason=Reason.MODEL_INVALID
        ) from None
    if not options.allow_uncapped_operators:
        _refuse_uncapped_operators(name, version, operators)
    if strings.problem is not None:
        _refuse_string_expansion(name, version, strings.problem, options)


def _refuse_graph_too_large(name: str, version: str, exc: GraphTooLarge) -> NoReturn:
    """Refuses a model whose graph, its functions inlined, is past the node budget: loading it
    would keep a worker (the walk's inliner, then ONNX Runtime's) busy for minutes."""
    log.warning(
        "model refused: its graph is too large once its functions are inlined",
        extra={"model": name, "version": version, "function": exc.function, "detail": str(exc)},
    )
    raise ModelLoadError(
        f"the model is too large to load: {exc}; {GRAPH_NODES_SETTING} sets the budget",
        reason=Reason.MODEL_GRAPH_TOO_LARGE,
    )


def _refuse_uncapped_operators(name: str, version: str, operators: frozenset[str]) -> None:
    """Raises ModelLoadError if the model's graph, a subgraph (``If``, ``Loop``, ``Scan``) or a
    model-local function uses one of :data:`UNCAPPED_OPERATORS` (``operators``: every operator
    it uses, ``models._graph.operator_name``): a request could otherwise make it allocate several times
    ``max_inference_memory_bytes`` outside the arena and the VM kill the service."""
    found = sorted(operators & UNCAPPED_OPERATORS)
    if not found:
        return
    log.warning(
        "model refused: it uses operators that allocate outside the inference memory cap",
        extra={"model": name, "version": version, "operators": found},
    )
    raise ModelLoadError(
        f"the model uses {', '.join(found)}, whose ONNX Runtime kernels allocate a multiple of "
        "their input outside inference.max_inference_memory_bytes (a request could size it and "
        f"exhaust the VM's memory); {UNCAPPED_OPERATORS_SETTING} lets such models load",
        reason=Reason.MODEL_OPERATOR_UNCAPPED,
    )


def _refuse_string_expansion(
    name: str, version: str, problem: str, options: RuntimeOptions
) -> None:
    """Refuses a model that could make runs hold string characters the arena does not count
    (``problem``, models._strings), unless the configuration lets it through."""
    if options.allows_string_expansion(name):
        log.warning(
            "model loaded though its strings escape the inference memory cap (allowed)",
            extra={"model": name, "version": version, "detail": problem},
        )
        return
    log.warning(
        "model refused: its strings escape the inference memory cap",
        extra={"model": name, "version": version, "detail": problem},
    )
    raise ModelLoadError(
        f"the model could make ONNX Runtime hold string characters outside "
        f"{INFERENCE_MEMORY_SETTING}: {problem}; a model trusted with that is named in "
        f"{STRING_EXPANSION_SETTINGS}",
        reason=Reason.MODEL_STRING_EXPANSION,
    )


def _spec(arg: Any, kind: str) -> TensorSpec:
    datatype = BY_ORT_TYPE.get(arg.type)
    if datatype is None:
        raise ModelLoadError(
            f"model {kind} {arg.name!r} has type {arg.type}, which OIP cannot carry",
            reason=Reason.MODEL_UNSUPPORTED_DATATYPE,
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, datatype.name, shape)


def _to_ort_strings(name: str, array: np.ndarray) -> np.ndarray:
    # ORT's Python binding stringifies bytes objects (b'..') instead of passing them through, so
    # BYTES must be valid UTF-8 text to reach a string tensor intact.
    out = np.empty(array.shape, dtype=object)
    flat_in = array.reshape(-1)
    flat_out = out.reshape(-1)
    for i, item in enumerate(flat_in):
        if isinstance(item, str):
            flat_out[i] = item
            continue
        try:
            flat_out[i] = bytes(item).decode("utf-8")
        except (UnicodeDecodeError, TypeError):
            raise InvalidArgument(
                f"input {name!r} element {i} is not UTF-8; this model's string tensors need text",
                reason=Reason.BYTES_NOT_UTF8,
            ) from None
    return out


def _from_ort_strings(array: np.ndarray) -> np.ndarray:
    out = np.empty(array.shape, dtype=object)
    flat_out = out.reshape(-1)
    for i, item in enumerate(array.reshape(-1)):
        flat_out[i] = item.encode("utf-8") if isinstance(item, str) else bytes(item)
    return out


def _run_error(exc: Exception) -> str:
    """ORT's message about a failed run, for the log, with every number outside the node's name
    masked: ORT puts the request's own values in it (a Gather's "idx=987654321", a token id; a
    Reshape's requested shape, read from an input; the bytes a value-sized tensor asked for),
    and what a client sent the confidential VM is not the log's to carry. The operator, the
    node, ORT's check and status code stay."""
    text = str(exc)[:2000]
    parts: list[str] = []
    last = 0
    for name in _NODE_NAME.finditer(text):
        parts.append(_NUMBER.sub("#", text[last : name.start()]))
        parts.append(name.group(0))
        last = name.end()
    parts.append(_NUMBER.sub("#", text[last:]))
    return "".join(parts)


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no detail"
    # A node's name is the model's (often its layer path): not the caller's to read.
    return _NODE_NAME.sub("", line)[:limit]


def _failed_operator(text: str) -> str:
    match = _FAILED_OPERATOR.search(text)
    return f" (its {match.group(1)} operator failed)" if match else ""


_ORT_FATAL = 4
"""ONNX Runtime's log severity FATAL: the run logs nothing short of a crash."""
_NODE_NAME = re.compile(r" ?Name:'[^']*'")
# A number not part of a word (int64, float16 and file names keep theirs).
_NUMBER = re.compile(r"(?<![A-Za-z_])\d+")
# A Cast of a string tensor to a number whose text does not parse (or overflows): ORT reports
# the C++ library's std::sto* exception, RUNTIME_EXCEPTION "... Status Message: stod", the
# request's doing, not the server's (it was INTERNAL and an ERROR line per request).
_UNPARSABLE_TEXT = re.compile(
    r"while running Cast node\..*Status Message: sto(?:i|l|ll|ul|ull|f|d|ld)\s*$"
)
_FAILED_OPERATOR = re.compile(r"while running ([A-Za-z0-9_]{1,64}) node")

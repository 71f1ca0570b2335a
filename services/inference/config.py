"""The inference service's own configuration section (``inference:``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar, Literal

from strongroom.artifact import DEFAULT_DECRYPT_THREADS
from strongroom.client.keypins import KeyPins
from strongroom.identifiers import KEY_ID_PATTERN, is_sha256_hex, name_rule_problem
from strongroom.inference.models import (
    DEFAULT_MAX_GRAPH_NODES,
    DEFAULT_MAX_INFERENCE_MEMORY_BYTES,
    MIN_INFERENCE_MEMORY_BYTES,
    RuntimeOptions,
)
from strongroom.inference.oip import (
    DEFAULT_MAX_RESPONSE_MEMORY_BYTES,
    DEFAULT_MAX_TENSOR_BYTES,
    DEFAULT_RESPONSE_MEMORY_WAIT_SECONDS,
    MAX_RESPONSE_MEMORY_WAIT_SECONDS,
    MIN_RESPONSE_MEMORY_BYTES,
    InferLimits,
    ResponseBudget,
)
from strongroom.runtime.config import ConfigError, EnvLocks, ModelNameRules, expected_server_id


@dataclass(frozen=True)
class ModelRef:
    """A model version to load at start-up; ``header_sha256`` (hex, optional) pins its artifact
    (see ``ModelLoader.load``)."""

    name: str
    version: str
    header_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.header_sha256 is not None and not is_sha256_hex(self.header_sha256):
            raise ConfigError(
                f"inference.models: header_sha256 of {self.name}/{self.version} must be 64 "
                "lower-case hexadecimal digits"
            )

    @property
    def pin(self) -> bytes | None:
        """``header_sha256`` as bytes (None: not pinned)."""
        return None if self.header_sha256 is None else bytes.fromhex(self.header_sha256)


@dataclass(frozen=True)
class ModelKeys:
    """A key-encryption key, and the model names (rules: a name, or ``name/`` for everything
    under it) whose artifacts may be wrapped under it."""

    key_id: str
    model_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not KEY_ID_PATTERN.fullmatch(self.key_id):
            raise ConfigError(f"inference.model_keys: {self.key_id!r} is not a key id")
        if not self.model_names:
            raise ConfigError(f"inference.model_keys: {self.key_id!r} lists no model_names")
        problem = name_rule_problem(self.model_names)
        if problem:
            raise ConfigError(f"inference.model_keys: {problem}")


@dataclass(frozen=True)
class ClientScope(ModelNameRules):
    """A client identity and the model names it may use over OIP (infer, metadata, readiness)."""

    where: ClassVar[str] = "inference.clients"


DEFAULT_MAX_MODEL_BYTES = 64 * 1024**3


@dataclass(frozen=True)
class InferenceConfig:
    """Where the store and broker are, which models to load, and how to attest.

    ``attester`` is ``auto`` in production (configfs-tsm, then the legacy guest devices). The
    simulated TEE (``simulated``) exists for development only and is refused in production mode;
    it then needs ``simulated_tee_dir`` and ``simulated_measurement`` (or ``simulated_mrtd``).
    """

    # How inference proves itself and which peers and models it trusts are never a STRONGROOM__
    # environment override in production (strongroom.runtime.config), except the safe settings:
    # a hardware attester, and requiring model signatures.
    ENV_LOCKED_IN_PRODUCTION: ClassVar[EnvLocks] = {
        "attester": ("auto", "configfs-tsm", "sev-guest", "tdx-guest"),
        "model_store_spiffe_id": (),
        "key_broker_spiffe_id": (),
        "model_signing_public_key": (),
        "require_model_signature": (True,),
        "accept_unbound_artifacts": (False,),
        "allow_uncapped_operators": (False,),
        "model_keys": (),
        "release_signing_public_keys": (),
        "allow_unsigned_releases": (False,),
        "clients": (),
        "string_expansion_models": (),
        "allow_string_expansion": (False,),
    }

    model_store: str
    key_broker: str
    models: tuple[ModelRef, ...] = ()
    model_store_server_name: str = "modelstore"
    key_broker_server_name: str = "keybroker"
    # The SPIFFE IDs the store and the broker must present (default spiffe://<our domain>/<name>).
    model_store_spiffe_id: str | None = None
    key_broker_spiffe_id: str | None = None
    attester: Literal["auto", "configfs-tsm", "sev-guest", "tdx-guest", "simulated"] = "auto"
    # SEV-SNP: the VMPL (0-3) reports are requested at, for a guest that runs above VMPL 0 (under
    # an SVSM or paravisor, whose kernel refuses a lower one); None leaves the kernel's default.
    # The broker's policy decides which VMPL it accepts (POLICY.md).
    attester_privlevel: int | None = None
    simulated_tee_dir: Path | None = None
    simulated_tee_type: Literal["SEV_SNP", "TDX"] = "SEV_SNP"
    simulated_measurement: str | None = None
    simulated_policy: int | None = None
    # Workers decrypting a download; 0 (the default) decrypts on the receiving thread, which is
    # faster while the AEAD holds the interpreter lock (strongroom.artifact.stream).
    decrypt_threads: int = DEFAULT_DECRYPT_THREADS
    load_timeout_seconds: float = 600.0
    # How long LoadModel keeps retrying a load that fails with UNAVAILABLE (a store or broker
    # restarting); 0 answers the first UNAVAILABLE. The caller's own deadline still wins.
    load_retry_seconds: float = 30.0
    # A configured model whose load failed for a reason that is not transient (a release the
    # broker's policy denies, the model not yet published, a peer's certificate outside its
    # dates, ...) is tried again after this many seconds, the wait doubling on each failure up
    # to failed_load_retry_max_seconds (strongroom.inference.autoload); 0 leaves such a failure
    # to an operator's LoadModel. At least 5: every replica of the fleet shares one identity,
    # whose denied releases the broker records within a budget (1 a second per reason).
    failed_load_retry_seconds: float = 30.0
    failed_load_retry_max_seconds: float = 300.0
    # The largest model a load accepts (a single artifact, or all parts of a multi-part model
    # together), judged on its header or manifest before the key is released or a plaintext buffer
    # reserved (the store chooses both): a larger one is RESOURCE_EXHAUSTED ARTIFACT_TOO_LARGE.
    # The model store's default limit.
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
    # Bounds on the tensor bytes of one ModelInfer request and response; the server's gRPC
    # message limits are derived from them (nowhere else sets them).
    max_input_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    max_output_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    # What ONNX Runtime may hold for inference runs (inputs it copies, intermediates, outputs until
    # they are sent), every model's running requests together: a run that would need more is
    # RESOURCE_EXHAUSTED INFERENCE_MEMORY_EXHAUSTED, not the VM out of memory. A model's output
    # size can come from an input's *value* (ConstantOfShape, Expand, Tile, Range), which no
    # bound on the request's bytes limits. Keep it below the VM's memory less the models' own.
    max_inference_memory_bytes: int = DEFAULT_MAX_INFERENCE_MEMORY_BYTES
    # What responses may hold outside that cap while they are built and sent, all requests
    # together (their outputs copied out, the message, its serialised copies: 5 times a raw
    # response's size, up to 8 times a typed one's; strongroom.inference.oip._budget). A request past
    # it waits, first come first served, up to response_memory_wait_seconds for earlier ones to
    # be sent, then is RESOURCE_EXHAUSTED RESPONSE_MEMORY_BUSY; one larger than a caller's share is
    # RESPONSE_TOO_LARGE at once. One caller (SPIFFE ID) holds half of it at most
    # (TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY past it), one of its certificates half of that (its
    # first response alone may hold more; TOO_MUCH_RESPONSE_MEMORY_PER_CERTIFICATE), a request past either waiting
    # as long for its own earlier responses first, its run's outputs kept in the arena meanwhile
    # (an identity's waiting calls an eighth of max_inference_memory_bytes at most, a
    # certificate's half that; past it refused at once): a client that never reads its
    # responses keeps them until the stream settings' bound cancels them (strongroom.runtime.
    # unsent). Keep the VM's memory above the models + both + ~0.5 GiB.
    max_response_memory_bytes: int = DEFAULT_MAX_RESPONSE_MEMORY_BYTES
    response_memory_wait_seconds: float = DEFAULT_RESPONSE_MEMORY_WAIT_SECONDS
    # Whether models may use operators whose kernels allocate a multiple of their input outside
    # that cap (NonZero, Unique: models.UNCAPPED_OPERATORS); refused at load otherwise
    # (MODEL_OPERATOR_UNCAPPED). Only for models whose such inputs no request can size.
    allow_uncapped_operators: bool = False
    # The characters of strings longer than 15 bytes are outside that cap: a model that could
    # repeat one by a runtime value (Expand, Tile, Gather, Where, a Loop's outputs, ...), or whose
    # string values could together outgrow the cap, is refused at load (FAILED_PRECONDITION
    # MODEL_STRING_EXPANSION) unless named here (a model name, or ``name/`` for everything under
    # it) or allowed for every model: then its requests can hold memory nothing bounds.
    string_expansion_models: tuple[str, ...] = ()
    allow_string_expansion: bool = False
    # The most nodes a model's graph may have once its model-local functions are inlined (and
    # its subgraphs counted): a model is refused at load past it (FAILED_PRECONDITION
    # MODEL_GRAPH_TOO_LARGE), before ONNX Runtime reads it. Functions calling functions several
    # times each inline to a number of nodes exponential in their depth: a model of a few
    # kilobytes kept a loading worker busy for minutes. Real models have 10^2-10^4 nodes.
    max_graph_nodes: int = DEFAULT_MAX_GRAPH_NODES
    # OpenSSF model signing: the EC public key (PEM) models must be signed with, and whether an
    # unsigned model may load at all.
    model_signing_public_key: Path | None = None
    require_model_signature: bool = False
    # Artifacts of formats 1 and 2, whose data key is not bound to its model (whoever ever held a
    # data key of the KEK could have written them for any name): refused unless this is set, for
    # the time it takes to re-publish them as format 3.
    accept_unbound_artifacts: bool = False
    # Which KEK each model may be wrapped under (empty: any key the broker releases to us). When
    # set, a model whose name no entry covers, or stored under another key, is refused before a
    # key is requested: the store chooses the artifact, and with it the key it names.
    model_keys: tuple[ModelKeys, ...] = ()
    # The key broker's release-signing public keys (PEM files, each one or more Ed25519 keys;
    # list the old and the new while the broker's key is rotated). Every release answer must be
    # signed by one of them over its request, or the load fails before anything is decrypted.
    # Required: without it the service refuses to start (RELEASE_SIGNING_KEY_MISSING). A key
    # given as a certificate is trusted only within the certificate's validity (a bare public key
    # until it is removed): strongroom.attestation.release_keys.
    release_signing_public_keys: tuple[Path, ...] = ()
    # A trusted key whose certificate ends within this many seconds (or has ended) is warned of
    # at start, and, while answers signed with it are verified, once a day.
    release_signing_key_warning_seconds: float = 30 * 86400.0
    # Development only (refused in production): accept an answer that carries no signature at all
    # (a broker older than release signing), and, when no key is set, a signed one unverified.
    # A signed answer is still verified when keys are set.
    allow_unsigned_releases: bool = False
    # Which models each client identity may use over OIP (ModelInfer, ModelMetadata, ModelReady).
    # Absent (None): every identity with the client role uses every model served, as before the
    # list existed; a list (even an empty one) admits only the identities it names, each to its
    # names. Admins are not scoped by it.
    clients: tuple[ClientScope, ...] | None = None

    def __post_init__(self) -> None:
        listed: set[tuple[str, str]] = set()
        for ref in self.models:
            # Each listing is loaded, and retried, on its own: twice the downloads and key
            # releases, and a pin that another listing of the version without one bypasses.
            if (ref.name, ref.version) in listed:
                raise ConfigError(f"inference.models: {ref.name}/{ref.version} is listed twice")
            listed.add((ref.name, ref.version))
        if self.clients is not None:
            seen: set[str] = set()
            for scope in self.clients:
                if scope.spiffe_id in seen:
                    raise ConfigError(f"inference.clients: {scope.spiffe_id!r} is listed twice")
                seen.add(scope.spiffe_id)
        if self.attester == "simulated":
            if self.simulated_tee_dir is None or self.simulated_measurement is None:
                raise ConfigError(
                    "inference.attester simulated needs simulated_tee_dir and simulated_measurement"
                )
            try:
                if len(bytes.fromhex(self.simulated_measurement)) != 48:
                    raise ValueError
            except ValueError:
                raise ConfigError(
                    "inference.simulated_measurement must be 96 hex characters"
                ) from None
        if self.attester_privlevel is not None and not 0 <= self.attester_privlevel <= 3:
            raise ConfigError(
                f"inference.attester_privlevel must be between 0 and 3 (a VMPL), got "
                f"{self.attester_privlevel}"
            )
        if self.require_model_signature and self.model_signing_public_key is None:
            raise ConfigError("inference.require_model_signature needs model_signing_public_key")
        if not 0 <= self.release_signing_key_warning_seconds <= 366 * 86400:
            raise ConfigError(
                "inference.release_signing_key_warning_seconds must be between 0 and 31622400"
            )
        if not 0 <= self.load_retry_seconds <= 3600:
            raise ConfigError("inference.load_retry_seconds must be between 0 and 3600")
        if self.failed_load_retry_seconds != 0 and not 5 <= self.failed_load_retry_seconds <= 3600:
            raise ConfigError("inference.failed_load_retry_seconds must be 0 or between 5 and 3600")
        if (
            not max(self.failed_load_retry_seconds, 5)
            <= self.failed_load_retry_max_seconds
            <= 86400
        ):
            raise ConfigError(
                "inference.failed_load_retry_max_seconds must be between "
                "failed_load_retry_seconds (at least 5) and 86400"
            )
        if self.max_model_bytes < 1024:
            raise ConfigError("inference.max_model_bytes must be at least 1024")
        if self.max_graph_nodes < 1:
            raise ConfigError("inference.max_graph_nodes must be at least 1")
        if self.max_inference_memory_bytes < MIN_INFERENCE_MEMORY_BYTES:
            raise ConfigError(
                f"inference.max_inference_memory_bytes must be at least {MIN_INFERENCE_MEMORY_BYTES}"
            )
        if self.max_response_memory_bytes < MIN_RESPONSE_MEMORY_BYTES:
            raise ConfigError(
                f"inference.max_response_memory_bytes must be at least {MIN_RESPONSE_MEMORY_BYTES}"
            )
        if not 0 <= self.response_memory_wait_seconds <= MAX_RESPONSE_MEMORY_WAIT_SECONDS:
            raise ConfigError(
                "inference.response_memory_wait_seconds must be between 0 and "
                f"{MAX_RESPONSE_MEMORY_WAIT_SECONDS:g}"
            )
        problem = name_rule_problem(self.string_expansion_models)
        if problem:
            raise ConfigError(f"inference.string_expansion_models: {problem}")
        if not 0 <= self.decrypt_threads <= 64:
            raise ConfigError("inference.decrypt_threads must be between 0 and 64")
        try:
            self.limits  # noqa: B018 - validates the tensor bounds
        except ValueError as exc:
            raise ConfigError(f"inference.{exc}") from None

    def server_ids(self, trust_domain: str) -> tuple[str, str]:
        """The SPIFFE IDs the model store and the key broker must present."""
        return (
            expected_server_id(
                trust_domain, "modelstore", self.model_store_spiffe_id, where="inference"
            ),
            expected_server_id(
                trust_domain, "keybroker", self.key_broker_spiffe_id, where="inference"
            ),
        )

    @property
    def key_pins(self) -> KeyPins:
        """``model_keys`` as the loader checks them."""
        return KeyPins(tuple((n, m.key_id) for m in self.model_keys for n in m.model_names))

    @property
    def client_scopes(self) -> Mapping[str, tuple[str, ...]] | None:
        """``clients`` as the OIP servicer checks them: SPIFFE ID -> name rules (None: no list)."""
        if self.clients is None:
            return None
        return MappingProxyType({c.spiffe_id: c.model_names for c in self.clients})

    @property
    def runtime(self) -> RuntimeOptions:
        """The ONNX Runtime settings of every session the service makes."""
        return RuntimeOptions(
            max_inference_memory_bytes=self.max_inference_memory_bytes,
            allow_uncapped_operators=self.allow_uncapped_operators,
            max_input_bytes=self.max_input_bytes,
            string_expansion_models=self.string_expansion_models,
            allow_string_expansion=self.allow_string_expansion,
            max_graph_nodes=self.max_graph_nodes,
        )

    def response_budget(self) -> ResponseBudget:
        """A new budget of response memory of these settings (the server makes one)."""
        return ResponseBudget(
            self.max_response_memory_bytes,
            self.response_memory_wait_seconds,
            arena_bytes=self.max_inference_memory_bytes,
        )

    @property
    def limits(self) -> InferLimits:
        """The request limits these settings give (and the server's message sizes with them)."""
        return InferLimits(
            max_input_bytes=self.max_input_bytes, max_output_bytes=self.max_output_bytes
        )

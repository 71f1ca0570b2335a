"""gRPC adapters for the key broker: protobuf in, domain calls, protobuf out, nothing else."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from strongroom.api.keybroker.v1 import keybroker_pb2 as pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from strongroom.attestation import Evidence
from strongroom.errors import Cancelled, DeadlineExceeded, InvalidArgument, StrongroomError
from strongroom.identifiers import KEY_ID_PATTERN
from strongroom.keybroker.keys import KeyInfo, KeyManager, KeyState
from strongroom.keybroker.lifecycle import KeyService
from strongroom.keybroker.release import Caller, ReleaseEngine, ReleaseRequest
from strongroom.oaep import OaepHash
from strongroom.pki.authz import verified_caller
from strongroom.reasons import Reason
from strongroom.runtime.gave_up import GaveUp, gave_up_on
from strongroom.runtime.server import MessageLimits

KEYBROKER_SERVICE = "strongroom.api.keybroker.v1.KeyBrokerService"
KEYADMIN_SERVICE = "strongroom.api.keybroker.v1.KeyAdminService"
RELEASE_KEY = f"/{KEYBROKER_SERVICE}/ReleaseKey"

MESSAGE_LIMITS = MessageLimits(receive=256 * 1024, send=256 * 1024)
"""The broker's message sizes. Its largest legitimate messages are a few tens of KiB: a
ReleaseKeyRequest with a TDX quote or SNP report, its certificate chain and collateral (CRLs,
TCB info, QE identity), and a policy document (at most ``MAX_POLICY_BYTES``, 64 KiB). A peer whose
RPC will be refused anyway can make the broker buffer at most this much per call."""

# Who may call what (roles are mapped to SPIFFE IDs by the service configuration).
ROLE_RULES: dict[str, tuple[str, ...]] = {
    f"/{KEYBROKER_SERVICE}/GetChallenge": ("inference",),
    RELEASE_KEY: ("inference",),
    f"/{KEYBROKER_SERVICE}/GenerateDataKey": ("publisher",),
    f"/{KEYBROKER_SERVICE}/ReWrap": ("publisher", "admin"),
    KEYADMIN_SERVICE: ("admin",),
}

CONTROL_PLANE: tuple[str, ...] = (KEYADMIN_SERVICE,)
"""The broker's control plane: key administration and release policies (the admin role's), which
may use the workers reserved from releases, data keys and re-wraps
(``server.control_plane_workers``), so that an operator can still disable a key while the fleet's
releases hold every other worker."""

DEFAULT_LIST_KEYS_PAGE = 500
MAX_LIST_KEYS_PAGE = 1000
LIST_KEYS_PAGE_BYTES = 192 * 1024
"""A ListKeys page ends before its keys pass this size: one answer listing every key failed at the
broker's 256 KiB send limit from about 4,000 keys (or fewer, with many versions each) on."""


def _page_size(requested: int) -> int:
    if requested == 0:
        return DEFAULT_LIST_KEYS_PAGE
    if not 1 <= requested <= MAX_LIST_KEYS_PAGE:
        raise InvalidArgument(
            f"page_size must be between 1 and {MAX_LIST_KEYS_PAGE} (0: {DEFAULT_LIST_KEYS_PAGE})",
            reason=Reason.INVALID_PAGE_SIZE,
        )
    return requested


def _page_after(token: str) -> str:
    """The key id a page starts after: the previous page's last (key ids are no secret to the
    admins who may list them)."""
    if token and not KEY_ID_PATTERN.fullmatch(token):
        raise InvalidArgument("page_token is not a valid token", reason=Reason.INVALID_PAGE_TOKEN)
    return token


_STATE = {KeyState.ENABLED: pb.KEY_STATE_ENABLED, KeyState.DISABLED: pb.KEY_STATE_DISABLED}


def _caller(context: grpc.ServicerContext) -> Caller:
    ident = verified_caller(context)
    return Caller(str(ident.spiffe_id), ident.serial, ident.public_key_der)


def _still_waited_for(context: grpc.ServicerContext) -> Callable[[], None]:
    """A check that the call is still waited for: DeadlineExceeded once its caller's deadline has
    passed, Cancelled once its caller cancelled it (or it ended otherwise), as the runtime's rule
    tells them apart (:func:`~strongroom.runtime.gave_up.gave_up`). A change made after its
    caller gave up went live while the caller had heard it failed."""

    def check() -> None:
        why = gave_up_on(context)
        if why is GaveUp.DEADLINE:
            raise DeadlineExceeded(
                "the call's deadline passed before the policy could be written (the policy "
                "directory's lock was held): nothing was stored; retry with a longer deadline"
            )
        if why is GaveUp.CANCELLED:
            raise Cancelled(
                "the call was cancelled before the policy could be written: nothing was stored"
            )

    return check


def _timestamp(when: datetime | float) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when if isinstance(when, datetime) else datetime.fromtimestamp(when, UTC))
    return ts


def _accepted(mechanisms: list[pb.WrapMechanism.ValueType]) -> list[OaepHash]:
    return [OaepHash.from_mechanism(m) for m in mechanisms]


def key_info_proto(info: KeyInfo, policy_version: str) -> pb.KeyInfo:
    """Converts a domain :class:`KeyInfo`."""
    return pb.KeyInfo(
        key_id=info.key_id,
        current_version=info.current_version,
        versions=[
            pb.KeyVersion(
                version=v.version, state=_STATE[v.state], created_at=_timestamp(v.created_at)
            )
            for v in info.versions
        ],
        policy_version=policy_version,
    )


class KeyBrokerServicer(pb_grpc.KeyBrokerServiceServicer):
    """Challenges and releases for inference servers; data keys for publishers."""

    def __init__(self, engine: ReleaseEngine, keys: KeyManager, service: KeyService) -> None:
        self._engine = engine
        self._keys = keys
        self._service = service

    def GetChallenge(
        self, request: pb.GetChallengeRequest, context: grpc.ServicerContext
    ) -> pb.GetChallengeResponse:
        challenge = self._engine.challenge(request.key_id, _caller(context))
        return pb.GetChallengeResponse(
            nonce=challenge.nonce, expires_at=_timestamp(challenge.expires_at)
        )

    def ReleaseKey(
        self, request: pb.ReleaseKeyRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseKeyResponse:
        caller = _caller(context)
        try:
            evidence = Evidence.from_proto(request.evidence)
            accepted = _accepted(list(request.accepted_mechanisms))
        except Exception as exc:  # every refusal is audited, whatever raised it
            self._engine.deny(exc, caller, key_id=request.key_id, report=request.evidence.report)
            raise
        outcome = self._engine.release(
            ReleaseRequest(
                key_id=request.key_id,
                key_version=request.key_version,
                wrapped_data_key=request.wrapped_data_key,
                evidence=evidence,
                ephemeral_public_key_der=request.ephemeral_public_key,
                nonce=request.nonce,
                accepted_mechanisms=accepted,
            ),
            caller,
        )
        return pb.ReleaseKeyResponse(
            wrapped_data_key=outcome.wrapped_data_key,
            mechanism=pb.WrapMechanism.ValueType(outcome.mechanism.mechanism),
            decision_id=outcome.decision_id,
            policy_version=outcome.policy_version,
            release_signature=outcome.signature,
            release_signing_key_id=outcome.signing_key_id,
        )

    def release_refused_unread(
        self, exc: StrongroomError, context: grpc.ServicerContext, bucket: str
    ) -> None:
        """Audits a ReleaseKey refused before this servicer ran (the runtime's refusal observer):
        an identity without the inference role, a caller with too many calls running at once
        (``server.max_unary_calls_per_identity``) or too many data-plane workers held, calls,
        streams and health waits together (``server.max_data_plane_workers_per_identity``),
        every data-plane worker busy (``DATA_PLANE_WORKERS_BUSY``), a request that does not
        decode. Every refusal of a release is audited, and these were only logged: an inference identity could send
        any number of undecodable attempts the audit log never saw. ``bucket`` is whose budget
        of such records it counts against, by the runtime's rule (every role-less caller in one).
        The caller is the one the authoriser verified when it admitted the call (a certificate
        that expired since, while the call waited for its message, still names it)."""
        try:
            ident = verified_caller(context)
            caller: Caller | None = Caller(str(ident.spiffe_id), ident.serial, ident.public_key_der)
        except StrongroomError:  # no usable certificate: the record says so by naming no one
            caller = None
        self._engine.deny_unread(exc, caller, bucket)

    def GenerateDataKey(
        self, request: pb.GenerateDataKeyRequest, context: grpc.ServicerContext
    ) -> pb.GenerateDataKeyResponse:
        data_key = self._service.generate_data_key(
            _caller(context), request.key_id, request.model_name, request.model_version
        )
        try:
            return pb.GenerateDataKeyResponse(
                data_key=bytes(data_key.dek),
                wrapped_data_key=data_key.wrapped,
                key_version=data_key.version,
                mechanism=pb.WRAP_MECHANISM_AES_KEY_WRAP_PAD,
                bound_model_name=request.model_name,
                bound_model_version=request.model_version,
            )
        finally:
            data_key.wipe()

    def ReWrap(self, request: pb.ReWrapRequest, context: grpc.ServicerContext) -> pb.ReWrapResponse:
        rewrapped = self._service.rewrap(
            _caller(context), request.key_id, request.key_version, request.wrapped_data_key
        )
        return pb.ReWrapResponse(wrapped_data_key=rewrapped.wrapped, key_version=rewrapped.version)


class KeyAdminServicer(pb_grpc.KeyAdminServiceServicer):
    """Key lifecycle and release policies, for the admin identity."""

    def __init__(self, service: KeyService) -> None:
        self._service = service

    def _info(self, info: KeyInfo) -> pb.KeyInfo:
        return key_info_proto(info, self._service.policy_version(info.key_id))

    def CreateKey(
        self, request: pb.CreateKeyRequest, context: grpc.ServicerContext
    ) -> pb.CreateKeyResponse:
        info = self._service.create_key(_caller(context), request.key_id)
        return pb.CreateKeyResponse(key=self._info(info))

    def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.ServicerContext
    ) -> pb.ListKeysResponse:
        page_size = _page_size(request.page_size)
        after = _page_after(request.page_token)
        infos = sorted(
            (i for i in self._service.list_keys() if i.key_id > after), key=lambda i: i.key_id
        )
        response = pb.ListKeysResponse()
        size = 0
        for info in infos[:page_size]:
            key = self._info(info)
            # Field tag, length prefix and the message: what it adds to the response's encoding.
            size += key.ByteSize() + 8
            if response.keys and size > LIST_KEYS_PAGE_BYTES:
                break
            response.keys.append(key)
        if len(response.keys) < len(infos):
            response.next_page_token = response.keys[-1].key_id
        return response

    def RotateKey(
        self, request: pb.RotateKeyRequest, context: grpc.ServicerContext
    ) -> pb.RotateKeyResponse:
        info = self._service.rotate_key(_caller(context), request.key_id)
        return pb.RotateKeyResponse(key=self._info(info))

    def DisableKey(
        self, request: pb.DisableKeyRequest, context: grpc.ServicerContext
    ) -> pb.DisableKeyResponse:
        version = request.version or None
        info = self._service.disable_key(_caller(context), request.key_id, version)
        return pb.DisableKeyResponse(key=self._info(info))

    def SetReleasePolicy(
        self, request: pb.SetReleasePolicyRequest, context: grpc.ServicerContext
    ) -> pb.SetReleasePolicyResponse:
        stored = self._service.set_policy(
            _caller(context),
            request.key_id,
            request.policy_document,
            # Present (even ""): a compare-and-swap; "" expects the key to have no policy yet.
            expected_version=request.expected_policy_version
            if request.HasField("expected_policy_version")
            else None,
            still_wanted=_still_waited_for(context),
        )
        return pb.SetReleasePolicyResponse(policy_version=stored.policy.version)

    def GetReleasePolicy(
        self, request: pb.GetReleasePolicyRequest, context: grpc.ServicerContext
    ) -> pb.GetReleasePolicyResponse:
        stored = self._service.get_policy(request.key_id)
        return pb.GetReleasePolicyResponse(
            policy_document=stored.document, policy_version=stored.policy.version
        )

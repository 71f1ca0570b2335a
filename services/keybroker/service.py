"""gRPC adapters for the key broker: protobuf in, domain calls, protobuf out, nothing else."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from strongroom.api.keybroker.v1 import keybroker_pb2 as pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from strongroom.attestation import Evidence
from strongroom.errors import StrongroomError
from strongroom.keybroker.audit import AuditEvent, AuditLog, Decision
from strongroom.keybroker.keys import KeyInfo, KeyManager, KeyState
from strongroom.keybroker.policies import PolicyStore
from strongroom.keybroker.release import Caller, ReleaseEngine, ReleaseRequest
from strongroom.oaep import OaepHash
from strongroom.pki.authz import caller_identity
from strongroom.runtime.metrics import DATA_KEYS_REWRAPPED

KEYBROKER_SERVICE = "strongroom.api.keybroker.v1.KeyBrokerService"
KEYADMIN_SERVICE = "strongroom.api.keybroker.v1.KeyAdminService"

# Who may call what (roles are mapped to SPIFFE IDs by the service configuration).
ROLE_RULES: dict[str, tuple[str, ...]] = {
    f"/{KEYBROKER_SERVICE}/GetChallenge": ("inference",),
    f"/{KEYBROKER_SERVICE}/ReleaseKey": ("inference",),
    f"/{KEYBROKER_SERVICE}/GenerateDataKey": ("publisher",),
    f"/{KEYBROKER_SERVICE}/ReWrap": ("publisher", "admin"),
    KEYADMIN_SERVICE: ("admin",),
}

_STATE = {KeyState.ENABLED: pb.KEY_STATE_ENABLED, KeyState.DISABLED: pb.KEY_STATE_DISABLED}


def _caller(context: grpc.ServicerContext) -> Caller:
    ident = caller_identity(context)
    return Caller(str(ident.spiffe_id), ident.serial, ident.public_key_der)


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

    def __init__(self, engine: ReleaseEngine, keys: KeyManager, audit: AuditLog) -> None:
        self._engine = engine
        self._keys = keys
        self._audit = audit

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
        except StrongroomError as exc:
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
        )

    def GenerateDataKey(
        self, request: pb.GenerateDataKeyRequest, context: grpc.ServicerContext
    ) -> pb.GenerateDataKeyResponse:
        caller = _caller(context)
        data_key = self._keys.generate_data_key(request.key_id)
        try:
            self._audit.append(
                AuditEvent(
                    decision=Decision.ALLOWED,
                    reason="DATA_KEY_GENERATED",
                    action="generate_data_key",
                    caller_spiffe_id=caller.spiffe_id,
                    caller_cert_serial=f"{caller.serial:x}",
                    key_id=data_key.key_id,
                    key_version=data_key.version,
                )
            )
            return pb.GenerateDataKeyResponse(
                data_key=bytes(data_key.dek),
                wrapped_data_key=data_key.wrapped,
                key_version=data_key.version,
                mechanism=pb.WRAP_MECHANISM_AES_KEY_WRAP_PAD,
            )
        finally:
            data_key.wipe()

    def ReWrap(self, request: pb.ReWrapRequest, context: grpc.ServicerContext) -> pb.ReWrapResponse:
        caller = _caller(context)
        try:
            rewrapped = self._keys.rewrap(
                request.key_id, request.key_version, request.wrapped_data_key
            )
        except StrongroomError as exc:
            # Refusals are audited too: a burst of failed unwraps is what a forged slot looks like.
            self._audit_rewrap(caller, request, Decision.DENIED, exc.reason, None)
            DATA_KEYS_REWRAPPED.add(1, {"key_id": request.key_id, "outcome": exc.reason})
            raise
        self._audit_rewrap(
            caller, request, Decision.ALLOWED, "DATA_KEY_REWRAPPED", rewrapped.version
        )
        DATA_KEYS_REWRAPPED.add(1, {"key_id": request.key_id, "outcome": "rewrapped"})
        return pb.ReWrapResponse(wrapped_data_key=rewrapped.wrapped, key_version=rewrapped.version)

    def _audit_rewrap(
        self,
        caller: Caller,
        request: pb.ReWrapRequest,
        decision: Decision,
        reason: str,
        to_version: int | None,
    ) -> None:
        """One audit record per re-wrap: from which KEK version to which (the keys themselves never)."""
        self._audit.append(
            AuditEvent(
                decision=decision,
                reason=reason,
                action="rewrap",
                caller_spiffe_id=caller.spiffe_id,
                caller_cert_serial=f"{caller.serial:x}",
                key_id=request.key_id,
                key_version=to_version,
                claims={"from_key_version": request.key_version},
            )
        )


class KeyAdminServicer(pb_grpc.KeyAdminServiceServicer):
    """Key lifecycle and release policies, for the admin identity."""

    def __init__(self, keys: KeyManager, policies: PolicyStore, audit: AuditLog) -> None:
        self._keys = keys
        self._policies = policies
        self._audit = audit

    def _record(
        self, context: grpc.ServicerContext, action: str, key_id: str, **extra: object
    ) -> None:
        caller = _caller(context)
        self._audit.append(
            AuditEvent(
                decision=Decision.ALLOWED,
                reason=action.upper(),
                action=action,
                caller_spiffe_id=caller.spiffe_id,
                caller_cert_serial=f"{caller.serial:x}",
                key_id=key_id,
                **extra,  # type: ignore[arg-type]
            )
        )

    def _info(self, info: KeyInfo) -> pb.KeyInfo:
        return key_info_proto(info, self._policies.version(info.key_id))

    def CreateKey(
        self, request: pb.CreateKeyRequest, context: grpc.ServicerContext
    ) -> pb.CreateKeyResponse:
        info = self._keys.create_key(request.key_id)
        self._record(context, "create_key", info.key_id, key_version=info.current_version)
        return pb.CreateKeyResponse(key=self._info(info))

    def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.ServicerContext
    ) -> pb.ListKeysResponse:
        return pb.ListKeysResponse(keys=[self._info(i) for i in self._keys.list_keys()])

    def RotateKey(
        self, request: pb.RotateKeyRequest, context: grpc.ServicerContext
    ) -> pb.RotateKeyResponse:
        info = self._keys.rotate_key(request.key_id)
        self._record(context, "rotate_key", info.key_id, key_version=info.current_version)
        return pb.RotateKeyResponse(key=self._info(info))

    def DisableKey(
        self, request: pb.DisableKeyRequest, context: grpc.ServicerContext
    ) -> pb.DisableKeyResponse:
        info = self._keys.disable_key(request.key_id, request.version or "all")
        self._record(context, "disable_key", info.key_id, key_version=request.version or None)
        return pb.DisableKeyResponse(key=self._info(info))

    def SetReleasePolicy(
        self, request: pb.SetReleasePolicyRequest, context: grpc.ServicerContext
    ) -> pb.SetReleasePolicyResponse:
        self._keys.describe_key(request.key_id)  # the key must exist
        stored = self._policies.put(request.key_id, request.policy_document)
        self._record(
            context, "set_release_policy", request.key_id, policy_version=stored.policy.version
        )
        return pb.SetReleasePolicyResponse(policy_version=stored.policy.version)

    def GetReleasePolicy(
        self, request: pb.GetReleasePolicyRequest, context: grpc.ServicerContext
    ) -> pb.GetReleasePolicyResponse:
        stored = self._policies.get(request.key_id)
        return pb.GetReleasePolicyResponse(
            policy_document=stored.document, policy_version=stored.policy.version
        )

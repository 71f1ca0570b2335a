"""Issue 12, finding 1, end to end: a forged record appended to the live audit log is tampering.

The broker must not sign it into the head: releases are refused with DATA_LOSS
(AUDIT_LOG_TAMPERED), readiness turns NOT_SERVING with the reason, and ``audit verify`` names the
forged record. Once an operator removes it and restarts the broker, releases resume.
"""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from strongroom.client.remote import peer_reason
from strongroom.dev.devstack import DevStack
from strongroom.keybroker.audit import canonical_json, load_public_key, record_hash
from strongroom.keybroker.audit_verify import verify_audit_log
from strongroom.keybroker.service import KEYBROKER_SERVICE
from tests.keybroker.helpers import bound, data_key_request


def _health(stack: DevStack, service: str) -> int:
    with grpc.insecure_channel(stack.services["keybroker"].health_address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


def test_forged_tail_record_refuses_releases_until_repaired(stack: DevStack) -> None:
    stack.create_release_key(stack.identity("admin"), "tamper", policy_version="1")
    publisher = pb_grpc.KeyBrokerServiceStub(
        stack.channel(stack.identity("publisher"), "keybroker")
    )
    generated = publisher.GenerateDataKey(data_key_request("tamper"), timeout=30)
    client = stack.release_client()

    def release() -> bytes:
        return bound(
            client.release("tamper", generated.key_version, generated.wrapped_data_key).dek
        )

    assert release() == generated.data_key
    log = stack.root / "state" / "keybroker" / "audit.log"
    genuine = log.read_bytes()
    last = json.loads(genuine.splitlines()[-1])
    forged = {k: v for k, v in last.items() if k not in ("hash", "sig")}
    forged.update(seq=last["seq"] + 1, prev=last["hash"], decision="allowed", reason="RELEASED")
    forged["hash"] = record_hash(forged)
    log.write_bytes(genuine + canonical_json(forged) + b"\n")

    with pytest.raises(grpc.RpcError) as info:
        release()
    assert info.value.code() == grpc.StatusCode.DATA_LOSS  # type: ignore[attr-defined]
    assert peer_reason(info.value) == "AUDIT_LOG_TAMPERED"
    broker = stack.services["keybroker"].handle
    broker.host._evaluate()  # the readiness loop runs every second; evaluate now
    assert _health(stack, KEYBROKER_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    public = load_public_key((stack.secrets_dir / "audit-key.pub.pem").read_bytes())
    result = verify_audit_log(log, public_key=public)
    assert (result.intact, result.problem) == (False, "RECORD_FORGED")

    # The operator removes the forged line and restarts the broker: releases resume.
    log.write_bytes(genuine)
    stack.services.pop("keybroker").stop()
    stack.start_in_process("keybroker")
    assert release() == generated.data_key
    assert verify_audit_log(log, public_key=public).intact

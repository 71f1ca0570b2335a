"""If the audit record cannot be written, the key broker releases nothing (real disk-full failure).

The broker runs in a child process whose file-size limit (RLIMIT_FSIZE) is lowered to just above
the audit log's current size, so the next append fails with EFBIG exactly as on a full disk. One
run of the stack serves the module's tests.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.broker_child import outcome as run_child

SCRIPT = textwrap.dedent(
    """
    import json, logging, resource, signal, sys
    from pathlib import Path
    import grpc
    from strongroom.api.keybroker.v1 import keybroker_pb2 as pb, keybroker_pb2_grpc as pb_grpc
    from strongroom.dev.devstack import DevStack, read_audit_records
    from strongroom.artifact.keybinding import bind_data_key

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    out = {}

    class Kept(logging.Handler):
        lines = []
        def emit(self, record):
            self.lines.append([record.levelname, record.getMessage(), getattr(record, "reason", None)])

    logging.getLogger().addHandler(Kept())
    with DevStack(Path(sys.argv[1])) as stack:
        stack.start_in_process("keybroker")
        stack.create_release_key(stack.identity("admin"), "k", policy_version="1")
        publisher = pb_grpc.KeyBrokerServiceStub(stack.channel(stack.identity("publisher"), "keybroker"))
        generated = publisher.GenerateDataKey(pb.GenerateDataKeyRequest(key_id="k", model_name="m", model_version="1"), timeout=30)
        client = stack.release_client()
        out["before"] = bind_data_key(client.release("k", generated.key_version, generated.wrapped_data_key).dek, "m", "1") == generated.data_key
        audit = stack.root / "state" / "keybroker" / "audit.log"
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (audit.stat().st_size + 64, hard))
        try:
            client.release("k", generated.key_version, generated.wrapped_data_key)
            out["during"] = "released"
        except grpc.RpcError as exc:
            out["during"] = [exc.code().name, exc.details().split(":")[0]]
            out["details"] = exc.details()
            out["trailer"] = dict(exc.trailing_metadata() or ()).get("strongroom-reason")
        out["logged"] = [line for line in Kept.lines if line[0] == "ERROR"]
        out["state"] = str(stack.root / "state")
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        out["after"] = bind_data_key(client.release("k", generated.key_version, generated.wrapped_data_key).dek, "m", "1") == generated.data_key
        out["records"] = [r["decision"] for r in read_audit_records(audit) if r["action"] == "key_release"]
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory, step_ca_binary: Path) -> dict[str, Any]:
    """What the child saw: releases before, during and after the failure, what the refused
    caller was told, the broker's ERROR lines, the stack's state directory."""
    return run_child(SCRIPT, str(tmp_path_factory.mktemp("audit-failure") / "stack"), timeout=180)


def test_release_is_refused_when_the_audit_log_cannot_be_written(outcome: dict[str, Any]) -> None:
    assert outcome["before"] is True
    assert outcome["during"] == ["UNAVAILABLE", "AUDIT_UNAVAILABLE"], outcome
    assert outcome["after"] is True
    # Only the two granted releases are on record; the refused one left no "allowed" record.
    assert outcome["records"] == ["allowed", "allowed"]


def test_the_refused_caller_learns_the_failure_not_the_brokers_files(
    outcome: dict[str, Any],
) -> None:
    """The refusal's status message was the audit log's own error: ``cannot write the audit log
    <the broker's state directory>/audit.log: File too large (EFBIG)``, the broker's paths, file
    names and layout told to any caller holding a certificate. The caller is told the failure's
    class, the reason and the errno now; the broker's log has the path, in one ERROR line."""
    state = outcome["state"]
    assert outcome["details"] == (
        "AUDIT_UNAVAILABLE: the key broker cannot write its audit log (EFBIG); its operator's "
        "log has the details"
    )
    assert outcome["trailer"] == "AUDIT_UNAVAILABLE"
    for part in (state, "state/keybroker", "audit.log", "/"):
        assert part not in outcome["details"], outcome["details"]
    refused = f"cannot write the audit log {state}/keybroker/audit.log: File too large (EFBIG)"
    assert [line for line in outcome["logged"] if line[1] == refused] == [
        ["ERROR", refused, "AUDIT_UNAVAILABLE"]
    ], outcome["logged"]

"""If the audit record cannot be written, the key broker releases nothing (real disk-full failure).

The broker runs in a child process whose file-size limit (RLIMIT_FSIZE) is lowered to just above
the audit log's current size, so the next append fails with EFBIG exactly as on a full disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO

SCRIPT = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    import grpc
    from strongroom.api.keybroker.v1 import keybroker_pb2 as pb, keybroker_pb2_grpc as pb_grpc
    from strongroom.dev.simulated import SimulatedAuthority
    from strongroom.dev.devstack import DevStack, read_audit_records
    from strongroom.dev.devstack.stack import DEMO_MEASUREMENT
    from strongroom.attesters import SimulatedAttester, TeeType
    from strongroom.client.keyrelease import KeyReleaseClient
    from strongroom.artifact.keybinding import bind_data_key

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    out = {}
    with DevStack(Path(sys.argv[1])) as stack:
        stack.start_in_process("keybroker")
        stack.create_release_key(stack.identity("admin"), "k", policy_version="1")
        publisher = pb_grpc.KeyBrokerServiceStub(stack.channel(stack.identity("publisher"), "keybroker"))
        generated = publisher.GenerateDataKey(pb.GenerateDataKeyRequest(key_id="k", model_name="m", model_version="1"), timeout=30)
        inference = stack.identity("inference")
        attester = SimulatedAttester(SimulatedAuthority.load(stack.root / "simulated-tee").snp(),
            TeeType.SEV_SNP, production=False, claims={"measurement": bytes.fromhex(DEMO_MEASUREMENT)})
        client = KeyReleaseClient(stack.channel(inference, "keybroker"), attester, inference.public_key_der, verifier=stack.release_verifier())
        out["before"] = bind_data_key(client.release("k", generated.key_version, generated.wrapped_data_key).dek, "m", "1") == generated.data_key
        audit = stack.root / "state" / "keybroker" / "audit.log"
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (audit.stat().st_size + 64, hard))
        try:
            client.release("k", generated.key_version, generated.wrapped_data_key)
            out["during"] = "released"
        except grpc.RpcError as exc:
            out["during"] = [exc.code().name, exc.details().split(":")[0]]
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        out["after"] = bind_data_key(client.release("k", generated.key_version, generated.wrapped_data_key).dek, "m", "1") == generated.data_key
        out["records"] = [r["decision"] for r in read_audit_records(audit) if r["action"] == "key_release"]
    print(json.dumps(out))
    """
)


def test_release_is_refused_when_the_audit_log_cannot_be_written(
    tmp_path: Path, step_ca_binary: Path
) -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "stack")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome["before"] is True
    assert outcome["during"] == ["UNAVAILABLE", "AUDIT_UNAVAILABLE"], outcome
    assert outcome["after"] is True
    # Only the two granted releases are on record; the refused one left no "allowed" record.
    assert outcome["records"] == ["allowed", "allowed"]

"""An audit outage is logged once per failure, not once per refused request (a real disk-full).

The broker runs in a child process whose file-size limit (RLIMIT_FSIZE) is lowered to just above
the audit log's size, so every commit fails with EFBIG as on a full disk; then its log's ``flock``
is held (a second failure), let go (the first again), and the limit lifted. Through all of it a
caller with a certificate sends releases, half of them with evidence the policy refuses (a
``DENIED`` record attempted each time, within its budget), half that would be granted. Before,
each refused batch wrote the failure's ERROR line (the path), each unrecorded denial an ERROR
``could not audit a denied key release``, and each refusal's ``key release denied`` WARNING
repeated the path: one certified caller set the broker's ERROR rate.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.broker_child import outcome as run_child

RELEASES = 64  # on the full disk (~96 ERROR lines before); a few more in each later phase

SCRIPT = textwrap.dedent(
    """
    import fcntl, json, logging, os, resource, signal, sys
    from pathlib import Path
    import grpc
    from strongroom.api.keybroker.v1 import keybroker_pb2 as pb, keybroker_pb2_grpc as pb_grpc
    from strongroom.dev.simulated import SimulatedAuthority
    from strongroom.dev.devstack import DevStack
    from strongroom.dev.devstack.stack import DEMO_MEASUREMENT
    from strongroom.attesters import SimulatedAttester, TeeType
    from strongroom.client.keyrelease import KeyReleaseClient
    from tests.e2e.broker_child import KeptLines
    from strongroom.keybroker import audit as audit_module

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    audit_module.LOG_LOCK_WAIT_SECONDS = 0.2  # the held lock's refusals come quickly
    releases = int(sys.argv[2])
    out = {"refused": {}}

    Kept = KeptLines.install()
    with DevStack(Path(sys.argv[1])) as stack:
        stack.start_in_process("keybroker")
        stack.create_release_key(stack.identity("admin"), "k", policy_version="1")
        publisher = pb_grpc.KeyBrokerServiceStub(stack.channel(stack.identity("publisher"), "keybroker"))
        generated = publisher.GenerateDataKey(pb.GenerateDataKeyRequest(key_id="k", model_name="m", model_version="1"), timeout=30)
        inference = stack.identity("inference")
        authority = SimulatedAuthority.load(stack.root / "simulated-tee").snp()
        def client(measurement):
            attester = SimulatedAttester(authority, TeeType.SEV_SNP, production=False,
                                         claims={"measurement": measurement})
            return KeyReleaseClient(stack.channel(inference, "keybroker"), attester,
                                    inference.public_key_der, verifier=stack.release_verifier())
        good, bad = client(bytes.fromhex(DEMO_MEASUREMENT)), client(bytes(48))
        def release(count):
            for n in range(count):
                try:
                    (bad if n % 2 else good).release("k", generated.key_version, generated.wrapped_data_key)
                    reason = "RELEASED"
                except grpc.RpcError as exc:
                    reason = exc.details().split(":")[0]
                out["refused"][reason] = out["refused"].get(reason, 0) + 1
        release(1)
        audit = stack.root / "state" / "keybroker" / "audit.log"
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (audit.stat().st_size + 64, hard))
        mark = len(Kept.lines)
        release(releases)
        out["full"] = Kept.lines[mark:]
        held = os.open(audit, os.O_RDONLY)
        fcntl.flock(held, fcntl.LOCK_EX)
        mark = len(Kept.lines)
        release(6)
        out["locked"] = Kept.lines[mark:]
        os.close(held)
        mark = len(Kept.lines)
        release(6)
        out["full_again"] = Kept.lines[mark:]
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        mark = len(Kept.lines)
        release(2)
        out["after"] = Kept.lines[mark:]
        out["state"] = str(stack.root / "state")
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory, step_ca_binary: Path) -> dict[str, Any]:
    """The broker's log lines (level, message, detail) of each phase, the refusals' reasons."""
    return run_child(
        SCRIPT, str(tmp_path_factory.mktemp("audit-lines") / "stack"), str(RELEASES), timeout=600
    )


def _errors(lines: list[list[Any]]) -> list[str]:
    return [message for level, message, _ in lines if level in ("ERROR", "CRITICAL")]


def test_a_full_disk_is_one_error_line_however_many_releases_it_refuses(
    outcome: dict[str, Any],
) -> None:
    """64 refused releases, granted and denied alike: one ERROR line, the failure's, naming the
    file (before: one per refused batch, and one more per denial it could not record)."""
    state = outcome["state"]
    assert outcome["refused"]["AUDIT_UNAVAILABLE"] >= RELEASES // 2, outcome["refused"]
    refused = f"cannot write the audit log {state}/keybroker/audit.log: File too large (EFBIG)"
    assert _errors(outcome["full"]) == [refused], _errors(outcome["full"])[:10]


def test_no_refused_callers_line_names_the_brokers_files(outcome: dict[str, Any]) -> None:
    """The per-caller lines (``key release denied``, ``could not audit a denied key release``)
    carry the failure's public words; only the failure's own line has the path."""
    state = outcome["state"]
    per_caller = [
        line
        for phase in ("full", "locked", "full_again")
        for line in outcome[phase]
        if line[1] in ("key release denied", "could not audit a denied key release")
    ]
    assert per_caller
    assert all(line[0] == "WARNING" for line in per_caller), per_caller[:5]
    for _, _, detail in per_caller:
        assert detail is None or state not in detail, detail


def test_each_different_failure_is_logged_at_once(outcome: dict[str, Any]) -> None:
    """The held lock, then the full disk again: each is logged when it begins, within a minute of
    the last line; and the change reports how many refusals the failure before it went on to
    make unlogged."""
    state = outcome["state"]
    locked = _errors(outcome["locked"])
    assert len(locked) == 2, locked
    assert locked[0].startswith("the audit log's previous failure refused "), locked
    assert locked[0].endswith("(EFBIG)") and int(locked[0].split()[6]) > 0, locked
    assert locked[1].startswith(f"the audit log {state}/keybroker/audit.log is locked"), locked
    again = _errors(outcome["full_again"])
    assert again[-1] == (
        f"cannot write the audit log {state}/keybroker/audit.log: File too large (EFBIG)"
    ), again
    assert len(again) <= 2, again


def test_the_end_of_the_failure_says_how_many_commits_it_refused_unlogged(
    outcome: dict[str, Any],
) -> None:
    after = outcome["after"]
    assert outcome["refused"]["RELEASED"] >= 2
    assert _errors(after) == []
    ended = [line[1] for line in after if line[1].startswith("the audit log commits again")]
    assert len(ended) == 1, after
    assert int(ended[0].split("(")[1].split()[0]) > 0, ended

"""A key broker outage's per-call lines: within the caller's budget, and naming none of its files.

A real broker (step-ca, mTLS, SoftHSM2) whose HSM connection is recycled after every operation
(``hsm_recycle_after_operations: 1``) loses its SoftHSM2 configuration file: each release's
re-wrap then reconnects, or waits out the backoff, and is refused ``HSM_UNAVAILABLE``. Before,
every refused release wrote a ``key release denied`` WARNING outside any budget, its ``detail``
the operator's message (the configuration's path): one caller with an inference certificate set
the broker's WARNING rate through the outage, repeating its paths; the runtime's ``rpc failed``
INFO line of each was written every time too. The outage's own line (``cannot connect to the
HSM``, once per failure and then counted) keeps them.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from strongroom.api.keybroker.v1 import keybroker_pb2 as pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from strongroom.client.keyrelease import KeyReleaseClient
from strongroom.dev.devstack import DevStack, read_audit_records
from strongroom.runtime.log_refusals import REFUSED_CALLS_BURST
from tests.conftest import buffered_service_log, refused_calls_not_logged, stack_root

RELEASES = 3 * REFUSED_CALLS_BURST


def _release_client(dev: DevStack) -> tuple[KeyReleaseClient, pb.GenerateDataKeyResponse]:
    """Key ``k`` created on ``dev``'s running broker, a data key under it, and an inference
    server's release client (a simulated SNP VM with the demo measurement) for it."""
    dev.create_release_key(dev.identity("admin"), "k", policy_version="1")
    publisher = pb_grpc.KeyBrokerServiceStub(dev.channel(dev.identity("publisher"), "keybroker"))
    generated = publisher.GenerateDataKey(
        pb.GenerateDataKeyRequest(key_id="k", model_name="m", model_version="1"), timeout=30
    )
    return dev.release_client(), generated


def test_an_hsm_outage_writes_its_paths_in_its_own_lines_and_budgets_the_refused_calls(
    step_ca_binary: Path,
    tmp_path_factory: pytest.TempPathFactory,
    simulated_tee_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    handler, stream = buffered_service_log(monkeypatch, "keybroker")
    root = stack_root(tmp_path_factory, "hsm-outage-lines", simulated_tee_dir)
    reasons: list[str] = []
    with DevStack(root, step_ca_binary=step_ca_binary) as dev:
        section = {**dev.default_section("keybroker"), "hsm_recycle_after_operations": 1}
        conf = Path(section["softhsm2_conf"])
        dev.start_in_process("keybroker", section)
        client, generated = _release_client(dev)
        client.release("k", generated.key_version, generated.wrapped_data_key)  # the HSM works
        conf.rename(conf.with_name("softhsm2.conf.away"))
        try:
            for _ in range(RELEASES):
                with pytest.raises(grpc.RpcError) as info:
                    client.release("k", generated.key_version, generated.wrapped_data_key)
                reasons.append(info.value.details().split(":")[0])
        finally:
            conf.with_name("softhsm2.conf.away").rename(conf)
        caller = dev.spiffe_id("inference")
        dev.services["keybroker"].stop()
    handler.close()
    assert reasons == ["HSM_UNAVAILABLE"] * RELEASES
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    # The outage's own lines name the configuration's path (the operator's words, in full).
    outage = [r for r in lines if r["msg"].startswith("cannot connect to the HSM")]
    assert outage and all(str(conf) in r["msg"] for r in outage), outage
    assert all(r["level"] == "ERROR" for r in outage), outage
    # The refused calls' lines: their caller's budget, the rest counted; none names a file.
    denied = [r for r in lines if r["msg"] == "key release denied"]
    assert len(denied) == REFUSED_CALLS_BURST, [r.get("detail") for r in denied]
    assert {(r["reason"], r["level"]) for r in denied} == {("HSM_UNAVAILABLE", "WARNING")}
    for line in denied:
        assert str(dev.root) not in json.dumps(line), line
        assert line["detail"].startswith("the key broker cannot connect to its HSM"), line
    # The runtime's "rpc failed" line of each refused call follows the same rule (it was
    # written every time: the service's own failure, by the runtime's older rule).
    failed = [r for r in lines if r["msg"] == "rpc failed" and r["reason"] == "HSM_UNAVAILABLE"]
    assert len(failed) == REFUSED_CALLS_BURST, len(failed)
    counted = refused_calls_not_logged(lines)
    assert counted[(caller, "HSM_UNAVAILABLE")] == RELEASES - REFUSED_CALLS_BURST, counted


def test_a_policy_that_does_not_load_is_logged_once_and_counted_whoever_names_its_key(
    step_ca_binary: Path,
    tmp_path_factory: pytest.TempPathFactory,
    simulated_tee_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    """A real broker (step-ca, mTLS, SoftHSM2) whose key's policy file is damaged in its policy
    directory. Before, every release naming the key wrote the ERROR ``the release policy of a key
    does not load`` before its caller was checked, and a ``key release denied`` WARNING outside
    any budget: a holder of an inference certificate wrote two lines per call. The ERROR is now
    written once, naming the file and the loader's cause, its repeats said as a count (here at
    the broker's stop; otherwise a minute later); the per-call lines are the caller's budget.
    The callers' answers and the audit records are unchanged: one refusal each, every one
    recorded with the loader's reason."""
    handler, stream = buffered_service_log(monkeypatch, "keybroker")
    root = stack_root(tmp_path_factory, "policy-load-lines", simulated_tee_dir)
    answers: list[tuple[grpc.StatusCode, str]] = []
    with DevStack(root, step_ca_binary=step_ca_binary) as dev:
        section = dev.default_section("keybroker")
        dev.start_in_process("keybroker", section)
        client, generated = _release_client(dev)
        client.release("k", generated.key_version, generated.wrapped_data_key)  # it loads
        path = Path(section["policies_dir"]) / "k.yaml"
        path.write_text(path.read_text() + "release_to: [\n")  # a hand edit gone wrong
        for _ in range(RELEASES):
            with pytest.raises(grpc.RpcError) as info:
                client.release("k", generated.key_version, generated.wrapped_data_key)
            answers.append((info.value.code(), info.value.details().split(":")[0]))  # type: ignore[attr-defined]
        caller = dev.spiffe_id("inference")
        dev.services["keybroker"].stop()
        records = read_audit_records(Path(section["audit_log"]))
    handler.close()
    assert answers == [(grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED")] * RELEASES
    refused = [r for r in records if r["decision"] == "denied" and r["key"]["id"] == "k"]
    assert len(refused) == RELEASES, [(r["decision"], r["reason"]) for r in records]
    reasons = {r["reason"] for r in refused}
    assert len(reasons) == 1 and "CALLER_NOT_ALLOWED" not in reasons, reasons
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    own = [r for r in lines if r["msg"].startswith("the release policy of a key does not load")]
    assert [r["level"] for r in own] == ["ERROR", "ERROR"], [r["msg"] for r in own]
    first, count = own
    assert str(path) in first["msg"] and "'k'" in first["msg"], first
    assert first["reason"] in reasons, first
    assert count["msg"] == f"{first['msg']} ({RELEASES - 1} more times after its last line)"
    denied = [r for r in lines if r["msg"] == "key release denied"]
    assert len(denied) == REFUSED_CALLS_BURST, len(denied)  # before: one per call
    assert all(str(dev.root) not in json.dumps(r) for r in denied)
    counted = refused_calls_not_logged(lines)
    assert counted[(caller, first["reason"])] == RELEASES - REFUSED_CALLS_BURST, counted

"""KeyService: the key lifecycle as a domain, against a real SoftHSM2 token and a real audit log.

Every change is audited with who made it; a refused change writes no record; a data key whose
record cannot be written never leaves (and is wiped).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import threading
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from strongroom import files
from strongroom.dev.devstack import read_audit_records
from strongroom.errors import (
    REFUSAL_LINE,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StrongroomError,
)
from strongroom.keybroker import hsm as hsm_module
from strongroom.keybroker import keys as keys_module
from strongroom.keybroker import policies as policies_module
from strongroom.keybroker import refusals
from strongroom.keybroker.audit import AuditLog
from strongroom.keybroker.errors import AuditUnavailable, PolicyChanged, PolicyStoreBusy
from strongroom.keybroker.keys import KeyManager, KeyState
from strongroom.keybroker.lifecycle import KeyService
from strongroom.keybroker.policies import PolicyStore
from strongroom.keybroker.release import Caller
from tests.keybroker.helpers import MODEL, make_config

ADMIN = Caller("spiffe://strongroom.test/admin", 0x1F, b"")
PUBLISHER = Caller("spiffe://strongroom.test/publisher", 0x20, b"")
POLICY = (
    'version: "p1"\n'
    'allowed_spiffe_ids: ["spiffe://strongroom.test/inference"]\n'
    "tee_types: [SEV_SNP]\n"
    "sev_snp:\n"
    f'  measurements: ["{"ab" * 48}"]\n'
    "  products: [Milan]\n"
    "  min_reported_tcb: {bootloader: 3, tee: 0, snp: 8, microcode: 115}\n"
)


@pytest.fixture
def service(km, tmp_path):
    audit = AuditLog.open(tmp_path / "audit.log", ed25519.Ed25519PrivateKey.generate())
    yield KeyService(km, PolicyStore(tmp_path / "policies"), audit), tmp_path / "audit.log"
    audit.close()


def _records(path) -> list[dict[str, Any]]:
    return read_audit_records(path)


def test_every_change_is_audited_with_its_caller(service) -> None:
    keys, log = service
    keys.create_key(ADMIN, "k1")
    keys.rotate_key(ADMIN, "k1")
    keys.set_policy(ADMIN, "k1", POLICY)
    keys.disable_key(ADMIN, "k1", 1)
    records = _records(log)
    assert [r["action"] for r in records] == [
        "create_key",
        "rotate_key",
        "set_release_policy",
        "disable_key",
    ]
    assert {r["caller"]["spiffe_id"] for r in records} == {ADMIN.spiffe_id}
    assert {r["caller"]["cert_serial"] for r in records} == {"1f"}
    assert [r["key"]["version"] for r in records] == [1, 2, None, 1]
    assert {r["key"]["id"] for r in records} == {"k1"}
    assert keys.policy_version("k1") == records[2]["policy_version"]


def test_a_policy_for_a_missing_key_is_refused_and_not_audited(service) -> None:
    keys, log = service
    with pytest.raises(NotFound):
        keys.set_policy(ADMIN, "nope", POLICY)
    assert not log.exists() or _records(log) == []
    assert keys.policy_version("nope") == ""


def test_the_policy_of_a_missing_key_is_not_found_not_absent(service) -> None:
    keys, _ = service
    keys.create_key(ADMIN, "k1")
    with pytest.raises(FailedPrecondition) as absent:
        keys.get_policy("k1")
    assert absent.value.reason == "NO_RELEASE_POLICY"
    with pytest.raises(NotFound) as missing:
        keys.get_policy("nope")
    assert missing.value.reason == "KEY_NOT_FOUND"


def test_a_data_key_that_cannot_be_audited_never_leaves(service, monkeypatch) -> None:
    keys, _ = service
    keys.create_key(ADMIN, "k1")
    issued = []
    real = keys._keys.generate_data_key

    def spy(*args):
        issued.append(real(*args))
        return issued[-1]

    monkeypatch.setattr(keys._keys, "generate_data_key", spy)

    def refuse(event):
        raise AuditUnavailable("disk full")

    monkeypatch.setattr(keys._audit, "append", refuse)
    with pytest.raises(AuditUnavailable):
        keys.generate_data_key(ADMIN, "k1", *MODEL)
    assert len(issued) == 1
    assert not any(issued[0].dek)  # wiped


@pytest.mark.parametrize("key_id", ["Bad Key!", "", "a\nb", "k" * 100])
def test_a_refused_rewrap_of_a_malformed_key_id_is_audited(service, key_id: str) -> None:
    """The refusal's record used to carry the caller's malformed id, which the log refuses: the
    caller saw AUDIT_RECORD_INVALID instead of its own error, and nothing was recorded."""
    keys, log = service
    with pytest.raises(InvalidArgument) as info:
        keys.rewrap(PUBLISHER, key_id, 1, b"\x01" * 40)
    assert info.value.reason == "KEY_ID_INVALID"
    [record] = _records(log)
    assert (record["decision"], record["reason"], record["action"]) == (
        "denied",
        "KEY_ID_INVALID",
        "rewrap",
    )
    assert record["key"]["id"] is None
    assert record["caller"]["spiffe_id"] == PUBLISHER.spiffe_id


def test_another_document_under_the_live_policy_version_is_refused(service) -> None:
    """Release records name the policy that judged them by its version only: a policy loosened
    (another measurement, another caller) under the version it had was accepted, and every
    record of that version then named two policies."""
    keys, log = service
    keys.create_key(ADMIN, "k1")
    keys.set_policy(ADMIN, "k1", POLICY)
    loosened = POLICY.replace('"ab" * 48', '"cd" * 48').replace("ab" * 48, "cd" * 48)
    assert loosened != POLICY
    with pytest.raises(FailedPrecondition) as info:
        keys.set_policy(ADMIN, "k1", loosened)
    assert info.value.reason == "POLICY_VERSION_REUSED"
    assert keys.get_policy("k1").document == POLICY
    keys.set_policy(ADMIN, "k1", POLICY)  # the same document again: a retry
    keys.set_policy(ADMIN, "k1", loosened.replace('"p1"', '"p2"'))  # a version of its own
    changes = [r for r in _records(log) if r["action"] == "set_release_policy"]
    assert [r["policy_version"] for r in changes] == ["p1", "p1", "p2"]
    assert changes[0]["policy_sha256"] == hashlib.sha256(POLICY.encode()).hexdigest()


def test_a_policy_with_crlf_line_ends_is_named_by_the_bytes_it_was_stored_as(km, tmp_path) -> None:
    """A policy file was read with universal newlines: a document written with CRLF line ends
    (a policy edited on Windows, sent as it is) was judged, shown and hashed as its LF form, so
    the set_release_policy record's policy_sha256 named other bytes than the policy_in_force and
    release records (and the file itself), GetReleasePolicy returned another document, and the
    same document sent again (a retry) was refused POLICY_VERSION_REUSED."""
    audit = AuditLog.open(tmp_path / "audit.log", ed25519.Ed25519PrivateKey.generate())
    policies = PolicyStore(tmp_path / "policies", audit=audit)
    keys = KeyService(km, policies, audit)
    try:
        keys.create_key(ADMIN, "k1")
        crlf = POLICY.replace("\n", "\r\n")
        keys.set_policy(ADMIN, "k1", crlf)
        assert keys.get_policy("k1").document == crlf
        keys.set_policy(ADMIN, "k1", crlf)  # the same document again: a retry
        policies.get("k1")  # a decision's read: recorded in force
        on_disk = hashlib.sha256((tmp_path / "policies" / "k1.yaml").read_bytes()).hexdigest()
        named = {
            (r["action"], r["policy_sha256"])
            for r in _records(tmp_path / "audit.log")
            if r["policy_sha256"] is not None
        }
        assert named == {("set_release_policy", on_disk), ("policy_in_force", on_disk)}
    finally:
        audit.close()


def test_a_keys_policy_is_described_during_an_audit_outage_and_recorded_before_judging(
    km, tmp_path, monkeypatch
) -> None:
    """Describing a key (ListKeys, CreateKey/RotateKey/DisableKey answers) and GetReleasePolicy
    read the policy through the path that records a new document in force: during an audit
    outage a key whose policy had changed on disk was described as having none (version "",
    logged as a policy that "does not load") and GetReleasePolicy was UNAVAILABLE. Nothing is
    decided by describing: the document is read without being recorded, and is
    recorded in force before the first decision under it, as before."""
    audit = AuditLog.open(tmp_path / "audit.log", ed25519.Ed25519PrivateKey.generate())
    policies = PolicyStore(tmp_path / "policies", audit=audit)
    keys = KeyService(km, policies, audit)

    def full(event, **kwargs):
        raise AuditUnavailable("the audit log is full", reason="AUDIT_LOG_FULL")

    try:
        keys.create_key(ADMIN, "k1")
        keys.set_policy(ADMIN, "k1", POLICY)
        policies.get("k1")  # judged by: recorded in force
        edited = POLICY.replace('"p1"', '"p2"')
        (tmp_path / "policies" / "k1.yaml").write_text(edited)  # a hand edit
        real_append = audit.append
        monkeypatch.setattr(audit, "append", full)
        assert keys.policy_version("k1") == "p2"
        assert keys.get_policy("k1").document == edited
        monkeypatch.setattr(audit, "append", real_append)
        assert policies.get("k1").policy.version == "p2"  # a decision's read
    finally:
        audit.close()
    in_force = [
        r["policy_version"]
        for r in _records(tmp_path / "audit.log")
        if r["action"] == "policy_in_force"
    ]
    assert in_force == ["p1", "p2"]


def test_a_policy_change_whose_record_fails_does_not_take_effect(service, monkeypatch) -> None:
    """A policy is live for every replica once its file is written: stored first and recorded
    after, a failed record left a (possibly looser) policy live with no record of it."""
    keys, _ = service
    keys.create_key(ADMIN, "k1")
    keys.set_policy(ADMIN, "k1", POLICY)

    def refuse(event):
        raise AuditUnavailable("disk full")

    monkeypatch.setattr(keys._audit, "append", refuse)
    with pytest.raises(AuditUnavailable):
        keys.set_policy(ADMIN, "k1", POLICY.replace('"p1"', '"loosened"'))
    assert keys.policy_version("k1") == "p1"


def test_a_policy_that_cannot_be_stored_after_its_record_is_recorded_as_refused(
    service, monkeypatch
) -> None:
    keys, log = service
    keys.create_key(ADMIN, "k1")

    def read_only(key_id, stored, **_):
        raise FailedPrecondition("read-only", reason="POLICY_STORE_READ_ONLY")

    monkeypatch.setattr(keys._policies, "write", read_only)
    with pytest.raises(FailedPrecondition):
        keys.set_policy(ADMIN, "k1", POLICY)
    allowed, denied = _records(log)[1:]
    assert (allowed["decision"], denied["decision"]) == ("allowed", "denied")
    assert denied["reason"] == "POLICY_STORE_READ_ONLY"
    assert denied["decision_id"] == allowed["decision_id"]
    assert keys.policy_version("k1") == ""


def test_concurrent_policy_changes_leave_the_last_record_naming_the_live_policy(
    service, monkeypatch
) -> None:
    """Two SetReleasePolicy calls on one key: the first recorded, then (a slow disk) written
    after the second had recorded and written its own, so the log's last change named "p-b"
    while "p-a" was live."""
    keys, log = service
    keys.create_key(ADMIN, "k1")
    real_write = keys._policies.write
    first_writing = threading.Event()
    second_written = threading.Event()

    def write(key_id, stored, **kwargs):
        if stored.policy.version == "p-a":
            first_writing.set()
            # Gives the second change every chance to record and write first; serialised, it
            # cannot record until this write is done.
            second_written.wait(timeout=1.0)
        written = real_write(key_id, stored, **kwargs)
        if stored.policy.version == "p-b":
            second_written.set()
        return written

    monkeypatch.setattr(keys._policies, "write", write)
    first = threading.Thread(
        target=keys.set_policy, args=(ADMIN, "k1", POLICY.replace('"p1"', '"p-a"'))
    )
    first.start()
    assert first_writing.wait(timeout=30)
    keys.set_policy(ADMIN, "k1", POLICY.replace('"p1"', '"p-b"'))
    first.join()
    changes = [r for r in _records(log) if r["action"] == "set_release_policy"]
    assert [r["policy_version"] for r in changes] == ["p-a", "p-b"]
    assert keys.policy_version("k1") == changes[-1]["policy_version"]


@pytest.mark.parametrize("change", ["create_key", "rotate_key", "disable_key"])
def test_a_key_change_that_outlives_the_hsm_deadline_is_awaited_and_audited(
    softhsm_token, open_hsm, tmp_path, monkeypatch, change: str
) -> None:
    """The HSM worker runs a started operation to its end whatever its caller does: a change
    still running at the HSM deadline (a slow token, or one started late behind a queue of
    publishers' calls) was made in the token while its caller heard HSM_TIMEOUT, "retry", and
    was never audited; a retried rotation made a second version."""
    # The operation is held until its caller's first wait is over (it then waits once more, a
    # whole timeout, in HsmCall.finish): past the deadline however loaded the machine, and the
    # rest of the change (its audit record's fsync, the token's writes) has that second timeout
    # to itself. A 0.6 s sleep past a 0.5 s deadline left it 0.4 s, which a loaded 2-core
    # runner once overran (HSM_TIMEOUT).
    km = KeyManager(open_hsm(make_config(softhsm_token, operation_timeout=2.0)))
    audit = AuditLog.open(tmp_path / "audit.log", ed25519.Ed25519PrivateKey.generate())
    keys = KeyService(km, PolicyStore(tmp_path / "policies"), audit)
    if change != "create_key":
        keys.create_key(ADMIN, "k1")
    real = km._versions
    slowed: list[bool] = []
    awaited = threading.Event()
    real_finish = hsm_module.HsmCall.finish

    def finish(call):
        awaited.set()  # the first wait timed out on a started change: its second begins
        return real_finish(call)

    def slow_once(hs, key_id):
        if not slowed:
            slowed.append(awaited.wait(60))  # inside the operation, until past its deadline
        return real(hs, key_id)

    monkeypatch.setattr(hsm_module.HsmCall, "finish", finish)
    monkeypatch.setattr(km, "_versions", slow_once)
    try:
        if change == "create_key":
            info = keys.create_key(ADMIN, "k1")
        elif change == "rotate_key":
            info = keys.rotate_key(ADMIN, "k1")
        else:
            info = keys.disable_key(ADMIN, "k1", 1)
    finally:
        audit.close()
    assert slowed == [True]
    states = {
        "create_key": [KeyState.ENABLED],
        "rotate_key": [KeyState.ENABLED, KeyState.ENABLED],
        "disable_key": [KeyState.DISABLED],
    }[change]
    assert [v.state for v in km.describe_key("k1").versions] == states
    assert [v.state for v in info.versions] == states
    last = _records(tmp_path / "audit.log")[-1]
    assert (last["action"], last["decision"], last["key"]["id"]) == (change, "allowed", "k1")


def _slow_service(
    softhsm_token, open_hsm, tmp_path, timeout: float
) -> tuple[KeyManager, KeyService, AuditLog]:
    """A KeyService whose HSM calls time out after ``timeout`` seconds, with key "k1" created
    (given all the time it needs, recorded as KeyService records it)."""
    km = KeyManager(open_hsm(make_config(softhsm_token, operation_timeout=timeout)))
    audit = AuditLog.open(tmp_path / "audit.log", ed25519.Ed25519PrivateKey.generate())
    keys = KeyService(km, PolicyStore(tmp_path / "policies"), audit)
    km.create_key("k1", timeout=30, gate=keys._gate(ADMIN, "create_key", "k1"))
    return km, keys, audit


def _change(keys: KeyService, change: str) -> None:
    if change == "rotate_key":
        keys.rotate_key(ADMIN, "k1")
    else:
        keys.disable_key(ADMIN, "k1", 1)


@pytest.mark.parametrize("change", ["rotate_key", "disable_key"])
def test_a_key_change_whose_caller_gave_up_before_it_took_effect_is_not_made(
    softhsm_token, open_hsm, tmp_path, monkeypatch, change: str
) -> None:
    """An HSM that hangs past both waits (the deadline, then one more) answered HSM_TIMEOUT, and
    the worker then made the change anyway: a rotation or a disable live in the token that no
    audit record shows."""
    km, keys, audit = _slow_service(softhsm_token, open_hsm, tmp_path, 0.2)
    gave_up = threading.Event()
    real = km._all_objects
    held: list[bool] = []

    def hang_until_the_caller_gave_up(hs, key_id):
        if not held:
            held.append(True)
            gave_up.wait(timeout=30)
        return real(hs, key_id)

    monkeypatch.setattr(km, "_all_objects", hang_until_the_caller_gave_up)
    try:
        with pytest.raises(StrongroomError) as info:
            _change(keys, change)
        gave_up.set()
        assert info.value.reason == "HSM_TIMEOUT"
        assert "not made" in info.value.message
        monkeypatch.undo()
        # The worker runs one operation at a time: this one runs after the abandoned change.
        versions = km.describe_key("k1", timeout=30).versions
    finally:
        gave_up.set()
        audit.close()
    assert held
    assert [v.state for v in versions] == [KeyState.ENABLED]
    assert [r["action"] for r in _records(tmp_path / "audit.log")] == ["create_key"]


def test_a_key_change_recorded_before_its_caller_gave_up_completes_recorded(
    softhsm_token, open_hsm, tmp_path, monkeypatch
) -> None:
    # Long enough for the lookup and the record before the gate, on a busy machine too: the
    # change then waits inside its token write until its caller has given up (two timeouts).
    km, keys, audit = _slow_service(softhsm_token, open_hsm, tmp_path, 1.0)
    gave_up = threading.Event()
    real = keys_module._destroy_enabler

    def hang_until_the_caller_gave_up(hs, enabler):
        gave_up.wait(timeout=30)
        real(hs, enabler)

    # The disable's token write: destroying its enabler (a KEK is immutable).
    monkeypatch.setattr(keys_module, "_destroy_enabler", hang_until_the_caller_gave_up)
    try:
        with pytest.raises(StrongroomError) as info:
            keys.disable_key(ADMIN, "k1", 1)
        gave_up.set()
        assert info.value.reason == "HSM_TIMEOUT"
        assert "recorded and may still complete" in info.value.message
        versions = km.describe_key("k1", timeout=30).versions
    finally:
        gave_up.set()
        audit.close()
    assert [v.state for v in versions] == [KeyState.DISABLED]
    last = _records(tmp_path / "audit.log")[-1]
    assert (last["action"], last["decision"], last["key"]["version"]) == (
        "disable_key",
        "allowed",
        1,
    )


@pytest.mark.parametrize("change", ["rotate_key", "disable_key"])
def test_a_key_change_whose_record_fails_is_not_made(service, monkeypatch, change: str) -> None:
    """The change was made first and recorded after: a full or failing audit log left a
    rotation or a disable live with no record, its caller told the request failed."""
    keys, log = service
    keys.create_key(ADMIN, "k1")

    def refuse(event):
        raise AuditUnavailable("disk full")

    monkeypatch.setattr(keys._audit, "append", refuse)
    with pytest.raises(AuditUnavailable):
        _change(keys, change)
    monkeypatch.undo()
    info = keys._keys.describe_key("k1")
    assert [v.state for v in info.versions] == [KeyState.ENABLED]
    assert [r["action"] for r in _records(log)] == ["create_key"]


def test_a_recorded_key_change_that_fails_in_the_hsm_is_recorded_as_refused(
    service, monkeypatch
) -> None:
    keys, log = service
    keys.create_key(ADMIN, "k1")

    def fail(hs, enabler):
        raise FailedPrecondition("the token refused", reason="HSM_ERROR")

    monkeypatch.setattr(keys_module, "_destroy_enabler", fail)
    with pytest.raises(FailedPrecondition):
        keys.disable_key(ADMIN, "k1", 1)
    allowed, denied = _records(log)[1:]
    assert (allowed["decision"], denied["decision"], denied["reason"]) == (
        "allowed",
        "denied",
        "HSM_ERROR",
    )
    assert denied["decision_id"] == allowed["decision_id"]


def test_a_data_key_is_audited_with_the_model_it_is_bound_to(service) -> None:
    keys, log = service
    keys.create_key(ADMIN, "k1")
    data_key = keys.generate_data_key(PUBLISHER, "k1", "acme/fraud-detector", "1.4.0")
    data_key.wipe()
    record = _records(log)[-1]
    assert (record["action"], record["reason"]) == ("generate_data_key", "DATA_KEY_GENERATED")
    assert record["claims"] == {"model_name": "acme/fraud-detector", "model_version": "1.4.0"}


def test_a_data_key_the_hsm_side_refuses_is_audited_with_its_reason(service) -> None:
    """Only the release policy's refusals of GenerateDataKey were recorded: a key that does not
    exist or whose current version is disabled was refused with no trace in the log."""
    keys, log = service
    keys.create_key(ADMIN, "k1")
    keys.disable_key(ADMIN, "k1", 1)
    for key_id, reason in (("k1", "KEY_DISABLED"), ("nope", "KEY_NOT_FOUND")):
        with pytest.raises(StrongroomError) as info:
            keys.generate_data_key(PUBLISHER, key_id, "acme/m", "1")
        assert info.value.reason == reason
        record = _records(log)[-1]
        assert (record["action"], record["decision"], record["reason"]) == (
            "generate_data_key",
            "denied",
            reason,
        )
        assert record["key"]["id"] == key_id
        assert record["caller"]["spiffe_id"] == PUBLISHER.spiffe_id
        assert record["claims"]["model_name"] == "acme/m"


@pytest.mark.parametrize(
    ("name", "version", "reason"),
    [
        ("", "", "INVALID_MODEL_NAME"),
        ("", "1", "INVALID_MODEL_NAME"),
        ("acme/m", "", "INVALID_MODEL_VERSION"),
        ("../etc", "1", "INVALID_MODEL_NAME"),
        ("acme/m", "1 2", "INVALID_MODEL_VERSION"),
    ],
)
def test_a_data_key_for_no_valid_model_is_refused_before_the_hsm(
    service, name: str, version: str, reason: str
) -> None:
    """GenerateDataKey without a model (an older client) must not hand out an unbound key."""
    keys, log = service
    keys.create_key(ADMIN, "k1")
    with pytest.raises(InvalidArgument) as info:
        keys.generate_data_key(PUBLISHER, "k1", name, version)
    assert info.value.reason == reason
    assert [r["action"] for r in _records(log)] == ["create_key"]


def _with_publishers(keys: KeyService, entries: list[dict[str, object]]) -> None:
    keys.create_key(ADMIN, "k1")
    keys.set_policy(ADMIN, "k1", POLICY + "publishers:\n" + "".join(
        f"  - {{spiffe_id: '{e['spiffe_id']}', model_names: {json.dumps(e['model_names'])}}}\n"
        for e in entries
    ))  # fmt: skip


def test_a_policy_naming_publishers_admits_each_to_its_model_names(service) -> None:
    """Bound data keys stop a key generated for one model from writing another; without this,
    any publisher identity could still ask for a key for any name (another tenant's model)."""
    keys, log = service
    _with_publishers(keys, [{"spiffe_id": PUBLISHER.spiffe_id, "model_names": ["tenant-a/"]}])
    keys.generate_data_key(PUBLISHER, "k1", "tenant-a/model", "1").wipe()
    other = Caller("spiffe://strongroom.test/publisher-b", 0x21, b"")
    for caller, name, reason in [
        (PUBLISHER, "tenant-b/model", "MODEL_NAME_NOT_ALLOWED"),
        (other, "tenant-a/model", "PUBLISHER_NOT_ALLOWED"),
    ]:
        with pytest.raises(PermissionDenied) as info:
            keys.generate_data_key(caller, "k1", name, "7")
        assert info.value.reason == reason
        record = _records(log)[-1]
        assert (record["action"], record["decision"], record["reason"]) == (
            "generate_data_key",
            "denied",
            reason,
        )
        assert record["caller"]["spiffe_id"] == caller.spiffe_id
        assert record["claims"] == {"model_name": name, "model_version": "7"}
    allowed = [r for r in _records(log) if r["action"] == "generate_data_key"]
    assert [r["decision"] for r in allowed] == ["allowed", "denied", "denied"]


def test_a_data_key_decision_names_the_policy_document_that_judged_it(service) -> None:
    """A policy's publishers list decides who gets a data key for which name, but the
    generate_data_key records (granted or refused) named no policy at all: a publishers list
    loosened by hand under the version it had could not be told from the one before by any of
    them. Each now names the document by version and SHA-256, as release records do."""
    keys, log = service
    _with_publishers(keys, [{"spiffe_id": PUBLISHER.spiffe_id, "model_names": ["tenant-a/"]}])
    keys.generate_data_key(PUBLISHER, "k1", "tenant-a/model", "1").wipe()
    with pytest.raises(PermissionDenied):
        keys.generate_data_key(PUBLISHER, "k1", "tenant-b/model", "1")
    on_disk = hashlib.sha256((log.parent / "policies" / "k1.yaml").read_bytes()).hexdigest()
    decisions = [r for r in _records(log) if r["action"] == "generate_data_key"]
    assert [(r["decision"], r["policy_version"], r["policy_sha256"]) for r in decisions] == [
        ("allowed", "p1", on_disk),
        ("denied", "p1", on_disk),
    ]
    keys.create_key(ADMIN, "k2")  # no policy: nothing judged the data key, none is named
    keys.generate_data_key(PUBLISHER, "k2", "tenant-b/model", "1").wipe()
    assert (_records(log)[-1]["policy_version"], _records(log)[-1]["policy_sha256"]) == (None, None)


def test_a_policy_that_does_not_read_admits_no_publisher(service) -> None:
    keys, log = service
    _with_publishers(keys, [{"spiffe_id": PUBLISHER.spiffe_id, "model_names": ["tenant-a/"]}])
    stored = log.parent / "policies" / "k1.yaml"
    stored.write_text("version: [", encoding="utf-8")
    with pytest.raises(StrongroomError) as info:
        keys.generate_data_key(PUBLISHER, "k1", "tenant-a/model", "1")
    assert info.value.reason == "POLICY_SYNTAX"
    assert _records(log)[-1]["decision"] == "denied"


def test_an_audit_outage_is_not_logged_as_a_policy_that_does_not_load(km, tmp_path, caplog) -> None:
    """GenerateDataKey records a policy in force before judging by it; an audit log that refuses
    that record (an outage, a tampered log) is no failure of the policy, but the call reported
    whatever the store's lookup raised as one: an ERROR 'the release policy of a key does not
    load' naming the audit log's failure and the sound policy's file, sending the operator to a
    policy with nothing wrong (a release lets these through untouched)."""
    caplog.set_level(logging.WARNING, "strongroom.keybroker.policies")
    audit = AuditLog.open(tmp_path / "audit.log", ed25519.Ed25519PrivateKey.generate())
    down = AuditLog.open(tmp_path / "down.log", ed25519.Ed25519PrivateKey.generate())
    try:
        _with_publishers(
            KeyService(km, PolicyStore(tmp_path / "policies"), audit),
            [{"spiffe_id": PUBLISHER.spiffe_id, "model_names": ["tenant-a/"]}],
        )
        down.close()  # the store's records of the policies in force are refused from now on
        keys = KeyService(km, PolicyStore(tmp_path / "policies", audit=down), audit)
        for _ in range(3):
            with pytest.raises(StrongroomError) as info:
                keys.generate_data_key(PUBLISHER, "k1", "tenant-a/model", "1")
            assert info.value.status_name == "UNAVAILABLE", info.value
        lines = [
            r.getMessage() for r in caplog.records if r.name == "strongroom.keybroker.policies"
        ]
        assert lines == []  # before: one ERROR naming the closed audit log and k1.yaml
    finally:
        audit.close()


def test_data_keys_a_broken_policy_refuses_cannot_fill_the_log(km, tmp_path, caplog) -> None:
    """GenerateDataKey under a key whose stored policy does not load (the broker's error, not
    the caller's) was recorded every time, outside any budget: one publisher calling it in a loop
    wrote a record a call. The broker's failures have a budget of their own per caller and
    reason now (256, then 1 a second), counted past it and accounted for by count. The operator
    hears of the policy once (an ERROR naming its file; before: nothing), however many publishers'
    calls and key descriptions (a WARNING each, before) met it."""
    caplog.set_level(logging.WARNING, "strongroom.keybroker.policies")
    audit = AuditLog.open(tmp_path / "audit.log", ed25519.Ed25519PrivateKey.generate())
    keys = KeyService(km, PolicyStore(tmp_path / "policies"), audit, clock=lambda: 1000.0)
    log = tmp_path / "audit.log"
    try:
        _with_publishers(keys, [{"spiffe_id": PUBLISHER.spiffe_id, "model_names": ["tenant-a/"]}])
        (tmp_path / "policies" / "k1.yaml").write_text("version: [", encoding="utf-8")
        before = len(_records(log))
        flood = refusals.BROKER_REFUSAL_BURST + 10
        for _ in range(flood):
            with pytest.raises(StrongroomError) as info:
                keys.generate_data_key(PUBLISHER, "k1", "tenant-a/model", "1")
            assert info.value.reason == "POLICY_SYNTAX"  # the answer never depends on it
        refused = _records(log)[before:]
        assert len(refused) == refusals.BROKER_REFUSAL_BURST + 1  # before: `flood`
        assert [keys.policy_version("k1") for _ in range(3)] == ["", "", ""]
        lines = [
            (r.levelname, r.getMessage())
            for r in caplog.records
            if r.name == "strongroom.keybroker.policies"
        ]
        assert [level for level, _ in lines] == ["ERROR"], lines  # before: 3 WARNINGs, no ERROR
        assert lines[0][1].startswith(
            "the release policy of a key does not load; nothing is released under it: the "
            "stored release policy of 'k1' does not load: "
        )
        assert lines[0][1].endswith(f"(its file: {tmp_path / 'policies' / 'k1.yaml'})")
        keys.record_counted_refusals(every=True)
    finally:
        audit.close()
    refused = _records(log)[before:]
    assert refused[-1]["reason"] == "REFUSALS_COUNTED"
    assert refused[-1]["claims"]["counted_reason"] == "POLICY_SYNTAX"
    assert (
        sum(
            (r["reason"] == "POLICY_SYNTAX") + r["claims"].get("refusals_unrecorded", 0)
            for r in refused
        )
        == flood
    )


def test_a_key_without_a_policy_admits_every_publisher(service) -> None:
    keys, _ = service
    keys.create_key(ADMIN, "k1")
    keys.generate_data_key(PUBLISHER, "k1", "any/model", "1").wipe()


def test_refused_rewraps_are_recorded_up_to_a_rate_per_caller(km, tmp_path) -> None:
    """Each refused ReWrap was an fsync'd audit record costing its caller nothing (a blob of the
    wrong length is refused before the HSM): one publisher could grow the log until its size cap
    refused every decision, key releases included, with AUDIT_LOG_FULL."""
    now = [1000.0]
    audit = AuditLog.open(tmp_path / "audit.log", ed25519.Ed25519PrivateKey.generate())
    keys = KeyService(km, PolicyStore(tmp_path / "policies"), audit, clock=lambda: now[0])
    keys.create_key(ADMIN, "k1")
    other = Caller("spiffe://strongroom.test/publisher-b", 0x21, b"")

    def refused(caller: Caller = PUBLISHER) -> str:
        with pytest.raises(StrongroomError) as info:
            keys.rewrap(caller, "k1", 1, b"\x01")
        return info.value.reason

    try:
        assert {refused() for _ in range(refusals.REFUSAL_BURST)} == {"WRAPPED_KEY_INVALID"}
        assert {refused() for _ in range(10)} == {"REWRAP_REFUSALS_RATE_LIMITED"}
        assert refused(other) == "WRAPPED_KEY_INVALID"  # per caller
        # A minute later the bucket has refilled (and is spent again); the next limited refusal
        # is recorded with the count of those left unrecorded.
        now[0] += refusals.LIMITED_RECORD_SECONDS
        while refused() != "REWRAP_REFUSALS_RATE_LIMITED":
            pass
    finally:
        audit.close()
    rewraps = [r for r in _records(tmp_path / "audit.log") if r["action"] == "rewrap"]
    counted = [
        (r["reason"], r["claims"]["refusals_unrecorded"])
        for r in rewraps
        if "refusals_unrecorded" in r["claims"]
    ]
    # The 9 left unrecorded go on the caller's next refusal recorded on its own (after the
    # refill); the next limited one is a counting record again, with none since.
    assert counted == [
        ("REWRAP_REFUSALS_RATE_LIMITED", 0),
        ("WRAPPED_KEY_INVALID", 9),
        ("REWRAP_REFUSALS_RATE_LIMITED", 0),
    ]
    assert len(rewraps) == refusals.REFUSAL_BURST + 1 + 60 + 1 + 1


def test_refused_rewraps_whose_record_the_log_refuses_are_counted_not_lost(
    km, tmp_path, monkeypatch
) -> None:
    """A refused ReWrap's count was taken before its record was written: when the audit log
    refused it (full: what a flood of refusals brings about), the count and the refusal were
    gone. They are counted again and reach the log once it takes records."""
    now = [1000.0]
    audit = AuditLog.open(tmp_path / "audit.log", ed25519.Ed25519PrivateKey.generate())
    keys = KeyService(km, PolicyStore(tmp_path / "policies"), audit, clock=lambda: now[0])
    keys.create_key(ADMIN, "k1")

    def refused() -> str:
        with pytest.raises(StrongroomError) as info:
            keys.rewrap(PUBLISHER, "k1", 1, b"\x01")
        return info.value.reason

    def full(event, **kwargs):
        raise AuditUnavailable("the audit log is full", reason="AUDIT_LOG_FULL")

    real_append = audit.append
    try:
        for _ in range(refusals.REFUSAL_BURST + 1 + 9):  # the burst, a counting record, 9 counted
            refused()
        monkeypatch.setattr(audit, "append", full)
        now[0] += 1.0  # one token: recorded on its own with the 9, and the log refuses it
        # The caller hears its own refusal either way (as a refused key release does); the
        # record the log would not take is counted.
        assert refused() == "WRAPPED_KEY_INVALID"
        now[0] += refusals.LIMITED_RECORD_SECONDS  # refilled, then over again: a counting record
        for _ in range(60):
            assert refused() == "WRAPPED_KEY_INVALID"
        assert refused() == "REWRAP_REFUSALS_RATE_LIMITED"
        monkeypatch.setattr(audit, "append", real_append)
        keys.record_counted_refusals(every=True)
    finally:
        audit.close()
    last = _records(tmp_path / "audit.log")[-1]
    assert (last["reason"], last["claims"]["refusals_unrecorded"]) == (
        "REFUSALS_COUNTED",
        9 + 1 + 60 + 1,
    )


def test_a_refused_data_key_whose_record_the_log_refuses_is_answered_with_its_refusal(
    km, tmp_path, monkeypatch, caplog
) -> None:
    """GenerateDataKey answered the log's error (AUDIT_LOG_FULL) for a refusal the log would not
    take, while a refused key release answers its own refusal: one rule now, the refusal, with
    the failure to record it logged (and counted for the next record). Logged as a refused key
    release's is: a WARNING within the caller's budget of refusal lines when the refusal was its
    own (it was an ERROR per refusal, the one the key release's no longer is: the audit log's
    failure has its own line)."""
    audit = AuditLog.open(tmp_path / "audit.log", ed25519.Ed25519PrivateKey.generate())
    keys = KeyService(km, PolicyStore(tmp_path / "policies"), audit, clock=lambda: 1000.0)
    _with_publishers(keys, [{"spiffe_id": PUBLISHER.spiffe_id, "model_names": ["tenant-a/"]}])

    def full(event, **kwargs):
        raise AuditUnavailable("the audit log is full", reason="AUDIT_LOG_FULL")

    monkeypatch.setattr(audit, "append", full)
    try:
        with pytest.raises(StrongroomError) as info:
            keys.generate_data_key(PUBLISHER, "k1", "tenant-b/model", "1")
        assert info.value.reason == "MODEL_NAME_NOT_ALLOWED"
        # A key that would be granted is still never handed out unrecorded.
        with pytest.raises(AuditUnavailable):
            keys.generate_data_key(PUBLISHER, "k1", "tenant-a/model", "1")
    finally:
        audit.close()
    unaudited = [
        (r.levelname, getattr(r, REFUSAL_LINE, None), getattr(r, "reason", None))
        for r in caplog.records
        if r.getMessage() == "could not audit a refused generate_data_key"
    ]
    assert unaudited == [("WARNING", True, "MODEL_NAME_NOT_ALLOWED")]


def test_refused_data_keys_are_recorded_up_to_a_rate_per_caller(km, tmp_path) -> None:
    """A publisher a key's policy does not name got an fsync'd refusal record per call, with no
    HSM work: the same unbounded growth of the log as refused re-wraps."""
    audit = AuditLog.open(tmp_path / "audit.log", ed25519.Ed25519PrivateKey.generate())
    keys = KeyService(km, PolicyStore(tmp_path / "policies"), audit, clock=lambda: 1000.0)
    _with_publishers(keys, [{"spiffe_id": PUBLISHER.spiffe_id, "model_names": ["tenant-a/"]}])
    other = Caller("spiffe://strongroom.test/publisher-b", 0x21, b"")
    reasons = []
    try:
        for _ in range(refusals.REFUSAL_BURST + 5):
            with pytest.raises(StrongroomError) as info:
                keys.generate_data_key(other, "k1", "tenant-a/model", "1")
            reasons.append(info.value.reason)
        keys.generate_data_key(PUBLISHER, "k1", "tenant-a/model", "1").wipe()  # per caller
    finally:
        audit.close()
    assert (
        reasons
        == ["PUBLISHER_NOT_ALLOWED"] * refusals.REFUSAL_BURST
        + ["DATA_KEY_REFUSALS_RATE_LIMITED"] * 5
    )
    data_keys = [r for r in _records(tmp_path / "audit.log") if r["action"] == "generate_data_key"]
    assert len(data_keys) == refusals.REFUSAL_BURST + 1 + 1
    assert data_keys[-2]["reason"] == "DATA_KEY_REFUSALS_RATE_LIMITED"
    assert data_keys[-2]["claims"]["refusals_unrecorded"] == 0


def test_refused_data_keys_counted_past_the_budget_reach_the_log_once_it_refills(
    km, tmp_path
) -> None:
    """The refusals counted past the budget were written only by a later counting record, due
    only while the caller stays over its rate: a publisher back within it left them out of the
    log. Its next refusal recorded on its own carries them now."""
    now = [1000.0]
    audit = AuditLog.open(tmp_path / "audit.log", ed25519.Ed25519PrivateKey.generate())
    keys = KeyService(km, PolicyStore(tmp_path / "policies"), audit, clock=lambda: now[0])
    _with_publishers(keys, [{"spiffe_id": PUBLISHER.spiffe_id, "model_names": ["tenant-a/"]}])
    other = Caller("spiffe://strongroom.test/publisher-b", 0x21, b"")
    try:
        for _ in range(refusals.REFUSAL_BURST + 1 + 4):  # the burst, a counting record, 4 counted
            with pytest.raises(StrongroomError):
                keys.generate_data_key(other, "k1", "tenant-a/model", "1")
        now[0] += 5.0  # back within the rate, before the next counting record is due
        for _ in range(2):
            with pytest.raises(StrongroomError) as info:
                keys.generate_data_key(other, "k1", "tenant-a/model", "1")
            assert info.value.reason == "PUBLISHER_NOT_ALLOWED"
    finally:
        audit.close()
    data_keys = [r for r in _records(tmp_path / "audit.log") if r["action"] == "generate_data_key"]
    assert [r["claims"].get("refusals_unrecorded") for r in data_keys[-3:]] == [0, 4, None]


def test_the_brokers_own_failures_do_not_spend_a_callers_refusal_budget(
    km, tmp_path, service
) -> None:
    """An HSM outage or a policy file that does not read refuses every call, recorded with its
    reason; counted against the callers, they turned into a rate limit after 64 calls."""
    keys, log = service
    _with_publishers(keys, [{"spiffe_id": PUBLISHER.spiffe_id, "model_names": ["tenant-a/"]}])
    (log.parent / "policies" / "k1.yaml").write_text("version: [", encoding="utf-8")
    km.hsm.close()
    reasons = set()
    for _ in range(refusals.REFUSAL_BURST + 2):
        for call in (
            lambda: keys.rewrap(PUBLISHER, "k1", 1, b"\x01" * 40),
            lambda: keys.generate_data_key(PUBLISHER, "k1", "tenant-a/model", "1"),
        ):
            with pytest.raises(StrongroomError) as info:
                call()
            reasons.add(info.value.reason)
    assert reasons == {"HSM_CLOSED", "POLICY_SYNTAX"}


def test_a_stale_compare_and_swap_is_refused_recorded_and_stores_nothing(service) -> None:
    keys, log = service
    keys.create_key(ADMIN, "k1")
    keys.set_policy(ADMIN, "k1", POLICY, expected_version="")  # the key has none yet
    p2 = POLICY.replace('"p1"', '"p2"')
    keys.set_policy(ADMIN, "k1", p2, expected_version="p1")
    stale = POLICY.replace('"p1"', '"p3"')
    for expected in ("p1", ""):
        with pytest.raises(PolicyChanged) as raised:
            keys.set_policy(ADMIN, "k1", stale, expected_version=expected)
        assert raised.value.reason == "POLICY_CHANGED"
        assert "is at version 'p2' now" in raised.value.message
        refused = _records(log)[-1]
        assert (refused["action"], refused["decision"], refused["reason"]) == (
            "set_release_policy",
            "denied",
            "POLICY_CHANGED",
        )
        assert refused["caller"]["spiffe_id"] == ADMIN.spiffe_id
        assert refused["policy_version"] == "p3"
        assert refused["policy_sha256"] == hashlib.sha256(stale.encode()).hexdigest()
        assert refused["claims"] == {
            "expected_policy_version": expected,
            "live_policy_version": "p2",
        }
    assert keys.get_policy("k1").document == p2
    changes = [r for r in _records(log) if r["action"] == "set_release_policy"]
    assert [(r["decision"], r["claims"]) for r in changes[:2]] == [
        ("allowed", {"expected_policy_version": ""}),
        ("allowed", {"expected_policy_version": "p1"}),
    ]


def test_a_compare_and_swap_another_replica_overtook_after_its_record_is_recorded_refused(
    service, tmp_path, monkeypatch
) -> None:
    """Another broker process sharing the policy directory changed the policy between this
    change's check and its write: the check is repeated under the directory's lock, so this
    change's ALLOWED record is followed by a DENIED one (same decision id) and the other stays."""
    keys, log = service
    keys.create_key(ADMIN, "k1")
    keys.set_policy(ADMIN, "k1", POLICY)
    replica = PolicyStore(tmp_path / "policies")
    theirs = POLICY.replace('"p1"', '"theirs"')
    real_write = keys._policies.write

    def overtaken(key_id, stored, **kwargs):
        replica.put(key_id, theirs)
        return real_write(key_id, stored, **kwargs)

    monkeypatch.setattr(keys._policies, "write", overtaken)
    with pytest.raises(PolicyChanged):
        keys.set_policy(ADMIN, "k1", POLICY.replace('"p1"', '"mine"'), expected_version="p1")
    allowed, denied = _records(log)[-2:]
    assert (allowed["decision"], denied["decision"]) == ("allowed", "denied")
    assert denied["decision_id"] == allowed["decision_id"]
    assert denied["reason"] == "POLICY_CHANGED"
    assert denied["claims"]["live_policy_version"] == "theirs"
    assert keys.get_policy("k1").document == theirs


def test_an_expected_version_no_policy_could_have_is_invalid_argument(service) -> None:
    keys, log = service
    keys.create_key(ADMIN, "k1")
    before = len(_records(log))
    for expected in ("v" * 257, "1\n# approved"):
        with pytest.raises(InvalidArgument) as raised:
            keys.set_policy(ADMIN, "k1", POLICY, expected_version=expected)
        assert raised.value.reason == "POLICY_BAD_VALUE"
    assert len(_records(log)) == before and keys.policy_version("k1") == ""


def test_a_policy_written_whose_directory_sync_fails_is_recorded_made_not_refused(
    service, monkeypatch
) -> None:
    """The write renamed the new policy into place, then the directory's fsync failed (EIO): the
    change was live for every replica, yet recorded DENIED and answered POLICY_STORE_READ_ONLY,
    so the log's outcome for the policy judging every release was "not made"."""
    keys, log = service
    keys.create_key(ADMIN, "k1")
    keys.set_policy(ADMIN, "k1", POLICY)

    def failing_sync(path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files, "fsync_dir", failing_sync)
    p2 = POLICY.replace('"p1"', '"p2"')
    assert keys.set_policy(ADMIN, "k1", p2, expected_version="p1").policy.version == "p2"
    assert keys.get_policy("k1").document == p2
    change = _records(log)[-1]
    assert (change["action"], change["decision"], change["policy_version"]) == (
        "set_release_policy",
        "allowed",
        "p2",
    )

    # A write that never reached the file is still refused, recorded DENIED, nothing stored.
    def failing_write(path, data, **_) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(policies_module, "atomic_write", failing_write)
    with pytest.raises(FailedPrecondition) as raised:
        keys.set_policy(ADMIN, "k1", POLICY.replace('"p1"', '"p3"'), expected_version="p2")
    assert raised.value.reason == "POLICY_STORE_READ_ONLY"
    assert _records(log)[-1]["decision"] == "denied"
    assert keys.get_policy("k1").document == p2


def test_a_policy_renamed_in_whose_sync_and_read_back_both_fail_is_recorded_made(
    service, monkeypatch
) -> None:
    """The write renamed the new policy into place, then the directory's fsync failed, and the
    store told "renamed, only the sync failed" from "never renamed" by reading the file back,
    which a failing disk (or an NFS server gone meanwhile) refuses with the same EIO: the live
    change was recorded DENIED and answered POLICY_STORE_READ_ONLY. The write itself now says
    which step failed: a rename that was made is the change's outcome, recorded ALLOWED."""
    keys, log = service
    keys.create_key(ADMIN, "k1")
    keys.set_policy(ADMIN, "k1", POLICY)
    failing = OSError(errno.EIO, "Input/output error")
    failed: list[object] = []

    def failing_sync(path) -> None:
        failed.append(path)
        raise failing

    def unreadable(path, *args, **kwargs):  # from the failed sync on, as the disk fails
        if failed and str(path).endswith("k1.yaml"):
            raise failing
        return open(path, *args, **kwargs)

    monkeypatch.setattr(files, "fsync_dir", failing_sync)
    monkeypatch.setattr(policies_module, "open", unreadable, raising=False)
    p2 = POLICY.replace('"p1"', '"p2"')
    assert keys.set_policy(ADMIN, "k1", p2, expected_version="p1").policy.version == "p2"
    monkeypatch.undo()
    assert keys.get_policy("k1").document == p2
    change = _records(log)[-1]
    assert (change["action"], change["decision"], change["policy_version"]) == (
        "set_release_policy",
        "allowed",
        "p2",
    )


def test_a_change_queued_behind_a_stuck_change_of_the_key_is_refused_busy_in_bound(
    km, tmp_path
) -> None:
    """A policy change waited for this process's other change of the key without a bound (the
    directory's lock was bounded, its per-key turn was not): behind a holder stuck on a hung
    file system (or a hung audit volume) each queued change added its own wait, and a few held
    every control-plane worker. The whole wait is bounded now: refused POLICY_STORE_BUSY,
    unrecorded (nothing was attempted), nothing stored."""
    audit = AuditLog.open(tmp_path / "audit.log", ed25519.Ed25519PrivateKey.generate())
    keys = KeyService(km, PolicyStore(tmp_path / "policies"), audit, policy_lock_wait=0)
    try:
        keys.create_key(ADMIN, "k1")
        keys.set_policy(ADMIN, "k1", POLICY)
        before = len(_records(tmp_path / "audit.log"))
        stuck = keys._policy_lock("k1")
        stuck.acquire()  # the stuck change, mid-way
        outcome: list[BaseException | None] = []

        def change() -> None:
            try:
                keys.set_policy(ADMIN, "k1", POLICY.replace('"p1"', '"p2"'), expected_version="p1")
            except BaseException as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

        queued = threading.Thread(target=change, daemon=True)
        queued.start()
        queued.join(120)  # a guard against the old unbounded wait, not a measurement
        stuck.release()
        queued.join()
        [refusal] = outcome
        assert isinstance(refusal, PolicyStoreBusy), refusal
        assert refusal.reason == "POLICY_STORE_BUSY" and "nothing was stored" in refusal.message
        assert len(_records(tmp_path / "audit.log")) == before
        assert keys.get_policy("k1").policy.version == "p1"
    finally:
        audit.close()


def test_a_change_queued_behind_another_of_the_key_stops_waiting_when_its_caller_gives_up(
    km, tmp_path
) -> None:
    """A change waiting for this process's other change of the key did not ask whether its
    caller still waited (only its wait for the directory's lock did): a call whose deadline had
    passed kept its worker for the whole bound, then was recorded ALLOWED for a change nobody
    waited for, and DENIED. Its turn is waited for as the lock is now: the caller gone, it stops
    with the caller's outcome, unrecorded (nothing was attempted), nothing stored."""
    audit = AuditLog.open(tmp_path / "audit.log", ed25519.Ed25519PrivateKey.generate())
    keys = KeyService(km, PolicyStore(tmp_path / "policies"), audit, policy_lock_wait=2)
    try:
        keys.create_key(ADMIN, "k1")
        keys.set_policy(ADMIN, "k1", POLICY)
        before = len(_records(tmp_path / "audit.log"))
        asked: list[None] = []

        def gone() -> None:  # the caller's deadline passed while it waited
            asked.append(None)
            raise DeadlineExceeded("the call's deadline passed")

        stuck = keys._policy_lock("k1")
        stuck.acquire()  # another change of the key, mid-way
        try:
            with pytest.raises(DeadlineExceeded):
                keys.set_policy(
                    ADMIN,
                    "k1",
                    POLICY.replace('"p1"', '"p2"'),
                    expected_version="p1",
                    still_wanted=gone,
                )
        finally:
            stuck.release()
        assert asked
        assert len(_records(tmp_path / "audit.log")) == before
        assert keys.get_policy("k1").policy.version == "p1"
    finally:
        audit.close()

"""The audit log: records, chain, signed head, tamper detection, crash repair, failures, concurrency."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from strongroom.errors import DataLoss, InvalidArgument, NotFound, Unavailable
from strongroom.keybroker import audit as audit_module
from strongroom.keybroker.audit import (
    GENESIS_HASH,
    AuditEvent,
    AuditLog,
    Decision,
    canonical_json,
    head_path,
    load_public_key,
    load_signing_key,
    new_signing_key,
    record_hash,
    record_signed_by,
)
from strongroom.keybroker.audit_head import HEAD_DOMAIN
from strongroom.keybroker.audit_verify import verify_audit_log
from strongroom.keybroker.errors import AuditUnavailable
from strongroom.runtime.secrets import Secret
from tests.keybroker.helpers import ec_spki_on_an_unsupported_curve

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "decisions.jsonl"


@pytest.fixture
def audit(log_path: Path, signing_key: Ed25519PrivateKey) -> Iterator[AuditLog]:
    log_path.parent.mkdir()
    log = AuditLog.open(log_path, signing_key, clock=lambda: 1_767_225_600.25)
    yield log
    log.close()


def _nested(depth: int) -> dict[str, Any]:
    """Claims whose innermost container sits ``depth`` levels below the claims mapping."""
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"d": value}
    return value


def event(n: int = 0, **overrides: Any) -> AuditEvent:
    values: dict[str, Any] = {
        "decision": Decision.ALLOWED if n % 2 == 0 else Decision.DENIED,
        "reason": "OK" if n % 2 == 0 else "MEASUREMENT_MISMATCH",
        "caller_spiffe_id": "spiffe://strongroom.test/inference",
        "caller_cert_serial": f"{0x1F00 + n:x}",
        "evidence_sha256": f"{n:064x}",
        "claims": {"measurement": "ab" * 48, "tcb": {"snp": 22, "microcode": 213}, "n": n},
        "policy_version": "policy-7",
        "key_id": "model-a",
        "key_version": 3,
        "oaep_mechanism": "RSA-OAEP/SHA-1/MGF1-SHA-1",
    }
    values.update(overrides)
    return AuditEvent(**values)


def fill(log: AuditLog, count: int) -> None:
    for n in range(count):
        log.append(event(n))


# A log line well under MAX_RECORD_BYTES nested past the interpreter's recursion limit.
_DEEP_LINE = b"[" * 20_000 + b"]" * 20_000 + b"\n"


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_record_contents(audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey) -> None:
    first = audit.append(event(0, decision_id="req-1"))
    second = audit.append(event(1))
    assert (first.seq, second.seq) == (0, 1)
    assert first.decision_id == "req-1" and len(second.decision_id) == 32
    assert first.time == "2026-01-01T00:00:00.250000Z"
    records = [json.loads(line) for line in lines(log_path)]
    # A new log starts from a random value (its first head's), not from the shared all-zeros one.
    assert records[0]["prev"] != GENESIS_HASH and re.fullmatch(r"[0-9a-f]{64}", records[0]["prev"])
    assert records[1]["prev"] == records[0]["hash"] == first.hash
    assert records[0]["decision"] == "allowed" and records[1]["decision"] == "denied"
    assert records[0]["caller"] == {
        "spiffe_id": "spiffe://strongroom.test/inference",
        "cert_serial": "1f00",
    }
    assert records[0]["key"] == {"id": "model-a", "version": 3}
    assert records[0]["claims"]["tcb"] == {"snp": 22, "microcode": 213}
    body = dict(records[1])
    assert record_hash({k: v for k, v in body.items() if k != "hash"}) == body["hash"]
    assert lines(log_path)[1] == canonical_json(body) + b"\n"
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert result.intact and result.records == 2 and result.signature_checked
    assert result.last_hash == second.hash


def test_records_with_awkward_claims_are_canonical_and_signed(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    # The committer assembles each line from members encoded beforehand; the result must be the
    # canonical JSON of the whole record (unsorted nested keys, non-ASCII, floats, tuples, empty
    # containers, quotes and backslashes in values).
    claims = {
        "z": {"b": [1, 2.5, None, True], "a": 'é\u2028"\\'},
        "a": ("x", {"y": -0.0, "x": 1e300}),
        "m": {},
        "l": [],
    }
    audit.append(event(0, claims=claims, policy_version='p"\\v'))
    audit.append(event(1, claims={}))
    for line in lines(log_path):
        record = json.loads(line)
        assert line == canonical_json(record) + b"\n"
        assert record_signed_by(line.rstrip(b"\n"), signing_key.public_key())
    assert json.loads(lines(log_path)[0])["claims"]["a"] == ["x", {"x": 1e300, "y": -0.0}]
    assert verify_audit_log(log_path, public_key=signing_key.public_key()).intact


# The granted release the first and last pinned records describe (with and without the key).
_RELEASE: dict[str, Any] = dict(
    decision=Decision.ALLOWED,
    reason="RELEASED",
    caller_spiffe_id="spiffe://strongroom.test/inference",
    caller_cert_serial="1f00",
    evidence_sha256="e" * 64,
    claims={
        "z": {"b": [1, 2.5, None, True], "a": 'é"\\'},
        "a": ("x", {"y": -0.0}),
        "m": {},
    },
    policy_version="v1",
    policy_sha256="b" * 64,
    key_id="model-a",
    key_version=3,
    oaep_mechanism="CKM_RSA_PKCS_OAEP/SHA-256",
    decision_id="req-1",
)


# A record's bytes for fixed inputs (Ed25519 signs deterministically): the encoder may change
# how it builds them, never what it writes, signs or hashes. The granted release's record changed
# once, deliberately: it now names the release-signing key that signed the answer
# (``release_signing_key_id``, placed by the canonical sort between ``reason`` and ``seq``); the
# same event without it, as releases were recorded before, keeps its bytes (the last case), as
# does every other record.
_PINNED_RECORDS = [
    (
        AuditEvent(**_RELEASE, release_signing_key_id="c" * 64),
        7,
        "ab" * 32,
        "2026-12-06T12:00:00.000000Z",
        b'{"action":"key_release","caller":{"cert_serial":"1f00","spiffe_id":'
        b'"spiffe://strongroom.test/inference"},"claims":{"a":["x",{"y":-0.0}],"m":{},'
        b'"z":{"a":"\\u00e9\\"\\\\","b":[1,2.5,null,true]}},"decision":"allowed",'
        b'"decision_id":"req-1","evidence_sha256":"' + b"e" * 64 + b'","hash":'
        b'"e0cb049eddb68afa7187868e41a025736faa385b44dbf9ec15b66f2142c7595d",'
        b'"key":{"id":"model-a","version":3},"oaep_mechanism":"CKM_RSA_PKCS_OAEP/SHA-256",'
        b'"policy_sha256":"' + b"b" * 64 + b'","policy_version":"v1","prev":"' + b"ab" * 32 + b'",'
        b'"reason":"RELEASED","release_signing_key_id":"' + b"c" * 64 + b'",'
        b'"seq":7,"sig":"m53eH6JASz2y9Px4ddOv6ZE59bfntiDykVfH1LFyU4KE1ad42QrAOArS4pTnZrSVABArtcvd'
        b'iNk6D/+9k76oCQ==","time":"2026-12-06T12:00:00.000000Z","v":2}\n',
        "e0cb049eddb68afa7187868e41a025736faa385b44dbf9ec15b66f2142c7595d",
    ),
    (
        AuditEvent(decision=Decision.DENIED, reason="NO_RELEASE_POLICY", decision_id="req-2"),
        0,
        "0" * 64,
        "2026-12-06T12:00:00.000001Z",
        b'{"action":"key_release","caller":{"cert_serial":null,"spiffe_id":null},"claims":{},'
        b'"decision":"denied","decision_id":"req-2","evidence_sha256":null,"hash":'
        b'"1b8f8758fc66c9d299cbbe65a8ed2a96daee485a98d5c3b5b3f8acdad8609486",'
        b'"key":{"id":null,"version":null},"oaep_mechanism":null,"policy_sha256":null,'
        b'"policy_version":null,"prev":"' + b"0" * 64 + b'","reason":"NO_RELEASE_POLICY",'
        b'"seq":0,"sig":"VUENFeCOlT2cSipQFA5lkilLyCknxq75Fp5w+jb1BNiGj9ukt7W0IL1LKaHsrRaW5xEK+'
        b'fFxeqC0D9IWaA6WCg==","time":"2026-12-06T12:00:00.000001Z","v":2}\n',
        "1b8f8758fc66c9d299cbbe65a8ed2a96daee485a98d5c3b5b3f8acdad8609486",
    ),
    (
        # Recorded before records named the release-signing key: unchanged.
        AuditEvent(**_RELEASE),
        7,
        "ab" * 32,
        "2026-12-06T12:00:00.000000Z",
        b'{"action":"key_release","caller":{"cert_serial":"1f00","spiffe_id":'
        b'"spiffe://strongroom.test/inference"},"claims":{"a":["x",{"y":-0.0}],"m":{},'
        b'"z":{"a":"\\u00e9\\"\\\\","b":[1,2.5,null,true]}},"decision":"allowed",'
        b'"decision_id":"req-1","evidence_sha256":"' + b"e" * 64 + b'","hash":'
        b'"aeed3f80bfe75f88392a6d4439a9c8ba0b043c71bb4e75d43737974423a90aec",'
        b'"key":{"id":"model-a","version":3},"oaep_mechanism":"CKM_RSA_PKCS_OAEP/SHA-256",'
        b'"policy_sha256":"' + b"b" * 64 + b'","policy_version":"v1","prev":"' + b"ab" * 32 + b'",'
        b'"reason":"RELEASED","seq":7,"sig":"mPjCNYgwYpxaPv8wd8pB3j+E+P5BoSDdvqaXD0GlDXBsYBvytHQ9'
        b'Ul2BhfD2z1x5xdxaOKZE45wwfKOj/vASDQ==","time":"2026-12-06T12:00:00.000000Z","v":2}\n',
        "aeed3f80bfe75f88392a6d4439a9c8ba0b043c71bb4e75d43737974423a90aec",
    ),
]


@pytest.mark.parametrize(("event_", "seq", "prev", "time_text", "line", "digest"), _PINNED_RECORDS)
def test_a_records_bytes_are_pinned(
    event_: AuditEvent, seq: int, prev: str, time_text: str, line: bytes, digest: str
) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    decision_id, members = audit_module._event_members(event_)
    assert decision_id == event_.decision_id
    assert audit_module._record_line(members, seq, prev, time_text, key) == (line, digest)
    record = json.loads(line)
    assert canonical_json(record) + b"\n" == line
    assert record_hash({k: v for k, v in record.items() if k != "hash"}) == digest
    assert record_signed_by(line.rstrip(b"\n"), key.public_key())


def test_empty_log_verifies(audit: AuditLog, log_path: Path) -> None:
    result = verify_audit_log(log_path)
    assert result.intact and result.records == 0 and not result.signature_checked
    assert "NOT checked" in result.message


def test_missing_log(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as info:
        verify_audit_log(tmp_path / "nothing.jsonl")
    assert info.value.reason == "AUDIT_LOG_NOT_FOUND"


@pytest.mark.parametrize("unreadable", ["log", "head"])
def test_an_unreadable_log_or_head_is_a_clear_error(
    audit: AuditLog, log_path: Path, unreadable: str
) -> None:
    """A file that cannot be read (here a directory; likewise permissions or I/O errors) escaped
    as an OSError: a traceback from ``strongroom audit verify``."""
    audit.append(event(0))
    audit.close()
    target = log_path if unreadable == "log" else head_path(log_path)
    target.unlink()
    target.mkdir()
    with pytest.raises(AuditUnavailable) as info:
        verify_audit_log(log_path)
    assert info.value.reason == "AUDIT_UNAVAILABLE"
    assert f"cannot read {target}: Is a directory" in info.value.message


def _unblock_fifo(path: Path) -> None:
    """Releases a reader blocked opening ``path`` (a FIFO): a writer comes and goes."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def _outcome_unless_blocked(call: Callable[[], object], fifo: Path) -> object:
    """What ``call`` returns or raises, run on a thread; fails the test if it blocks (on the FIFO
    at ``fifo``, which is then unblocked so that the thread ends)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(3)
    hung = thread.is_alive()
    _unblock_fifo(fifo)
    thread.join(5)
    assert not hung, f"blocked on the FIFO {fifo}"
    (result,) = outcome
    return result


@pytest.mark.parametrize("which", ["head", "log"])
def test_verify_never_hangs_on_a_fifo(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey, which: str
) -> None:
    """`audit verify` opened the log and head by name and read them: a FIFO put in place of either
    (anyone who can write the directory) blocked it in open() forever; a cron job piles up."""
    audit.append(event(0))
    target = head_path(log_path) if which == "head" else log_path
    target.unlink()
    os.mkfifo(target)
    error = _outcome_unless_blocked(
        lambda: verify_audit_log(log_path, public_key=signing_key.public_key()), target
    )
    assert isinstance(error, AuditUnavailable)
    assert f"cannot read {target}: not a regular file" in error.message


def test_a_verify_on_a_fifo_head_does_not_stall_the_brokers_commits(
    audit: AuditLog, log_path: Path
) -> None:
    """Worse for the head: the verifier opened it while holding its shared flock on the log, which
    every commit takes exclusively; the broker's releases then hung (instead of being refused, as
    the broker itself refuses a head it cannot read) for as long as the verifier did."""
    audit.append(event(0))
    head_path(log_path).unlink()
    os.mkfifo(head_path(log_path))

    def verify() -> None:
        with contextlib.suppress(AuditUnavailable):  # how verify answers is the test above
            verify_audit_log(log_path)

    verifier = threading.Thread(target=verify, daemon=True)
    verifier.start()
    verifier.join(1)
    answered: list[str] = []

    def append() -> None:
        try:
            audit.append(event(1))
            answered.append("committed")
        except (AuditUnavailable, DataLoss) as exc:
            answered.append(type(exc).__name__)

    writer = threading.Thread(target=append, daemon=True)
    writer.start()
    writer.join(3)
    stalled = writer.is_alive()
    _unblock_fifo(head_path(log_path))
    verifier.join(5)
    writer.join(5)
    assert not stalled, "the broker's commit waited on a verifier blocked on a FIFO"
    assert answered and answered != ["committed"]  # a FIFO is no head to anchor a record


@pytest.mark.parametrize("which", ["log", "head"])
@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_the_broker_opens_neither_a_symlink_nor_a_fifo_as_its_log_or_head(
    log_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path, which: str, kind: str
) -> None:
    """The broker opened its log and head by name, following symlinks: it then appended records
    to, or rewrote head slots in, whatever file the link named (a copy of the real pair placed
    elsewhere, say); and a FIFO in place of the log blocked its start. Both are refused now."""
    log_path.parent.mkdir()
    with AuditLog.open(log_path, signing_key) as log:
        log.append(event(0))
    target = head_path(log_path) if which == "head" else log_path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = elsewhere / target.name
    target.rename(moved)
    if kind == "symlink":
        target.symlink_to(moved)
    else:
        os.mkfifo(target)
    before = moved.read_bytes()

    def open_and_append() -> str:
        with AuditLog.open(log_path, signing_key) as log:
            log.append(event(1))
        return "opened"

    error = _outcome_unless_blocked(open_and_append, target)
    assert isinstance(error, AuditUnavailable), error
    assert moved.read_bytes() == before  # nothing written through the link


def test_a_log_at_its_size_cap_refuses_decisions_and_keeps_what_it_holds(
    log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """Nothing bounded the log but the disk, and where the volume's limit is enforced by evicting
    the pod (a Kubernetes emptyDir's sizeLimit), the log and its head were lost and the next pod
    began a new chain. With ``max_bytes`` a batch that would pass the cap is refused like one on a
    full disk (AUDIT_LOG_FULL), nothing of it written, and the log stays intact."""
    log_path.parent.mkdir()
    appended = 0
    with AuditLog.open(log_path, signing_key, max_bytes=8 * 1024) as log:
        with pytest.raises(AuditUnavailable) as info:
            for appended in range(1, 1000):
                log.append(event(appended))
        assert info.value.reason == "AUDIT_LOG_FULL"
        size = log_path.stat().st_size
        assert size <= 8 * 1024 and log.count == appended - 1 >= 1
        with pytest.raises(AuditUnavailable):
            log.append(event(0))  # still full: refused again, not written
        assert log_path.stat().st_size == size
    verdict = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert verdict.intact and verdict.records == appended - 1
    with AuditLog.open(log_path, signing_key, max_bytes=64 * 1024) as log:  # a raised cap
        log.append(event(1))
    assert verify_audit_log(log_path, public_key=signing_key.public_key()).intact


def _edit(path: Path, index: int, change: Callable[[dict[str, Any]], None], rehash: bool) -> None:
    content = lines(path)
    record = json.loads(content[index])
    change(record)
    if rehash:
        record.pop("hash")
        record["hash"] = record_hash(record)
    content[index] = canonical_json(record) + b"\n"
    path.write_bytes(b"".join(content))


def _set_claim(record: dict[str, Any]) -> None:
    record["claims"]["measurement"] = "cd" * 48


def _swap(path: Path, i: int, j: int) -> None:
    content = lines(path)
    content[i], content[j] = content[j], content[i]
    path.write_bytes(b"".join(content))


def _delete(path: Path, *indexes: int) -> None:
    content = lines(path)
    path.write_bytes(b"".join(line for n, line in enumerate(content) if n not in indexes))


def _insert_copy(path: Path, at: int, source: int) -> None:
    content = lines(path)
    content.insert(at, content[source])
    path.write_bytes(b"".join(content))


def _edit_raw(path: Path, index: int, old: bytes, new: bytes) -> None:
    content = lines(path)
    assert old in content[index]
    content[index] = content[index].replace(old, new, 1)
    path.write_bytes(b"".join(content))


def _rewrite_chain_from(path: Path, start: int) -> None:
    """An attacker edits record ``start`` and recomputes every later hash: only the head catches it."""
    content = [json.loads(line) for line in lines(path)]
    content[start]["decision"] = "allowed"
    prev = content[start - 1]["hash"] if start else GENESIS_HASH
    for record in content[start:]:
        record["prev"] = prev
        record.pop("hash")
        record["hash"] = prev = record_hash(record)
    path.write_bytes(b"".join(canonical_json(r) + b"\n" for r in content))


@pytest.mark.parametrize(
    ("tamper", "problem", "bad_record"),
    [
        pytest.param(
            lambda p: _edit(p, 2, _set_claim, rehash=False), "RECORD_MODIFIED", 3, id="edit"
        ),
        pytest.param(
            lambda p: _edit(p, 2, _set_claim, rehash=True), "CHAIN_BROKEN", 4, id="edit-rehash"
        ),
        pytest.param(
            lambda p: _edit(p, 4, _set_claim, rehash=True),
            "HEAD_MISMATCH",
            5,
            id="edit-last-rehash",
        ),
        pytest.param(lambda p: _rewrite_chain_from(p, 1), "HEAD_MISMATCH", 5, id="rewrite-chain"),
        pytest.param(lambda p: _swap(p, 1, 2), "SEQUENCE_BROKEN", 2, id="reorder"),
        pytest.param(lambda p: _insert_copy(p, 2, 1), "SEQUENCE_BROKEN", 3, id="insert"),
        pytest.param(lambda p: _delete(p, 2), "SEQUENCE_BROKEN", 3, id="delete-middle"),
        pytest.param(lambda p: _delete(p, 0), "SEQUENCE_BROKEN", 1, id="delete-first"),
        pytest.param(lambda p: _delete(p, 4), "TAIL_TRUNCATED", 5, id="delete-last"),
        pytest.param(lambda p: _delete(p, 3, 4), "TAIL_TRUNCATED", 4, id="delete-tail"),
        pytest.param(lambda p: p.write_bytes(b""), "TAIL_TRUNCATED", 1, id="emptied"),
        pytest.param(lambda p: p.unlink(), "TAIL_TRUNCATED", 1, id="log-deleted"),
        pytest.param(
            lambda p: p.write_bytes(p.read_bytes()[:-30]),
            "RECORD_TRUNCATED",
            5,
            id="truncate-mid-line",
        ),
        pytest.param(
            lambda p: p.write_bytes(p.read_bytes().replace(b'"reason":"OK"', b'"reason": "OK"', 1)),
            "RECORD_MODIFIED",
            1,
            id="whitespace",
        ),
        pytest.param(
            lambda p: p.write_bytes(p.read_bytes() + b"{}\n"),
            "RECORD_MALFORMED",
            6,
            id="junk-appended",
        ),
        pytest.param(
            # json.loads raises RecursionError (not a ValueError) for nesting this deep.
            lambda p: p.write_bytes(p.read_bytes() + _DEEP_LINE),
            "RECORD_MALFORMED",
            6,
            id="deeply-nested-line-appended",
        ),
        pytest.param(
            # Not JSON, but Python's parser took them and its strict encoder then raised.
            lambda p: _edit_raw(p, 2, b'"decision":"allowed"', b'"decision":NaN'),
            "RECORD_MALFORMED",
            3,
            id="nan",
        ),
        pytest.param(
            lambda p: _edit_raw(p, 2, b'"decision":"allowed"', b'"decision":1e400'),
            "RECORD_MALFORMED",
            3,
            id="infinite-number",
        ),
        pytest.param(lambda p: head_path(p).unlink(), "HEAD_MISSING", None, id="head-deleted"),
        pytest.param(
            lambda p: head_path(p).write_text("{"), "HEAD_MALFORMED", None, id="head-garbage"
        ),
    ],
)
def test_tampering_is_detected(
    audit: AuditLog,
    log_path: Path,
    signing_key: Ed25519PrivateKey,
    tamper: Callable[[Path], None],
    problem: str,
    bad_record: int | None,
) -> None:
    fill(audit, 5)
    assert verify_audit_log(log_path, public_key=signing_key.public_key()).intact
    tamper(log_path)
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert not result.intact
    assert (result.problem, result.bad_record) == (problem, bad_record)
    assert result.message


def _forge_head(log_path: Path, count: int, last_hash: str, key: Ed25519PrivateKey) -> None:
    """A well-formed head for a truncated log, signed by someone else's key."""
    body = {
        "v": 1,
        "count": count,
        "last_hash": last_hash,
        "time": "2026-01-01T00:00:00Z",
        "key": "x",
    }
    signature = key.sign(HEAD_DOMAIN + canonical_json(body))
    head_path(log_path).write_bytes(
        canonical_json({**body, "sig": base64.b64encode(signature).decode()}) + b"\n"
    )


def test_forged_head_needs_the_private_key(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    fill(audit, 5)
    _delete(log_path, 4)
    last = json.loads(lines(log_path)[-1])["hash"]
    _forge_head(log_path, 4, last, Ed25519PrivateKey.generate())
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert (result.intact, result.problem) == (False, "HEAD_SIGNATURE_INVALID")
    # Without the public key the truncation goes unnoticed, and the result says what was skipped.
    unchecked = verify_audit_log(log_path)
    assert unchecked.intact and not unchecked.signature_checked


def test_open_refuses_a_truncated_log(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    fill(audit, 3)
    audit.close()
    _delete(log_path, 2)
    with pytest.raises(DataLoss) as info:
        AuditLog.open(log_path, signing_key)
    assert info.value.reason == "AUDIT_LOG_TAMPERED"


def test_open_refuses_a_foreign_head(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    fill(audit, 2)
    audit.close()
    with pytest.raises(DataLoss):
        AuditLog.open(log_path, Ed25519PrivateKey.generate())


def test_open_refuses_records_without_head(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    fill(audit, 2)
    audit.close()
    head_path(log_path).unlink()
    with pytest.raises(DataLoss):
        AuditLog.open(log_path, signing_key)


def test_crash_leaving_a_torn_line_is_repaired(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    fill(audit, 3)
    audit.close()
    with log_path.open("ab") as f:  # the process died half-way through writing record 4
        f.write(b'{"v":1,"seq":3,"time":"2026')
    assert verify_audit_log(log_path).problem == "RECORD_TRUNCATED"
    with AuditLog.open(log_path, signing_key) as reopened:
        assert reopened.append(event(3)).seq == 3
    assert verify_audit_log(log_path, public_key=signing_key.public_key()).records == 4


def test_crash_before_the_head_update_is_repaired(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    fill(audit, 2)
    old_head = head_path(log_path).read_bytes()
    audit.append(event(2))
    audit.close()
    head_path(log_path).write_bytes(old_head)  # the new head never reached the disk
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert (result.problem, result.bad_record) == ("UNANCHORED_RECORDS", 3)
    with AuditLog.open(log_path, signing_key) as reopened:
        assert reopened.count == 3
    assert verify_audit_log(log_path, public_key=signing_key.public_key()).intact


def test_threads_append_concurrently(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    with ThreadPoolExecutor(8) as pool:
        records = list(pool.map(lambda n: audit.append(event(n)), range(80)))
    assert sorted(r.seq for r in records) == list(range(80))
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert result.intact and result.records == 80


_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from strongroom.keybroker.audit import AuditEvent, AuditLog, Decision
    key = load_pem_private_key(Path(sys.argv[2]).read_bytes(), None)
    with AuditLog.open(Path(sys.argv[1]), key) as log:
        for n in range(int(sys.argv[3])):
            log.append(AuditEvent(decision=Decision.DENIED, reason="CHILD", claims={"n": n}))
    """
)


def _signing_key_file(tmp_path: Path) -> tuple[Path, Ed25519PrivateKey, Ed25519PublicKey]:
    """A new signing key in a PEM file for child processes, and both halves of it."""
    private_pem, public_pem = new_signing_key()
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(private_pem)
    key_file.chmod(0o600)
    return key_file, load_signing_key(Secret(private_pem)), load_public_key(public_pem)


def test_processes_append_concurrently(tmp_path: Path) -> None:
    key_file, key, public_key = _signing_key_file(tmp_path)
    path = tmp_path / "shared.jsonl"
    with AuditLog.open(path, key) as log:
        children = [
            subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(path), str(key_file), "25"], cwd=REPO
            )
            for _ in range(2)
        ]
        for n in range(25):
            log.append(event(n))
        assert [child.wait(60) for child in children] == [0, 0]
        log.append(event(99))  # this process notices the others' records and continues the chain
    result = verify_audit_log(path, public_key=public_key)
    assert result.intact and result.records == 76


# A writer process committing as fast as it can until its standard input closes.
_WRITER = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from strongroom.keybroker.audit import AuditEvent, AuditLog, Decision
    key = load_pem_private_key(Path(sys.argv[2]).read_bytes(), None)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    with AuditLog.open(Path(sys.argv[1]), key) as log:
        print("ready", flush=True)
        n = 0
        while not stop.is_set():
            log.append(AuditEvent(decision=Decision.DENIED, reason="WRITER", claims={"n": n}))
            n += 1
    """
)


def test_verifying_a_log_that_is_being_written_never_reports_tampering(tmp_path: Path) -> None:
    """Operators verify ``/var/lib/strongroom/audit/audit.log`` in place (from a cron job, say):
    a commit landing while the verifier reads (between its last line and the head, or between a
    batch's lines and their head) must not read as tampering."""
    key_file, key, public_key = _signing_key_file(tmp_path)
    path = tmp_path / "audit.log"
    with AuditLog.open(path, key) as log:
        log.append(event(0))
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(key_file)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None and writer.stdin is not None
    try:
        assert writer.stdout.readline().strip() == "ready"
        results = [verify_audit_log(path, public_key=public_key) for _ in range(150)]
    finally:
        writer.stdin.close()
        assert writer.wait(60) == 0
    problems = [(r.problem, r.message) for r in results if not r.intact]
    assert problems == [], f"{len(problems)} of {len(results)}: {problems[:3]}"
    # Each verification saw a consistent snapshot of a log that kept growing meanwhile.
    counts = [r.records for r in results]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    final = verify_audit_log(path, public_key=public_key)
    assert final.intact and final.records >= counts[-1]


_FULL_DISK = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from strongroom.keybroker.audit import AuditEvent, AuditLog, Decision
    from strongroom.keybroker.errors import AuditUnavailable
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    path, key = Path(sys.argv[1]), load_pem_private_key(Path(sys.argv[2]).read_bytes(), None)
    ok = failed = 0
    with AuditLog.open(path, key) as log:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        # The limit is per file: room for a few records in the log, none lost by the head file.
        head = path.with_name(path.name + ".head")
        limit = max(path.stat().st_size, head.stat().st_size) + 2500
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        for n in range(20):
            try:
                log.append(AuditEvent(decision=Decision.ALLOWED, reason="OK", claims={"pad": "x" * 300}))
                ok += 1
            except AuditUnavailable as exc:
                failed += 1
                reason, message = exc.reason, exc.message
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space comes back
        log.append(AuditEvent(decision=Decision.DENIED, reason="RECOVERED"))
    print(json.dumps({"ok": ok, "failed": failed, "reason": reason, "message": message}))
    """
)


def test_write_failure_refuses_the_decision_and_recovers(tmp_path: Path) -> None:
    """Writes past the file-size limit fail (EFBIG, real): each decision is refused, naming the
    log and the errno (it said ``cannot write the audit log: File too large``), and the log
    recovers when the room comes back."""
    key_file, _, public_key = _signing_key_file(tmp_path)
    path = tmp_path / "full.jsonl"
    run = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(path), str(key_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    outcome = json.loads(run.stdout)
    assert outcome["ok"] >= 1 and outcome["failed"] >= 1
    assert outcome["reason"] == "AUDIT_UNAVAILABLE"
    assert outcome["message"] == f"cannot write the audit log {path}: File too large (EFBIG)"
    result = verify_audit_log(path, public_key=public_key)
    assert result.intact
    assert result.records == outcome["ok"] + 1  # no trace of the refused decisions


def test_audit_unavailable_is_unavailable() -> None:
    assert issubclass(AuditUnavailable, Unavailable)


def test_unwritable_directory(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    with pytest.raises(AuditUnavailable):
        AuditLog.open(tmp_path / "missing-dir" / "log.jsonl", signing_key)


def test_closed_log_refuses(audit: AuditLog) -> None:
    audit.close()
    with pytest.raises(AuditUnavailable):
        audit.append(event())


def test_claims_nested_to_the_limit_are_recorded(audit: AuditLog, log_path: Path) -> None:
    audit.append(event(claims=_nested(16)))
    assert verify_audit_log(log_path).records == 1


@pytest.mark.parametrize(
    "overrides",
    [
        {"reason": "lower_case"},
        {"reason": ""},
        {"decision": "allowed"},
        {"caller_spiffe_id": "https://not-spiffe"},
        {"caller_cert_serial": "XYZ"},
        {"evidence_sha256": "ab" * 31},
        {"key_id": "Model"},
        {"key_version": "3"},
        {"key_version": True},
        {"decision_id": "has space"},
        {"action": "Release"},
        {"claims": {"bad": float("nan")}},
        {"claims": {"bytes": b"\x00"}},
        {"claims": {1: "int key"}},
        {"claims": {"nested": {"list": [{2: "int key, deeper"}]}}},
        {"claims": {"proxy": MappingProxyType({"a": 1})}},
        {"claims": {"set": {1, 2}}},
        {"claims": {"inf": [float("inf")]}},
        {"claims": _nested(17)},
        {"claims": ["not", "a", "mapping"]},
        {"policy_version": "x" * 300},
        {"claims": {"big": "x" * 70_000}},
        {"release_signing_key_id": "AB" * 32},
        {"release_signing_key_id": "ab" * 16},
        {"release_signing_key_id": bytes(32)},
    ],
)
def test_malformed_events(audit: AuditLog, log_path: Path, overrides: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument) as info:
        audit.append(event(**overrides))
    assert info.value.reason == "AUDIT_RECORD_INVALID"
    assert verify_audit_log(log_path).records == 0


def test_signing_key_formats() -> None:
    private_pem, public_pem = new_signing_key()
    key = load_signing_key(Secret(private_pem))
    raw = Ed25519PrivateKey.generate()
    raw_bytes = raw.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    assert load_signing_key(Secret(raw_bytes)).public_key() == raw.public_key()
    assert load_public_key(public_pem) == key.public_key()
    for bad in (b"", b"x" * 31, b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"):
        with pytest.raises(InvalidArgument):
            load_signing_key(Secret(bad))
    with pytest.raises(InvalidArgument):
        load_public_key(private_pem)
    # An EC key on a curve cryptography cannot load raises UnsupportedAlgorithm, not ValueError.
    body = base64.encodebytes(ec_spki_on_an_unsupported_curve())
    unknown_curve = b"-----BEGIN PUBLIC KEY-----\n" + body + b"-----END PUBLIC KEY-----\n"
    with pytest.raises(InvalidArgument) as info:
        load_public_key(unknown_curve)
    assert info.value.reason == "AUDIT_KEY_INVALID"


def _append_forged(log_path: Path, *, sign_with: Ed25519PrivateKey | None = None) -> None:
    """What anyone able to write the file can do: a correctly chained record after the last one."""
    last = json.loads(lines(log_path)[-1])
    forged: dict[str, Any] = {
        **{k: v for k, v in last.items() if k not in ("hash", "sig")},
        "seq": last["seq"] + 1,
        "prev": last["hash"],
        "decision": "allowed",
        "reason": "RELEASED",
        "caller": {"spiffe_id": "spiffe://strongroom.test/attacker", "cert_serial": "1"},
    }
    if sign_with is not None:
        body = canonical_json({k: v for k, v in forged.items() if k != "sig"})
        signature = sign_with.sign(b"strongroom-audit-record-sig-v1\n" + body)
        forged["sig"] = base64.b64encode(signature).decode()
    else:
        forged.pop("sig", None)
    forged["hash"] = record_hash(forged)
    with log_path.open("ab") as f:
        f.write(canonical_json(forged) + b"\n")


@pytest.mark.parametrize("signer", ["unsigned", "foreign-key"])
def test_forged_record_at_the_end_is_never_anchored(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey, signer: str
) -> None:
    """Issue 12, finding 1: a chained line someone appended must not be signed into the head."""
    fill(audit, 3)
    _append_forged(
        log_path, sign_with=None if signer == "unsigned" else Ed25519PrivateKey.generate()
    )
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert (result.problem, result.bad_record) == ("RECORD_FORGED", 4)
    with pytest.raises(DataLoss) as info:
        audit.append(event(3))
    assert info.value.reason == "AUDIT_LOG_TAMPERED"
    assert audit.tamper_problem is not None and "forged" in audit.tamper_problem
    # Nothing was anchored: the head still covers only the three genuine records.
    assert verify_audit_log(log_path, public_key=signing_key.public_key()).problem == (
        "RECORD_FORGED"
    )
    # The verdict latches: removing the line again does not make the broker trust the log.
    _delete(log_path, 3)
    with pytest.raises(DataLoss):
        audit.append(event(4))
    assert verify_audit_log(log_path, public_key=signing_key.public_key()).intact
    # A restarted broker starts from the files, which are intact again.
    audit.close()
    with AuditLog.open(log_path, signing_key) as reopened:
        assert reopened.append(event(5)).seq == 3


def test_open_refuses_a_forged_unanchored_record(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    fill(audit, 2)
    audit.close()
    _append_forged(log_path)
    with pytest.raises(DataLoss) as info:
        AuditLog.open(log_path, signing_key)
    assert info.value.reason == "AUDIT_LOG_TAMPERED"


def test_a_deeply_nested_last_line_is_tampering_not_an_untyped_error(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """A line nested past Python's recursion limit made json.loads raise RecursionError: appends
    failed with it (no tamper alarm, no latch) and the repair's signature check escaped too."""
    fill(audit, 2)
    log_path.write_bytes(log_path.read_bytes() + _DEEP_LINE)
    with pytest.raises(DataLoss) as info:
        audit.append(event(9))
    assert info.value.reason == "AUDIT_LOG_TAMPERED"
    assert audit.tamper_problem is not None
    assert not record_signed_by(_DEEP_LINE[:-1], signing_key.public_key())


def test_tampering_latches_and_raises_the_alarm(
    audit: AuditLog, log_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill(audit, 3)
    _delete(log_path, 2)  # the last record is cut off
    with caplog.at_level("CRITICAL", logger="strongroom.keybroker.audit"):
        for n in range(2):
            with pytest.raises(DataLoss):
                audit.append(event(n))
    alarms = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert len(alarms) == 1 and getattr(alarms[0], "alert", None) == "AUDIT_LOG_TAMPERED"
    assert audit.tamper_problem is not None


def test_a_refused_record_that_reappears_is_cut_off_not_anchored(
    audit: AuditLog,
    log_path: Path,
    signing_key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A record whose head update failed was refused; its signed line must not be anchored later."""
    fill(audit, 2)
    captured: list[bytes] = []

    def failing_head(_head: object) -> None:
        captured.append(lines(log_path)[-1])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit, "_write_head", failing_head)
    with pytest.raises(AuditUnavailable):
        audit.append(event(2, reason="REFUSED_ONE"))
    monkeypatch.undo()
    assert len(lines(log_path)) == 2
    with log_path.open("ab") as f:  # the signed line comes back (a failed truncate, or a replay)
        f.write(captured[0])
    assert audit.append(event(3)).seq == 2
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert result.intact and result.records == 3
    assert b"REFUSED_ONE" not in log_path.read_bytes()


def _refuse(audit: AuditLog, log_path: Path, batches: int, reason: str) -> list[bytes]:
    """Commits ``batches`` single records while the head cannot be written (a full disk);
    returns each refused signed line, as written before it was cut back."""
    captured: list[bytes] = []
    real_write_head = audit._write_head

    def full_disk(_head: object) -> None:
        captured.append(lines(log_path)[-1])
        raise OSError(errno.ENOSPC, "No space left on device")

    audit._write_head = full_disk  # type: ignore[assignment,method-assign]
    try:
        for n in range(batches):
            with pytest.raises(AuditUnavailable):
                audit.append(event(n, reason=reason))
    finally:
        audit._write_head = real_write_head  # type: ignore[method-assign]
    return captured


def test_a_refused_record_is_never_anchored_however_many_batches_failed_since(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """The hashes of cut-back records were kept in a deque of 256 (four full batches). While the
    disk stays full every refused batch lands at the same position, so the first refused record
    was forgotten after 256 more; its signed line, put back, was then anchored by the same process
    (no restart needed) and `audit verify` called the log intact."""
    fill(audit, 1)
    (first,) = _refuse(audit, log_path, 1, "REFUSED_FIRST")
    _refuse(audit, log_path, audit_module._REVOKED_MAX, "REFUSED")
    with log_path.open("ab") as f:
        f.write(first)
    assert audit.append(event(1, reason="LATER")).seq == 1
    assert b"REFUSED_FIRST" not in log_path.read_bytes()
    assert _reasons(log_path) == ["OK", "LATER"]
    assert verify_audit_log(log_path, public_key=signing_key.public_key()).intact


def test_refused_records_are_forgotten_once_a_commit_takes_their_place(
    audit: AuditLog, log_path: Path
) -> None:
    """What a successful commit makes unanchorable is not kept: the memory stays bounded without
    forgetting anything that could still be anchored."""
    fill(audit, 1)
    _refuse(audit, log_path, audit_module._REVOKED_MAX + 1, "REFUSED")
    assert audit._refused_from == 1 and not audit._revoked
    fill(audit, 1)
    assert audit._refused_from is None
    _refuse(audit, log_path, 3, "REFUSED")
    assert sorted(audit._revoked.values()) == [2, 2, 2]
    fill(audit, 1)
    assert not audit._revoked


def test_records_are_signed_by_the_broker(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    fill(audit, 2)
    for line in lines(log_path):
        assert record_signed_by(line.rstrip(b"\n"), signing_key.public_key())
        assert not record_signed_by(line.rstrip(b"\n"), Ed25519PrivateKey.generate().public_key())


@pytest.mark.parametrize(
    "field",
    [
        {"key_id": "k1\n"},
        {"reason": "DENIED\n"},
        {"decision_id": "d1\n"},
        {"release_signing_key_id": "ab" * 32 + "\n"},
    ],
)
def test_a_field_with_a_trailing_newline_is_malformed(tmp_path, field) -> None:
    """The field patterns end in ``$``, which also matches before a final newline."""
    log = AuditLog.open(tmp_path / "audit.log", Ed25519PrivateKey.generate())
    try:
        event = AuditEvent(**{"decision": Decision.DENIED, "reason": "DENIED", **field})
        with pytest.raises(InvalidArgument) as info:
            log.append(event)
        assert info.value.reason == "AUDIT_RECORD_INVALID"
    finally:
        log.close()


def _reasons(path: Path) -> list[str]:
    return [json.loads(line)["reason"] for line in lines(path)]


def test_an_unreadable_log_fails_the_batch_as_unavailable(
    audit: AuditLog, log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error reading the tail back (after another process wrote) escaped as a bare OSError,
    past the batch's bookkeeping. Then it said ``the audit log cannot be read: Input/output
    error``; a read through the log's descriptor names no file, and the refusal names the log and
    the errno now."""
    fill(audit, 1)
    real = audit_module._read_tail
    failures = iter([OSError(errno.EIO, "Input/output error")])

    def flaky(*args: Any) -> Any:
        for failure in failures:
            raise failure
        return real(*args)

    monkeypatch.setattr(audit_module, "_read_tail", flaky)
    audit._stale = True  # as after another process's commit: the tail is read back
    with pytest.raises(AuditUnavailable) as info:
        audit.append(event(1, reason="REFUSED"))
    assert info.value.message == (
        f"cannot read the audit file {log_path}: Input/output error (EIO)"
    )
    audit.append(event(2, reason="LATER"))
    assert _reasons(log_path) == ["OK", "LATER"]


def test_a_caller_whose_commit_raised_is_never_committed_later(
    log_path: Path, signing_key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller committing a batch ahead of its own record (more than a batch queued) and failing
    unexpectedly heard the error, while its record stayed queued and the next committer wrote it:
    the log then showed a decision its caller was told had failed."""
    log_path.parent.mkdir()
    log = AuditLog.open(log_path, signing_key, max_batch=1)
    try:
        ahead = audit_module._Pending(event(1, reason="AHEAD"), None)
        log._queue.append(ahead)  # another caller's record, queued before ours
        calls = iter([RuntimeError("a bug")])

        def failing() -> None:
            for failure in calls:
                raise failure

        monkeypatch.setattr(log, "_resync", failing)
        with pytest.raises(RuntimeError):
            log.append(event(2, reason="MINE"))
        assert ahead.done and ahead.error is not None  # the batch it committed failed too
        monkeypatch.undo()
        log.append(event(3, reason="NEXT"))
        assert _reasons(log_path) == ["NEXT"]
    finally:
        log.close()


def test_a_stub_line_carrying_the_heads_hash_is_not_taken_for_the_log(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """The broker matched only the last line's seq and hash fields against its head: a log
    replaced by one line naming them opened, and appends carried on after it."""
    fill(audit, 5)
    audit.close()
    last = json.loads(lines(log_path)[-1])
    stub = {"seq": last["seq"], "hash": last["hash"], "prev": "x"}
    log_path.write_bytes(json.dumps(stub).encode() + b"\n")
    with pytest.raises(DataLoss) as info:
        AuditLog.open(log_path, signing_key)
    assert info.value.reason == "AUDIT_LOG_TAMPERED"


def test_an_older_log_and_head_put_back_while_the_broker_runs_latch_tampering(
    audit: AuditLog, log_path: Path
) -> None:
    """Heads only grow. A broker at 8 records took an older (genuinely signed) pair swapped in
    under it for the truth and went on from 4, with no alarm."""
    fill(audit, 4)
    older = {p: p.read_bytes() for p in (log_path, head_path(log_path))}
    fill(audit, 4)
    for path, data in older.items():
        path.write_bytes(data)
    with pytest.raises(DataLoss) as info:
        audit.append(event(9))
    assert info.value.reason == "AUDIT_LOG_TAMPERED"
    assert "went back from 8 to 4" in info.value.message


def test_another_logs_records_signed_with_the_same_key_are_not_anchored(
    log_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """Every log started from the same all-zeros hash and a record's signature names no log, so
    the first records of another log signed with the same key (a staging broker sharing it, a log
    from before a reinstall) were a valid unanchored tail for any empty log: appended, the crash
    repair anchored them, and `audit verify` called the log intact."""
    log_path.parent.mkdir()
    other_path = tmp_path / "other" / "decisions.jsonl"
    other_path.parent.mkdir()
    with AuditLog.open(other_path, signing_key) as other:
        for n in range(3):
            other.append(event(n, reason="FORGED_RELEASE"))
    AuditLog.open(log_path, signing_key).close()  # a fresh, empty log with its head
    log_path.write_bytes(other_path.read_bytes())
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert not result.intact and result.problem == "HEAD_MISMATCH", result
    with pytest.raises(DataLoss) as info:
        AuditLog.open(log_path, signing_key)
    assert info.value.reason == "AUDIT_LOG_TAMPERED"


def test_a_log_emptied_and_its_head_deleted_under_a_running_broker_is_tampering(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """Truncating the log to nothing and deleting the head needs no older pair and no key. The
    running broker took the empty log for a new one: it wrote a fresh head, went on from seq 0
    with no alarm, and `audit verify` then called the log intact, its decisions gone."""
    fill(audit, 3)
    log_path.write_bytes(b"")
    head_path(log_path).unlink()
    with pytest.raises(DataLoss) as info:
        audit.append(event(3, reason="AFTER"))
    assert info.value.reason == "AUDIT_LOG_TAMPERED"
    assert audit.tamper_problem is not None
    assert not verify_audit_log(log_path, public_key=signing_key.public_key()).intact


@pytest.mark.parametrize("how", ["unlinked", "renamed", "replaced-by-empty-file"])
def test_a_log_file_taken_away_under_a_running_broker_is_tampering(
    audit: AuditLog, log_path: Path, how: str
) -> None:
    """The broker writes through the descriptor it opened and checked only the head's inode, so it
    went on committing into the old inode after the log was unlinked or renamed: every later
    decision was "fsync'd and anchored" into a file nobody (nor the restarted broker) reads."""
    fill(audit, 3)
    if how == "unlinked":
        log_path.unlink()
    elif how == "renamed":
        log_path.rename(log_path.with_name("elsewhere.jsonl"))
    else:
        log_path.unlink()
        log_path.write_bytes(b"")
    with pytest.raises(DataLoss) as info:
        audit.append(event(3, reason="AFTER"))
    assert info.value.reason == "AUDIT_LOG_TAMPERED"
    assert audit.tamper_problem is not None
    # The verdict names the log for the operator; a remote caller (the error mapping answers
    # ``answer()``) was told that path too, and is told only that the check failed now.
    assert str(log_path) in info.value.message
    assert info.value.answer() == (
        "AUDIT_LOG_TAMPERED: the key broker's audit log failed its integrity check; its "
        "operator's log has the details"
    )


@pytest.mark.parametrize("ours", [0, 2])
def test_another_logs_pair_swapped_in_under_a_running_broker_is_tampering(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path, ours: int
) -> None:
    """Another log signed with the same key (a staging broker's, one from before a reinstall)
    copied with its head over a running broker's files: the "heads only grow" check compared
    counts only, so a longer foreign pair was taken for the truth, the broker's own records
    vanished and it went on after the foreign ones. Also when its own log was still empty."""
    other_path = tmp_path / "other.jsonl"
    with AuditLog.open(other_path, signing_key) as other:
        for n in range(5):
            other.append(event(n, reason="FOREIGN"))
    fill(audit, ours)
    log_path.write_bytes(other_path.read_bytes())
    head_path(log_path).write_bytes(head_path(other_path).read_bytes())
    with pytest.raises(DataLoss) as info:
        audit.append(event(9, reason="AFTER"))
    assert info.value.reason == "AUDIT_LOG_TAMPERED"
    assert audit.tamper_problem is not None


def test_processes_sharing_the_log_still_see_one_chain(
    log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """The continuity checks must not take another writer's commits for tampering."""
    log_path.parent.mkdir()
    with (
        AuditLog.open(log_path, signing_key) as first,
        AuditLog.open(log_path, signing_key) as second,
    ):
        for n in range(6):
            (first if n % 3 else second).append(event(n))
        assert first.tamper_problem is None and second.tamper_problem is None
    assert verify_audit_log(log_path, public_key=signing_key.public_key()).intact


def test_a_verdicts_message_carries_no_value_read_from_a_record(
    audit: AuditLog, log_path: Path
) -> None:
    """SEQUENCE_BROKEN's message quoted the record's `seq`, any JSON value the file chose."""
    fill(audit, 2)
    _edit(log_path, 1, lambda record: record.update(seq="\x1b[2Kforged"), rehash=True)
    result = verify_audit_log(log_path)
    assert result.problem == "SEQUENCE_BROKEN" and result.bad_record == 2
    assert "forged" not in result.message and "\x1b" not in result.message


def test_a_granted_releases_record_names_its_release_signing_key_and_verify_counts_them(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """Across a rotation of the release-signing key (the inference side trusting old and new at
    once) the log did not say which key vouched for which release: the granted release's record
    now names it, records written before (which do not) still verify, and ``audit verify``
    counts the releases each key signed."""
    old_key, new_key = "a1" * 32, "b2" * 32
    audit.append(event(0, reason="RELEASED"))  # a release recorded before: no key named
    for n, key_id in enumerate((old_key, old_key, new_key), start=1):
        audit.append(event(2 * n, reason="RELEASED", release_signing_key_id=key_id))
    audit.append(event(1))  # a denial signs nothing
    records = [json.loads(line) for line in lines(log_path)]
    assert [r.get("release_signing_key_id") for r in records] == [
        None,
        old_key,
        old_key,
        new_key,
        None,
    ]
    assert "release_signing_key_id" not in records[0] and "release_signing_key_id" not in records[4]
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert result.intact and result.records == 5
    assert result.release_signing_keys == (("", 1), (old_key, 2), (new_key, 1))
    assert result.message.endswith(
        "; granted releases by release-signing key: not named: 1, a1a1a1a1a1a1a1a1: 2, "
        "b2b2b2b2b2b2b2b2: 1"
    )


def test_verify_refuses_a_release_signing_key_id_that_is_not_a_sha256(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    audit.append(event(0, reason="RELEASED", release_signing_key_id="c" * 64))
    audit.close()
    [record] = [json.loads(line) for line in lines(log_path)]
    record["release_signing_key_id"] = "C" * 64  # chained and under a head the key holder signed
    record.pop("hash")
    record["hash"] = record_hash(record)
    log_path.write_bytes(canonical_json(record) + b"\n")
    _forge_head(log_path, 1, record["hash"], signing_key)
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert (result.intact, result.problem, result.bad_record) == (False, "RECORD_MALFORMED", 1)


def test_an_empty_log_made_before_random_anchors_gets_a_start_of_its_own(
    log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """A log made before random anchors and still without a record has a head anchoring the
    all-zeros hash every such log shares: it names no log. The first records of another such log
    signed with the same key (another replica's, written by a broker of that time) were a valid
    unanchored tail for it: copied in, `audit verify` called them the broker's own crash leftovers
    and the broker anchored them. Opened now, the log gets a random start first, so they are not."""
    log_path.parent.mkdir()
    log_path.write_bytes(b"")
    _forge_head(log_path, 0, GENESIS_HASH, signing_key)  # as such a log's head was
    assert verify_audit_log(log_path, public_key=signing_key.public_key()).intact
    AuditLog.open(log_path, signing_key).close()  # the upgraded broker starts
    upgraded = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert upgraded.intact and upgraded.records == 0 and upgraded.anchor != GENESIS_HASH
    # Another replica's first records, as a broker of that time wrote them: chained on the zeros
    # and signed with the key the replicas share.
    foreign, prev = [], GENESIS_HASH
    for n in range(3):
        _, members = audit_module._event_members(event(n, reason="FOREIGN"))
        line, prev = audit_module._record_line(
            members, n, prev, "2026-01-01T00:00:00.000000Z", signing_key
        )
        foreign.append(line)
    log_path.write_bytes(b"".join(foreign))
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert (result.intact, result.problem) == (False, "HEAD_MISMATCH")
    with pytest.raises(DataLoss) as info:
        AuditLog.open(log_path, signing_key)
    assert info.value.reason == "AUDIT_LOG_TAMPERED"

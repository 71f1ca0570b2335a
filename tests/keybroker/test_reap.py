"""A rotation reaps only attempts that are really abandoned: a SoftHSM2 instance that missed another
replica's new KEK for good (it wrote an object of its own right after the other's, without
searching in between, so it never re-read the token) saw the version's enabler without its KEK.
It took the enabler for a crashed attempt: its rotations met it as a rival (KEY_VERSION_CONFLICT),
and once it was a minute old it destroyed it (a WARNING, no audit record), disabling the version on
every replica, and published a second KEK for the same version."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from pkcs11 import KeyType

from strongroom.dev.devstack import read_audit_records
from strongroom.dev.softhsm import SoftHsmToken
from strongroom.errors import Internal, NotFound, Unavailable
from strongroom.keybroker import _kek
from strongroom.keybroker import keys as keys_module
from strongroom.keybroker.audit import AuditEvent, AuditLog, Decision
from strongroom.keybroker.audit_verify import verify_audit_log
from strongroom.keybroker.hsm import Hsm, HsmSession
from strongroom.keybroker.keys import ChangeGate, KeyManager, KeyState, Reaped
from strongroom.keybroker.lifecycle import KeyService
from strongroom.keybroker.policies import PolicyStore
from strongroom.keybroker.release import Caller
from strongroom.oaep import OaepHash
from strongroom.reasons import Reason
from tests.keybroker.helpers import MODEL, bound, make_config, spki

ADMIN = Caller("spiffe://strongroom.test/admin", 0x1F, b"")

_OAEP = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
_WAIT = 30.0  # seconds: a step of the other replica that never comes fails the test, not hangs it


@pytest.fixture
def other_hsm(softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm]) -> Hsm:
    """Another broker's backend on the test's token: its own SoftHSM2 instance (a copy of the
    module), as a replica on another host."""
    return open_hsm(make_config(softhsm_token, softhsm_token.replica_module("b")))


def _enablers(hsm: Hsm, key_id: str) -> dict[int, list[bytes]]:
    """The labels of ``key_id``'s enablers by version, read by ``hsm`` afresh."""

    def op(hs: HsmSession) -> dict[int, list[bytes]]:
        found: dict[int, list[bytes]] = {}
        for obj in keys_module._search(hs, _kek.key_objects(key_id)):
            if obj.kind == "enabler":
                found.setdefault(obj.version, []).append(obj.label)
        return found

    return hsm.call(op, reread_token=True)


def _candidates(hsm: Hsm, key_id: str) -> dict[int, int]:
    """How many KEK candidates each version of ``key_id`` has, read by ``hsm`` afresh."""

    def op(hs: HsmSession) -> dict[int, int]:
        objects = keys_module._search(hs, _kek.key_objects(key_id))
        return {v.version: len(v.candidates) for v in _kek.group_versions(objects)}

    return hsm.call(op, reread_token=True)


def _wait(event: threading.Event) -> None:
    if not event.wait(_WAIT):
        raise AssertionError("the other replica's step never came")


@pytest.fixture
def missed(
    km: KeyManager, other_hsm: Hsm, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[], None]]:
    """Makes ``other_hsm`` miss version 2 of key ``live`` (which ``km`` publishes) while seeing its
    enabler, as two replicas rotating two keys at the same moment do: the other replica searches
    (and sees the enabler) while ``km`` is about to publish, and makes its own rotation's enabler
    right after ``km``'s KEK, without searching in between."""

    def make() -> None:
        other = KeyManager(other_hsm)
        real_publish = keys_module._publish
        real_enabler = keys_module._create_enabler
        enabler_made, other_searched, publish, published = (threading.Event() for _ in range(4))

        def publish_later(hs: HsmSession, key_id: str, *args: Any) -> None:
            if key_id == "live":  # km's rotation, its enabler made: hold the KEK back
                enabler_made.set()
                _wait(publish)
            real_publish(hs, key_id, *args)

        def enabler_after_it(hs: HsmSession, key_id: str, *args: Any, **kwargs: Any) -> Any:
            if key_id == "spare":  # the other's rotation, its search made: let km publish first
                other_searched.set()
                _wait(published)
            return real_enabler(hs, key_id, *args, **kwargs)

        monkeypatch.setattr(keys_module, "_publish", publish_later)
        monkeypatch.setattr(keys_module, "_create_enabler", enabler_after_it)
        mine = threading.Thread(target=km.rotate_key, args=("live",))
        mine.start()
        _wait(enabler_made)
        theirs = threading.Thread(target=other.rotate_key, args=("spare",))
        theirs.start()
        _wait(other_searched)
        publish.set()
        mine.join(_WAIT)
        published.set()
        theirs.join(_WAIT)
        monkeypatch.undo()
        assert not mine.is_alive() and not theirs.is_alive()

    km.create_key("live")
    km.create_key("spare")
    yield make


def test_a_replica_can_miss_another_replicas_new_kek_for_good(
    km: KeyManager, other_hsm: Hsm, missed: Callable[[], None]
) -> None:
    """The condition itself (SoftHSM2's token generation): the other instance sees the enabler of
    version 2 and not its KEK, on every search, until it is re-initialised."""
    missed()
    assert km.describe_key("live").current_version == 2
    other = KeyManager(other_hsm)
    for _ in range(3):
        assert other.describe_key("live").current_version == 1  # version 2's KEK missed
    assert _candidates(other_hsm, "live") == {1: 1, 2: 1}  # a re-read finds it


def test_a_rotation_on_a_replica_that_missed_a_kek_makes_the_next_version(
    km: KeyManager, other_hsm: Hsm, missed: Callable[[], None]
) -> None:
    """Before, every rotation there met version 2's enabler as a rival: KEY_VERSION_CONFLICT."""
    missed()
    other = KeyManager(other_hsm)
    assert other.rotate_key("live").current_version == 3
    assert _candidates(other_hsm, "live") == {1: 1, 2: 1, 3: 1}
    assert [v.state for v in km.describe_key("live").versions] == [KeyState.ENABLED] * 3


def test_a_replica_that_missed_a_kek_never_reaps_its_versions_enabler(
    km: KeyManager, other_hsm: Hsm, missed: Callable[[], None]
) -> None:
    """Once the enabler was a minute old, a rotation there destroyed it as abandoned: version 2
    read disabled on every replica (for good when the rotation then failed, as here where its
    record is refused), and a rotation that went on published a second KEK of version 2."""
    missed()
    before = _enablers(km.hsm, "live")
    later = KeyManager(other_hsm, clock=lambda: time.time() + _kek.PENDING_TTL_MS / 1000 + 60)

    def refuse(version: int | None) -> None:
        raise Internal("the audit log refused the record", reason=Reason.AUDIT_UNAVAILABLE)

    with pytest.raises(Internal):
        later.rotate_key("live", gate=ChangeGate(refuse))
    assert _enablers(km.hsm, "live") == before
    assert [v.state for v in km.describe_key("live").versions] == [KeyState.ENABLED] * 2
    assert later.rotate_key("live").current_version == 3
    assert _candidates(km.hsm, "live") == {1: 1, 2: 1, 3: 1}
    assert _enablers(km.hsm, "live")[2] == before[2]


def _leave_attempt(hsm: Hsm, key_id: str, version: int, age_s: float) -> bytes:
    """An enabler of ``version`` whose KEK never came (its rotation crashed), ``age_s`` old;
    returns its label."""
    label = _kek.label(
        key_id, version, int((time.time() - age_s) * 1000), "00" * 8, pending=False, enabler=True
    )

    def op(hs: HsmSession) -> None:
        hs.session.generate_key(
            KeyType.GENERIC_SECRET,
            _kek.MARKER_BITS,
            id=_kek.object_id(key_id),
            label=label,
            store=True,
            template=_kek.MARKER_TEMPLATE,
        )

    hsm.call(op)
    return label.encode()


def test_an_abandoned_attempt_is_recorded_before_it_is_destroyed(
    km: KeyManager, tmp_path: Path
) -> None:
    signing_key = ed25519.Ed25519PrivateKey.generate()
    audit = AuditLog.open(tmp_path / "audit.log", signing_key)
    try:
        keys = KeyService(km, PolicyStore(tmp_path / "policies"), audit)
        keys.create_key(ADMIN, "crash")
        label = _leave_attempt(km.hsm, "crash", 2, _kek.PENDING_TTL_MS / 1000 + 5)
        assert keys.rotate_key(ADMIN, "crash").current_version == 2
    finally:
        audit.close()
    records = read_audit_records(tmp_path / "audit.log")
    assert [r["action"] for r in records] == ["create_key", "reap_key_claim", "rotate_key"]
    reap = records[1]
    assert reap["decision"] == "allowed"
    assert reap["reason"] == "ABANDONED_KEY_CLAIM"
    assert reap["caller"]["spiffe_id"] == ADMIN.spiffe_id
    assert reap["key"] == {"id": "crash", "version": 2}
    assert reap["claims"]["object"] == "enabler"
    assert reap["claims"]["label"] == label.decode()
    assert reap["claims"]["age_ms"] > _kek.PENDING_TTL_MS
    assert label not in _enablers(km.hsm, "crash").get(2, [])
    # What `strongroom audit verify` checks: the record is in the chain, under the signed head.
    assert verify_audit_log(tmp_path / "audit.log", public_key=signing_key.public_key()).intact


def test_an_abandoned_attempt_whose_record_is_refused_stays(km: KeyManager) -> None:
    """No key state goes unrecorded: the rotation is refused with the record's error."""
    km.create_key("crash")
    label = _leave_attempt(km.hsm, "crash", 2, _kek.PENDING_TTL_MS / 1000 + 5)

    def refuse(reaped: Reaped) -> None:
        raise Internal("the audit log refused the record", reason=Reason.AUDIT_UNAVAILABLE)

    with pytest.raises(Internal):
        km.rotate_key("crash", gate=ChangeGate(reaped=refuse))
    assert _enablers(km.hsm, "crash")[2] == [label]
    assert km.describe_key("crash").current_version == 1


def test_an_enabler_of_a_version_below_a_published_one_is_never_reaped(km: KeyManager) -> None:
    """A version is claimed only above every published one, so an enabler of a lower version is
    no attempt, whatever a search found of its KEK (here an operator shredded it)."""
    km.create_key("shred")
    km.rotate_key("shred")

    def shred(hs: HsmSession) -> None:
        for obj in keys_module._search(hs, _kek.key_objects("shred")):
            if obj.published and obj.version == 1:
                hs.direct.destroy(obj.handle)

    km.hsm.call(shred)
    label = _leave_attempt(km.hsm, "shred", 1, _kek.PENDING_TTL_MS / 1000 + 5)
    assert km.rotate_key("shred").current_version == 3
    assert label in _enablers(km.hsm, "shred")[1]


def test_a_rotation_whose_claim_was_reaped_while_it_waited_publishes_nothing(
    km: KeyManager, other_hsm: Hsm
) -> None:
    """A rotation held at its audit record, or a replica whose clock runs a minute ahead, lets
    another replica take the rotation's claim for an abandoned attempt and reap it. The publisher
    went on and generated its KEK with no enabler: version 2 current, and disabled from birth
    (here the reaper's own rotation is refused, so nothing else claims the version)."""
    km.create_key("held")
    entered, go = threading.Event(), threading.Event()
    outcome: list[BaseException | int] = []

    def hold(version: int | None) -> None:
        entered.set()
        _wait(go)

    def rotate() -> None:
        try:
            outcome.append(km.rotate_key("held", gate=ChangeGate(hold)).current_version)
        except BaseException as exc:
            outcome.append(exc)

    def refuse(version: int | None) -> None:
        raise Internal("the audit log refused the record", reason=Reason.AUDIT_UNAVAILABLE)

    publisher = threading.Thread(target=rotate)
    publisher.start()
    try:
        _wait(entered)
        ahead = KeyManager(other_hsm, clock=lambda: time.time() + _kek.PENDING_TTL_MS / 1000 + 5)
        with pytest.raises(Internal):
            ahead.rotate_key("held", gate=ChangeGate(refuse))  # reaps the claim, then refused
        assert 2 not in _enablers(other_hsm, "held")  # km.hsm's worker is the one held
    finally:
        go.set()
        publisher.join(_WAIT)
    assert not publisher.is_alive()
    [answer] = outcome
    assert isinstance(answer, Unavailable), answer
    assert answer.reason == Reason.KEY_VERSION_CONFLICT
    assert "reaped" in answer.message
    assert _candidates(km.hsm, "held") == {1: 1}
    assert [v.state for v in km.describe_key("held").versions] == [KeyState.ENABLED]


def test_a_replica_that_missed_a_kek_releases_data_keys_under_it(
    km: KeyManager, other_hsm: Hsm, missed: Callable[[], None], tee_key: rsa.RSAPrivateKey
) -> None:
    """Before, every release there of a data key under version 2 answered KEY_VERSION_NOT_FOUND
    until something else re-read the token: a release naming a version above every one it sees
    now re-reads the token (at most once per _MISSED_VERSION_REREAD_S) before it says so."""
    missed()
    dek, wrapped, version = km.generate_data_key("live", *MODEL)
    assert version == 2
    other = KeyManager(other_hsm)
    assert other.describe_key("live").current_version == 1  # still missed
    out, _ = other.release_to_ephemeral("live", 2, wrapped, spki(tee_key), [OaepHash.SHA1])
    assert bound(tee_key.decrypt(out, _OAEP)) == dek


def test_releases_naming_versions_that_do_not_exist_reread_the_token_at_most_so_often(
    km: KeyManager, monkeypatch: pytest.MonkeyPatch, tee_key: rsa.RSAPrivateKey
) -> None:
    """Anyone who may ask for a release names the version: each re-read stalls every queued HSM
    operation, so one per interval for all of them, and still KEY_VERSION_NOT_FOUND."""
    monkeypatch.setattr(keys_module, "_MISSED_VERSION_REREAD_S", 3600.0)
    km.create_key("few")
    _, wrapped, _ = km.generate_data_key("few", *MODEL)
    generation = km.hsm.status().generation
    for version in (2, 7, 2, 1_000_000):
        with pytest.raises(NotFound) as refused:
            km.release_to_ephemeral("few", version, wrapped, spki(tee_key), [OaepHash.SHA1])
        assert refused.value.reason == Reason.KEY_VERSION_NOT_FOUND
    assert km.hsm.status().generation == generation + 1  # one re-read, the first's


def test_a_creation_that_runs_again_on_a_reread_token_keeps_to_one_deadline(
    km: KeyManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation whose first run meets another attempt's claim runs again on a re-read token;
    each run had the whole timeout, so a caller could wait twice it (undocumented). The second
    run now has what the first left of one deadline: a first run that used it all (and more,
    waited for as a started change) is answered HSM_TIMEOUT without a second run, nothing
    changed; one that left some time gives the second run no more than that."""
    km.create_key("slow")
    label = _leave_attempt(km.hsm, "slow", 2, _kek.PENDING_TTL_MS / 1000 + 5)
    real_reap, real_submit = keys_module._reap, km.hsm.submit
    pause = [1.2]
    limits: list[float] = []
    first_run: list[float] = []

    def late(hs: HsmSession, *args: Any, fresh: bool, **kwargs: Any) -> Any:
        if not fresh and not first_run:  # the first run's first look: it meets the claim
            started = time.monotonic()
            time.sleep(pause[0])
            first_run.append(time.monotonic() - started)
        return real_reap(hs, *args, fresh=fresh, **kwargs)

    def timed(op: Any, *, timeout: float | None = None, **kwargs: Any) -> Any:
        limits.append(-1.0 if timeout is None else timeout)
        return real_submit(op, timeout=timeout, **kwargs)

    monkeypatch.setattr(keys_module, "_reap", late)
    monkeypatch.setattr(km.hsm, "submit", timed)
    with pytest.raises(Unavailable) as info:
        km.rotate_key("slow", timeout=1.0)  # before: rotated, by a second run given 1 s more
    assert info.value.reason == "HSM_TIMEOUT"
    assert "no time left within its 1s to run again on a re-read token" in info.value.message
    assert limits == [1.0]
    assert km.describe_key("slow").current_version == 1
    assert label in _enablers(km.hsm, "slow")[2]  # the claim is not reaped either
    pause[0], first_run[:], limits[:] = 0.3, [], []
    assert km.rotate_key("slow", timeout=30.0).current_version == 2
    assert limits[0] == 30.0
    assert limits[1] <= 30.0 - first_run[0]  # before: 30.0


def test_a_release_keeps_to_one_deadline_across_its_hsm_steps(
    km: KeyManager, monkeypatch: pytest.MonkeyPatch, tee_key: rsa.RSAPrivateKey
) -> None:
    """A release's cold-cache lookup, its re-read of the token (a version it did not find) and
    its re-wrap each had the whole timeout, so its caller could wait three times it. They now
    share one deadline: a step that has nothing left is not queued and the caller gets
    HSM_TIMEOUT saying which; one that has some gets no more than that."""
    km.create_key("paced")
    dek, wrapped, version = km.generate_data_key("paced", *MODEL)
    real_submit = km.hsm.submit
    limits: list[float] = []
    pause = [1.2]

    def timed(op: Any, *, timeout: float | None = None, **kwargs: Any) -> Any:
        limits.append(-1.0 if timeout is None else timeout)
        return real_submit(op, timeout=timeout, **kwargs)

    def slow_reread(versions: list[_kek.KekVersion], wanted: int) -> bool:
        time.sleep(pause[0])  # on the caller's thread, between the lookup and the re-read
        return True

    monkeypatch.setattr(km.hsm, "submit", timed)
    cold = KeyManager(km.hsm)  # its lookup cache is empty: the release looks the key up first
    monkeypatch.setattr(cold, "_may_reread_for", slow_reread)
    target = spki(tee_key)
    with pytest.raises(Unavailable) as info:  # before: the re-read and the re-wrap had 1 s each
        cold.release_to_ephemeral("paced", version, wrapped, target, [OaepHash.SHA1], timeout=1.0)
    assert info.value.reason == "HSM_TIMEOUT"
    assert info.value.message == (
        "the release of key 'paced' version 1 had no time left within its 1s to re-read the "
        "token for a version it did not find; nothing was released; retry"
    )
    assert limits == [1.0]  # the lookup; no re-read queued
    # The caller's own work between begin_release and the re-wrap's start (its ALLOWED record,
    # waiting behind another batch's stalled fsync) is not the HSM's: the re-wrap has what the
    # lookup left, from its start.
    monkeypatch.setattr(cold, "_may_reread_for", lambda versions, wanted: False)
    cold._forget("paced")  # cold again, whatever the cache's TTL: one lookup
    limits.clear()
    pending = cold.begin_release("paced", version, wrapped, target, [OaepHash.SHA1], timeout=1.0)
    time.sleep(pause[0])
    released = pending.result()  # before: HSM_TIMEOUT 'within its 1s for its re-wrap'
    assert bound(tee_key.decrypt(released.wrapped, _OAEP)) == dek
    assert len(limits) == 2, limits  # the lookup, the re-wrap
    assert 0 < limits[1] <= 1.0
    # A lookup that took the whole deadline leaves the re-wrap nothing: it is not queued.
    cold._forget("paced")
    limits.clear()

    def slow_lookup(op: Any, *, timeout: float | None = None, **kwargs: Any) -> Any:
        if not limits:
            time.sleep(pause[0])  # on the caller's thread, before the lookup is queued
        return timed(op, timeout=timeout, **kwargs)

    monkeypatch.setattr(km.hsm, "submit", slow_lookup)
    pending = cold.begin_release("paced", version, wrapped, target, [OaepHash.SHA1], timeout=1.0)
    with pytest.raises(Unavailable) as info:
        pending.result()
    assert info.value.reason == "HSM_TIMEOUT"
    assert "within its 1s for its re-wrap; nothing was released; retry" in info.value.message
    assert limits == [1.0]  # the lookup; no re-wrap queued
    monkeypatch.setattr(km.hsm, "submit", timed)
    # Time left: each step has the remainder of the one deadline.
    pause[0], limits[:] = 0.3, []
    cold = KeyManager(km.hsm)
    monkeypatch.setattr(cold, "_may_reread_for", slow_reread)
    out, _ = cold.release_to_ephemeral(
        "paced", version, wrapped, target, [OaepHash.SHA1], timeout=30.0
    )
    assert bound(tee_key.decrypt(out, _OAEP)) == dek
    assert len(limits) == 3, limits  # the lookup, the re-read, the re-wrap
    assert limits[0] == 30.0
    assert limits[1] <= 30.0 - pause[0]  # before: 30.0
    assert limits[2] < limits[1]  # before: 30.0


def test_a_release_behind_a_stalled_audit_commit_keeps_its_hsm_share(
    km: KeyManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tee_key: rsa.RSAPrivateKey
) -> None:
    """A release's re-wrap starts once its ALLOWED record has its place in a batch; behind another
    batch whose fsync stalls, that is later than the HSM deadline. That wait is the disk's, not
    the HSM's: the re-wrap still has what the release's lookup left (it was refused HSM_TIMEOUT
    with a healthy HSM: 15 of 16 concurrent releases behind a 1 s stall with a 1 s timeout)."""
    km.create_key("disk")
    dek, wrapped, version = km.generate_data_key("disk", *MODEL)
    audit = AuditLog.open(tmp_path / "audit.log", ed25519.Ed25519PrivateKey.generate())
    real_fsync = os.fsync
    stalled, go_on = threading.Event(), threading.Event()

    def stalling_fsync(fd: int) -> None:
        if threading.current_thread().name == "stalled-commit":
            stalled.set()
            go_on.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", stalling_fsync)
    event = AuditEvent(decision=Decision.ALLOWED, reason=Reason.RELEASED, key_id="disk")
    first = threading.Thread(target=audit.append, args=(event,), name="stalled-commit")
    first.start()
    try:
        assert stalled.wait(30)
        pending = km.begin_release(
            "disk", version, wrapped, spki(tee_key), [OaepHash.SHA1], timeout=0.5
        )
        behind = threading.Thread(
            target=audit.append, args=(event,), kwargs={"on_written": pending.start}
        )
        behind.start()
        time.sleep(1.0)  # the stall outlasts the release's whole HSM deadline
        go_on.set()
        behind.join(30)
        released = pending.result()  # before: HSM_TIMEOUT 'for its re-wrap'
    finally:
        go_on.set()
        first.join(30)
        audit.close()
    assert bound(tee_key.decrypt(released.wrapped, _OAEP)) == dek

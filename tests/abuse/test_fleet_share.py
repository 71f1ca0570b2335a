"""One replica of the inference fleet cannot hold its whole fleet's calls at the key broker.

Every replica has the one inference SPIFFE ID, so the broker's caps per identity are the fleet's.
One replica (its own certificate, as each enrolment gives) that opened ``ReleaseKey`` calls and
never sent their message held all 13 of them for as long as its connection lived, and every other
replica's release was refused ``TOO_MANY_UNARY_CALLS_PER_IDENTITY`` (65 of 65 in 20 s, measured).
A certificate now holds half of each cap; the identity's caps still bound all its certificates
together. Counts only: how many calls each side had admitted or refused, never how fast.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as kb_grpc
from strongroom.attesters import SimulatedAttester, TeeType
from strongroom.client.keyrelease import KeyReleaseClient
from strongroom.dev.devstack import DevStack, read_audit_records
from strongroom.dev.devstack.stack import DEMO_MEASUREMENT
from strongroom.dev.simulated import SimulatedAuthority
from strongroom.pki import WorkloadIdentity
from strongroom.runtime.config import ServerConfig
from tests.abuse.traffic import BROKER, KEY_ID, outcome
from tests.keybroker.helpers import MODEL, bound, data_key_request

CAP = ServerConfig().data_plane_workers_per_identity  # 13: the fleet's, on the broker
SHARE = CAP // 2  # 6: one certificate's


class StalledReleases:
    """``ReleaseKey`` calls of one certificate that send their headers and never their message."""

    def __init__(self, stack: DevStack, identity: WorkloadIdentity, count: int) -> None:
        self._gate = threading.Event()
        call = stack.channel(identity, "keybroker").stream_unary(
            f"/{BROKER}/ReleaseKey", None, None
        )
        self.futures: list[Any] = [call.future(self._never(), timeout=120) for _ in range(count)]

    def _never(self) -> Iterator[bytes]:
        self._gate.wait(120)
        return
        yield b""  # a generator that yields nothing: the message never comes

    def refused(self) -> Counter[tuple[str, str | None]]:
        """How the calls refused so far ended (the admitted ones are still waiting)."""
        return Counter(outcome(f.exception()) for f in self.futures if f.done())

    def open(self) -> int:
        """Calls not ended: admitted and waiting for their message, once :func:`_counted`."""
        return sum(not f.done() for f in self.futures)

    def ended(self) -> int:
        return sum(f.done() for f in self.futures)

    def end(self) -> None:
        self._gate.set()  # each admitted call ends without its message (MALFORMED_REQUEST)
        for future in self.futures:
            future.exception(60)


def _settled(condition: Callable[[], bool]) -> bool:
    """Waits (bounded) for ``condition``, which the broker reaches on its own threads."""
    deadline = time.monotonic() + 30
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def _counted(stack: DevStack, attackers: list[StalledReleases]) -> bool:
    """Whether the broker has admitted or refused every one of the attackers' calls."""
    running = stack.services["keybroker"].handle.host.unary.running(stack.spiffe_id("inference"))
    ended = sum(a.ended() for a in attackers)
    return running + ended == sum(len(a.futures) for a in attackers)


@pytest.fixture(scope="module")
def genuine(stack: DevStack) -> Any:
    """A genuine replica's releases: its own certificate, a simulated SEV-SNP VM the release
    policy approves, the data key a publisher generated."""
    publisher = kb_grpc.KeyBrokerServiceStub(
        stack.channel(stack.identity("publisher"), "keybroker")
    )
    generated = publisher.GenerateDataKey(data_key_request(KEY_ID), timeout=30)
    replica = stack.identity("inference")
    client = KeyReleaseClient(
        stack.channel(replica, "keybroker"),
        SimulatedAttester(
            SimulatedAuthority.load(stack.root / "simulated-tee").snp(),
            TeeType.SEV_SNP,
            production=False,
            claims={"measurement": bytes.fromhex(DEMO_MEASUREMENT)},
        ),
        replica.public_key_der,
        verifier=stack.release_verifier(),
    )

    def release() -> tuple[str, str | None]:
        try:
            released = client.release(KEY_ID, generated.key_version, generated.wrapped_data_key)
        except grpc.RpcError as exc:
            return outcome(exc)
        assert bound(released.dek, MODEL) == generated.data_key
        return ("OK", None)

    return release


def test_one_replica_stalling_releases_leaves_its_fleet_the_rest_of_the_cap(
    stack: DevStack, genuine: Any
) -> None:
    """One inference certificate opens 3 x the cap of releases that never send their message: it
    holds its share, its others are refused TOO_MANY_CALLS_PER_CERTIFICATE (audited), and another
    replica's genuine releases all succeed meanwhile (on the old code: 0 of 5)."""
    caller = stack.spiffe_id("inference")
    broker = stack.services["keybroker"].handle.host
    audit = stack.root / "state" / "keybroker" / "audit.log"
    before = len(read_audit_records(audit))
    attacker = StalledReleases(stack, stack.identity("inference"), 3 * CAP)
    try:
        assert _settled(lambda: _counted(stack, [attacker]))
        genuine_outcomes = Counter(genuine() for _ in range(5))
        held = (broker.unary.running(caller), attacker.open())
        refused = attacker.refused()
    finally:
        attacker.end()
    assert genuine_outcomes == Counter({("OK", None): 5})
    assert held == (SHARE, SHARE)
    assert refused == Counter(
        {("RESOURCE_EXHAUSTED", "TOO_MANY_CALLS_PER_CERTIFICATE"): 3 * CAP - SHARE}
    )
    records = read_audit_records(audit)[before:]
    audited = [r for r in records if r["reason"] == "TOO_MANY_CALLS_PER_CERTIFICATE"]
    assert audited  # refused releases are audited (one by one, or counted within the budget)
    assert {(r["decision"], r["caller"]["spiffe_id"]) for r in audited} == {("denied", caller)}
    assert _settled(lambda: broker.unary.running(caller) == 0)
    # The shares hold only what runs: nothing once the calls ended.
    assert broker.shares.certificates_held() == 0


def test_fresh_certificates_take_their_shares_and_never_more_than_the_identitys_cap(
    stack: DevStack, genuine: Any
) -> None:
    """A replica can renew onto new serials at will: three certificates, each opening 3 x the cap
    of stalled releases, hold the identity's cap (13) between them, not three shares (18); what
    the identity's cap leaves them is refused as before, and so is the genuine replica then."""
    caller = stack.spiffe_id("inference")
    broker = stack.services["keybroker"].handle.host
    attackers = []
    try:
        for _ in range(3):
            attackers.append(StalledReleases(stack, stack.identity("inference"), 3 * CAP))
            assert _settled(lambda: _counted(stack, attackers))
        assert broker.unary.running(caller) == CAP
        assert [a.open() for a in attackers] == [SHARE, SHARE, CAP - 2 * SHARE]
        reasons = set().union(*(a.refused() for a in attackers))
        assert reasons == {
            ("RESOURCE_EXHAUSTED", "TOO_MANY_CALLS_PER_CERTIFICATE"),
            ("RESOURCE_EXHAUSTED", "TOO_MANY_UNARY_CALLS_PER_IDENTITY"),
        }
        # Residual, and said so in the README: a replica with enough serials holds the fleet's cap.
        assert genuine() == ("RESOURCE_EXHAUSTED", "TOO_MANY_UNARY_CALLS_PER_IDENTITY")
    finally:
        for attacker in attackers:
            attacker.end()
    assert _settled(lambda: broker.unary.running(caller) == 0)
    assert genuine() == ("OK", None)

"""Key releases at the real broker of an abuse stack: the stalled ones of an attacking replica,
and a genuine replica's, which must not notice them (tests/abuse/test_fleet_share.py,
tests/abuse/test_request_wait.py)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as kb_grpc
from strongroom.attesters import SimulatedAttester, TeeType
from strongroom.client.keyrelease import KeyReleaseClient
from strongroom.dev.devstack import DevStack
from strongroom.dev.devstack.stack import DEMO_MEASUREMENT
from strongroom.dev.simulated import SimulatedAuthority
from strongroom.pki import WorkloadIdentity
from tests.abuse.traffic import BROKER, KEY_ID, outcome
from tests.keybroker.helpers import MODEL, bound, data_key_request


class StalledCalls:
    """Unary calls of one certificate to ``method`` of ``service`` that send their headers and
    never their message."""

    def __init__(
        self,
        stack: DevStack,
        identity: WorkloadIdentity,
        service: str,
        method: str,
        count: int,
        timeout: float,
    ) -> None:
        """``count`` calls, each with the client's deadline ``timeout`` seconds away."""
        self._gate = threading.Event()
        self._timeout = timeout
        call = stack.channel(identity, service).stream_unary(method, None, None)
        self.futures: list[Any] = [
            call.future(self._never(), timeout=timeout) for _ in range(count)
        ]

    def _never(self) -> Iterator[bytes]:
        self._gate.wait(self._timeout)
        return
        yield b""  # a generator that yields nothing: the message never comes

    def refused(self) -> Counter[tuple[str, str | None]]:
        """How the calls refused so far ended (the admitted ones are still waiting)."""
        return Counter(outcome(f.exception()) for f in self.futures if f.done())

    def open(self) -> int:
        """Calls not ended: admitted and waiting for their message, once :func:`counted`."""
        return sum(not f.done() for f in self.futures)

    def ended(self) -> int:
        return sum(f.done() for f in self.futures)

    def end(self) -> None:
        self._gate.set()  # each admitted call ends without its message (MALFORMED_REQUEST)
        for future in self.futures:
            future.exception(60)


class StalledReleases(StalledCalls):
    """``ReleaseKey`` calls of one certificate that send their headers and never their message."""

    def __init__(
        self, stack: DevStack, identity: WorkloadIdentity, count: int, timeout: float = 120
    ) -> None:
        """``count`` calls, each with the client's deadline ``timeout`` seconds away."""
        super().__init__(stack, identity, "keybroker", f"/{BROKER}/ReleaseKey", count, timeout)


def settled(condition: Callable[[], bool]) -> bool:
    """Waits (bounded) for ``condition``, which the broker reaches on its own threads."""
    deadline = time.monotonic() + 30
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def counted(stack: DevStack, attackers: list[StalledReleases]) -> bool:
    """Whether the broker has admitted or refused every one of the attackers' calls."""
    running = stack.services["keybroker"].handle.host.unary.running(stack.spiffe_id("inference"))
    ended = sum(a.ended() for a in attackers)
    return running + ended == sum(len(a.futures) for a in attackers)


def genuine_release(stack: DevStack) -> Callable[[], tuple[str, str | None]]:
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

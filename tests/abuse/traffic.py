"""The abuse scenarios and the legitimate client that must not notice them (tests and bench).

Every attacker holds a certificate our step-ca really issued: a publisher, a SPIFFE ID in a
foreign trust domain, and one in our trust domain that no RPC allows. Everything runs on loopback
and every loop is bounded by a count and a deadline.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from strongroom.api.keybroker.v1 import keybroker_pb2 as kb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as kb_grpc
from strongroom.api.modelstore.v1 import modelstore_pb2 as ms
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as ms_grpc
from strongroom.dev.devstack import DevStack
from strongroom.pki import WorkloadIdentity
from strongroom.reasons import METADATA_KEY as REASON_TRAILER

KEY_ID = "abuse-key"
BROKER = "strongroom.api.keybroker.v1.KeyBrokerService"
ADMIN = "strongroom.api.keybroker.v1.KeyAdminService"
STORE = "strongroom.api.modelstore.v1.ModelStoreService"
IDLE_TIMEOUT = 2.0
"""The stacks' ``server.stream_idle_timeout_seconds`` (short, to keep the scenarios bounded)."""


def outcome(error: BaseException | None) -> tuple[str, str | None]:
    """(status code name, strongroom-reason or None) of a finished call."""
    if error is None:
        return ("OK", None)
    if not isinstance(error, grpc.RpcError):
        return (type(error).__name__, None)
    metadata: Any = error.trailing_metadata() or ()
    reason = dict(metadata).get(REASON_TRAILER)
    return (error.code().name, reason)


@dataclass
class Identities:
    """Who calls: the legitimate client and the attackers."""

    legit: WorkloadIdentity  # the inference identity: GetChallenge, ListModels, health
    admin: WorkloadIdentity
    publisher: WorkloadIdentity
    foreign: WorkloadIdentity  # spiffe://evil.example/watcher
    nobody: WorkloadIdentity  # spiffe://<ours>/nobody: every RPC refuses it

    @classmethod
    def enrol(cls, stack: DevStack) -> Identities:
        return cls(
            legit=stack.identity("inference"),
            admin=stack.identity("admin"),
            publisher=stack.identity("publisher"),
            foreign=stack.foreign_identity("spiffe://evil.example/watcher"),
            nobody=stack.foreign_identity(stack.spiffe_id("nobody")),
        )


@dataclass
class LegitClient:
    """Calls GetChallenge, ListModels and health Check in a loop and records every failure."""

    stack: DevStack
    identity: WorkloadIdentity
    timeout: float = 10.0
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._broker = kb_grpc.KeyBrokerServiceStub(self.stack.channel(self.identity, "keybroker"))
        self._store = ms_grpc.ModelStoreServiceStub(self.stack.channel(self.identity, "modelstore"))
        self._health = health_pb2_grpc.HealthStub(self.stack.channel(self.identity, "keybroker"))

    def call_once(self) -> None:
        """One round: three RPCs, each timed; a failure is recorded, never raised."""
        calls: list[Callable[[], Any]] = [
            lambda: self._broker.GetChallenge(
                kb.GetChallengeRequest(key_id=KEY_ID), timeout=self.timeout
            ),
            lambda: self._store.ListModels(ms.ListModelsRequest(), timeout=self.timeout),
            lambda: self._health.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout),
        ]
        for call in calls:
            started = time.perf_counter()
            try:
                call()
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            self.latencies.append(time.perf_counter() - started)

    def run(self, rounds: int) -> None:
        """``rounds`` rounds in this thread."""
        for _ in range(rounds):
            self.call_once()

    def __enter__(self) -> LegitClient:
        def loop() -> None:
            deadline = time.monotonic() + 120
            while not self._stop.is_set() and time.monotonic() < deadline:
                self.call_once()
                self._stop.wait(0.01)

        self._thread = threading.Thread(target=loop, name="legit-client", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def watch_streams(
    stack: DevStack, identities: list[WorkloadIdentity], count: int
) -> tuple[list[Any], Callable[[], Counter[tuple[str, str | None]]]]:
    """Opens ``count`` health Watch streams, spread over the identities and both services.

    Returns the calls and a function that cancels them all and counts how each ended: refused
    streams end at once with RESOURCE_EXHAUSTED, admitted ones stay open until cancelled.
    """
    stubs = [
        health_pb2_grpc.HealthStub(stack.channel(identity, service))
        for identity in identities
        for service in ("keybroker", "modelstore")
    ]
    calls = [
        stubs[i % len(stubs)].Watch(health_pb2.HealthCheckRequest(), timeout=60)
        for i in range(count)
    ]

    def finish() -> Counter[tuple[str, str | None]]:
        outcomes: Counter[tuple[str, str | None]] = Counter()
        for call in calls:
            if call.done():
                outcomes[outcome(_error_of(call))] += 1
            else:
                outcomes[("OPEN", None)] += 1
                call.cancel()
        return outcomes

    return calls, finish


def _error_of(call: Any) -> BaseException | None:
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        return exc
    return None


def stalled_uploads(
    stack: DevStack, identity: WorkloadIdentity, count: int
) -> tuple[list[Any], threading.Event]:
    """Starts ``count`` PutModel uploads that send one message and then nothing."""
    stop = threading.Event()
    stub = ms_grpc.ModelStoreServiceStub(stack.channel(identity, "modelstore"))

    def stalled() -> Iterator[ms.PutModelRequest]:
        yield ms.PutModelRequest(artifact_size=1 << 20)
        stop.wait(60)

    futures = [stub.PutModel.future(stalled(), timeout=60) for _ in range(count)]
    return futures, stop


def oversized_unary(
    stack: DevStack, identity: WorkloadIdentity, count: int, size: int
) -> list[Any]:
    """``count`` concurrent ReleaseKey calls of ``size`` bytes each (one shared buffer)."""
    payload = kb.ReleaseKeyRequest(key_id=KEY_ID, nonce=b"\0" * size).SerializeToString()
    raw = stack.channel(identity, "keybroker").unary_unary(f"/{BROKER}/ReleaseKey", None, None)
    return [raw.future(payload, timeout=60) for _ in range(count)]


MALFORMED = {
    "garbage": b"\xff\xff\xff\xff\x0f\x00garbage",
    "invalid UTF-8 in a string field": b"\x0a\x02\xc3\x28",
    "truncated": b"\x0a\x10abc",
}
"""Request bodies that are not a valid encoding of any of the services' messages."""


def nested_yaml(depth: int) -> str:
    """``"[" * depth + "]" * depth``."""
    return "[" * depth + "]" * depth

"""One replica of the inference fleet cannot hold its whole fleet's streams at the model store.

Every replica has the one inference SPIFFE ID, so the store's ``server.max_streams_per_identity``
is the fleet's. One replica (its own certificate, as each enrolment gives) whose downloads stalled,
each cut only after the idle timeout and then reopened, held all of them, and every other
replica's model load was refused ``TOO_MANY_STREAMS_PER_IDENTITY``. A certificate now holds its
share (``server.max_streams_per_certificate``); the identity's cap still bounds all its
certificates together. Counts only: how many downloads each side had open or refused.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from strongroom.api.modelstore.v1 import modelstore_pb2 as ms
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as ms_grpc
from strongroom.dev.devstack import DevStack
from strongroom.dev.devstack.model import train
from strongroom.pki import WorkloadIdentity
from strongroom.runtime.callers import certificate_share
from tests.abuse.conftest import SERVER, abuse_stack
from tests.abuse.releases import settled
from tests.abuse.traffic import KEY_ID, outcome
from tests.e2e.publishing import data_key, put_encrypted

CAP = 8  # the store's streams per identity: the service's default, the fleet's
SHARE = certificate_share(CAP)  # 4: one certificate's, as the chart sets it for a fleet
MODEL = "stream-share"
PADDING = 32 << 20
"""The model's size: far more than the flow-control windows between a client that reads nothing
and the store, so that such a download stays open, stalled, until its client reads or leaves."""


@pytest.fixture(scope="module")
def stack(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> Iterator[DevStack]:
    """The abuse stack with a share per certificate, its stalled downloads held until the test
    ends them (the idle timeout far beyond the test), and a large model published."""
    server = {
        **SERVER,
        "stream_idle_timeout_seconds": 600,
        "max_streams_per_identity": CAP,
        "max_streams_per_certificate": SHARE,
    }
    with abuse_stack(step_ca_binary, tmp_path_factory, simulated_tee_dir, server) as dev:
        path = tmp_path_factory.mktemp("stream-share") / "model.onnx"
        train(path, padding_bytes=PADDING)
        put_encrypted(dev, path, MODEL, KEY_ID, data_key(dev, KEY_ID, MODEL))
        yield dev


class StalledDownloads:
    """``GetModel`` downloads of one certificate that take nothing of what the store sends."""

    def __init__(
        self, stack: DevStack, identity: WorkloadIdentity, count: int, model: str = MODEL
    ) -> None:
        """``count`` downloads of ``model``, far larger than the flow-control windows."""
        store = ms_grpc.ModelStoreServiceStub(stack.channel(identity, "modelstore"))
        request = ms.GetModelRequest(name=model, version="1")
        self.calls: list[Any] = [store.GetModel(request, timeout=300) for _ in range(count)]

    def refused(self) -> Counter[tuple[str, str | None]]:
        """How the downloads that ended have ended (the admitted ones are still open)."""
        return Counter(outcome(c.exception()) for c in self.calls if c.done())

    def open(self) -> int:
        return sum(not c.done() for c in self.calls)

    def end(self) -> None:
        for call in self.calls:
            call.cancel()


def download(stack: DevStack, identity: WorkloadIdentity) -> tuple[tuple[str, str | None], str]:
    """A genuine replica's whole download: its outcome, and the artifact's SHA-256."""
    store = ms_grpc.ModelStoreServiceStub(stack.channel(identity, "modelstore"))
    digest = hashlib.sha256()
    try:
        for response in store.GetModel(ms.GetModelRequest(name=MODEL, version="1"), timeout=120):
            digest.update(response.data)
    except grpc.RpcError as exc:
        return outcome(exc), ""
    return outcome(None), digest.hexdigest()


def streams_of(stack: DevStack) -> int:
    """The inference identity's streams the store counts open now."""
    host = stack.services["modelstore"].handle.host
    return int(host.streams.open_streams(stack.spiffe_id("inference")))


def counted(stack: DevStack, attackers: list[StalledDownloads]) -> bool:
    """Whether the store has admitted or refused every one of the attackers' downloads."""
    ended = sum(len(a.calls) - a.open() for a in attackers)
    return streams_of(stack) + ended == sum(len(a.calls) for a in attackers)


def test_one_replica_stalling_downloads_leaves_its_fleet_the_rest_of_the_streams(
    stack: DevStack,
) -> None:
    """One inference certificate opens the identity's whole cap of downloads and reads none: it
    holds its share, its others are refused TOO_MANY_STREAMS_PER_CERTIFICATE, and another
    replica's downloads all complete meanwhile, whole (on the old code it held all 8 and the
    other replica was refused TOO_MANY_STREAMS_PER_IDENTITY)."""
    whole = download(stack, stack.identity("inference"))
    assert whole[0] == ("OK", None)
    host = stack.services["modelstore"].handle.host
    attacker = StalledDownloads(stack, stack.identity("inference"), CAP)
    try:
        assert settled(lambda: counted(stack, [attacker]))
        replica = stack.identity("inference")
        genuine = [download(stack, replica) for _ in range(3)]
        held = (streams_of(stack), attacker.open())
        refused = attacker.refused()
    finally:
        attacker.end()
    assert genuine == [whole] * 3
    assert held == (SHARE, SHARE)  # stalled, still open while the other replica downloaded
    assert refused == Counter(
        {("RESOURCE_EXHAUSTED", "TOO_MANY_STREAMS_PER_CERTIFICATE"): CAP - SHARE}
    )
    assert settled(lambda: streams_of(stack) == 0)
    # The share's table holds only certificates with streams open: none once they ended.
    assert host.streams.certificates_open() == 0


def test_fresh_certificates_take_their_shares_and_never_more_than_the_identitys_cap(
    stack: DevStack,
) -> None:
    """A replica can renew onto new serials at will (README: a known limit of the share): three
    certificates each opening the cap of stalled downloads hold the identity's cap (8) between
    them, not three shares (12); what the cap leaves them is refused as before, and so is the
    genuine replica then."""
    attackers: list[StalledDownloads] = []
    try:
        for _ in range(3):
            attackers.append(StalledDownloads(stack, stack.identity("inference"), CAP))
            assert settled(lambda: counted(stack, attackers))
        assert streams_of(stack) == CAP
        assert [a.open() for a in attackers] == [SHARE, SHARE, CAP - 2 * SHARE]
        reasons = set().union(*(a.refused() for a in attackers))
        assert reasons == {
            ("RESOURCE_EXHAUSTED", "TOO_MANY_STREAMS_PER_CERTIFICATE"),
            ("RESOURCE_EXHAUSTED", "TOO_MANY_STREAMS_PER_IDENTITY"),
        }
        refused, _ = download(stack, stack.identity("inference"))
        assert refused == ("RESOURCE_EXHAUSTED", "TOO_MANY_STREAMS_PER_IDENTITY")
    finally:
        for attacker in attackers:
            attacker.end()
    assert settled(lambda: streams_of(stack) == 0)
    assert download(stack, stack.identity("inference"))[0] == ("OK", None)

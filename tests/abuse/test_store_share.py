"""One replica of the inference fleet cannot hold its fleet's data-plane bound at the model store.

Every replica has the one inference SPIFFE ID, so the store's bound on the data-plane workers one
identity holds (``server.max_data_plane_workers_per_identity``) is the fleet's. The chart gave
each certificate a share of the streams, but blocking streams counted in no certificate's share of
that bound: one replica (compromised, or stuck) held its stream share of stalled downloads and
``StatModel`` calls that never sent their message beside them, the fleet's whole bound, and every
other replica's model load was refused ``TOO_MANY_WORKERS_PER_IDENTITY``. A certificate's streams
and unary calls now count together in its share (``server.max_calls_per_certificate``), which the
chart sets to half the bound. The store runs the limits the chart derives for a fleet of 2
(tests/deploy/test_chart_defaults.py pins them). Counts only: how many calls each side had open,
served or refused.
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
from tests.abuse.conftest import SERVER, abuse_stack
from tests.abuse.releases import StalledCalls, settled
from tests.abuse.test_stream_share import StalledDownloads
from tests.abuse.traffic import KEY_ID, outcome
from tests.e2e.publishing import data_key, put_encrypted

STREAMS, STREAM_SHARE = 16, 8
BOUND, SHARE = 24, 12
FLEET_OF_TWO = {
    "max_workers": 43,
    "control_plane_workers": 4,
    "max_blocking_streams": 24,
    "max_streams_per_identity": STREAMS,
    "max_streams_per_certificate": STREAM_SHARE,
    "max_unary_calls_per_identity": 24,
    "max_data_plane_workers_per_identity": BOUND,
    "max_calls_per_certificate": SHARE,
}
"""The store's server section as the chart renders it for inference.replicas 2 (to 8)."""

LOAD_STREAMS = 8  # one replica's load: 4 part fetches x 2 models
LOAD_CALLS = 2  # and a StatModel per model beside them

MODEL = "store-share"
PADDING = 32 << 20
"""Far more than the flow-control windows between a client that reads nothing and the store: a
download stays open at the store, its worker held, until its client reads the rest or leaves."""

STAT = "/strongroom.api.modelstore.v1.ModelStoreService/StatModel"


@pytest.fixture(scope="module")
def stack(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> Iterator[DevStack]:
    """The abuse stack with the chart's fleet limits, the stalled downloads and calls held until
    the test ends them (the idle timeout and the request wait far beyond the test), and a large
    model published."""
    server = {
        **SERVER,
        **FLEET_OF_TWO,
        "stream_idle_timeout_seconds": 600,
        "request_wait_seconds": 600,
    }
    with abuse_stack(step_ca_binary, tmp_path_factory, simulated_tee_dir, server) as dev:
        path = tmp_path_factory.mktemp("store-share") / "model.onnx"
        train(path, padding_bytes=PADDING)
        put_encrypted(dev, path, MODEL, KEY_ID, data_key(dev, KEY_ID, MODEL))
        yield dev


def held(stack: DevStack) -> int:
    """The data-plane workers the store counts to the inference identity now."""
    host = stack.services["modelstore"].handle.host
    return int(host.shares.held_now(stack.spiffe_id("inference")))


def running(stack: DevStack) -> int:
    host = stack.services["modelstore"].handle.host
    return int(host.unary.running(stack.spiffe_id("inference")))


def streams(stack: DevStack) -> int:
    """The inference identity's streams the store counts open now."""
    host = stack.services["modelstore"].handle.host
    return int(host.streams.open_streams(stack.spiffe_id("inference")))


def replica_load(
    stack: DevStack, identity: WorkloadIdentity
) -> tuple[Counter[tuple[str, str | None]], set[str], int]:
    """One healthy replica's load at once: its 8 downloads open (each past its first message,
    the rest left in flight), its StatModels answered meanwhile, then the downloads read to
    their end. The outcomes, the SHA-256 of each download served whole, and the identity's
    streams open at the store while the StatModels were answered."""
    store = ms_grpc.ModelStoreServiceStub(stack.channel(identity, "modelstore"))
    request = ms.GetModelRequest(name=MODEL, version="1")
    outcomes: list[tuple[str, str | None]] = []
    downloads: list[tuple[Any, Any]] = []
    for _ in range(LOAD_STREAMS):
        call = store.GetModel(request, timeout=120)
        digest = hashlib.sha256()
        try:
            digest.update(next(call).data)
            downloads.append((call, digest))
        except grpc.RpcError as exc:
            outcomes.append(outcome(exc))
    stat = ms.StatModelRequest(name=MODEL, version="1")
    for _ in range(LOAD_CALLS):
        try:
            store.StatModel(stat, timeout=60)
            outcomes.append(outcome(None))
        except grpc.RpcError as exc:
            outcomes.append(outcome(exc))
    open_meanwhile = streams(stack)
    digests = set()
    for call, digest in downloads:
        try:
            for response in call:
                digest.update(response.data)
            outcomes.append(outcome(None))
            digests.add(digest.hexdigest())
        except grpc.RpcError as exc:
            outcomes.append(outcome(exc))
    return Counter(outcomes), digests, open_meanwhile


def test_one_replica_stalling_downloads_and_calls_leaves_its_fleet_a_replicas_load(
    stack: DevStack,
) -> None:
    """One inference certificate holds its stream share of stalled downloads (8) and opens 3 x
    its share of StatModels that never send their message: 4 are admitted (8 + 4 = its share of
    12), the rest refused TOO_MANY_CALLS_PER_CERTIFICATE, and another replica's whole load (8
    downloads and 2 StatModels at once) is served meanwhile. On the old code the streams counted
    in no certificate's share: 12 calls were admitted beside the 8 downloads, 20 of the bound of
    24, and the other replica's load was refused TOO_MANY_WORKERS_PER_IDENTITY."""
    served = Counter({("OK", None): LOAD_STREAMS + LOAD_CALLS})
    alone, (whole,), concurrent = replica_load(stack, stack.identity("inference"))
    assert (alone, concurrent) == (served, LOAD_STREAMS)
    attacker = stack.identity("inference")
    downloads = StalledDownloads(stack, attacker, STREAM_SHARE, model=MODEL)
    calls = StalledCalls(stack, attacker, "modelstore", STAT, 0, timeout=300)
    try:
        assert settled(lambda: held(stack) == STREAM_SHARE == downloads.open())
        calls = StalledCalls(stack, attacker, "modelstore", STAT, 3 * SHARE, timeout=300)
        # Each call admitted (running) or refused (ended) once the store has seen them all.
        assert settled(lambda: running(stack) + 3 * SHARE - calls.open() == 3 * SHARE)
        holding = (held(stack), downloads.open(), calls.open())
        genuine, digests, concurrent = replica_load(stack, stack.identity("inference"))
        refused = calls.refused()
    finally:
        downloads.end()
        calls.end()
    assert (genuine, digests, concurrent) == (served, {whole}, STREAM_SHARE + LOAD_STREAMS)
    assert holding == (SHARE, STREAM_SHARE, SHARE - STREAM_SHARE)
    assert refused == Counter(
        {("RESOURCE_EXHAUSTED", "TOO_MANY_CALLS_PER_CERTIFICATE"): 2 * SHARE + STREAM_SHARE}
    )
    assert settled(lambda: held(stack) == 0)
    host = stack.services["modelstore"].handle.host
    assert host.shares.certificates_held() == 0

"""The budget of memory inference responses hold outside ONNX Runtime's arena, over a real gRPC
server and real ONNX Runtime runs: within it a request is served as before; past it a request
waits for earlier responses to be sent, then is refused ``RESPONSE_MEMORY_BUSY``; one larger
than all of it is refused at once; and whatever way a call ends, its reservation comes back."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest

from strongroom.api.oip.v2 import grpc_service_pb2 as pb
from strongroom.api.oip.v2.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from strongroom.errors import ResourceExhausted
from strongroom.inference.config import InferenceConfig
from strongroom.inference.models import ModelRepository
from strongroom.inference.oip import SERVICE_NAME, InferLimits, OipServicer, ResponseBudget
from strongroom.inference.oip._budget import (
    RAW_RESPONSE_COPIES,
    TYPED_RESPONSE_COPIES,
    CallEnded,
    Reservation,
    response_memory,
)
from strongroom.reasons import METADATA_KEY as REASON_TRAILER
from strongroom.runtime.interceptors import ErrorMappingInterceptor, RequestDecodingInterceptor
from strongroom.runtime.unsent import UnsentResponses, send_bound
from tests.inference import onnx_models
from tests.inference.conftest import Running, Starter
from tests.inference.test_oip import expect_error
from tests.inference.unread import UnreadClient

MIB = 1 << 20
# A raw response of 4 MiB holds 20 MiB by the budget's count.
FOUR_MIB_FP32 = MIB  # elements
ONE_RESPONSE = response_memory(4 * MIB, raw=True)


def _request(elements: int, *, raw: bool = True, model: str = "filled") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="n", datatype="INT64", shape=[1])
    if raw:
        request.raw_input_contents.append(np.array([elements], "<i8").tobytes())
    else:
        tensor.contents.int64_contents.append(elements)
    return request


@pytest.fixture(scope="module")
def repository() -> ModelRepository:
    repo = ModelRepository(["filled", "negatives"])
    repo.load("filled", "1", onnx_models.filled("FP32"))
    repo.load("negatives", "1", onnx_models.filled("INT64", -1))
    return repo


def _served(
    start_server: Starter,
    repository: ModelRepository,
    budget: ResponseBudget,
    unsent: UnsentResponses | None = None,
    **limits: int,
) -> Running:
    return start_server(
        repository,
        response_budget=budget,
        limits=InferLimits(**limits) if limits else None,
        unsent=unsent,
    )


def _until(condition: Callable[[], bool]) -> None:
    """Waits for ``condition`` (an event on another thread: the RPC's end is gRPC's, after the
    client has its answer), failing if it never comes."""
    give_up = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < give_up, "the condition never came"
        time.sleep(0.01)


def _whole(max_bytes: int, wait_seconds: float) -> ResponseBudget:
    """A budget whose one caller may hold all of it: the tests of the whole budget call from one
    client (callers' shares have tests of their own)."""
    return ResponseBudget(max_bytes, wait_seconds, per_caller=max_bytes)


def _full(budget: ResponseBudget) -> Callable[[], bool]:
    return lambda: budget.free == budget.max_bytes


@pytest.fixture
def held() -> Iterator[list[Callable[[], None]]]:
    """Reservations a test takes as other responses in flight would; given back at its end."""
    releases: list[Callable[[], None]] = []
    yield releases
    for release in releases:
        release()


def _hold(budget: ResponseBudget, size: int, held: list[Callable[[], None]]) -> Callable[[], None]:
    reservation = budget.reserve(size)
    held.append(reservation.release)
    return reservation.release


def test_a_response_within_the_budget_is_served_as_before_and_gives_its_room_back(
    start_server: Starter, repository: ModelRepository
) -> None:
    budget = _whole(2 * response_memory(4 * MIB, raw=False), wait_seconds=0)
    running = _served(start_server, repository, budget)
    for raw in (True, False):
        response = running.oip.ModelInfer(_request(FOUR_MIB_FP32, raw=raw))
        if raw:
            values = np.frombuffer(response.raw_output_contents[0], "<f4")
        else:
            values = np.asarray(response.outputs[0].contents.fp32_contents, np.float32)
        assert values.shape == (FOUR_MIB_FP32,) and bool(np.all(values == 1.5))
        _until(_full(budget))


def test_a_response_waits_for_earlier_ones_then_is_refused_busy(
    start_server: Starter, repository: ModelRepository, held: list[Callable[[], None]]
) -> None:
    """Other responses hold all but less than this one needs: it waits the configured time, is
    refused ``RESPONSE_MEMORY_BUSY``, holds nothing afterwards, and is served once they are
    sent."""
    budget = _whole(2 * ONE_RESPONSE, wait_seconds=0.2)
    running = _served(start_server, repository, budget)
    release = _hold(budget, ONE_RESPONSE + 1, held)
    error = expect_error(
        lambda: running.oip.ModelInfer(_request(FOUR_MIB_FP32)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RESPONSE_MEMORY_BUSY",
    )
    assert "inference.max_response_memory_bytes" in (error.details() or "")
    _until(lambda: budget.free == ONE_RESPONSE - 1 and budget.waiting == 0)
    # A smaller one still fits beside them: the refusal was this response's size.
    running.oip.ModelInfer(_request(FOUR_MIB_FP32 // 2))
    release()
    _until(_full(budget))
    running.oip.ModelInfer(_request(FOUR_MIB_FP32))
    _until(_full(budget))


def _at_once(running: Running, calls: int) -> list[str]:
    """``calls`` ModelInfer calls of a 4 MiB response started together: how each ended."""
    outcomes: list[str] = []
    start = threading.Barrier(calls)

    def call() -> None:
        start.wait()
        try:
            running.oip.ModelInfer(_request(FOUR_MIB_FP32), timeout=60)
            outcomes.append("OK")
        except grpc.RpcError as exc:
            reasons = [m.value for m in exc.trailing_metadata() or () if m.key == REASON_TRAILER]
            outcomes.append(f"{exc.code().name} {reasons}")

    threads = [threading.Thread(target=call) for _ in range(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_concurrent_responses_past_the_budget_are_refused(
    start_server: Starter, repository: ModelRepository, held: list[Callable[[], None]]
) -> None:
    """Eight calls at once while others' responses leave less than one of theirs: every one
    waits, is refused ``RESPONSE_MEMORY_BUSY``, and holds nothing afterwards."""
    budget = _whole(3 * ONE_RESPONSE, wait_seconds=0.2)
    running = _served(start_server, repository, budget)
    release = _hold(budget, 2 * ONE_RESPONSE + 1, held)
    assert _at_once(running, 8) == ["RESOURCE_EXHAUSTED ['RESPONSE_MEMORY_BUSY']"] * 8
    assert budget.free == ONE_RESPONSE - 1 and budget.waiting == 0
    release()
    assert budget.free == budget.max_bytes


def test_concurrent_responses_wait_their_turn_and_are_all_served(
    start_server: Starter, repository: ModelRepository, held: list[Callable[[], None]]
) -> None:
    """Eight calls at once while the budget is held: all eight wait (their outputs still in the
    arena), then, once it is free, are served two at a time, and every reservation comes back."""
    budget = _whole(2 * ONE_RESPONSE, wait_seconds=60)
    running = _served(start_server, repository, budget)
    release = _hold(budget, 2 * ONE_RESPONSE, held)
    outcomes: list[list[str]] = []
    calls = threading.Thread(target=lambda: outcomes.append(_at_once(running, 8)))
    calls.start()
    _until(lambda: budget.waiting == 8)
    release()
    calls.join()
    assert outcomes == [["OK"] * 8]
    _until(_full(budget))


def test_a_waiting_response_is_served_once_earlier_ones_are_sent(
    start_server: Starter, repository: ModelRepository, held: list[Callable[[], None]]
) -> None:
    budget = _whole(ONE_RESPONSE, wait_seconds=60)
    running = _served(start_server, repository, budget)
    release = _hold(budget, 1, held)
    call = running.oip.ModelInfer.future(_request(FOUR_MIB_FP32), timeout=60)
    _until(lambda: budget.waiting == 1)
    release()
    assert len(call.result().raw_output_contents[0]) == 4 * MIB
    _until(_full(budget))


@pytest.mark.parametrize("how", ["cancelled", "deadline"])
def test_a_call_ended_while_it_waits_takes_nothing(
    start_server: Starter,
    repository: ModelRepository,
    held: list[Callable[[], None]],
    how: str,
) -> None:
    """A caller that cancels, or whose deadline passes, while its response waits for room: the
    wait ends with the call (not after the configured minute), and nothing is reserved for it."""
    budget = _whole(ONE_RESPONSE, wait_seconds=60)
    running = _served(start_server, repository, budget)
    release = _hold(budget, 1, held)
    call = running.oip.ModelInfer.future(
        _request(FOUR_MIB_FP32), timeout=60 if how == "cancelled" else 1
    )
    _until(lambda: budget.waiting == 1)
    if how == "cancelled":
        call.cancel()
        assert call.cancelled()
    else:
        with pytest.raises(grpc.RpcError) as info:
            call.result()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _until(lambda: budget.waiting == 0)
    assert budget.free == budget.max_bytes - 1
    release()
    running.oip.ModelInfer(_request(FOUR_MIB_FP32))
    _until(_full(budget))


def test_a_response_larger_than_the_whole_budget_is_refused_at_once(
    start_server: Starter, repository: ModelRepository
) -> None:
    """No wait (the configured minute would outlast the call's deadline) and a message naming
    both sizes."""
    budget = _whole(ONE_RESPONSE, wait_seconds=60)
    running = _served(start_server, repository, budget)
    error = expect_error(
        lambda: running.oip.ModelInfer(_request(FOUR_MIB_FP32 + 1), timeout=30),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RESPONSE_TOO_LARGE",
    )
    details = error.details() or ""
    needed = response_memory(4 * MIB + 4, raw=True)
    assert f"({needed} bytes)" in details, details
    assert f"inference.max_response_memory_bytes = {ONE_RESPONSE} bytes" in details, details
    assert budget.free == budget.max_bytes and budget.waiting == 0


def test_a_response_refused_after_its_reservation_gives_it_back(
    start_server: Starter, repository: ModelRepository
) -> None:
    """Typed negative INT64s: their shape passes the output bound at one byte each and is
    reserved; their exact size (10 bytes each) is refused ``RESPONSE_TOO_LARGE`` when encoded,
    after the reservation, which comes back with the failure."""
    budget = ResponseBudget(64 * MIB, wait_seconds=0)
    running = _served(start_server, repository, budget, max_output_bytes=4 * MIB)
    elements = MIB // 2  # 512 KiB by shape, 5 MiB encoded
    expect_error(
        lambda: running.oip.ModelInfer(_request(elements, raw=False, model="negatives")),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RESPONSE_TOO_LARGE",
    )
    _until(_full(budget))
    # The exact size of a response is reserved once it is known: 8 bytes an element in its
    # array, 10 on the wire.
    served = running.oip.ModelInfer(_request(elements // 4, raw=False, model="negatives"))
    assert list(served.outputs[0].contents.int64_contents[:2]) == [-1, -1]
    _until(_full(budget))


def test_the_reservation_is_held_while_grpc_serialises_the_response(
    repository: ModelRepository,
) -> None:
    """The handler returns the message; gRPC serialises it after that, copies the bytes into its
    core and sends them, the message alive until then: the reservation is still held when the
    serialiser runs (released on the handler's return, the budget would not count the copies
    its peak is made of), and comes back when the call has ended."""
    budget = ResponseBudget(2 * ONE_RESPONSE, wait_seconds=0)
    servicer = OipServicer(repository, response_budget=budget)
    free_while_serialised: list[int] = []

    def serialise(response: pb.ModelInferResponse) -> bytes:
        free_while_serialised.append(budget.free)
        return response.SerializeToString()

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[ErrorMappingInterceptor(), RequestDecodingInterceptor()],
    )
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=serialise,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"ModelInfer": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        GRPCInferenceServiceStub(channel).ModelInfer(_request(FOUR_MIB_FP32 // 2))
        held = response_memory(2 * MIB, raw=True)
        assert free_while_serialised == [budget.max_bytes - held]
        _until(_full(budget))
    finally:
        channel.close()
        server.stop(grace=None)


def test_budget_counts_each_response_at_its_measured_copies() -> None:
    assert response_memory(MIB, raw=True) == RAW_RESPONSE_COPIES * MIB
    assert response_memory(MIB, raw=False) == TYPED_RESPONSE_COPIES * MIB


def test_the_budget_serves_waiters_in_arrival_order() -> None:
    """A large response that waits is not overtaken by smaller ones that came after it (they
    kept taking the room it waited for)."""
    budget = ResponseBudget(10, wait_seconds=60)
    first = budget.reserve(6)
    order: list[str] = []

    def take(name: str, size: int) -> None:
        budget.reserve(size).release()
        order.append(name)

    large = threading.Thread(target=take, args=("large", 8))
    large.start()
    _until(lambda: budget.waiting == 1)
    small = threading.Thread(target=take, args=("small", 2))
    small.start()
    _until(lambda: budget.waiting == 2)
    first.release()
    large.join()
    small.join()
    assert order == ["large", "small"]
    assert budget.free == 10


def test_a_reservation_that_grows_goes_ahead_of_the_waiters() -> None:
    """A request holding room that needs more (a BYTES response's exact size) is not queued
    behind one waiting for the room it holds: each would wait for the other."""
    budget = ResponseBudget(10, wait_seconds=60)
    holder = budget.reserve(6)
    waiter = threading.Thread(target=lambda: budget.reserve(8).release())
    waiter.start()
    _until(lambda: budget.waiting == 1)
    holder.grow_to(10)
    assert budget.free == 0
    holder.release()
    waiter.join()
    assert budget.free == 10


def test_a_grown_reservation_past_the_budget_is_refused_and_keeps_what_it_held() -> None:
    budget = ResponseBudget(10, wait_seconds=0)
    reservation = budget.reserve(4)
    with pytest.raises(ResourceExhausted) as info:
        reservation.grow_to(11)
    assert info.value.reason == "RESPONSE_TOO_LARGE"
    reservation.grow_to(7)
    assert budget.free == 3
    reservation.release()
    reservation.release()
    assert budget.free == 10


def test_a_caller_that_never_reads_its_responses_holds_less_than_half_the_budget(
    start_server: Starter, repository: ModelRepository
) -> None:
    """A reservation lasts until its call ends, and a call whose client never takes its response
    (HTTP/2 flow control: gRPC cannot finish sending it) lasts until its deadline or its
    connection's age. One caller sending small requests for large outputs and never reading
    held the whole budget so, and every other caller was refused ``RESPONSE_MEMORY_BUSY``. A
    caller now holds half of it at most: its calls past that wait for its own (0.2 s here), then
    are refused, the others are served, and its calls give their room back when it goes away."""
    budget = ResponseBudget(3 * ONE_RESPONSE, wait_seconds=0.2)
    running = _served(start_server, repository, budget)
    unread = UnreadClient(running.address, f"/{SERVICE_NAME}/ModelInfer")
    try:
        for _ in range(3):
            unread.call(_request(FOUR_MIB_FP32).SerializeToString())
        # It holds the whole budget, or one response and its two other calls ended (refused).
        _until(lambda: budget.free == 0 or unread.ended() == 2)
        assert budget.free == 2 * ONE_RESPONSE
        response = running.oip.ModelInfer(_request(FOUR_MIB_FP32), timeout=30)
        assert len(response.raw_output_contents[0]) == 4 * MIB
    finally:
        unread.close()
    _until(_full(budget))


def test_a_caller_past_its_share_is_refused_for_its_share_when_its_wait_ends() -> None:
    """Its share is half the budget; a reservation that would take it past waits for its own
    (none here: no wait configured) and is refused for its share, not the budget's room, while
    another caller takes the room; what it gives back it may take again."""
    budget = ResponseBudget(101, wait_seconds=0)
    assert budget.per_caller == 50
    mine = budget.reserve(30, caller="a")
    with pytest.raises(ResourceExhausted) as info:
        budget.reserve(21, caller="a")
    assert info.value.reason == "TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY"
    message = str(info.value)
    assert "(30 bytes)" in message and "may hold 50 bytes" in message, message
    assert "inference.max_response_memory_bytes = 101 bytes" in message, message
    assert budget.waiting == 0
    theirs = budget.reserve(50, caller="b")
    more = budget.reserve(20, caller="a")
    assert (budget.held_by("a"), budget.held_by("b"), budget.free) == (50, 50, 1)
    mine.release()
    more.release()
    theirs.release()
    assert (budget.held_by("a"), budget.free) == (0, 101)
    assert not budget._held  # every caller forgotten once it holds nothing


class _Taker(threading.Thread):
    """One ``reserve`` on its own thread, as a request's handler makes it: its reservation, or
    the exception it raised, once it has ended."""

    def __init__(self, budget: ResponseBudget, size: int, **how: object) -> None:
        super().__init__(daemon=True)
        self._budget, self._size, self._how = budget, size, how
        self.reservation: Reservation | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.reservation = self._budget.reserve(self._size, **self._how)  # type: ignore[arg-type]
        except Exception as exc:  # the outcome is the test's to check
            self.error = exc

    def result(self) -> Reservation:
        self.join()
        assert self.error is None, self.error
        assert self.reservation is not None
        return self.reservation

    def reason(self) -> str:
        self.join()
        assert isinstance(self.error, ResourceExhausted), self.error
        return self.error.reason


def test_two_requests_of_one_certificate_past_its_share_are_both_served_once_its_first_drains() -> (
    None
):
    """An honest client's burst: its first response being sent fills its certificate's share,
    and two more asked at once were both refused ``TOO_MUCH_RESPONSE_MEMORY_PER_CERTIFICATE`` at
    once (OIP clients seldom retry). They wait for its own first to be sent, then are served."""
    budget = ResponseBudget(200, wait_seconds=60)
    assert budget.per_certificate == 50
    first = budget.reserve(50, caller="fleet", certificate="fleet a")
    burst = [_Taker(budget, 25, caller="fleet", certificate="fleet a") for _ in range(2)]
    for taker in burst:
        taker.start()
    _until(lambda: budget.waiting == 2)
    assert budget.held_by_certificate("fleet a") == 50  # they wait, holding nothing yet
    first.release()
    for reservation in [taker.result() for taker in burst]:
        reservation.release()
    assert budget.free == 200 and budget.waiting == 0 and not budget._held_by_certificate


def test_a_waiter_past_its_share_is_refused_for_it_when_its_caller_never_gives_back() -> None:
    """A caller that never takes its responses: its call past its share waits the configured
    time for them, then is refused for its share (not ``RESPONSE_MEMORY_BUSY``: the budget has
    room), holding nothing."""
    budget = ResponseBudget(101, wait_seconds=1)
    stuck = budget.reserve(50, caller="a")
    waiter = _Taker(budget, 1, caller="a")
    waiter.start()
    _until(lambda: budget.waiting == 1 or not waiter.is_alive())
    assert budget.waiting == 1, waiter.error  # it waits (refused at once, it never did)
    assert waiter.reason() == "TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY"
    assert (budget.held_by("a"), budget.waiting, budget.free) == (50, 0, 51)
    certificate = ResponseBudget(200, wait_seconds=1)
    mine = certificate.reserve(50, caller="fleet", certificate="fleet a")
    waiter = _Taker(certificate, 1, caller="fleet", certificate="fleet a")
    waiter.start()
    _until(lambda: certificate.waiting == 1 or not waiter.is_alive())
    assert certificate.waiting == 1, waiter.error
    assert waiter.reason() == "TOO_MUCH_RESPONSE_MEMORY_PER_CERTIFICATE"
    assert (certificate.held_by_certificate("fleet a"), certificate.waiting) == (50, 0)
    stuck.release()
    mine.release()


def test_a_waiter_past_its_share_does_not_delay_another_callers_request_behind_it() -> None:
    """A caller's call waiting for its own responses is first in line; another caller's
    request that came after it is served at once (it would otherwise wait out the minute
    configured here), and the waiter is served once its own caller gives back."""
    budget = ResponseBudget(101, wait_seconds=60)
    mine = budget.reserve(50, caller="a")
    waiter = _Taker(budget, 20, caller="a")
    waiter.start()
    _until(lambda: budget.waiting == 1)
    theirs = budget.reserve(50, caller="b")
    assert budget.waiting == 1 and waiter.is_alive()  # still waiting: not served past it
    mine.release()
    waiter.result().release()
    theirs.release()
    assert budget.free == 101 and not budget._held


class _Grower(threading.Thread):
    """One ``grow_to`` on its own thread, as a request's handler makes it once its ``BYTES``
    outputs' size is known: the exception it raised, if any, once it has ended."""

    def __init__(self, reservation: Reservation, size: int) -> None:
        super().__init__(daemon=True)
        self._reservation, self._size = reservation, size
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self._reservation.grow_to(self._size)
        except Exception as exc:  # the outcome is the test's to check
            self.error = exc


@pytest.mark.parametrize(
    ("certificates", "reason"),
    [
        (("fleet a", "fleet a"), "TOO_MUCH_RESPONSE_MEMORY_PER_CERTIFICATE"),
        (("fleet a", "fleet b"), "TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY"),
    ],
)
def test_two_reservations_growing_past_their_share_into_each_others_room_do_not_wait_it_out(
    certificates: tuple[str, str], reason: str
) -> None:
    """Two ``BYTES`` responses of one certificate (or identity) grow at once, each past its
    share by what the other holds: nothing of the share can come back before one gives up, and
    both waited the whole wait (a minute here) holding their workers. The later one is refused
    at once for the share, and the earlier grows once that one's reservation is given back."""
    budget = ResponseBudget(200, wait_seconds=60)
    assert (budget.per_caller, budget.per_certificate) == (100, 50)
    size = 20 if certificates[0] == certificates[1] else 45
    first, second = (budget.reserve(size, caller="fleet", certificate=c) for c in certificates)
    earlier = _Grower(first, size + 15)
    earlier.start()
    _until(lambda: budget.waiting == 1)
    later = _Grower(second, size + 15)
    later.start()
    later.join(timeout=30)
    assert not later.is_alive(), "the later grow waited it out"
    assert isinstance(later.error, ResourceExhausted) and later.error.reason == reason
    assert earlier.is_alive() and budget.waiting == 1  # the earlier waits on
    second.release()  # its handler gives it back as it fails
    earlier.join(timeout=30)
    assert not earlier.is_alive() and earlier.error is None, earlier.error
    assert (first.size, budget.held_by("fleet")) == (size + 15, size + 15)
    first.release()
    assert budget.free == 200 and budget.waiting == 0 and not budget._held


def test_reservations_growing_past_their_share_wait_while_another_of_theirs_will_come_back() -> (
    None
):
    """Two grow past their certificate's share while a third response of it is being sent:
    that one comes back, so neither gives up, and both are served once it is sent."""
    budget = ResponseBudget(200, wait_seconds=60)
    one, two, sent = (
        budget.reserve(size, caller="fleet", certificate="fleet a") for size in (15, 15, 20)
    )
    growers = [_Grower(reservation, 25) for reservation in (one, two)]
    for grower in growers:
        grower.start()
    _until(lambda: budget.waiting == 2)
    assert all(grower.is_alive() for grower in growers)
    sent.release()
    for grower in growers:
        grower.join(timeout=30)
        assert not grower.is_alive() and grower.error is None, grower.error
    assert budget.held_by_certificate("fleet a") == 50
    one.release()
    two.release()
    assert budget.free == 200 and not budget._held_by_certificate


def test_a_call_ended_while_it_waits_past_its_share_takes_nothing() -> None:
    """Its call ends (cancelled, deadline) while it waits for its own responses: the wait ends
    with it (:meth:`ResponseBudget.wake`, as the call's end does), not after the minute
    configured, ``CallEnded``, and nothing is taken for it."""
    budget = ResponseBudget(200, wait_seconds=60)
    mine = budget.reserve(50, caller="fleet", certificate="fleet a")
    ended = threading.Event()
    waiter = _Taker(budget, 10, caller="fleet", certificate="fleet a", ended=ended.is_set)
    waiter.start()
    _until(lambda: budget.waiting == 1)
    ended.set()
    budget.wake()
    waiter.join()
    assert isinstance(waiter.error, CallEnded), waiter.error
    assert (budget.waiting, budget.held_by_certificate("fleet a"), budget.free) == (0, 50, 150)
    mine.release()


def test_a_response_larger_than_a_callers_share_is_refused_as_too_large() -> None:
    budget = ResponseBudget(101, wait_seconds=60)
    with pytest.raises(ResourceExhausted) as info:
        budget.reserve(51, caller="a")
    assert info.value.reason == "RESPONSE_TOO_LARGE"
    assert "(51 bytes)" in str(info.value) and "(50 bytes" in str(info.value)
    budget.reserve(51).release()  # counted in no caller's share: the whole budget's bound only
    assert budget.free == 101


def test_a_reservation_that_grows_past_its_callers_share_is_refused_and_keeps_what_it_held() -> (
    None
):
    budget = ResponseBudget(101, wait_seconds=0)
    other = budget.reserve(30, caller="a")
    reservation = budget.reserve(10, caller="a")
    with pytest.raises(ResourceExhausted) as info:
        reservation.grow_to(21)
    assert info.value.reason == "TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY"
    reservation.grow_to(20)
    assert budget.held_by("a") == 50
    other.release()
    reservation.release()
    assert budget.free == 101 and budget.held_by("a") == 0


def test_a_waiter_whose_caller_fills_its_share_meanwhile_lets_the_others_go_first() -> None:
    """Two calls of one caller wait; the first served takes the caller near its share, and the
    second, which fitted when it came, waits on without holding a later caller's call behind
    it, then is refused for its caller's share (not the budget) when its wait ends."""
    budget = ResponseBudget(101, wait_seconds=0.5)
    blocker = budget.reserve(90)
    outcomes: list[tuple[str, str]] = []

    def take(name: str, caller: str, size: int) -> None:
        try:
            budget.reserve(size, caller=caller)
            outcomes.append((name, "took"))
        except ResourceExhausted as exc:
            outcomes.append((name, exc.reason))

    threads = []
    for waiting, (name, caller, size) in enumerate(
        (("first", "a", 40), ("second", "a", 20), ("other", "c", 20)), start=1
    ):
        threads.append(threading.Thread(target=take, args=(name, caller, size)))
        threads[-1].start()
        _until(lambda waiting=waiting: budget.waiting == waiting)  # type: ignore[misc]
    blocker.release()
    for thread in threads:
        thread.join()
    # The other caller's call was served while the second still waited, not after its wait.
    assert outcomes[-1] == ("second", "TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY")
    assert sorted(outcomes[:2]) == [("first", "took"), ("other", "took")]
    assert (budget.held_by("a"), budget.held_by("c"), budget.waiting) == (40, 20, 0)


def _unsent(idle_timeout: float, min_bytes_per_second: int) -> UnsentResponses:
    return UnsentResponses(idle_timeout, min_bytes_per_second)


def test_a_response_its_client_never_takes_is_cancelled_after_the_bound_and_gives_its_room_back(
    start_server: Starter, repository: ModelRepository, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that never reads kept its calls, and their reservations, until its deadline or
    its connection's age (some 40 minutes): within its share, for as long as it liked. Now a
    response not taken within the idle timeout (the rate's bound being shorter here) is
    cancelled, its room given back, and one WARNING says so with the peer and the reason."""
    budget = _whole(3 * ONE_RESPONSE, wait_seconds=0)
    unsent = _unsent(0.5, 64 * MIB)  # 4 MiB at 64 MiB/s: the idle timeout is the bound
    running = _served(start_server, repository, budget, unsent=unsent)
    unread = UnreadClient(running.address, f"/{SERVICE_NAME}/ModelInfer")
    caplog.set_level(logging.WARNING, logger="strongroom.runtime.unsent")
    try:
        for _ in range(2):
            unread.call(_request(FOUR_MIB_FP32).SerializeToString())
        _until(lambda: budget.free < budget.max_bytes)
        _until(_full(budget))
        # Ended: the cancel's trailers are not flow-controlled.
        _until(lambda: unread.ended() == 2)
        assert unsent.pending == 0
        lines = [r for r in caplog.records if r.name == "strongroom.runtime.unsent"]
        assert len(lines) == 2, [r.getMessage() for r in lines]
        for line in lines:
            assert line.levelno == logging.WARNING
            assert line.getMessage() == "response cancelled: the client did not take it"
            assert line.reason == "STREAM_IDLE_TIMEOUT"  # type: ignore[attr-defined]
            assert "127.0.0.1" in line.peer  # type: ignore[attr-defined]
        # The room it held serves the others.
        running.oip.ModelInfer(_request(FOUR_MIB_FP32), timeout=30)
        _until(_full(budget))
    finally:
        unread.close()


def _read_slowly(
    start_server: Starter,
    repository: ModelRepository,
    caplog: pytest.LogCaptureFixture,
    min_rate: int,
) -> UnsentResponses:
    """A 4 MiB response read at 2 MiB/s, past a 0.5 s idle timeout, with the rate floor
    ``min_rate``: checks it was answered, uncancelled and unlogged, and its room given back."""
    budget = _whole(3 * ONE_RESPONSE, wait_seconds=0)
    unsent = _unsent(0.5, min_rate)
    running = _served(start_server, repository, budget, unsent=unsent)
    slow = UnreadClient(running.address, f"/{SERVICE_NAME}/ModelInfer", read_rate=2 * MIB)
    caplog.set_level(logging.WARNING, logger="strongroom.runtime.unsent")
    try:
        started = time.monotonic()
        slow.call(_request(FOUR_MIB_FP32).SerializeToString())
        _until(lambda: slow.ended() == 1)
        assert time.monotonic() - started > unsent.idle_timeout  # slower than the idle bound
        _until(_full(budget))
        assert not [r for r in caplog.records if r.name == "strongroom.runtime.unsent"]
    finally:
        slow.close()
    return unsent


def test_a_slow_client_reading_within_the_rate_is_not_cancelled(
    start_server: Starter, repository: ModelRepository, caplog: pytest.LogCaptureFixture
) -> None:
    """The bound grows with the response, as a download's rate floor: a client taking 4 MiB at
    2 MiB/s (some 2 s, past the 0.5 s idle timeout) is within 1 MiB/s and gets its answer."""
    _read_slowly(start_server, repository, caplog, MIB)


def test_with_the_rate_floor_off_a_slow_client_is_not_cancelled(
    start_server: Starter, repository: ModelRepository, caplog: pytest.LogCaptureFixture
) -> None:
    """The floor off (``server.stream_min_bytes_per_second: 0``, the way to serve slow links)
    left the idle timeout alone as the bound, so every response taking longer than it to send
    was cancelled however steadily its client read: a 4 MiB one at 2 MiB/s past a 0.5 s idle
    timeout here, a 64 MiB one below 2.2 MiB/s at the default 30 s. gRPC tells nothing of a unary
    response's progress; with the floor off it is not timed, as a request's wait is not."""
    assert _read_slowly(start_server, repository, caplog, 0).pending == 0


@pytest.mark.parametrize(
    ("size", "rate", "bound"),
    [(0, 1024, 30.0), (30 * 1024, 1024, 30.0), (60 * 1024, 1024, 60.0), (1 << 30, 0, None)],
)
def test_the_send_bound_is_the_idle_timeout_or_what_the_rate_allows(
    size: int, rate: int, bound: float | None
) -> None:
    assert send_bound(size, 30.0, rate) == bound


def test_a_certificates_refusal_counts_its_first_response_in_its_share() -> None:
    """Its share is what all its responses hold together, its first counted in it (the first
    alone may be larger): the refusal said it "may hold 50 bytes beyond its first response",
    and a second response of 30 after a first of 30 was refused although it was within that."""
    budget = ResponseBudget(200, wait_seconds=0)
    first = budget.reserve(30, caller="fleet", certificate="fleet a")
    with pytest.raises(ResourceExhausted) as info:
        budget.reserve(30, caller="fleet", certificate="fleet a")
    assert info.value.reason == "TOO_MUCH_RESPONSE_MEMORY_PER_CERTIFICATE"
    message = str(info.value)
    assert "beyond its first" not in message, message
    assert "may hold 50 bytes together, or its first alone more" in message, message
    budget.reserve(20, caller="fleet", certificate="fleet a").release()  # 50 together: within
    first.release()


def test_a_certificate_holds_half_its_identitys_share_or_its_first_response_alone() -> None:
    """A fleet's replicas share one SPIFFE ID: one replica not reading held its identity's whole
    share, and its siblings were refused. A certificate past half of it is refused (here at
    once: no wait configured); its first response may take the identity's whole share (the default typed bound needs it),
    and a reservation that grows counts as that first response."""
    budget = ResponseBudget(200, wait_seconds=0)
    assert (budget.per_caller, budget.per_certificate) == (100, 50)
    first = budget.reserve(60, caller="fleet", certificate="fleet a")
    with pytest.raises(ResourceExhausted) as info:
        budget.reserve(1, caller="fleet", certificate="fleet a")
    assert info.value.reason == "TOO_MUCH_RESPONSE_MEMORY_PER_CERTIFICATE"
    assert "(60 bytes)" in str(info.value) and "may hold 50 bytes" in str(info.value)
    first.grow_to(100)  # its only one
    first.grow_to(40)  # never less
    assert budget.held_by_certificate("fleet a") == 100
    first.release()
    a = budget.reserve(30, caller="fleet", certificate="fleet a")
    other = budget.reserve(10, caller="fleet", certificate="fleet a")
    b = budget.reserve(40, caller="fleet", certificate="fleet b")
    with pytest.raises(ResourceExhausted) as info:
        a.grow_to(41)  # not its certificate's only one: within the share
    assert info.value.reason == "TOO_MUCH_RESPONSE_MEMORY_PER_CERTIFICATE"
    a.grow_to(40)
    with pytest.raises(ResourceExhausted) as info:
        budget.reserve(11, caller="fleet", certificate="fleet c")
    assert info.value.reason == "TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY"  # the fleet's share
    budget.reserve(10, caller="fleet", certificate="fleet c").release()
    for reservation in (a, other, b):
        reservation.release()
    assert budget.free == 200 and not budget._held and not budget._held_by_certificate


def test_a_never_reading_callers_waiting_calls_stop_at_their_part_of_the_arena() -> None:
    """Each call waiting past its share keeps its run's outputs in the arena: a caller's waiting
    calls together may keep an eighth of it (100 of 800 here), and one that would keep more is
    refused at once for its share, saying too many of its calls wait; room given back by a wait
    that ends is room for the next. Waiting without that bound, a never-reading client's worker
    bound of calls held 832 MiB of the default 2 GiB arena."""
    budget = ResponseBudget(200, wait_seconds=60, arena_bytes=800)
    assert (budget.parked_per_caller, budget.parked_per_certificate) == (100, 50)
    stuck = budget.reserve(100, caller="a")
    waiters = [_Taker(budget, 10, caller="a", arena=40) for _ in range(2)]
    for taker in waiters:
        taker.start()
    _until(lambda: budget.waiting == 2)
    assert budget.parked_by("a") == 80
    with pytest.raises(ResourceExhausted) as info:
        budget.reserve(10, caller="a", arena=40)  # at once: no thread needed
    assert info.value.reason == "TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY"
    message = str(info.value)
    assert "too many of this caller's calls already wait for room" in message, message
    assert "their outputs hold 0.0 MiB (80 bytes)" in message, message
    assert "may hold 100 bytes (1/8 of inference.max_inference_memory_bytes = 800" in message
    assert "this one's would add 40" in message, message
    assert budget.waiting == 2 and budget.parked_by("a") == 80  # nothing of it counted
    last = _Taker(budget, 10, caller="a", arena=20)  # 100 together: within
    last.start()
    _until(lambda: budget.waiting == 3)
    stuck.release()
    for reservation in [taker.result() for taker in [*waiters, last]]:
        reservation.release()
    assert budget.parked_by("a") == 0 and not budget._parked
    assert budget.free == 200


def test_a_certificates_waiting_calls_keep_half_its_identitys_part_or_its_first_alone() -> None:
    """A fleet shares one identity: one stuck replica's waiting calls keep at most half the
    identity's part of the arena (its first alone more, within the identity's), so a sibling
    may still wait; the identity's part bounds them all."""
    budget = ResponseBudget(400, wait_seconds=60, arena_bytes=800)
    assert (budget.per_certificate, budget.parked_per_certificate) == (100, 50)
    stuck = budget.reserve(100, caller="fleet", certificate="fleet a")
    first = _Taker(budget, 10, caller="fleet", certificate="fleet a", arena=60)
    first.start()
    _until(lambda: budget.waiting == 1)  # its first: more than 50, within the identity's 100
    with pytest.raises(ResourceExhausted) as info:
        budget.reserve(10, caller="fleet", certificate="fleet a", arena=1)
    assert info.value.reason == "TOO_MUCH_RESPONSE_MEMORY_PER_CERTIFICATE"
    message = str(info.value)
    assert "too many of this certificate's calls already wait for room" in message, message
    assert "may hold 50 bytes (half of its identity's 100)" in message, message
    sibling = budget.reserve(100, caller="fleet", certificate="fleet b")
    other = _Taker(budget, 10, caller="fleet", certificate="fleet b", arena=40)
    other.start()
    _until(lambda: budget.waiting == 2)
    assert (budget.parked_by("fleet"), budget.parked_by_certificate("fleet b")) == (100, 40)
    with pytest.raises(ResourceExhausted) as info:
        budget.reserve(10, caller="fleet", certificate="fleet c", arena=1)
    assert info.value.reason == "TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY"
    assert "too many of this caller's calls already wait" in str(info.value)
    stuck.release()
    sibling.release()
    for reservation in [first.result(), other.result()]:
        reservation.release()
    assert not budget._parked and not budget._parked_by_certificate


def test_calls_waiting_for_the_whole_budget_keep_no_more_of_the_arena() -> None:
    """Other callers fill the budget, and a caller with room in its share waits for the whole
    budget, its outputs in the arena too: the same part bounds them, and the call past it is
    refused ``RESPONSE_MEMORY_BUSY`` at once, saying its calls wait."""
    budget = ResponseBudget(200, wait_seconds=60, arena_bytes=800)
    held = [budget.reserve(100, caller=caller) for caller in ("b", "c")]
    waiter = _Taker(budget, 10, caller="a", arena=60)
    waiter.start()
    _until(lambda: budget.waiting == 1)
    with pytest.raises(ResourceExhausted) as info:
        budget.reserve(10, caller="a", arena=60)
    assert info.value.reason == "RESPONSE_MEMORY_BUSY"
    message = str(info.value)
    assert "this one needs 10), and too many of this caller's calls already wait" in message
    for reservation in held:
        reservation.release()
    waiter.result().release()
    assert budget.free == 200 and not budget._parked


def test_with_the_defaults_two_raw_answers_at_the_output_bound_wait_for_each_other() -> None:
    """An honest burst: one certificate asks two raw 64 MiB answers at once (320 MiB each by
    the count, its share 256 MiB), the second waiting with its 64 MiB of outputs in the arena:
    within its certificate's part of the default 2 GiB arena (128 MiB), so it waits and is
    served once the first is sent. The service's budget takes the arena's cap from its config."""
    size, outputs = response_memory(64 * MIB, raw=True), 64 * MIB
    budget = ResponseBudget()
    assert (budget.parked_per_caller, budget.parked_per_certificate) == (256 * MIB, 128 * MIB)
    first = budget.reserve(size, caller="fleet", certificate="fleet a", arena=outputs)
    second = _Taker(budget, size, caller="fleet", certificate="fleet a", arena=outputs)
    second.start()
    _until(lambda: budget.waiting == 1)
    assert budget.parked_by_certificate("fleet a") == outputs
    first.release()
    second.result().release()
    assert budget.free == budget.max_bytes and not budget._parked
    config = InferenceConfig(
        model_store="a:1", key_broker="b:1", max_inference_memory_bytes=1 << 30
    )
    assert config.response_budget().parked_per_caller == 128 * MIB


def test_a_wait_that_ends_refused_or_cancelled_gives_its_part_of_the_arena_back() -> None:
    """Every way a wait ends gives back what it counted of its caller's and certificate's part
    of the arena: a wait run out (refused for its share), a wait whose call ended
    (:class:`CallEnded`), a wait whose ``ended`` raised, and a wait served. Kept counted, each
    would have refused its identity's later waits at once, for good. (A grow, ``grow_to``,
    counts none: it comes once the outputs are out of the arena.)"""
    budget = ResponseBudget(200, wait_seconds=0.05, arena_bytes=800)
    stuck = budget.reserve(100, caller="a", certificate="a 1")
    with pytest.raises(ResourceExhausted) as info:
        budget.reserve(10, caller="a", certificate="a 1", arena=40)
    assert info.value.reason == "TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY"
    assert not budget._parked and not budget._parked_by_certificate
    with pytest.raises(CallEnded):
        budget.reserve(10, caller="a", certificate="a 1", arena=40, ended=lambda: True)
    assert not budget._parked and not budget._parked_by_certificate

    def broken() -> bool:
        raise RuntimeError("the call's state could not be read")

    with pytest.raises(RuntimeError):
        budget.reserve(10, caller="a", certificate="a 1", arena=40, ended=broken)
    assert not budget._parked and not budget._parked_by_certificate
    stuck.release()
    assert budget.free == 200
    # Nothing left counted: the caller's whole part is there for its next waits.
    budget = ResponseBudget(200, wait_seconds=60, arena_bytes=800)
    full = budget.reserve(100, caller="a")
    waiter = _Taker(budget, 10, caller="a", arena=100)
    waiter.start()
    _until(lambda: budget.waiting == 1)
    assert budget.parked_by("a") == 100
    full.release()
    waiter.result().release()
    assert not budget._parked


def test_a_call_whose_outputs_alone_pass_its_callers_part_is_not_told_others_wait() -> None:
    """An arena small for the outputs (their eighth less than one call's): a call of a caller
    none of whose calls waits is refused at once, and told that its own outputs are more than
    its caller's waiting calls may keep, not that too many of its calls already wait."""
    budget = ResponseBudget(200, wait_seconds=60, arena_bytes=800)
    stuck = budget.reserve(100, caller="a")
    with pytest.raises(ResourceExhausted) as info:
        budget.reserve(10, caller="a", arena=101)
    assert info.value.reason == "TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY"
    message = str(info.value)
    assert "already wait" not in message, message
    assert "this call's outputs alone would keep 101 bytes of ONNX Runtime's memory" in message
    assert "more than this caller's waiting calls may (100 bytes, 1/8 of" in message, message
    stuck.release()
    assert not budget._parked


def test_all_waiting_calls_together_keep_at_most_half_the_arena() -> None:
    """Each caller's part of the arena bounded only its own waiting calls: with the defaults,
    seven identities' (4 x 64 MiB each) kept 1.75 GiB of the 2 GiB arena, and every other
    caller's runs were refused ``INFERENCE_MEMORY_EXHAUSTED``. All waiting calls together now
    keep at most half of it (400 of 800 here): four identities fill it, each its whole part,
    and the next identity's call that would wait is refused ``RESPONSE_MEMORY_BUSY`` before
    it waits at all, while a call that fits without waiting is served; room a waiting call gives
    back is room for the next."""
    budget = ResponseBudget(600, wait_seconds=60, per_caller=100, arena_bytes=800)
    assert (budget.parked_per_caller, budget.parked_in_all) == (100, 400)
    stuck = {caller: budget.reserve(100, caller=caller) for caller in "abcd"}
    parked = {caller: _Taker(budget, 10, caller=caller, arena=100) for caller in "abcd"}
    for taker in parked.values():
        taker.start()
    _until(lambda: budget.waiting == 4)
    assert budget.parked == 400 and budget.free == 200
    served = budget.reserve(10, caller="e", arena=100)  # fits: it parks nothing
    filler = budget.reserve(100, caller="f")  # 90 left
    asked: list[bool] = []

    def ended() -> bool:
        asked.append(True)
        return False

    with pytest.raises(ResourceExhausted) as info:
        budget.reserve(100, caller="g", certificate="g 1", arena=1, ended=ended)
    assert info.value.reason == "RESPONSE_MEMORY_BUSY"
    assert not asked, "it waited before it was refused"
    message = str(info.value)
    assert "calls waiting for room already hold 0.0 MiB (400 bytes) of ONNX Runtime's" in message
    assert (
        "all waiting calls may hold 400 bytes (1/2 of inference.max_inference_memory_bytes = "
        "800 bytes: the rest is for running requests), and this one's would add 1: retry later"
    ) in message, message
    assert budget.waiting == 4 and budget.parked == 400  # nothing of it counted
    stuck["a"].release()
    parked["a"].result().release()
    assert budget.parked == 300
    refill = budget.reserve(100, caller="h")  # 90 left again
    room = _Taker(budget, 100, caller="g", certificate="g 1", arena=100)
    room.start()
    _until(lambda: budget.waiting == 4)  # it waits now
    assert budget.parked == 400
    filler.release()
    refill.release()
    room.result().release()
    served.release()
    for caller in "bcd":
        stuck[caller].release()
        parked[caller].result().release()
    assert budget.free == 600 and budget.parked == 0 and not budget._parked
    assert ResponseBudget().parked_in_all == 1 << 30  # the defaults: 1 GiB of 2 GiB


def test_with_the_defaults_one_certificates_third_waiting_answer_is_refused_at_once() -> None:
    """What the README's upgrade item says of a burst at the default 64 MiB output bound: one
    certificate's first answer is served, two more wait (128 MiB of outputs, its part of the
    arena), and the fourth call is refused at once; an identity of several certificates keeps
    four waiting (256 MiB) and its fifth is refused at once."""
    size, outputs = response_memory(64 * MIB, raw=True), 64 * MIB
    budget = ResponseBudget()
    served = budget.reserve(size, caller="fleet", certificate="fleet a", arena=outputs)
    waiters = [
        _Taker(budget, size, caller="fleet", certificate="fleet a", arena=outputs) for _ in range(2)
    ]
    for taker in waiters:
        taker.start()
    _until(lambda: budget.waiting == 2)
    with pytest.raises(ResourceExhausted) as info:
        budget.reserve(size, caller="fleet", certificate="fleet a", arena=outputs)
    assert "too many of this certificate's calls already wait" in str(info.value)
    others = [
        _Taker(budget, size, caller="fleet", certificate="fleet b", arena=outputs) for _ in range(2)
    ]
    for taker in others:
        taker.start()
    _until(lambda: budget.waiting == 4)
    with pytest.raises(ResourceExhausted) as info:
        budget.reserve(size, caller="fleet", certificate="fleet c", arena=outputs)
    assert "too many of this caller's calls already wait" in str(info.value)
    served.release()
    for taker in [*waiters, *others]:
        taker.result().release()
    assert budget.free == budget.max_bytes and not budget._parked

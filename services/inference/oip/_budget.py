"""The process-wide budget of memory that inference responses hold outside ONNX Runtime's arena.

A response's outputs are copied out of the capped arena (``inference.max_inference_memory_bytes``)
and then live, as numpy arrays, a protobuf message, its serialised bytes and gRPC core's copy of
those, until the message has been sent: measured on a real server, a raw response held 3.0 times
its size at its peak, a typed one 4.4 times (the protobuf runtime's repeated fields grow by
doubling). Every data-plane worker could hold a response of ``inference.max_output_bytes`` so:
28 workers of 64 MiB, 3 times, was over 5 GiB that no cap counted and the pod's memory advice left out.

A request reserves what its response will hold (:func:`response_memory`) before any output is
copied out of the arena, and gives it back when its call has ended (its message sent, or the call
cancelled or failed): gRPC keeps the message and its serialised copies alive until then, after the
handler has returned. Past the budget a request waits for earlier ones, in arrival order, at most
``wait_seconds`` (and never past its call's end), then is refused ``RESOURCE_EXHAUSTED``
``RESPONSE_MEMORY_BUSY``; one that could never fit is refused at once, ``RESPONSE_TOO_LARGE``.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from strongroom.errors import ResourceExhausted
from strongroom.reasons import Reason

DEFAULT_MAX_RESPONSE_MEMORY_BYTES = 1 << 30
"""Default budget: five raw responses of the default 64 MiB bound at once (three typed)."""
MIN_RESPONSE_MEMORY_BYTES = 16 << 20
"""The least budget one may configure."""
DEFAULT_RESPONSE_MEMORY_WAIT_SECONDS = 5.0
"""Default longest wait for room in the budget."""
MAX_RESPONSE_MEMORY_WAIT_SECONDS = 60.0
"""The longest wait one may configure (a waiting request holds a worker and its arena tensors)."""
RESPONSE_MEMORY_SETTING = "inference.max_response_memory_bytes"
"""The configuration key of the budget, named in refusals."""
RAW_RESPONSE_COPIES = 3
"""What a raw response holds at its peak, in multiples of its size: the arrays copied out of the
arena, each output's bytes and the message's copy of them; then the message, its serialised bytes
and gRPC core's copy (measured: 3.0)."""
TYPED_RESPONSE_COPIES = 5
"""The same for typed contents, whose repeated fields grow by doubling (measured: 4.4 for FP32)."""


def response_memory(size: int, *, raw: bool) -> int:
    """What a response of ``size`` bytes (its outputs' message size, or their arrays' if larger)
    holds at its peak, as the budget counts it."""
    return size * (RAW_RESPONSE_COPIES if raw else TYPED_RESPONSE_COPIES)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


class ResponseBudget:
    """A byte semaphore over ``max_bytes``, taken in arrival order; thread-safe."""

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_RESPONSE_MEMORY_BYTES,
        wait_seconds: float = DEFAULT_RESPONSE_MEMORY_WAIT_SECONDS,
    ) -> None:
        if max_bytes < 1:
            raise ValueError("the response memory budget must be positive")
        if not 0 <= wait_seconds <= MAX_RESPONSE_MEMORY_WAIT_SECONDS:
            raise ValueError(
                f"the response memory wait must be between 0 and {MAX_RESPONSE_MEMORY_WAIT_SECONDS}"
            )
        self.max_bytes = max_bytes
        self.wait_seconds = wait_seconds
        self._free = max_bytes
        self._changed = threading.Condition(threading.Lock())
        # Tickets of the requests waiting, first come first served: without the order, a large
        # response waited while smaller ones that came after it kept taking the room it needed.
        self._queue: collections.deque[object] = collections.deque()

    @property
    def free(self) -> int:
        """Bytes not reserved now."""
        with self._changed:
            return self._free

    @property
    def waiting(self) -> int:
        """Requests waiting for room now."""
        with self._changed:
            return len(self._queue)

    def reserve(
        self, size: int, *, ended: Callable[[], bool] = lambda: False, first: bool = False
    ) -> Reservation:
        """``size`` bytes, waiting for them at most :attr:`wait_seconds` and only while
        ``ended()`` is false (:meth:`wake` has waiters look at it again); ``first``: ahead of
        every waiter (a request that holds a reservation already and needs more: behind the
        others, it and one waiting for the room it holds would each wait for the other until
        their waits ran out). ResourceExhausted
        ``RESPONSE_TOO_LARGE`` at once for more than the whole budget, ``RESPONSE_MEMORY_BUSY``
        when the wait ends without room; :class:`CallEnded` when the call ended meanwhile."""
        self.check_fits(size)
        with self._changed:
            if (first or not self._queue) and size <= self._free:
                self._free -= size
                return Reservation(self, size)
            ticket = object()
            if first:
                self._queue.appendleft(ticket)
            else:
                self._queue.append(ticket)
            until = time.monotonic() + self.wait_seconds
            try:
                while not (self._queue[0] is ticket and size <= self._free):
                    left = until - time.monotonic()
                    if ended():
                        raise CallEnded
                    if left <= 0:
                        raise ResourceExhausted(
                            f"responses being sent hold the server's response memory "
                            f"({RESPONSE_MEMORY_SETTING} = {self.max_bytes} bytes; this one "
                            f"needs {size}): retry later",
                            reason=Reason.RESPONSE_MEMORY_BUSY,
                        )
                    self._changed.wait(left)
                self._free -= size
                return Reservation(self, size)
            finally:
                self._queue.remove(ticket)
                # The next in line may fit now, or be first now.
                self._changed.notify_all()

    def check_fits(self, size: int) -> None:
        """ResourceExhausted ``RESPONSE_TOO_LARGE`` if ``size`` is more than the whole budget."""
        if size > self.max_bytes:
            raise ResourceExhausted(
                f"the response would hold {_mib(size)} ({size} bytes) while it is built and "
                f"sent, more than all responses together may ({RESPONSE_MEMORY_SETTING} = "
                f"{self.max_bytes} bytes, {_mib(self.max_bytes)}): request fewer or smaller outputs",
                reason=Reason.RESPONSE_TOO_LARGE,
            )

    def wake(self) -> None:
        """Has every waiter look at its ``ended`` again (a call just ended)."""
        with self._changed:
            self._changed.notify_all()

    def _give_back(self, size: int) -> None:
        with self._changed:
            self._free += size
            self._changed.notify_all()


class CallEnded(Exception):
    """The call ended (cancelled, its deadline passed) while its request waited for room."""


class Reservation:
    """Bytes taken from a :class:`ResponseBudget`; :meth:`release` gives them back, once."""

    __slots__ = ("_budget", "_lock", "size")

    def __init__(self, budget: ResponseBudget, size: int) -> None:
        self._budget = budget
        self._lock = threading.Lock()
        self.size = size

    def grow_to(self, size: int, *, ended: Callable[[], bool] = lambda: False) -> None:
        """Holds ``size`` bytes in all (more than it holds: the rest reserved as
        :meth:`ResponseBudget.reserve` does; never less)."""
        extra = size - self.size
        if extra <= 0:
            return
        self._budget.check_fits(size)
        more = self._budget.reserve(extra, ended=ended, first=True)
        with self._lock:
            self.size += more.size
            more.size = 0

    def release(self) -> None:
        """Gives the bytes back (again: nothing)."""
        with self._lock:
            size, self.size = self.size, 0
        if size:
            self._budget._give_back(size)

"""The process-wide budget of memory that inference responses hold outside ONNX Runtime's arena.

A response's outputs are copied out of the capped arena (``inference.max_inference_memory_bytes``)
and then live, as numpy arrays, a protobuf message, its serialised bytes and gRPC core's copy of
those, until the message has been sent: measured on a real server, a raw response held 3.0 to 5.0
times its size at its peak (gRPC's serialiser grows its buffer by doubling: 5 times just past a
power of two, as the default 64 MiB bound is with the message's other fields), a typed one 4.3 to 7 times the largest of its size, its arrays' and its
typed fields' (the protobuf runtime's repeated fields grow by doubling in the message's arena,
which keeps the blocks they outgrew; a narrow integer's field holds 4 bytes an element). Every data-plane worker could hold a response of ``inference.max_output_bytes`` so:
28 workers of 64 MiB, 5 times, was almost 9 GiB that no cap counted and the pod's memory advice left out.

A request reserves what its response will hold (:func:`response_memory`) before any output is
copied out of the arena, and gives it back when its call has ended (its message sent, or the call
cancelled or failed): gRPC keeps the message and its serialised copies alive until then, after the
handler has returned. Past the budget a request waits for earlier ones, in arrival order, at most
``wait_seconds`` (and never past its call's end), then is refused ``RESOURCE_EXHAUSTED``
``RESPONSE_MEMORY_BUSY``; one that could never fit is refused at once, ``RESPONSE_TOO_LARGE``.

A call ends only once its response has been sent, and a client that never takes it (HTTP/2 flow
control: gRPC cannot send past the window the client opens) kept its call open until its
deadline or its connection's age (none, and some 40 minutes): one caller sending small requests
for large outputs and never reading held the whole budget so, and every other caller was refused
``RESPONSE_MEMORY_BUSY``. Such a call is now cancelled once its response has waited past the
stream settings' bound (:mod:`~strongroom.runtime.unsent`), which bounds how long; and each caller (the runtime's per-identity bucket,
:func:`~strongroom.runtime.callers.caller_key`) holds at most its share, half the
budget (:func:`caller_share`): half, so that it leaves the others at least as much as it holds. A
request that would take its caller past it waits for its caller's own earlier responses to be sent,
as one past the budget waits (at most ``wait_seconds``, never past its call's end, woken when its
caller's reservations come back), without holding any other caller's place: the line passes over
a waiter whose share has no room (:meth:`ResponseBudget._next`). If its wait ends with its share
still full, it is refused ``TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY``. Refused at once instead, an
honest client's burst was: one certificate asking two raw responses of 64 MiB at once (320 MiB
each by the count) had the second refused, and OIP clients seldom retry.

A fleet's replicas share one SPIFFE ID, and so one share: one replica stuck not reading held all of
it, and every other replica was refused ``TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY``. So each
certificate (:func:`~strongroom.runtime.callers.certificate_key`, beneath its identity) holds at
most half its identity's share (:func:`~strongroom.runtime.callers.certificate_share`, as a
certificate's share of its identity's workers), all its responses together, its first counted
in it; or its first alone if that is more: a certificate holding nothing may always take one response its identity's share has room for (a typed response at the
default output bound, 512 MiB by the count, is the whole default share; refused by the
certificate's share, no caller of a certificate could have it). A reservation past it waits the
same way for its certificate's own responses, then is refused
``TOO_MUCH_RESPONSE_MEMORY_PER_CERTIFICATE``. A caller without a certificate of its own (a
role-less bucket, a plaintext peer) has no share beneath its identity's.

A client that never takes its responses fills its shares, and each call it sends after that now
waits instead of being refused, holding its data-plane worker and its run's outputs meanwhile: the
reservation is taken when :meth:`LoadedModel.infer <strongroom.inference.models.LoadedModel.infer>`
shows the outputs' shapes, after the run, and its outputs stay in ONNX Runtime's capped arena
(``inference.max_inference_memory_bytes``) until it is served. Its data-plane worker bound alone
(``server.max_data_plane_workers_per_identity``, 13 of 28 by default; a certificate's share of
it, ``server.max_calls_per_certificate``) let it park 13 calls of the 64 MiB output bound so:
832 MiB of the 2 GiB arena, held again by re-sending after each refusal, two identities 1.66 GiB,
and every other caller's runs were refused ``INFERENCE_MEMORY_EXHAUSTED``. So each waiting call
counts what its outputs take in the arena (``arena``: their elements at their width), and a
caller's waiting calls together keep at most an eighth of the arena's cap
(:func:`parked_share`: 256 MiB by default, four 64 MiB answers), a certificate's half that
(its first waiting call alone more, within its caller's): a call that would go past it is
refused at once, with the reason its wait would have ended with, saying that too many of its
calls already wait (or, none waiting, that its outputs alone are more than that: an arena under
eight times one call's outputs). Calls waiting for the whole budget (``RESPONSE_MEMORY_BUSY``) count the same
way: two identities filling the budget left a third parking its whole worker bound there.
An honest burst still waits: two raw 64 MiB answers of one certificate, the second waiting with
64 MiB in the arena, within the default 128 MiB. Those parts bound each caller's waiting calls,
not all of them: seven identities' (4 x 64 MiB each) kept 1.75 GiB of the default 2 GiB arena,
and every other caller's runs were refused ``INFERENCE_MEMORY_EXHAUSTED``. So all waiting calls
together keep at most half the arena's cap (:func:`parked_total`: 1 GiB by default, four
callers' parts), the other half left for runs that do not wait: a call that would go past it
is refused at once, ``RESPONSE_MEMORY_BUSY`` (its share's reason if its own share is what it
would wait for), saying how much of the arena waiting calls already hold.

What is counted is the outputs' own bytes: the arena region a parked output sits in may be
larger (ONNX Runtime places it in the smallest free chunk that fits, which may be inside a region
a larger tensor left), and that region stays held while it waits.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import NoReturn

from strongroom.errors import ResourceExhausted
from strongroom.inference.models import DEFAULT_MAX_INFERENCE_MEMORY_BYTES, INFERENCE_MEMORY_SETTING
from strongroom.reasons import Reason
from strongroom.runtime.callers import certificate_share

DEFAULT_MAX_RESPONSE_MEMORY_BYTES = 1 << 30
"""Default budget: three raw responses of the default 64 MiB bound at once (two typed FP32)."""
MIN_RESPONSE_MEMORY_BYTES = 16 << 20
"""The least budget one may configure."""
DEFAULT_RESPONSE_MEMORY_WAIT_SECONDS = 5.0
"""Default longest wait for room in the budget."""
MAX_RESPONSE_MEMORY_WAIT_SECONDS = 60.0
"""The longest wait one may configure (a waiting request holds a worker and its arena tensors)."""
RESPONSE_MEMORY_SETTING = "inference.max_response_memory_bytes"
"""The configuration key of the budget, named in refusals."""
RAW_RESPONSE_COPIES = 5
"""What a raw response holds at its peak, in multiples of its size: the arrays copied out of the
arena, each output's bytes and the message's copy of them (3); then, once the handler has
returned, the message, the serialiser's buffer grown by doubling (the half it outgrew too while it
copies it) and the bytes made from it. Measured on a real server: 3.0 at 16 and 63 MiB, 3.96 at
24 MiB, 5.0 at 32 and 64 MiB (a message just past a power of two: a buffer of twice its size).
Counted at 3, a response at the default 64 MiB bound held 320 MiB against 192 reserved."""
TYPED_RESPONSE_COPIES = 8
"""The same for typed contents, in multiples of the largest of their size on the wire, their
arrays' and what their elements take in the message's fields (a narrow integer widened to 32 bits:
an INT8 output of 16 MiB is 64 MiB there). Measured on a real server: FP32 4.3 to 6.1 (by where
its field's doubling ends), BOOL 7.0, negative INT64 5.4 (of its wire size), INT8 and INT16 3.3
(of their fields); a process outside the server, up to 7.9 for BOOL. Counted by their wire size
or arrays alone at 5, FP32 outgrew its reservation and INT8 held 13 times it."""


def caller_share(max_bytes: int) -> int:
    """What one caller's responses may hold of a budget of ``max_bytes``: half, as a
    certificate's share of its identity's workers (:func:`~strongroom.runtime.callers.
    certificate_share`): a caller that never takes its responses leaves the others at least as
    much as it holds, and a typed response at the default output bound (64 MiB, 512 MiB by the
    count) still fits the default budget's share."""
    return max_bytes // 2


PARKED_ARENA_FRACTION = 8
"""What one caller's calls waiting for room may hold of ONNX Runtime's arena together, as a
fraction of its cap (``inference.max_inference_memory_bytes``): an eighth, 256 MiB of the default
2 GiB, four waiting answers at the default 64 MiB output bound (a certificate two). Parked past
it, a never-reading client's 13 calls held 832 MiB of it, two identities 1.66 GiB."""


def parked_share(arena_bytes: int) -> int:
    """What one caller's waiting calls may hold of an arena capped at ``arena_bytes`` (their
    runs' outputs, still in it while they wait): :data:`PARKED_ARENA_FRACTION` of it."""
    return arena_bytes // PARKED_ARENA_FRACTION


PARKED_ARENA_TOTAL_FRACTION = 2
"""What all calls waiting for room may hold of ONNX Runtime's arena together, as a fraction of its
cap: half, 1 GiB of the default 2 GiB (sixteen waiting answers at the default 64 MiB output
bound, four callers' parts), so that the other half stays for the runs of requests that do not
wait (sixteen runs' outputs at that bound, more than half the default 28 data-plane workers).
Bounded by each caller's part alone, seven identities' waiting calls (4 x 64 MiB each) kept
1.75 GiB, and every other caller's runs were refused ``INFERENCE_MEMORY_EXHAUSTED``."""


def parked_total(arena_bytes: int) -> int:
    """What all waiting calls may hold of an arena capped at ``arena_bytes`` together:
    :data:`PARKED_ARENA_TOTAL_FRACTION` of it."""
    return arena_bytes // PARKED_ARENA_TOTAL_FRACTION


def response_memory(size: int, *, raw: bool) -> int:
    """What a response of ``size`` bytes (its outputs' message size, or their arrays' if larger,
    or for typed contents what their fields hold if larger still) holds at its peak, as the
    budget counts it."""
    return size * (RAW_RESPONSE_COPIES if raw else TYPED_RESPONSE_COPIES)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


class ResponseBudget:
    """A byte semaphore over ``max_bytes``, taken in arrival order; thread-safe."""

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_RESPONSE_MEMORY_BYTES,
        wait_seconds: float = DEFAULT_RESPONSE_MEMORY_WAIT_SECONDS,
        per_caller: int | None = None,
        arena_bytes: int = DEFAULT_MAX_INFERENCE_MEMORY_BYTES,
    ) -> None:
        if max_bytes < 1:
            raise ValueError("the response memory budget must be positive")
        if not 0 <= wait_seconds <= MAX_RESPONSE_MEMORY_WAIT_SECONDS:
            raise ValueError(
                f"the response memory wait must be between 0 and {MAX_RESPONSE_MEMORY_WAIT_SECONDS}"
            )
        self.max_bytes = max_bytes
        self.wait_seconds = wait_seconds
        self.per_caller = caller_share(max_bytes) if per_caller is None else per_caller
        """What one caller's reservations may hold together (:func:`caller_share` unless given)."""
        self.per_certificate = certificate_share(self.per_caller)
        """What one certificate's reservations may hold together, its first counted in it (half of
        :attr:`per_caller`); its first alone may hold more."""
        self.arena_bytes = arena_bytes
        """The cap of ONNX Runtime's arena, which waiting calls' outputs are in."""
        self.parked_per_caller = parked_share(arena_bytes)
        """What one caller's waiting calls' outputs may hold of the arena together
        (:func:`parked_share`); a call that would take them past it is refused at once."""
        self.parked_per_certificate = certificate_share(self.parked_per_caller)
        """The same for one certificate (half of :attr:`parked_per_caller`); its first waiting
        call alone may hold more, within its caller's."""
        self.parked_in_all = parked_total(arena_bytes)
        """What all waiting calls' outputs may hold of the arena together (:func:`parked_total`):
        a call that would take them past it is refused at once, whoever its caller."""
        self._free = max_bytes
        # What each caller, and each certificate, holds now, forgotten when it holds nothing (as
        # many entries as calls, however many certificates a caller mints).
        self._held: Counter[str] = Counter()
        self._held_by_certificate: Counter[str] = Counter()
        # What each caller's, and certificate's, waiting calls hold of the arena, forgotten alike.
        self._parked: Counter[str] = Counter()
        self._parked_by_certificate: Counter[str] = Counter()
        self._parked_all = 0  # and what all waiting calls hold of it
        self._changed = threading.Condition(threading.Lock())
        # Tickets of the requests waiting, first come first served: without the order, a large
        # response waited while smaller ones that came after it kept taking the room it needed.
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._arrivals = itertools.count()  # the waiters' order of arrival (_stuck)

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

    def held_by(self, caller: str) -> int:
        """Bytes ``caller``'s reservations hold now."""
        with self._changed:
            return self._held[caller]

    def parked_by(self, caller: str) -> int:
        """Arena bytes ``caller``'s waiting calls hold now (the ``arena`` their reserves gave)."""
        with self._changed:
            return self._parked[caller]

    @property
    def parked(self) -> int:
        """Arena bytes all waiting calls hold now."""
        with self._changed:
            return self._parked_all

    def parked_by_certificate(self, certificate: str) -> int:
        """Arena bytes ``certificate``'s waiting calls hold now."""
        with self._changed:
            return self._parked_by_certificate[certificate]

    def reserve(
        self,
        size: int,
        *,
        caller: str | None = None,
        ended: Callable[[], bool] = lambda: False,
        first: bool = False,
        certificate: str | None = None,
        own: int = 0,
        arena: int = 0,
    ) -> Reservation:
        """``size`` bytes for ``caller`` (None: counted in no caller's share) and its
        ``certificate`` (None: no share beneath the caller's; ``own``: what the reservation
        this one grows holds already, counted as the certificate's first), waiting for them
        at most :attr:`wait_seconds` and only while ``ended()`` is false (:meth:`wake` has
        waiters look at it again); ``first``: ahead of every waiter (a request that holds a
        reservation already and needs more: behind the others, it and one waiting for the room
        it holds would each wait for the other until their waits ran out). ResourceExhausted
        ``RESPONSE_TOO_LARGE`` at once for more than the whole budget or a caller's share;
        ``TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY`` when the wait ends while what ``caller``
        holds still leaves its share no room for it (it waits for its own reservations to be
        given back, holding no other caller's place); ``TOO_MUCH_RESPONSE_MEMORY_PER_CERTIFICATE``
        the same for ``certificate``'s share; ``RESPONSE_MEMORY_BUSY`` when the wait ends
        without room in the budget; :class:`CallEnded` when the call ended meanwhile.

        ``arena``: what the call's run holds in ONNX Runtime's arena while it waits (its
        outputs, not yet copied out). A wait that would take what ``caller``'s waiting calls
        hold there past :attr:`parked_per_caller`, or ``certificate``'s past
        :attr:`parked_per_certificate` (unless it is the certificate's only one), is refused at
        once, with the reason its wait would have ended with."""
        self.check_fits(size, caller=caller is not None)
        with self._changed:
            if (
                (first or self._next() is None)
                and size <= self._free
                and self._within_shares(size, caller, certificate, own)
            ):
                return self._take(size, caller, certificate)
            # Past the budget or past its own shares: it waits in line, and _next() passes over
            # it while its shares have no room, so that it holds no other caller's place.
            self._check_parking(size, caller, certificate, own, arena)
            waiter = _Waiter(size, caller, certificate, own, next(self._arrivals), arena=arena)
            self._park(waiter, +1)
            if first:
                self._queue.appendleft(waiter)
            else:
                self._queue.append(waiter)
            until = time.monotonic() + self.wait_seconds
            try:
                while not (self._next() is waiter and size <= self._free):
                    left = until - time.monotonic()
                    if ended():
                        raise CallEnded
                    if left <= 0 or self._stuck(waiter):
                        self._check_share(size, caller, certificate, own)
                        raise ResourceExhausted(
                            f"responses being sent hold the server's response memory "
                            f"({RESPONSE_MEMORY_SETTING} = {self.max_bytes} bytes; this one "
                            f"needs {size}): retry later",
                            reason=Reason.RESPONSE_MEMORY_BUSY,
                        )
                    self._changed.wait(left)
                return self._take(size, caller, certificate)
            finally:
                self._queue.remove(waiter)
                self._park(waiter, -1)
                # The next in line may fit now, or be first now.
                self._changed.notify_all()

    def _check_parking(
        self, size: int, caller: str | None, certificate: str | None, own: int, arena: int
    ) -> None:
        """Refuses at once a wait whose outputs would take its caller's (or its certificate's)
        waiting calls past their part of the arena: each waiting call holds its run's outputs
        there, and a client that never takes its responses parked its whole worker bound so
        (13 calls of 64 MiB: 832 MiB of the 2 GiB default), re-sending after each refusal, and
        every other caller's runs were refused ``INFERENCE_MEMORY_EXHAUSTED``. All waiting
        calls together keep at most :attr:`parked_in_all` (:meth:`_crowded_in_all`): a few
        identities' parts filled the arena so. The refusal is the one its wait would have ended
        with, as before such calls waited."""
        if not arena:
            return
        crowded = None if caller is None else self._crowded(caller, certificate, arena)
        if crowded is None:
            crowded = self._crowded_in_all(arena)
        if crowded is None:
            return
        self._check_share(size, caller, certificate, own, crowded=crowded)
        raise ResourceExhausted(
            f"responses being sent hold the server's response memory "
            f"({RESPONSE_MEMORY_SETTING} = {self.max_bytes} bytes; this one needs {size})"
            f"{crowded}: retry later",
            reason=Reason.RESPONSE_MEMORY_BUSY,
        )

    def _crowded(self, caller: str, certificate: str | None, arena: int) -> str | None:
        """Why a wait of ``arena`` bytes is refused at once for its caller's (or certificate's)
        part of the arena, said before what to do; None if it is within them."""
        parked = self._parked[caller]
        on_certificate = self._parked_by_certificate[certificate or ""]
        if parked + arena > self.parked_per_caller:
            whose, held, cap = "this caller's", parked, self.parked_per_caller
            part = f"1/{PARKED_ARENA_FRACTION} of {INFERENCE_MEMORY_SETTING} = {self.arena_bytes} bytes"
        elif certificate is not None and on_certificate + arena > self.parked_per_certificate:
            if not on_certificate:
                return None  # its first waiting call: its caller's part bounds it
            whose, held, cap = "this certificate's", on_certificate, self.parked_per_certificate
            part = f"half of its identity's {self.parked_per_caller}"
        else:
            return None
        if held:
            return (
                f", and too many of {whose} calls already wait for room: their outputs hold "
                f"{_mib(held)} ({held} bytes) of ONNX Runtime's memory, {whose} waiting calls "
                f"may hold {cap} bytes ({part}), and this one's would add {arena}"
            )
        # None of its caller's calls waits (an arena small for one call's outputs): told that
        # its calls already wait, its client looked for calls it did not have.
        return (
            f", and this call's outputs alone would keep {arena} bytes of ONNX Runtime's "
            f"memory while it waited, more than {whose} waiting calls may ({cap} bytes, "
            f"{part})"
        )

    def _crowded_in_all(self, arena: int) -> str | None:
        """Why a wait of ``arena`` bytes is refused at once for all waiting calls' part of the
        arena (:attr:`parked_in_all`), or None: each caller's part bounded only its own calls,
        and seven identities' waiting calls kept 1.75 GiB of the default 2 GiB arena, every
        other caller's runs refused ``INFERENCE_MEMORY_EXHAUSTED``."""
        held = self._parked_all
        if held + arena <= self.parked_in_all:
            return None
        return (
            f", and calls waiting for room already hold {_mib(held)} ({held} bytes) of ONNX "
            f"Runtime's memory by their outputs, all waiting calls may hold {self.parked_in_all} "
            f"bytes (1/{PARKED_ARENA_TOTAL_FRACTION} of {INFERENCE_MEMORY_SETTING} = "
            f"{self.arena_bytes} bytes: the rest is for running requests), and this one's would "
            f"add {arena}"
        )

    def _park(self, waiter: _Waiter, sign: int) -> None:
        """Counts ``waiter``'s arena bytes in (``sign`` 1) or out of (-1) its caller's and its
        certificate's waiting calls', and all waiting calls'."""
        if not waiter.arena:
            return
        self._parked_all += sign * waiter.arena
        if waiter.caller is None:
            return
        if sign > 0:
            self._parked[waiter.caller] += waiter.arena
            if waiter.certificate is not None:
                self._parked_by_certificate[waiter.certificate] += waiter.arena
            return
        _forget(self._parked, waiter.caller, waiter.arena)
        if waiter.certificate is not None:
            _forget(self._parked_by_certificate, waiter.certificate, waiter.arena)

    def _next(self) -> _Waiter | None:
        """The first waiter whose caller's share has room for it: one whose own caller's other
        calls fill its share waits without holding the callers behind it (a caller that never
        takes its responses would otherwise hold the queue with one more call)."""
        for waiter in self._queue:
            if self._within_shares(waiter.size, waiter.caller, waiter.certificate, waiter.own):
                return waiter
        return None

    def _stuck(self, waiter: _Waiter) -> bool:
        """Whether ``waiter`` grows a reservation past a share all of whose bytes are held by
        reservations waiting to grow past that share, itself the last of them to come: nothing of
        the share can come back before one of their waits ends, so each waited it out (two
        ``BYTES`` responses of one certificate grown at once both waited ``wait_seconds`` holding
        their workers, and both could be refused). The last gives up at once, refused for the
        share as a grow past it was before growers waited, and the others go on once its
        reservation is given back."""
        if not waiter.own:
            return False  # it holds nothing that others could wait for
        growers = [w for w in self._queue if w.own]
        if not self._within_share(waiter.size, waiter.caller) and _last_of(
            waiter,
            [
                w
                for w in growers
                if w.caller == waiter.caller and not self._within_share(w.size, w.caller)
            ],
            self._held[waiter.caller or ""],
        ):
            return True
        return not self._within_certificate(
            waiter.size, waiter.certificate, waiter.own
        ) and _last_of(
            waiter,
            [
                w
                for w in growers
                if w.certificate == waiter.certificate
                and not self._within_certificate(w.size, w.certificate, w.own)
            ],
            self._held_by_certificate[waiter.certificate or ""],
        )

    def _within_shares(
        self, size: int, caller: str | None, certificate: str | None, own: int
    ) -> bool:
        return self._within_share(size, caller) and self._within_certificate(size, certificate, own)

    def _within_share(self, size: int, caller: str | None) -> bool:
        return caller is None or self._held[caller] + size <= self.per_caller

    def _within_certificate(self, size: int, certificate: str | None, own: int) -> bool:
        if certificate is None:
            return True
        held = self._held_by_certificate[certificate]
        # Its first response (what it grows included) fits whatever its size: the caller's share
        # bounds it.
        return held == own or held + size <= self.per_certificate

    def _take(self, size: int, caller: str | None, certificate: str | None) -> Reservation:
        self._free -= size
        if caller is not None:
            self._held[caller] += size
            if certificate is not None:
                self._held_by_certificate[certificate] += size
        return Reservation(self, size, caller, certificate)

    def _check_share(
        self,
        size: int,
        caller: str | None,
        certificate: str | None = None,
        own: int = 0,
        *,
        crowded: str = "",
    ) -> None:
        """Raises the refusal for ``caller``'s (or ``certificate``'s) share if it has no room
        for ``size``; ``crowded``: why at once, said before what to do."""
        if caller is None:
            return
        if not self._within_share(size, caller):
            self._refuse_share(size, caller, crowded)
        if not self._within_certificate(size, certificate, own):
            held = self._held_by_certificate[certificate or ""]
            raise ResourceExhausted(
                f"this certificate's responses not yet sent hold {_mib(held)} ({held} bytes) of "
                f"the server's response memory, and one certificate's responses may hold "
                f"{self.per_certificate} bytes together, or its first alone more (half of its "
                f"identity's {self.per_caller}, which the identity's other certificates share); this one "
                f"needs {size} more{crowded}: take the responses already sent, or retry later",
                reason=Reason.TOO_MUCH_RESPONSE_MEMORY_PER_CERTIFICATE,
            )

    def _refuse_share(self, size: int, caller: str, crowded: str = "") -> NoReturn:
        held = self._held[caller]
        raise ResourceExhausted(
            f"this caller's responses not yet sent hold {_mib(held)} ({held} bytes) of the "
            f"server's response memory, and one caller may hold {self.per_caller} bytes "
            f"(half of {RESPONSE_MEMORY_SETTING} = {self.max_bytes} bytes); this "
            f"one needs {size} more{crowded}: take the responses already sent, or retry later",
            reason=Reason.TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY,
        )

    def check_fits(self, size: int, *, caller: bool = True) -> None:
        """ResourceExhausted ``RESPONSE_TOO_LARGE`` if ``size`` is more than the whole budget, or
        (``caller``: a reservation counted in a caller's share) more than one caller's share."""
        if caller and size > self.per_caller:
            raise ResourceExhausted(
                f"the response would hold {_mib(size)} ({size} bytes) while it is built and "
                f"sent, more than one caller's responses may ({self.per_caller} bytes, "
                f"{_mib(self.per_caller)}: half of {RESPONSE_MEMORY_SETTING} = "
                f"{self.max_bytes} bytes): request fewer or smaller outputs",
                reason=Reason.RESPONSE_TOO_LARGE,
            )
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

    def held_by_certificate(self, certificate: str) -> int:
        """Bytes ``certificate``'s reservations hold now."""
        with self._changed:
            return self._held_by_certificate[certificate]

    def _give_back(self, size: int, caller: str | None, certificate: str | None) -> None:
        with self._changed:
            self._free += size
            if caller is not None:
                _forget(self._held, caller, size)
                if certificate is not None:
                    _forget(self._held_by_certificate, certificate, size)
            self._changed.notify_all()


def _forget(held: Counter[str], key: str, size: int) -> None:
    held[key] -= size
    if held[key] <= 0:
        del held[key]


def _last_of(waiter: _Waiter, stuck: list[_Waiter], held: int) -> bool:
    """Whether the ``stuck`` waiters' reservations are all of ``held``, and ``waiter`` came last
    of them."""
    return sum(w.own for w in stuck) == held and max(w.order for w in stuck) == waiter.order


class _Waiter:
    """A request waiting for room: what it needs, for which caller and certificate, what the
    reservation it grows holds already (``own``), when it came (``order``), and what its run
    holds in the arena meanwhile (``arena``)."""

    __slots__ = ("arena", "caller", "certificate", "order", "own", "size")

    def __init__(
        self,
        size: int,
        caller: str | None,
        certificate: str | None,
        own: int,
        order: int,
        *,
        arena: int = 0,
    ) -> None:
        self.size = size
        self.caller = caller
        self.certificate = certificate
        self.own = own
        self.order = order
        self.arena = arena


class CallEnded(Exception):
    """The call ended (cancelled, its deadline passed) while its request waited for room."""


class Reservation:
    """Bytes taken from a :class:`ResponseBudget`; :meth:`release` gives them back, once."""

    __slots__ = ("_budget", "_caller", "_certificate", "_lock", "size")

    def __init__(
        self,
        budget: ResponseBudget,
        size: int,
        caller: str | None = None,
        certificate: str | None = None,
    ) -> None:
        self._budget = budget
        self._caller = caller
        self._certificate = certificate
        self._lock = threading.Lock()
        self.size = size

    def grow_to(self, size: int, *, ended: Callable[[], bool] = lambda: False) -> None:
        """Holds ``size`` bytes in all (more than it holds: the rest reserved as
        :meth:`ResponseBudget.reserve` does; never less)."""
        extra = size - self.size
        if extra <= 0:
            return
        self._budget.check_fits(size, caller=self._caller is not None)
        more = self._budget.reserve(
            extra,
            caller=self._caller,
            ended=ended,
            first=True,
            certificate=self._certificate,
            own=self.size,
        )
        with self._lock:
            self.size += more.size
            more.size = 0

    def release(self) -> None:
        """Gives the bytes back (again: nothing)."""
        with self._lock:
            size, self.size = self.size, 0
        if size:
            self._budget._give_back(size, self._caller, self._certificate)

"""Refusal log lines within a budget.

Lines saying why a caller's RPC was refused (marked :data:`~strongroom.errors.REFUSAL_LINE`: the
authoriser's denial, the error mapping's ``rpc failed``, a limit's refusal, a service's own refusal,
a watchdog's cancelling of a call its caller stalled, which names that call with
:data:`~strongroom.errors.REFUSAL_CALL` since it runs on a thread of its own) are written within a
budget (:class:`RefusalLines`): any certificate of the CA, a role-less one included, chose how
many of them the service wrote, two or three per refused call. The budget is
per refused *call*, so that a call's lines are written all or none: each caller (as its host's
limits count it: every role-less identity together is one) and reason has
:data:`REFUSED_CALLS_BURST` calls logged at once, then :data:`REFUSED_CALLS_PER_CALLER` a second,
each caller :data:`REASONS_PER_CALLER` reasons' worth of them over all its reasons, and all
callers together :data:`REFUSED_CALLS_PER_SECOND` a second (many identities buy no more lines).
The calls not logged are counted per caller and reason, and said in one WARNING
(``refused calls not logged``) at most every :data:`SUMMARY_SECONDS`, and when the log closes.
Only refusals, and failures the service logs on bounded lines of its own (an outage's), are
budgeted: a line about any other failure of the service (a bug, stored data that fails its check:
:func:`~strongroom.errors.line_budgeted`, marked ``False``) is written every time, and so are its
call's other lines. Only the service's log lines are budgeted: the key
broker's audit log is its own (every refused release is recorded there, or counted by its own
budget, whatever this one does).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any

import grpc

from strongroom.errors import REFUSAL_CALL, REFUSAL_LINE
from strongroom.runtime.call_peer import remember_peer
from strongroom.runtime.callers import Identify, caller_key
from strongroom.runtime.ratelimit import CallerBuckets

LOGGER = "strongroom.runtime.logs"
"""The logger of the log's own lines (``refused calls not logged``, and the handler's ``log lines
dropped``): the module they were logged from before they moved here, the ``logger`` field that
queries and alerts on those lines match."""
log = logging.getLogger(LOGGER)

REFUSED_CALLS_BURST = 5
"""Refused calls of one caller and reason whose lines are written at once, then
:data:`REFUSED_CALLS_PER_CALLER` a second."""
REFUSED_CALLS_PER_CALLER = 1.0
REASONS_PER_CALLER = 3
"""How many reasons' budgets one caller's refused calls of every reason have together
(:data:`REFUSED_CALLS_BURST` times as many at once, then as many a second): a caller cycling
through four reasons spent everyone's :data:`REFUSED_CALLS_PER_SECOND` at once, and through
twenty all of it for good, and every other caller's first refusals went unwritten."""
REFUSED_CALLS_PER_SECOND = 20
"""Refused calls whose lines are written a second, all callers and reasons together (a call writes
three lines at most): a holder of many certificates buys no more."""
SUMMARY_SECONDS = 10.0
"""How often, at most, the calls not logged are said (``refused calls not logged``)."""
SUMMARY_ENTRIES = 10
"""Callers and reasons a summary names one by one (the most refused first); the rest are summed."""
_MAX_COUNTED = 1024  # callers and reasons counted between two summaries; the rest as one


class _RpcLog:
    """The RPC running on this thread, for its refusal lines: who called (found on its first
    line) and whether its lines are written (decided by its first line)."""

    __slots__ = ("context", "verdict")

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.verdict: bool | None = None


_RPC: ContextVar[_RpcLog | None] = ContextVar("strongroom_rpc_log", default=None)

# How each running call's caller is named, by its host's rule (enter_rpc): for its own lines and
# for a watchdog's lines about it, logged on a thread of their own. Gone with the call.
_IDENTIFY: weakref.WeakKeyDictionary[Any, Identify] = weakref.WeakKeyDictionary()
_IDENTIFY_LOCK = threading.Lock()


def enter_rpc(
    context: grpc.ServicerContext, identify: Identify = caller_key
) -> Token[_RpcLog | None]:
    """Marks the RPC of ``context`` as the one this thread's refusal lines are about (the error
    mapping does, around each call), its caller named by ``identify`` (its host's rule, that of
    its limits: :func:`~strongroom.runtime.callers.bucket`, every role-less caller as one);
    :func:`leave_rpc` with the token when it ends. The call's peer is read now, while it lasts
    (a caller without a certificate is named by it, and gRPC may answer none once it ended)."""
    remember_peer(context)
    if identify is not caller_key:
        with _IDENTIFY_LOCK, contextlib.suppress(TypeError):  # TypeError: no weak reference
            _IDENTIFY[context] = identify
    return _RPC.set(_RpcLog(context))


def _caller_of(call: Any) -> str:
    """The budget a line about ``call`` counts in: its caller by its host's rule."""
    with _IDENTIFY_LOCK:
        try:
            identify = _IDENTIFY.get(call, caller_key)
        except TypeError:  # a call that cannot be weakly referenced was never remembered
            identify = caller_key
    return identify(call)


def leave_rpc(token: Token[_RpcLog | None]) -> None:
    """Ends what :func:`enter_rpc` began."""
    _RPC.reset(token)


def by_caller_and_reason(counted: Counter[tuple[str, str]]) -> dict[str, object]:
    """A line's fields saying ``counted`` (counts by caller and reason): the largest
    (:data:`SUMMARY_ENTRIES`, the largest first) one by one in ``by_caller_and_reason`` as
    ``[caller, reason, count]``, the rest summed in ``others``. One shape for every line that
    says whose counts they are (the refused calls not logged, the key broker's refusals it could
    not record)."""
    named = counted.most_common(SUMMARY_ENTRIES)
    return {
        "by_caller_and_reason": [[caller, reason, n] for (caller, reason), n in named],
        "others": sum(counted.values()) - sum(n for _, n in named),
    }


class RefusalLines(logging.Filter):
    """Lets through every line but refusal lines (:data:`~strongroom.errors.REFUSAL_LINE`), which
    are written within the budget the module describes, keyed on the RPC's caller (the bucket its
    host's limits count it in: its verified SPIFFE ID, every role-less caller as one,
    :func:`~strongroom.runtime.callers.bucket`) and the line's ``reason``; the rest
    are counted and said in one WARNING per :data:`SUMMARY_SECONDS`. ``clock`` paces the budget."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        # The token buckets the key broker's audit budget and attestation limits use: one per
        # caller and reason, and one for everyone (key "").
        self._each = CallerBuckets(REFUSED_CALLS_PER_CALLER, REFUSED_CALLS_BURST, clock=clock)
        self._caller = CallerBuckets(  # and one per caller, every reason together
            REASONS_PER_CALLER * REFUSED_CALLS_PER_CALLER,
            REASONS_PER_CALLER * REFUSED_CALLS_BURST,
            clock=clock,
        )
        self._all = CallerBuckets(REFUSED_CALLS_PER_SECOND, REFUSED_CALLS_PER_SECOND, clock=clock)
        self._lock = threading.Lock()
        # The verdicts of lines logged away from their call's thread (REFUSAL_CALL: a watchdog's),
        # for that call's own later lines (all or none); gone with the call.
        self._away: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        self._counted: Counter[tuple[str, str]] = Counter()
        self._since = time.monotonic()
        self._timer: threading.Timer | None = None
        self._closed = False
        # Held while a summary takes the counts and says them: the close, finding the counts
        # taken by a timed summary still on its way to the log, waits for it to get there.
        self._saying = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is written (a refusal line not written is counted)."""
        marked = getattr(record, REFUSAL_LINE, None)
        if marked is None:
            return True
        rpc = _RPC.get()
        named = getattr(record, REFUSAL_CALL, None)
        if rpc is not None and named is not None and named is not rpc.context:
            # A line about another call than the one this thread runs (a thread that inherited
            # a call's context, a worker still marked by an abandoned response stream): the
            # running call's caller neither pays for it nor takes its verdict.
            rpc = None
        # The call the line is about: the one it names (a watchdog's line about the call it
        # cancels), else the one running on this thread.
        call = rpc.context if rpc is not None else named
        # The service's own failure first: a verdict not to log the call's lines (its caller's
        # budget spent, by a watchdog's line about it or its own first) must not hide it.
        if not marked:  # this call's lines are all written from here on
            if rpc is not None:
                rpc.verdict = True
            return True
        if rpc is not None and rpc.verdict is None:
            rpc.verdict = self._verdict_away(call)  # a watchdog's line about it came first
        if rpc is not None and rpc.verdict is not None:
            return rpc.verdict  # the call's other lines go with its first
        if rpc is None and call is not None:
            earlier = self._verdict_away(call)
            if earlier is not None:
                return earlier
        caller = "-"
        if call is not None:
            try:
                caller = _caller_of(call)
            except Exception:  # a line is written or counted, never an error at its call site
                caller = "(unidentified)"
        reason = str(getattr(record, "reason", "") or "")
        key = f"{caller} {reason}"  # a space is in neither a SPIFFE ID nor a reason code
        # A caller past its own budget (of this reason, or of all) spends none of everyone's.
        verdict = self._take(key, caller)
        if rpc is not None:
            rpc.verdict = verdict
        elif call is not None:
            with self._lock, contextlib.suppress(TypeError):  # TypeError: no weak reference
                self._away[call] = verdict
        if not verdict:
            self._count(caller, reason)
        return verdict

    def _verdict_away(self, call: Any) -> bool | None:
        """The verdict of an earlier line about ``call`` logged away from its thread, if any."""
        if call is None:
            return None
        with self._lock:
            try:
                return self._away.get(call)
            except TypeError:  # a call that cannot be weakly referenced was never remembered
                return None

    def _take(self, key: str, caller: str) -> bool:
        if not (self._each.available(key) and self._caller.available(caller)):
            return False
        if not self._all.take(""):
            return False
        if not self._each.take(key):  # another thread took its last token
            self._all.refund("")
            return False
        if not self._caller.take(caller):
            self._each.refund(key)
            self._all.refund("")
            return False
        return True

    def _count(self, caller: str, reason: str) -> None:
        with self._lock:
            key = (caller, reason)
            if key not in self._counted and len(self._counted) >= _MAX_COUNTED:
                key = ("(others)", "")
            self._counted[key] += 1
            if self._timer is None and not self._closed:
                wait = max(0.0, self._since + SUMMARY_SECONDS - time.monotonic())
                timer = threading.Timer(wait, self.summarise)
                timer.daemon = True
                timer.name = "refusal-log-summary"
                # No thread to be had: the next refusal not logged tries again (the count stays).
                with contextlib.suppress(RuntimeError):
                    timer.start()
                    self._timer = timer

    def summarise(self, wait: float | None = None) -> None:
        """Says the refused calls not logged since the last summary, if any (one WARNING), once
        a summary already being said has been (for ``wait`` seconds at most; None: as long as
        it takes)."""
        saying = self._saying.acquire(timeout=-1 if wait is None else wait)
        try:
            self._say()
        finally:
            if saying:
                self._saying.release()

    def _say(self) -> None:
        with self._lock:
            counted, self._counted = self._counted, Counter()
            now = time.monotonic()
            seconds, self._since = now - self._since, now
            if self._timer is not None:
                self._timer.cancel()  # nothing once it runs (this may be it)
                self._timer = None
        if not counted:
            return
        log.warning(
            "refused calls not logged",
            extra={
                "calls": sum(counted.values()),
                "seconds": round(seconds, 1),
                **by_caller_and_reason(counted),
            },
        )

    def close(self, wait: float | None = None) -> None:
        """Says what is still counted, once a timed summary being said has been (for ``wait``
        seconds at most); no summary is timed after this."""
        with self._lock:
            self._closed = True
        self.summarise(wait)

"""Refusals that say "busy, retry later", and retrying a client's call refused so.

A Strongroom server refuses a call at once with ``RESOURCE_EXHAUSTED`` and one of
:data:`BUSY_REFUSALS` when its caller (its SPIFFE ID, or its certificate's share) already holds as
many calls, streams or workers as it admits, or every data-plane worker is taken. Such a call was
refused before its handler ran: nothing was stored, generated or released, so it can be made again.
The inference loader retries whole loads refused so; :func:`retrying_busy` is the publisher's
(``strongroom model publish``, :mod:`strongroom.client.publish`, :mod:`strongroom.client.multipart`)
and ``strongroom model fetch``'s (:func:`strongroom.client.fetch.retrying_source`): each call again after a jittered,
exponentially growing wait, within a total bound. Any other failure, ``CANCELLED`` and
``DEADLINE_EXCEEDED`` included, ends it at once.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from strongroom.client.remote import peer_reason
from strongroom.errors import ResourceExhausted
from strongroom.reasons import Reason

__all__ = [
    "BUSY_REFUSALS",
    "CLIENT_RETRY",
    "NO_RETRY",
    "BusyRetry",
    "is_busy_refusal",
    "retrying_busy",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

BUSY_REFUSALS = frozenset(
    {
        Reason.TOO_MANY_UNARY_CALLS_PER_IDENTITY,
        Reason.TOO_MANY_WORKERS_PER_IDENTITY,
        Reason.TOO_MANY_CALLS_PER_CERTIFICATE,
        Reason.TOO_MANY_STREAMS_PER_IDENTITY,
        Reason.TOO_MANY_STREAMS_PER_CERTIFICATE,
        Reason.TOO_MANY_STREAMS,
        Reason.DATA_PLANE_WORKERS_BUSY,
        Reason.RELEASES_RATE_LIMITED,
    }
)
"""RESOURCE_EXHAUSTED refusals that say "retry later" rather than "too large": the key broker had
as many calls of this identity (or of this caller's certificate, its share) running as it admits,
or the store as many of its streams (or of this caller's certificate, its share, or blocking
streams in all), or either had every data-plane worker busy; or the key broker had granted this
certificate (or the fleet's SPIFFE ID) as many releases as its grant budget admits for now, and
gives one back each second or so (``RELEASES_RATE_LIMITED``: a replica's burst of loads). Every
replica of the inference service shares its SPIFFE ID, so a fleet's releases at once while
collateral or the HSM is slow, or its downloads at once, reach them. A retry cannot spend the grant
budget it waits for: the broker takes a grant only for a release it grants, and refuses one past
the budget before the evidence is verified."""

CLIENT_RETRY_SECONDS = 60.0
"""How long a client keeps retrying one call refused as busy (seconds, from its first try)."""


@dataclass(frozen=True)
class BusyRetry:
    """How a client retries a call refused with one of :data:`BUSY_REFUSALS`: after a wait drawn
    between ``first_delay`` and half as long again, doubling up to ``max_delay``, while the next
    try would start within ``within`` seconds of the first (0: never retried). ``sleep`` waits."""

    within: float = CLIENT_RETRY_SECONDS
    first_delay: float = 0.5
    max_delay: float = 8.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.first_delay <= self.max_delay:
            # No wait at all would make as many tries as a busy peer can refuse in ``within``.
            raise ValueError("a busy retry waits: 0 < first_delay <= max_delay")
        if not 0 <= self.within < math.inf:
            # Unbounded (or NaN, which no comparison ends) has no most_tries: a multi-part
            # publish, which makes each part's writers up front, counted them for ever.
            raise ValueError("a busy retry ends: 0 <= within, finite")

    @property
    def most_tries(self) -> int:
        """The most tries :func:`retrying_busy` can make of one call: 1, and a retry for every
        wait that fits within ``within`` even drawn at its shortest (11 for :data:`CLIENT_RETRY`)."""
        tries, waited, delay = 1, 0.0, self.first_delay
        while delay < self.max_delay and waited + delay <= self.within:
            tries += 1
            waited += delay
            delay = min(delay * 2, self.max_delay)
        if delay == self.max_delay and waited + delay <= self.within:
            # Counted, not stepped through: a within of days is millions of waits at max_delay.
            tries += int((self.within - waited) // delay)
        return tries


CLIENT_RETRY = BusyRetry()
"""The publisher's and ``strongroom model fetch``'s: :data:`CLIENT_RETRY_SECONDS`, waits from
0.5 s up to 8 s."""

NO_RETRY = BusyRetry(within=0.0)
"""Every refusal raised as it comes."""


def is_busy_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is a peer's busy refusal: ``RESOURCE_EXHAUSTED`` with a reason in
    :data:`BUSY_REFUSALS`, as a gRPC error (the reason from its trailer) or a domain error."""
    return _busy_reason(exc) is not None


def _busy_reason(exc: BaseException) -> str | None:
    if isinstance(exc, ResourceExhausted):
        reason: str | None = exc.reason
    elif isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            return None
        reason = peer_reason(exc)
    else:
        return None
    return reason if reason in BUSY_REFUSALS else None


def retrying_busy(
    attempt: Callable[[], T],
    retry: BusyRetry,
    *,
    what: str,
    attempts: int | None = None,
    stop: threading.Event | None = None,
    deadline: float | None = None,
) -> T:
    """``attempt()``, made again while it raises a busy refusal (:func:`is_busy_refusal`), as
    ``retry`` says and at most ``attempts`` times in all (None: no count); then, or for any other
    failure, the last error is raised. Each retry is logged (WARNING) with ``what`` was refused.
    With ``stop``, a wait is on it instead of ``retry.sleep``, and the refusal is raised as soon
    as it is set (the work the call was for has failed elsewhere). With ``deadline``
    (``time.monotonic()``), no wait ends past it either: the refusal is raised instead of a try
    made with no time left, which would end ``DEADLINE_EXCEEDED`` and hide why."""
    until = time.monotonic() + retry.within
    if deadline is not None:
        until = min(until, deadline)
    delay = retry.first_delay
    made = 0
    while True:
        made += 1
        try:
            return attempt()
        except Exception as exc:
            reason = _busy_reason(exc)
            if reason is None or (attempts is not None and made >= attempts):
                raise
            # Drawn, so that clients refused together do not come back together.
            wait = random.uniform(delay, delay * 1.5)  # noqa: S311 - spreading, not secrecy
            if time.monotonic() + wait > until:
                raise
            log.warning(
                "%s refused as busy (%s); retrying in %.1fs",
                what,
                reason,
                wait,
                extra={"reason": reason},
            )
            if stop is None:
                retry.sleep(wait)
            elif stop.wait(wait):
                raise
            delay = min(delay * 2, retry.max_delay)

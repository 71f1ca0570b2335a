"""A Strongroom peer's refusal, as the client sees it: the peer's reason and, where it matters, its
status.

The reason is read from the peer's ``strongroom-reason`` trailer, never parsed out of the message
text, and kept only if it is in the catalogue (:class:`~strongroom.reasons.Reason`): reasons label
metrics and load failures, and a peer (a compromised store, or one of another version) must not be
able to grow that set; an unknown one gives way to the status's own reason, and the peer's message
still says what happened. An error our own channel raised in place of the call (a ``StrongroomError``
that is also a ``grpc.RpcError``: the server identity check's explanation, a rejected client
certificate) keeps its own reason. ``DATA_LOSS``, ``NOT_FOUND`` and ``RESOURCE_EXHAUSTED`` keep their status; ``UNAVAILABLE``,
``DEADLINE_EXCEEDED`` and ``CANCELLED`` become the class :data:`TRANSIENT` gives each (the one table
of what is an outage rather than a refusal, and of its class, which the publisher uses too:
``Unavailable``, ``DeadlineExceeded`` for a call out of time); any other refusal becomes
``FailedPrecondition`` with the peer's reason: the caller of the client was not itself refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Literal

import grpc

from strongroom.errors import (
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    StrongroomError,
    Unavailable,
)
from strongroom.reasons import METADATA_KEY as REASON_TRAILER
from strongroom.reasons import Reason

_CATALOGUE = frozenset(Reason)
Step = Literal["fetch", "key release"]
"""What the client was doing when the peer refused: it picks the fallback reasons below."""

_UNAVAILABLE: dict[str, Reason] = {
    "fetch": Reason.FETCH_UNAVAILABLE,
    "key release": Reason.KEY_RELEASE_UNAVAILABLE,
}
_BY_STATUS: dict[str, dict[grpc.StatusCode, Reason]] = {
    "fetch": {
        grpc.StatusCode.PERMISSION_DENIED: Reason.FETCH_DENIED,
        grpc.StatusCode.UNAUTHENTICATED: Reason.UNAUTHENTICATED,
        grpc.StatusCode.NOT_FOUND: Reason.MODEL_NOT_IN_STORE,
    },
    "key release": {
        grpc.StatusCode.PERMISSION_DENIED: Reason.KEY_RELEASE_DENIED,
        grpc.StatusCode.UNAUTHENTICATED: Reason.UNAUTHENTICATED,
        grpc.StatusCode.NOT_FOUND: Reason.KEY_NOT_FOUND,
    },
}
_OTHERWISE: dict[str, Reason] = {
    "fetch": Reason.FETCH_REFUSED,
    "key release": Reason.KEY_RELEASE_REFUSED,
}
TRANSIENT: Mapping[grpc.StatusCode, type[StrongroomError]] = MappingProxyType(
    {
        grpc.StatusCode.UNAVAILABLE: Unavailable,
        # Our clients cancel their own calls only in a CallScope, which then reports its own
        # error, or on an interrupt (KeyboardInterrupt, raised as it is): a CANCELLED otherwise
        # comes from a peer that is shutting down (gRPC cancels the calls in flight on a server
        # that drains, and answers those arriving meanwhile so).
        grpc.StatusCode.CANCELLED: Unavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    }
)
"""The one table of which failed calls are an outage (the peer down, draining, or too slow for the
call's time) rather than a refusal of what the caller asked, and of the domain error each becomes,
for every client: the publishers' (:func:`outage_error`) and :func:`remote_error`'s (the fetch
library, the inference loader). A caller that retries outages retries every class in
:data:`OUTAGES` (remote_error made each ``Unavailable`` while the publisher made a call out of time
``DeadlineExceeded``: one status, two classes, depending on which client met it)."""

OUTAGES: tuple[type[StrongroomError], ...] = tuple(dict.fromkeys(TRANSIENT.values()))
"""The classes :data:`TRANSIENT` makes of an outage, for ``except`` and ``isinstance``: what the
inference loader retries (beside a busy peer's refusals)."""

#: Peer statuses passed on as they are (see the module docstring); the rest is FailedPrecondition.
_KEPT: dict[grpc.StatusCode, type[StrongroomError]] = {
    grpc.StatusCode.DATA_LOSS: DataLoss,
    **TRANSIENT,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}


def peer_reason(error: grpc.RpcError) -> str | None:
    """The ``strongroom-reason`` trailer a Strongroom peer sent with a failed call, if any."""
    trailing = getattr(error, "trailing_metadata", None)
    try:
        metadata = trailing() if callable(trailing) else None
    except Exception:  # a call object without trailers: no reason
        metadata = None
    for key, value in metadata or ():
        if key == REASON_TRAILER and isinstance(value, str):
            return value
    return None


def catalogued_reason(error: grpc.RpcError) -> str | None:
    """The peer's reason (:func:`peer_reason`) when it is in the catalogue, else None: a peer
    must not grow the set of reasons our errors carry (module docstring)."""
    sent = peer_reason(error)
    return sent if sent in _CATALOGUE else None


def outage_error(exc: grpc.RpcError, what: str) -> StrongroomError | None:
    """``exc`` as the domain error :data:`TRANSIENT` makes of its status, its message ``what``
    then the status, the peer's reason and its text; None for a status that is no outage (a
    refusal) or an error that carries none.

    Its reason is the peer's when in the catalogue, else the error class's own
    (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``): the message names the status it came with."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    cls = TRANSIENT.get(code) if code is not None else None
    if cls is None:
        return None
    return cls(f"{what} ({refusal_text(exc)})", reason=catalogued_reason(exc))


@contextmanager
def outages_raised_as_errors(what: str | Callable[[grpc.RpcError], str]) -> Iterator[None]:
    """Raises a ``grpc.RpcError`` of an outage from the block as :func:`outage_error` makes it
    (``what``, or what it returns for the outage when it comes, then the status: ``Unavailable``,
    ``DeadlineExceeded``); any other is raised as it came. The publishers' one rule, single and
    multi-part alike."""
    try:
        yield
    except grpc.RpcError as exc:
        error = outage_error(exc, what if isinstance(what, str) else what(exc))
        if error is None:
            raise
        raise error from exc


def refusal_text(exc: grpc.RpcError) -> str:
    """What a failed call said, for a message: its status, the peer's reason if it sent one, and
    its text (``UNAVAILABLE: failed to connect``, ``RESOURCE_EXHAUSTED TOO_MANY_STREAMS: ...``)."""
    if not isinstance(exc, grpc.Call):
        return type(exc).__name__
    refused = f"{exc.code().name} {peer_reason(exc) or ''}".rstrip()
    return f"{refused}: {exc.details()}"


def remote_error(step: Step, exc: grpc.RpcError) -> StrongroomError:
    """A peer's refusal as a domain error with the peer's reason (its ``strongroom-reason``
    trailer) and, where it matters, its status (module docstring).

    Without a catalogue reason from the peer, the reason is one of the step's own, all in the
    catalogue (they label metrics as the peer's do): ``<STEP>_UNAVAILABLE`` (an outage, whatever
    its class), ``<STEP>_DENIED``,
    ``UNAUTHENTICATED``, ``MODEL_NOT_IN_STORE`` or ``KEY_NOT_FOUND``, else ``<STEP>_REFUSED``, and
    the message names the status."""
    code = exc.code()
    details = exc.details() or code.name
    sent = peer_reason(exc)
    if sent is None and isinstance(exc, StrongroomError):
        # Raised by our own channel in place of the call (the server identity check's
        # explanation, a client certificate the server rejected): no peer sent it, and its
        # reason (SERVER_IDENTITY_NAME_MISSING after an upgrade) says more than the status's.
        sent = str(exc.reason)
    cls = _KEPT.get(code, FailedPrecondition)
    if sent in _CATALOGUE:
        # A Strongroom peer's message begins with the reason its trailer sent ("REASON: text",
        # strongroom.errors): our error prints its reason first too, so the peer's copy went.
        return cls(f"{step}: {details.removeprefix(f'{sent}: ')}", reason=sent)
    if code in TRANSIENT:
        fallback = _UNAVAILABLE[step]
    else:
        fallback = _BY_STATUS[step].get(code, _OTHERWISE[step])
    return cls(f"{step}: {details} ({code.name})", reason=fallback)

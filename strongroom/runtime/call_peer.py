"""A call's peer as read while the call lasted.

gRPC's ``context.peer()`` answers ``""`` for a call at times once the call was cancelled (1.85: 3
of 200 cancelled downloads read at the handler's close, more under load), while its auth context
stays. A caller without a client certificate (a plaintext host) is counted by its address
(:func:`~strongroom.runtime.callers.caller_key`): a line about its call logged as the handler ends
(a ``download stopped``) was counted as the caller ``peer:``, in a budget of its own, and written
beyond its caller's. The error mapping remembers each call's peer as the call begins
(:func:`~strongroom.runtime.log_refusals.enter_rpc`), and the rule reads it from here.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any

import grpc

# Each running call's peer as read at its start: weakly keyed, gone with its call.
_PEERS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def remember_peer(context: grpc.ServicerContext) -> None:
    """Reads the peer of the call of ``context`` now, while it lasts, for :func:`call_peer`."""
    peer = context.peer()
    if peer:  # a call that ended before this read has nothing to remember
        with _LOCK, contextlib.suppress(TypeError):  # TypeError: no weak reference
            _PEERS[context] = peer


def call_peer(context: grpc.ServicerContext) -> str:
    """The peer of the call of ``context``: as :func:`remember_peer` read it, else as gRPC says
    now."""
    with _LOCK:
        try:
            remembered = _PEERS.get(context)
        except TypeError:  # a context that cannot be weakly referenced was never remembered
            remembered = None
    return remembered if remembered is not None else context.peer()

"""A handler held between its read of the request message and what follows it, for the tests of
the race between that read and a watchdog's cancel of the call's wait (UnaryGuard._took)."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest

from strongroom.runtime.interceptors import PendingRequest


def hold_after_read(monkeypatch: pytest.MonkeyPatch, method: str) -> threading.Event:
    """Holds the first call of ``method`` (a full method name) once its handler has read its
    message, until the call ends (a watchdog's cancel); returns the event set once it has. A
    test waits for it after its client's refusal: the client may hear of the cancel before the
    handler does."""
    real = PendingRequest._next
    armed, cut = threading.Event(), threading.Event()
    armed.set()

    def read_then_hold(self: PendingRequest, context: grpc.ServicerContext) -> Any:
        request = real(self, context)
        if self._method == method and armed.is_set():
            armed.clear()
            ended = threading.Event()
            # Held, its message read, until the watchdog ends the call.
            if context.add_callback(ended.set) and ended.wait(30):
                cut.set()
        return request

    monkeypatch.setattr(PendingRequest, "_next", read_then_hold)
    return cut

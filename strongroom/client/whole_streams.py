"""Single-threaded response streams
(:data:`~strongroom.client.store_channel.STORE_CHANNEL_OPTIONS`) taken in to their end, however
they end; :func:`~strongroom.client.store_channel.store_channel` makes a channel that has both.

In gRPC's single-threaded mode (``SingleThreadedUnaryStream``) a call's events arrive on a
completion queue of its own that only the thread iterating the call drains; no channel thread does.
A call that ends before its reader has taken its last event — the reader stops early (a refused
header, a failed decryption, a failed part) and cancels it, a scope cancels it from another thread,
its deadline passes, the store ends it with an error — keeps its core call and queue for as long
as the channel lives (measured: 25-130 KB each, on the inference server's one store channel for
good), and its done callbacks never run (a :class:`~strongroom.client.cancel.CallScope` goes on
tracking it). :func:`whole_streams` wraps each such stream so that the thread iterating it takes
in what is left once it has ended or been closed. gRPC has no public call for that: the wrapper
uses the rendezvous's own (grpc is pinned in requirements-runtime.txt, and
tests/e2e/test_store_channel.py fails if that stops working).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc

__all__ = ["end_stream", "ending", "whole_streams"]

_S = TypeVar("_S")


def _take_the_rest(call: Any) -> None:
    """Takes in an ended single-threaded call's outstanding events on this thread (releasing its
    core call and running its done callbacks); nothing for any other kind of call."""
    state = getattr(call, "_state", None)
    consume = getattr(call, "_consume_next_event", None)
    if state is None or consume is None:
        return
    # Cancelled or ended, every outstanding operation completes at once: this does not wait.
    while state.due:
        consume()


class _WholeStream:
    """A single-threaded response stream whose thread takes in its end (see the module doc).

    Iterated by one thread, which alone calls :meth:`close`; :meth:`cancel`, from any thread,
    only cancels (the iterating thread then takes in the rest). Everything else is the call's."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError:
            _take_the_rest(self._call)
            raise

    def cancel(self) -> bool:
        """Cancels the call (from any thread); see ``grpc.RpcContext.cancel``."""
        cancelled: bool = self._call.cancel()
        return cancelled

    def close(self) -> None:
        """The reader stops here: cancels the call and takes in the rest of it."""
        self._call.cancel()
        _take_the_rest(self._call)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _WholeStreams(grpc.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        call = continuation(details, request)
        return _WholeStream(call) if hasattr(call, "_consume_next_event") else call


def whole_streams(channel: grpc.Channel) -> grpc.Channel:
    """``channel`` (made with ``STORE_CHANNEL_OPTIONS``) with each response stream taken in to its
    end by the thread reading it; wrap the raw channel, below any other interceptor (a
    :func:`~strongroom.client.store_channel.store_channel` is made so)."""
    return grpc.intercept_channel(channel, _WholeStreams())


def end_stream(call: Any) -> None:
    """Ends a response stream its reader leaves (``close`` where it has one: a
    :func:`whole_streams` stream or a generator wrapping one; else ``cancel``); a finished call
    ignores it."""
    close = getattr(call, "close", None)
    if close is not None:
        close()
        return
    cancel = getattr(call, "cancel", None)
    if cancel is not None:
        cancel()
    _take_the_rest(call)  # a raw single-threaded call (a channel not wrapped)


@contextmanager
def ending(stream: _S) -> Iterator[_S]:
    """``stream``, ended (:func:`end_stream`) however the block is left: its reader refused
    what it read, was interrupted or read it all. Left without, a store channel's download is
    only cancelled once collected, and its end stays untaken for as long as the channel lives."""
    try:
        yield stream
    finally:
        end_stream(stream)

"""The channel a client downloads from the model store over: :func:`store_channel`.

Its downloads run in gRPC's single-threaded mode (:data:`STORE_CHANNEL_OPTIONS`), which leaks
every call that ends before its reader took its last event unless the channel is also wrapped by
:func:`~strongroom.client.whole_streams.whole_streams`. The two were paired by hand at each
place that made a store channel; a channel made here has both, so neither can be forgotten.
"""

from __future__ import annotations

import grpc

from strongroom.client.whole_streams import whole_streams
from strongroom.pki.identity import WorkloadIdentity

__all__ = ["STORE_CHANNEL_OPTIONS", "store_channel"]

STORE_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # grpc.experimental.ChannelOptions.SingleThreadedUnaryStream (not in grpc's type stubs)
    ("SingleThreadedUnaryStream", 1),
)
"""The options of a :func:`store_channel`: make store channels with that, not with these.

gRPC Python hands each message of a response stream from its channel's spin thread to the thread
that iterates the call, a wake-up and an interpreter-lock hand-off per message; with this option
the iterating thread polls the call's own queue. Measured on the 512 MB cold start (2 cores): 0.045
CPU-s less in the loading process, 0.024 s less wall time (tests/bench/ANALYSIS.md, "Cold start").
Such a call's ``result()`` and ``exception()`` raise rather than wait until it has ended; nothing
here asks them early. Its end is taken in only by the thread reading it: a channel made with these
options but not wrapped by :func:`~strongroom.client.whole_streams.whole_streams` keeps each call
ended early (cancelled, failed) for as long as it lives. Public for measuring the bare option
(tests/bench) and for a channel of one's own, which must then be wrapped so."""


def store_channel(
    identity: WorkloadIdentity,
    target: str,
    *,
    server_name: str | None = None,
    server_id: str | None = None,
) -> grpc.Channel:
    """An mTLS channel from ``identity`` to the model store at ``target`` whose downloads are
    read by their own thread and taken in to their end however they end (see the module doc).

    ``server_name`` and ``server_id`` are :meth:`WorkloadIdentity.channel`'s. Interceptors of
    one's own (tracing, a :func:`~strongroom.client.cancel.scoped_channel`) go on top of it."""
    return whole_streams(
        identity.channel(
            target, server_name=server_name, server_id=server_id, options=STORE_CHANNEL_OPTIONS
        )
    )

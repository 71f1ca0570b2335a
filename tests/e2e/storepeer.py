"""A model store servicer the test controls, served on a local port as the store peer of a load."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent import futures

import grpc

from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as store_grpc


@contextlib.contextmanager
def store_peer(
    store: store_grpc.ModelStoreServiceServicer, workers: int = 2
) -> Iterator[grpc.Channel]:
    """``store`` served on a local port (plaintext), and a channel to it; the server stops,
    cancelling what is in flight, when the block ends."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    store_grpc.add_ModelStoreServiceServicer_to_server(store, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        server.stop(None).wait(30)

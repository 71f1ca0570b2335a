"""The key-release client's ephemeral RSA keys: made ahead at the lowest CPU priority, each used
once, never waited for when the background one is not ready, and not made while a load defers it."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from strongroom.attestation.release_signature import ReleaseVerifier
from strongroom.client.keyrelease import EPHEMERAL_KEY_BITS, KeyReleaseClient


@pytest.fixture
def client() -> Iterator[KeyReleaseClient]:
    channel = grpc.insecure_channel("127.0.0.1:9")  # never called: no RPC in these tests
    made = KeyReleaseClient(
        channel,
        attester=None,  # type: ignore[arg-type]
        tls_public_key=lambda: b"",
        verifier=ReleaseVerifier([], allow_unsigned=True),
    )
    yield made
    made._keygen.shutdown(wait=True, cancel_futures=True)
    channel.close()


def test_the_background_key_is_made_at_the_lowest_priority(client: KeyReleaseClient) -> None:
    # It comes due as a download starts: on a busy machine it must not take the download's CPU.
    niceness = client._keygen.submit(
        lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    ).result(30)
    assert niceness == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19  # the caller's is kept


def test_a_key_not_ready_is_made_at_once_on_the_callers_thread(client: KeyReleaseClient) -> None:
    client._take_key()  # the one made at construction; the next one is being made
    assert client._next_key is not None
    client._next_key.result(30)
    held, release = threading.Event(), threading.Event()

    # Occupy the background thread: the key queued by the next take waits behind this.
    def occupy() -> None:
        held.set()
        release.wait(60)

    blocker = client._keygen.submit(occupy)
    assert held.wait(30)
    try:
        client._take_key()  # the ready one
        queued = client._next_key
        assert queued is not None and not queued.done()
        key = client._take_key()  # returns without the background thread (still blocked)
        assert key.key_size == EPHEMERAL_KEY_BITS
        assert client._next_key is queued  # the queued one stays the next, not made twice
        assert not queued.cancelled() and not blocker.done()
    finally:
        release.set()
    blocker.result(30)
    distinct = {client._take_key().public_key().public_numbers().n for _ in range(3)}
    assert len(distinct | {key.public_key().public_numbers().n}) == 4


def test_a_key_taken_while_deferring_is_replaced_only_after_the_last_block(
    client: KeyReleaseClient,
) -> None:
    assert client._next_key is not None
    client._next_key.result(30)
    with client.deferring_key_generation():
        with client.deferring_key_generation():  # e.g. two models loading at once
            first = client._take_key()  # the ready one, with nothing queued behind it
            assert client._next_key is None
            second = client._take_key()  # none ready: made at once, still nothing queued
            assert client._next_key is None
        assert client._next_key is None  # one block still open
    queued = client._next_key
    assert queued is not None
    third = queued.result(30)
    assert third is client._take_key()
    assert len({k.public_key().public_numbers().n for k in (first, second, third)}) == 3


def test_a_deferring_block_that_took_no_key_leaves_the_ready_one(
    client: KeyReleaseClient,
) -> None:
    ready = client._next_key
    with client.deferring_key_generation():
        pass
    assert client._next_key is ready


def test_a_block_left_by_an_exception_still_lets_the_next_key_be_made(
    client: KeyReleaseClient,
) -> None:
    with pytest.raises(RuntimeError), client.deferring_key_generation():
        client._take_key()
        raise RuntimeError("the load failed")
    assert client._next_key is not None
    assert client._next_key.result(30).key_size == EPHEMERAL_KEY_BITS


def test_a_key_being_made_when_one_is_needed_is_kept_for_the_next_exchange(
    client: KeyReleaseClient,
) -> None:
    """The caller does not wait for a key the background thread is still making (it runs at the
    lowest priority); that key used to be dropped when done, 0.1-0.3 CPU-seconds for nothing."""
    started, finish = threading.Event(), threading.Event()
    slow_key = rsa.generate_private_key(65537, EPHEMERAL_KEY_BITS)

    def slow() -> rsa.RSAPrivateKey:
        started.set()
        finish.wait(60)
        return slow_key

    for deferring in (False, True):
        assert client._next_key is not None
        client._next_key.result(30)  # the worker is idle
        client._next_key = client._keygen.submit(slow)  # and now busy making the next key
        assert started.wait(30)
        with contextlib.ExitStack() as stack:
            if deferring:
                stack.enter_context(client.deferring_key_generation())
            now = client._take_key()  # made at once: the running one is not waited for
            running = client._next_key
            assert running is not None and running.running()
            finish.set()
            running.result(30)
            assert client._take_key() is slow_key  # the running one, used next
            assert now is not slow_key
        started.clear()
        finish.clear()

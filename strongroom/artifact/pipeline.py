"""A downloading artifact decrypted as it arrives, with the data key obtained alongside.

:func:`decrypt_download` is the cold start of a model as one pipeline. It takes the artifact's
bytes as an iterable of pieces (a store download) and a function that obtains the data key for a
header (attested key release). As soon as the header is in:

* the key is requested on a thread of its own, while the download goes on;
* the plaintext buffer is reserved and a thread faults its pages in (huge pages where the kernel
  has them) ahead of the data, so that decryption later writes into memory that is already there;
* the body keeps arriving and is held, without copying, until the key is there (at most
  ``max_held_without_key`` bytes: beyond that the download waits for the key);

and from then on every batch of chunks is decrypted as it arrives (by the receiving thread by
default, or on ``threads`` workers: see :class:`~strongroom.artifact.BufferedStreamDecryptor`). The
plaintext exists only in that one buffer; the result hands it out as ``bytes`` (what ONNX Runtime
takes) and zeroes it when closed. Every failure — of the download, of the key release, of
authentication — wipes what was written, drops the key, and raises the first error.

The library knows nothing of gRPC: the caller maps its transport's errors (in ``pieces`` and in
``release``) to domain errors itself.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Generic, Protocol, TypeVar

from strongroom.artifact._memory import wipe
from strongroom.artifact.format import ArtifactHeader
from strongroom.artifact.stream import DEFAULT_DECRYPT_THREADS, BufferedStreamDecryptor
from strongroom.closing import Closing

__all__ = ["DEFAULT_MAX_HELD_WITHOUT_KEY", "DecryptedArtifact", "KeyLike", "decrypt_download"]

DEFAULT_MAX_HELD_WITHOUT_KEY = 256 * 1024 * 1024
"""Ciphertext held while the key release is in flight (≈ 0.2 s of a fast download)."""


class KeyLike(Protocol):
    """What ``release`` returns: at least the data key, which the pipeline wipes once used."""

    @property
    def dek(self) -> bytearray:
        """The 32-byte data key."""
        ...


K = TypeVar("K", bound=KeyLike)


class DecryptedArtifact(Closing, Generic[K]):
    """The plaintext of a fully authenticated artifact, in memory until :meth:`close`.

    ``key`` is what ``release`` returned (its ``dek`` already wiped); ``timings`` are seconds:
    ``attest_and_release`` (the release, on its own thread, overlapping the download),
    ``key_wait`` (how long the download waited for it), ``fetch_and_decrypt`` (from the first piece
    to the authenticated plaintext, the release included).
    """

    def __init__(
        self,
        plaintext: bytes,
        header: ArtifactHeader,
        key: K,
        timings: dict[str, float],
        decryptor: BufferedStreamDecryptor,
    ) -> None:
        self.plaintext = plaintext
        self.header = header
        self.key = key
        self.timings = timings
        self._decryptor = decryptor

    def __repr__(self) -> str:
        return f"DecryptedArtifact({self.header!r}, timings={self.timings!r})"

    def close(self) -> None:
        """Zeroes the plaintext in place; the object must not be used afterwards."""
        self._decryptor.wipe_output()
        self.plaintext = b""


def _wipe_unused(future: Future[K]) -> None:
    if not future.cancelled() and future.exception() is None:
        wipe(future.result().dek)


def decrypt_download(
    pieces: Iterable[bytes | bytearray | memoryview],
    release: Callable[[ArtifactHeader], K],
    *,
    check_header: Callable[[ArtifactHeader], None] | None = None,
    threads: int = DEFAULT_DECRYPT_THREADS,
    max_artifact_size: int | None = None,
    max_held_without_key: int = DEFAULT_MAX_HELD_WITHOUT_KEY,
    prefault: bool = True,
) -> DecryptedArtifact[K]:
    """Decrypts the artifact arriving as ``pieces``, obtaining its key with ``release`` meanwhile.

    ``check_header`` sees the (not yet authenticated) header before the key is requested and may
    raise to refuse it. ``release`` runs on another thread, in a copy of the caller's context (so
    a trace started by the caller spans it). Returns only once every byte has authenticated.
    """
    started = time.perf_counter()
    decryptor = BufferedStreamDecryptor(
        threads=threads,
        as_bytes=True,
        prefault=prefault,
        max_artifact_size=max_artifact_size,
        max_held_without_key=max_held_without_key,
    )
    future: Future[K] | None = None
    key: K | None = None
    release_time: list[float] = []
    waited = 0.0

    def run_release(header: ArtifactHeader, result: Future[K]) -> None:
        began = time.perf_counter()
        try:
            outcome = release(header)
        except BaseException as exc:
            result.set_exception(exc)
        else:
            result.set_result(outcome)
        finally:
            release_time.append(time.perf_counter() - began)

    def take_key() -> None:
        nonlocal key, waited
        assert future is not None
        began = time.perf_counter()
        obtained = future.result()  # raises the release's own error
        waited += time.perf_counter() - began
        key = obtained
        try:
            decryptor.set_dek(obtained.dek)
        finally:
            wipe(obtained.dek)

    try:
        for piece in pieces:
            # Take the key once it is there, or wait for it rather than hold more than the limit.
            over = decryptor.held_without_key + len(piece) > max_held_without_key
            if future is not None and key is None and (future.done() or over):
                take_key()
            decryptor.feed(piece)
            header = decryptor.header
            if header is not None and future is None:
                if check_header is not None:
                    check_header(header)
                future = Future()
                future.set_running_or_notify_cancel()
                context = contextvars.copy_context()
                threading.Thread(
                    target=context.run,
                    args=(run_release, header, future),
                    name="artifact-key-release",
                    daemon=True,
                ).start()
        if future is not None and key is None:
            take_key()
        plaintext = decryptor.finish()
    except BaseException:
        decryptor.abort()
        # Ends the source here, in this thread and context, rather than wherever the garbage
        # collector finalises it: a download whose header was refused stops at once (its gRPC
        # call is cancelled), and a traced source leaves its span where it entered it.
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
        if future is not None and key is None:
            # A key that arrives after the failure is wiped as soon as it does.
            future.add_done_callback(_wipe_unused)
        raise
    assert isinstance(plaintext, bytes) and key is not None and decryptor.header is not None
    timings = {
        "attest_and_release": release_time[0] if release_time else 0.0,
        "key_wait": waited,
        "fetch_and_decrypt": time.perf_counter() - started,
    }
    return DecryptedArtifact(plaintext, decryptor.header, key, timings, decryptor)

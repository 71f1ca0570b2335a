"""Incremental decryption of an artifact arriving over a network stream.

Both decryptors take the whole artifact, from byte 0, in pieces of any size. The header is parsed
without a key, so a caller can read :attr:`header` (and its wrapped data key), obtain the data key,
and only then :meth:`set_dek`; body bytes that arrive before the key are held, up to a limit.

* :class:`StreamDecryptor` — ``feed`` returns plaintext as soon as each chunk authenticates, so
  memory stays at a chunk or two. Every released byte is authenticated by the AEAD, but properties
  of the whole artifact (complete, footer matches the encrypted digest, optional SHA-256 check) are
  only established by ``finish()``: a caller must discard what it received if ``finish`` raises.
* :class:`BufferedStreamDecryptor` — decrypts into one preallocated buffer, on a thread pool while
  the data keeps arriving, and releases the buffer only from ``finish()``, once everything has
  authenticated. On any failure the buffer is zeroed and nothing is released.

After a failure each later call raises again: a failed stream never ends cleanly.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from strongroom.artifact import c2sp
from strongroom.artifact._memory import Prefaulter, discard, output_buffer, output_bytes, wipe
from strongroom.artifact.errors import ArtifactTooLarge, DecryptionFailed, InvalidArtifact
from strongroom.artifact.format import (
    DEK_SIZE,
    DIGEST_SIZE,
    ArtifactHeader,
    HeadAccumulator,
)
from strongroom.errors import FailedPrecondition, InvalidArgument
from strongroom.reasons import Reason

__all__ = [
    "DEFAULT_DECRYPT_THREADS",
    "MAX_BUFFERED_WITHOUT_KEY",
    "BufferedStreamDecryptor",
    "StreamDecryptor",
]

_log = logging.getLogger(__name__)

_CS = c2sp.CHUNK_SIZE
_SEALED = c2sp.SEALED_CHUNK_SIZE
_TAG = c2sp.TAG_SIZE
# Runs of at least this many whole chunks in immutable caller bytes go to a worker without a copy
# (a 512 KiB download message holds 31); shorter ones are batched.
_DIRECT_MIN_CHUNKS = 8

DEFAULT_DECRYPT_THREADS = 0
"""Decrypt a download on the thread that receives it (see :class:`BufferedStreamDecryptor`)."""

MAX_BUFFERED_WITHOUT_KEY = 16 * 1024 * 1024
"""Body bytes held while waiting for :meth:`set_dek` by default; more raises FailedPrecondition."""
PREFAULT_AHEAD = 64 * 1024 * 1024
"""How far past the bytes received a ``prefault`` decryptor lets its output be faulted in."""


class _ArtifactStream:
    """Shared framing: header, preamble, chunk boundaries, footer; subclasses decrypt the chunks."""

    def __init__(
        self,
        dek: bytearray | memoryview | None,
        *,
        verify_digest: bool,
        max_artifact_size: int | None,
        max_held_without_key: int = MAX_BUFFERED_WITHOUT_KEY,
    ) -> None:
        self._max = max_artifact_size
        self._max_held = max_held_without_key
        self._verify_digest = verify_digest
        self._dek: bytearray | None = None
        self._head = HeadAccumulator()
        self._header: ArtifactHeader | None = None
        self._seen = 0
        # Body bytes received before the key, held as they came (ciphertext is not secret; an
        # immutable ``bytes`` piece is kept without a copy).
        self._waiting: list[memoryview] = []
        self._waiting_bytes = 0
        self._preamble = bytearray()
        self._cipher: c2sp.ChunkCipher | None = None
        # The chunks holding only plaintext, opened in native code (c2sp.BulkOpener) where a
        # subclass opens them inline; the rest (digest, final chunk) by `_cipher`.
        self._bulk: c2sp.BulkOpener | None = None
        self._partial = bytearray()  # the chunk being assembled across pieces
        self._index = 0
        self._digest = bytearray()  # the encrypted digest, as authenticated
        self._footer = bytearray()
        self._error: Exception | None = None
        self._finished = False
        if dek is not None:
            self._set_dek(dek)

    # -- public -------------------------------------------------------------------------------

    @property
    def header(self) -> ArtifactHeader | None:
        """The parsed (not yet authenticated) header once received, else None."""
        return self._header

    @property
    def held_without_key(self) -> int:
        """Body bytes received and held because the data key has not been supplied yet."""
        return self._waiting_bytes

    def _set_dek(self, dek: bytearray | memoryview) -> None:
        """Takes a copy of the data key (wiped once the body cipher is derived)."""
        self._check_usable()
        if self._dek is not None or self._cipher is not None:
            raise ValueError("the data key was already set")
        if len(dek) != DEK_SIZE:
            raise InvalidArgument(
                f"the data key must be {DEK_SIZE} bytes", reason=Reason.INVALID_DEK_SIZE
            )
        self._dek = bytearray(dek)
        if self._header is not None and self._waiting:
            waiting, self._waiting, self._waiting_bytes = self._waiting, [], 0
            for piece in waiting:
                self._guard(self._body, piece)

    def abort(self) -> None:
        """Abandons the stream: wipes keys and buffers; later calls raise."""
        if self._error is None:
            self._fail(FailedPrecondition("the stream was aborted", reason=Reason.STREAM_ABORTED))

    # -- framing ------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._finished:
            raise ValueError("the stream is already finished")

    def _fail(self, exc: Exception) -> Exception:
        self._error = exc
        self._waiting, self._waiting_bytes = [], 0
        for buf in (self._partial, self._preamble, self._digest):
            wipe(buf)
        if self._dek is not None:
            wipe(self._dek)
        self._on_fail()
        self._drop_keys()  # after _on_fail: a subclass's workers may still hold or need them
        return exc

    def _drop_keys(self) -> None:
        """Drops the derived key's holders (in cryptography's memory): a stream that ended, well
        or not, keeps no key."""
        self._cipher = None
        self._bulk = None

    def _open_bulk(self, dek: bytearray) -> None:
        header = self._header
        assert header is not None
        self._bulk = c2sp.BulkOpener(dek, self._preamble, header.encoded)

    def _plaintext_chunks(self) -> int:
        """How many chunks hold only plaintext (the bulk opener's; never the final one)."""
        assert self._header is not None
        return self._header.plaintext_size // _CS

    def _guard(self, fn: Callable[[memoryview], None], view: memoryview) -> None:
        try:
            fn(view)
        except Exception as exc:
            self._fail(exc)
            raise

    def _feed(self, data: bytes | bytearray | memoryview) -> None:
        self._check_usable()
        self._guard(self._take, memoryview(data).cast("B"))

    def _take(self, view: memoryview) -> None:
        self._seen += view.nbytes
        if self._header is None:
            view = self._take_header(view)
            if self._header is None:
                return
        if self._seen > self._header.artifact_size:
            raise InvalidArtifact(
                "artifact is longer than its header implies", reason=Reason.TRAILING_DATA
            )
        if self._cipher is None and self._dek is None:
            if self._waiting_bytes + view.nbytes > self._max_held:
                raise FailedPrecondition(
                    "the data key is needed before more of the body can be accepted",
                    reason=Reason.DATA_KEY_REQUIRED,
                )
            self._waiting.append(view if isinstance(view.obj, bytes) else memoryview(bytes(view)))
            self._waiting_bytes += view.nbytes
            return
        self._body(view)

    def _take_header(self, view: memoryview) -> memoryview:
        rest = self._head.take(view)
        header = self._head.header
        if header is not None:
            self._header = header
            if self._max is not None and header.artifact_size > self._max:
                raise ArtifactTooLarge(
                    f"artifact of {header.artifact_size} bytes exceeds the limit"
                )
            self._on_header(header)
        return rest

    def _body(self, view: memoryview) -> None:
        header = self._header
        assert header is not None
        if self._cipher is None:
            take = min(c2sp.PREAMBLE_SIZE - len(self._preamble), view.nbytes)
            self._preamble += view[:take]
            view = view[take:]
            if len(self._preamble) < c2sp.PREAMBLE_SIZE:
                return
            assert self._dek is not None
            try:
                cipher = c2sp.open_message(
                    self._dek, self._preamble, header.encoded, suite=c2sp.AES_256_GCM
                )
                self._on_cipher(cipher, self._dek)
                self._cipher = cipher
            finally:
                wipe(self._dek)
                self._dek = None
        count = header.chunk_count
        last = count - 1
        final_len = header.message_size - last * _CS + _TAG
        while self._index < count and view.nbytes:
            need = (_SEALED if self._index < last else final_len) - len(self._partial)
            if self._partial or view.nbytes < need:
                take = min(need, view.nbytes)
                self._partial += view[:take]
                view = view[take:]
                if take == need:
                    self._chunks(self._index, 1, memoryview(self._partial))
                    self._index += 1
                    self._partial.clear()
                continue
            # As many whole chunks as `view` holds, straight from the caller's buffer.
            run = min(view.nbytes // _SEALED, last - self._index)
            if run == 0:  # only the final chunk is left and `view` holds all of it
                run, run_bytes = 1, final_len
            else:
                run_bytes = run * _SEALED
            self._chunks(self._index, run, view[:run_bytes])
            self._index += run
            view = view[run_bytes:]
        self._footer += view

    def _finish_common(self) -> None:
        header = self._header
        if header is None or self._seen < header.artifact_size:
            raise self._fail(
                InvalidArtifact(
                    "artifact is shorter than its header implies", reason=Reason.TRUNCATED
                )
            )
        if self._cipher is None:
            raise FailedPrecondition(
                "the data key was never supplied", reason=Reason.DATA_KEY_REQUIRED
            )

    def _check_footer(self) -> None:
        if len(self._digest) != DIGEST_SIZE or not hmac.compare_digest(self._digest, self._footer):
            _log.debug("artifact stream: footer does not match the encrypted digest")
            raise DecryptionFailed()

    def _open_run(self, first: int, count: int, ciphertext: memoryview, dst: memoryview) -> None:
        """Opens chunks ``first .. first+count-1`` (the final one possibly among them) into ``dst``."""
        header = self._header
        assert header is not None and self._cipher is not None
        last = header.chunk_count - 1
        full = count - 1 if first + count - 1 == last else count
        if full:
            self._cipher.open_full_chunks_into(
                first, full, ciphertext[: full * _SEALED], dst[: full * _CS]
            )
        if full < count:
            self._cipher.open_into(last, True, ciphertext[full * _SEALED :], dst[full * _CS :])

    def _split(self, first: int, plain: memoryview) -> memoryview:
        """Moves the digest bytes of a decrypted run into ``_digest``; returns its plaintext part."""
        header = self._header
        assert header is not None
        start = first * _CS
        keep = max(0, min(plain.nbytes, header.plaintext_size - start))
        self._digest += plain[keep:]
        return plain[:keep]

    # -- subclass hooks -----------------------------------------------------------------------

    def _on_header(self, header: ArtifactHeader) -> None:
        del header

    def _on_cipher(self, cipher: c2sp.ChunkCipher, dek: bytearray) -> None:
        del cipher, dek

    def _chunks(self, first: int, count: int, ciphertext: memoryview) -> None:
        raise NotImplementedError

    def _on_fail(self) -> None:
        pass


class StreamDecryptor(_ArtifactStream):
    """Releases authenticated plaintext chunk by chunk as the artifact arrives.

    ``feed(data)`` returns the plaintext of every chunk completed and authenticated by ``data``
    (possibly empty) and never any byte of a chunk that failed; ``finish()`` must then be called:
    it raises unless the artifact was complete, its footer matches the authenticated digest and,
    with ``verify_digest``, the SHA-256 of all released plaintext matches it too.
    """

    def __init__(
        self,
        dek: bytearray | memoryview | None = None,
        *,
        verify_digest: bool = False,
        max_artifact_size: int | None = None,
    ) -> None:
        self._hash = hashlib.sha256() if verify_digest else None
        self._released: list[bytes] = []
        super().__init__(dek, verify_digest=verify_digest, max_artifact_size=max_artifact_size)

    def __repr__(self) -> str:
        return f"StreamDecryptor({self._header!r}, chunks={self._index})"

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        """Accepts the next artifact bytes; returns newly authenticated plaintext."""
        self._feed(data)
        return self._take_released()

    def set_dek(self, dek: bytearray | memoryview) -> bytes:
        """Supplies the data key; returns the plaintext of body bytes already received."""
        self._set_dek(dek)
        return self._take_released()

    def _take_released(self) -> bytes:
        out = b"".join(self._released)
        self._released = []
        return out

    def _on_cipher(self, cipher: c2sp.ChunkCipher, dek: bytearray) -> None:
        self._open_bulk(dek)

    def _chunks(self, first: int, count: int, ciphertext: memoryview) -> None:
        header = self._header
        assert header is not None and self._cipher is not None and self._bulk is not None
        msg_end = min((first + count) * _CS, header.message_size)
        n_full = max(0, min(first + count, self._plaintext_chunks()) - first)
        # Decrypted straight into the bytes object handed out (no zero-fill, no copy), unless the
        # run ends in the digest bytes, which are cut off with one copy.
        out, dst = output_bytes(msg_end - first * _CS)
        try:
            try:
                if n_full:
                    self._bulk.open_into(first, ciphertext[: n_full * _SEALED], dst[: n_full * _CS])
                if n_full < count:
                    self._open_run(
                        first + n_full,
                        count - n_full,
                        ciphertext[n_full * _SEALED :],
                        dst[n_full * _CS :],
                    )
            except DecryptionFailed:
                wipe(dst)
                raise
            plain = self._split(first, dst)
            if self._hash is not None:
                self._hash.update(plain)
            self._released.append(out if plain.nbytes == dst.nbytes else bytes(plain))
            plain.release()
        finally:
            dst.release()

    def _on_fail(self) -> None:
        # Chunks that authenticated in the failing feed before its failure are never handed out.
        self._released = []

    def finish(self) -> None:
        """Confirms the whole artifact: complete, footer authentic, digest (if asked) correct."""
        self._check_usable()
        try:
            self._finish_common()
            self._check_footer()
            if self._hash is not None and not hmac.compare_digest(
                self._hash.digest(), self._digest
            ):
                _log.debug("artifact stream: plaintext digest mismatch")
                raise DecryptionFailed()
        except (InvalidArtifact, DecryptionFailed, FailedPrecondition) as exc:
            raise self._fail(exc) from None
        self._drop_keys()
        self._finished = True


class BufferedStreamDecryptor(_ArtifactStream):
    """Decrypts an arriving artifact into one preallocated buffer as it arrives, released at the end.

    ``feed(data)`` hands complete batches of chunks to ``threads`` worker threads, so decryption
    overlaps the download; at most ``2 * threads`` batches of ``batch_chunks`` chunks are in
    flight, and ``feed`` waits when that many are. With ``threads=0`` the feeding thread decrypts
    each batch itself as it arrives (:data:`DEFAULT_DECRYPT_THREADS`). That is the faster choice
    with ``cryptography``'s AEAD, which holds the interpreter lock while it works (measured: a
    decryption beside a busy Python thread runs 80 times slower): workers cannot decrypt in
    parallel, and handing each batch over costs thread wake-ups. A 512 MB download over mTLS,
    decrypted as it arrived, took 1.07-1.10 s with none against 1.21-1.22 s with two workers
    (alternated, best of four each). ``finish()``
    returns the plaintext buffer only if every chunk authenticated; otherwise the buffer is zeroed
    and DecryptionFailed (or InvalidArtifact for a malformed stream) is raised.

    With ``prefault``, the output is allocated as soon as the header arrives (bounded by
    ``max_artifact_size`` when given) and a :class:`~strongroom.artifact._memory.Prefaulter`
    faults its pages in on a thread — with transparent huge pages — while the data key is still
    being obtained, never further than :data:`PREFAULT_AHEAD` past the bytes received. Without it
    the output is allocated only once the key's commitment has authenticated the header, and the
    decrypting threads fault its pages in as they write. ``max_held_without_key`` bounds the body
    bytes held before :meth:`set_dek` (``held_without_key`` tells how many are).
    """

    def __init__(
        self,
        dek: bytearray | memoryview | None = None,
        *,
        threads: int = DEFAULT_DECRYPT_THREADS,
        batch_chunks: int = 64,
        verify_digest: bool = False,
        max_artifact_size: int | None = None,
        as_bytes: bool = False,
        prefault: bool = False,
        max_held_without_key: int = MAX_BUFFERED_WITHOUT_KEY,
    ) -> None:
        if not 0 <= threads <= 64:
            raise ValueError("threads must be between 0 and 64")
        if batch_chunks < 1:
            raise ValueError("batch_chunks must be positive")
        self._threads = threads
        self._batch_chunks = batch_chunks
        self._out: bytearray | bytes | None = None
        self._dst: memoryview | None = None
        # as_bytes: the plaintext is built in a bytes object (no copy for bytes-only consumers);
        # after finish() the decryptor keeps it and a writable view until wipe_output().
        self._as_bytes = as_bytes
        self._kept: tuple[bytes, memoryview] | None = None
        self._batch = bytearray()
        self._batch_first = 0
        self._pool: ThreadPoolExecutor | None = None
        self._ciphers: queue.SimpleQueue[c2sp.ChunkCipher] = queue.SimpleQueue()
        self._slots = threading.Semaphore(2 * max(threads, 1))
        self._futures: list[Future[None]] = []
        self._worker_failed = threading.Event()
        self._prefault = prefault
        self._prefaulter: Prefaulter | None = None
        self._handed = 0  # chunks below this index may have been written to the output
        super().__init__(
            dek,
            verify_digest=verify_digest,
            max_artifact_size=max_artifact_size,
            max_held_without_key=max_held_without_key,
        )

    def __repr__(self) -> str:
        return f"BufferedStreamDecryptor({self._header!r}, chunks={self._index})"

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Accepts the next artifact bytes (decryption proceeds in the background)."""
        if self._worker_failed.is_set() and self._error is None:
            self._drain()
            raise self._fail(DecryptionFailed())
        self._feed(data)
        if self._prefaulter is not None:
            self._prefaulter.allow(self._seen + PREFAULT_AHEAD)

    def set_dek(self, dek: bytearray | memoryview) -> None:
        """Supplies the data key (copied, and wiped once the body cipher is derived)."""
        self._set_dek(dek)

    def _allocate(self, size: int) -> None:
        # Uninitialised: every byte is written by a chunk, or the whole buffer is wiped on failure.
        try:
            if self._as_bytes:
                self._out, self._dst = output_bytes(size)
            else:
                self._out = output_buffer(size)
                self._dst = memoryview(self._out)
        except MemoryError:
            raise ArtifactTooLarge(f"no memory for a plaintext of {size} bytes") from None

    def _on_header(self, header: ArtifactHeader) -> None:
        if not self._prefault:
            return
        # Allocated before the header is authenticated: the mapping is only reserved here, and the
        # prefaulter commits memory no faster than the artifact's bytes actually arrive.
        self._allocate(header.plaintext_size)
        assert self._dst is not None
        self._prefaulter = Prefaulter(self._dst)
        self._prefaulter.allow(self._seen + PREFAULT_AHEAD)

    def _stop_prefault(self) -> None:
        if self._prefaulter is not None:
            self._prefaulter.stop()
            self._prefaulter = None

    def _on_cipher(self, cipher: c2sp.ChunkCipher, dek: bytearray) -> None:
        header = self._header
        assert header is not None
        if self._dst is None:
            # Sized only now, once the commitment has authenticated the header's plaintext_size:
            # an unauthenticated header cannot make us allocate.
            self._allocate(header.plaintext_size)
        if not self._threads:
            # Decrypted inline, the runs by the bulk opener, the final chunks by `cipher`.
            self._open_bulk(dek)
            return
        # One AEAD object per worker; `cipher` stays with the feeding thread (the tail chunks).
        del cipher
        preamble = bytes(self._preamble)
        for _ in range(self._threads):
            self._ciphers.put(
                c2sp.open_message(dek, preamble, header.encoded, suite=c2sp.AES_256_GCM)
            )
        self._pool = ThreadPoolExecutor(
            max_workers=self._threads, thread_name_prefix="artifact-stream-decrypt"
        )

    def _chunks(self, first: int, count: int, ciphertext: memoryview) -> None:
        header = self._header
        assert header is not None and self._cipher is not None
        self._handed = max(self._handed, first + count)
        # Chunks holding only plaintext go to the workers (or the bulk opener).
        n_full = max(0, min(first + count, self._plaintext_chunks()) - first)
        if n_full:
            run = ciphertext[: n_full * _SEALED]
            if isinstance(run.obj, bytes) and n_full >= _DIRECT_MIN_CHUNKS:
                # Immutable caller bytes (a received message): the worker reads them in place
                # instead of a copy; the pending batch goes first so that it stays contiguous.
                self._submit()
                self._submit_run(first, run)
            else:
                if not self._batch:
                    self._batch_first = first
                self._batch += run
                if len(self._batch) >= self._batch_chunks * _SEALED:
                    self._submit()
        if n_full < count:
            self._submit()
            self._tail(first + n_full, count - n_full, ciphertext[n_full * _SEALED :])

    def _submit(self) -> None:
        if not self._batch:
            return
        batch, first = self._batch, self._batch_first
        self._batch = bytearray()
        self._submit_run(first, batch)

    def _submit_run(self, first: int, ciphertext: bytearray | memoryview) -> None:
        if self._worker_failed.is_set():
            raise DecryptionFailed()
        if self._pool is None:  # threads=0
            dst, run = self._dst, memoryview(ciphertext)
            assert dst is not None and self._bulk is not None
            count = run.nbytes // _SEALED
            self._bulk.open_into(first, run, dst[first * _CS : (first + count) * _CS])
            return
        self._slots.acquire()
        future = self._pool.submit(self._work, first, ciphertext)
        future.add_done_callback(lambda _f: self._slots.release())
        self._futures = [f for f in self._futures if not f.done()]
        self._futures.append(future)

    def _work(self, first: int, batch: bytearray | memoryview) -> None:
        dst = self._dst
        assert dst is not None
        cipher = self._ciphers.get()
        try:
            if self._worker_failed.is_set():
                return
            count = memoryview(batch).nbytes // _SEALED
            cipher.open_full_chunks_into(
                first, count, memoryview(batch), dst[first * _CS : (first + count) * _CS]
            )
        except BaseException:
            self._worker_failed.set()
            raise
        finally:
            self._ciphers.put(cipher)

    def _tail(self, first: int, count: int, ciphertext: memoryview) -> None:
        """Chunks holding the digest (and the final chunk): decrypted inline, in order."""
        header = self._header
        assert header is not None and self._cipher is not None and self._dst is not None
        msg_end = min((first + count) * _CS, header.message_size)
        scratch = bytearray(msg_end - first * _CS)
        try:
            with memoryview(scratch) as view:
                self._open_run(first, count, ciphertext, view)
                plain = self._split(first, view)
                start = first * _CS
                self._dst[start : start + plain.nbytes] = plain
        finally:
            wipe(scratch)  # the model's last bytes, authenticated: nowhere but the output

    def _drain(self) -> None:
        for future in self._futures:
            future.exception()
        self._futures = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _drop_keys(self) -> None:
        super()._drop_keys()
        # The workers' AEAD objects too; called only once the workers are done (after _drain).
        while True:
            try:
                self._ciphers.get_nowait()
            except queue.Empty:
                break

    def _on_fail(self) -> None:
        self._worker_failed.set()
        self._drain()
        self._stop_prefault()
        wipe(self._batch)
        if self._dst is not None:
            # Plaintext can only be in the chunks handed out so far; the rest of the buffer was
            # never written (wiping it would fault in memory a lying header merely claimed).
            wipe(self._dst[: min(self._dst.nbytes, self._handed * _CS)])
            self._dst.release()
            self._dst = None
        self._out = None

    def finish(self) -> bytearray | bytes:
        """Waits for the workers; returns the whole plaintext only if everything authenticated.

        With ``as_bytes`` it is a ``bytes`` object; call :meth:`wipe_output` once it is consumed.
        """
        self._check_usable()
        try:
            self._finish_common()
            self._submit()
            self._drain()
            self._stop_prefault()
            if self._worker_failed.is_set():
                raise DecryptionFailed()
            self._check_footer()
            out = self._out
            assert out is not None and self._dst is not None
            if self._verify_digest and not hmac.compare_digest(
                hashlib.sha256(out).digest(), self._digest
            ):
                _log.debug("artifact stream: plaintext digest mismatch")
                raise DecryptionFailed()
        except (InvalidArtifact, DecryptionFailed, FailedPrecondition) as exc:
            raise self._fail(exc) from None
        if self._as_bytes:
            assert isinstance(out, bytes)
            self._kept = (out, self._dst)
        else:
            self._dst.release()
        self._dst = None
        self._out = None
        self._drop_keys()
        self._finished = True
        return out

    def wipe_output(self) -> None:
        """Zeroes the plaintext returned by :meth:`finish` (``as_bytes`` mode): its whole pages are
        dropped (they read as zeros), the partial ones at its ends overwritten (``discard``)."""
        if self._kept is not None:
            _obj, view = self._kept
            discard(view)  # its own output_bytes buffer, about to be freed
            view.release()
            self._kept = None

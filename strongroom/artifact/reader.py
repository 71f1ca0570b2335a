"""Random-access and whole-artifact decryption of a complete artifact (bytes or a seekable file).

The header is parsed, and the total length checked against it, when the reader is built: no key is
needed for that. Every keyed operation then

1. derives the body cipher from the data key, the salt and the exact header bytes and checks the
   C2SP commitment (wrong key or a body moved under another header fails here, before any chunk);
2. authenticates the tail once per reader: the chunk(s) holding the encrypted digest, including the
   short final chunk at the index the header implies, and compares the digest with the footer.

Because ``plaintext_size`` is in the header, and the header is bound by the commitment, a reader
knows the one valid body length before decrypting anything: truncation or extension is a length
mismatch (rejected at construction) and a final chunk at the wrong index or of the wrong length
cannot authenticate. A range read therefore only needs the chunks it covers.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from strongroom.artifact import c2sp
from strongroom.artifact._memory import output_buffer, wipe
from strongroom.artifact.errors import DecryptionFailed, InvalidArtifact
from strongroom.artifact.format import (
    FOOTER_SIZE,
    ArtifactHeader,
    ArtifactSummary,
    parse_header,
    read_header,
)
from strongroom.errors import InvalidArgument
from strongroom.reasons import Reason

__all__ = ["MAX_THREADS", "ArtifactReader"]

_log = logging.getLogger(__name__)

_CS = c2sp.CHUNK_SIZE
_SEALED = c2sp.SEALED_CHUNK_SIZE
_TAG = c2sp.TAG_SIZE
_BATCH = 64
"""Chunks read and decrypted per step of a worker (1 MiB)."""
MAX_THREADS = 64


class ArtifactReader:
    """Keyed access to a complete artifact held in memory or in a seekable binary file.

    ``header`` and ``summary`` need no key. ``read_range`` and ``decrypt_all`` take the data key
    (a ``bytearray``; it is not retained) and release only authenticated plaintext.
    """

    def __init__(self, source: bytes | bytearray | memoryview | BinaryIO) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._file: BinaryIO | None = None
        self._mem: memoryview | None = None
        if isinstance(source, bytes | bytearray | memoryview):
            self._mem = memoryview(source).cast("B")
            header = parse_header(self._mem)
            size = self._mem.nbytes
        else:
            self._file = source
            # Positional reads straight from the descriptor, only for plain files: a wrapper
            # (gzip, a decoding stream) can have a fileno() whose bytes are not the stream's.
            raw = source if isinstance(source, io.FileIO) else getattr(source, "raw", None)
            if isinstance(raw, io.FileIO) and hasattr(os, "preadv"):
                self._fd = raw.fileno()
            source.seek(0)
            header = read_header(source)
            size = source.seek(0, os.SEEK_END)
        if size < header.artifact_size:
            raise InvalidArtifact(
                "artifact is shorter than its header implies", reason=Reason.TRUNCATED
            )
        if size > header.artifact_size:
            raise InvalidArtifact(
                "artifact is longer than its header implies", reason=Reason.TRAILING_DATA
            )
        self.header: ArtifactHeader = header
        self._footer = bytes(self._read(header.footer_offset, FOOTER_SIZE))
        self.summary: ArtifactSummary = ArtifactSummary.of(header, self._footer)
        self._tail_ok = False

    def __repr__(self) -> str:
        return f"ArtifactReader({self.header!r})"

    # -- raw access ---------------------------------------------------------------------------

    def _read(self, offset: int, size: int) -> memoryview | bytes | bytearray:
        if self._mem is not None:
            return self._mem[offset : offset + size]
        buf = bytearray(size)
        self._read_into(offset, memoryview(buf))
        return buf

    def _read_into(self, offset: int, dst: memoryview) -> None:
        size = dst.nbytes
        if self._mem is not None:
            dst[:] = self._mem[offset : offset + size]
            return
        got = 0
        if self._fd is not None:
            while got < size:
                n = os.preadv(self._fd, [dst[got:]], offset + got)
                if n <= 0:
                    break
                got += n
        else:
            assert self._file is not None
            with self._lock:
                self._file.seek(offset)
                while got < size:
                    n = self._file.readinto(dst[got:])  # type: ignore[attr-defined]
                    if not n:
                        break
                    got += n
        if got != size:
            # The file changed under us since the length was checked.
            raise InvalidArtifact(
                "artifact is shorter than its header implies", reason=Reason.TRUNCATED
            )

    def _chunk_span(self, first: int, last: int) -> tuple[int, int, int]:
        """Ciphertext offset, ciphertext length and message length of chunks first..last."""
        msg_len = self.header.message_size
        start = first * _CS
        end = min((last + 1) * _CS, msg_len)
        offset = self.header.header_size + c2sp.PREAMBLE_SIZE + first * _SEALED
        return offset, end - start + (last - first + 1) * _TAG, end - start

    def _open_run(
        self,
        cipher: c2sp.ChunkCipher,
        first: int,
        count: int,
        ciphertext: memoryview | bytes | bytearray,
        out: memoryview,
    ) -> None:
        """Decrypts ``count`` consecutive chunks from ``first`` out of ``ciphertext`` into ``out``."""
        last_index = self.header.chunk_count - 1
        msg_len = self.header.message_size
        src = memoryview(ciphertext)
        pos_in = 0
        pos_out = 0
        for index in range(first, first + count):
            size = min(_CS, msg_len - index * _CS)
            cipher.open_into(
                index,
                index == last_index,
                src[pos_in : pos_in + size + _TAG],
                out[pos_out : pos_out + size],
            )
            pos_in += size + _TAG
            pos_out += size

    # -- keyed operations ---------------------------------------------------------------------

    def _cipher(self, dek: bytearray | memoryview) -> c2sp.ChunkCipher:
        preamble = self._read(self.header.header_size, c2sp.PREAMBLE_SIZE)
        return c2sp.open_message(dek, preamble, self.header.encoded, suite=c2sp.AES_256_GCM)

    def _open_tail(self, cipher: c2sp.ChunkCipher) -> bytearray:
        """Authenticates the chunks holding the digest (the final one included); returns their text.

        The returned buffer holds message bytes from chunk ``plaintext_size // 16384`` to the end;
        its last 32 bytes are the encrypted digest, which must equal the footer.
        """
        header = self.header
        first = header.plaintext_size // _CS
        last = header.chunk_count - 1
        offset, ct_len, msg_len = self._chunk_span(first, last)
        ciphertext = self._read(offset, ct_len)
        tail = bytearray(msg_len)
        self._open_run(cipher, first, last - first + 1, ciphertext, memoryview(tail))
        if not hmac.compare_digest(tail[-FOOTER_SIZE:], self._footer):
            wipe(tail)
            _log.debug("artifact: footer does not match the encrypted digest")
            raise DecryptionFailed()
        self._tail_ok = True
        return tail

    def verify_tail(self, dek: bytearray | memoryview) -> None:
        """Checks the key (commitment), the final chunk and the footer without reading the rest."""
        self._open_tail(self._cipher(dek))

    def read_range(self, dek: bytearray | memoryview, offset: int, length: int) -> bytes:
        """Decrypts plaintext bytes ``[offset, offset + length)``, reading only the chunks needed.

        Raises InvalidArgument(RANGE_OUT_OF_BOUNDS) outside ``[0, plaintext_size]`` and
        DecryptionFailed if the key, the header binding, the tail or any covered chunk fails.
        """
        size = self.header.plaintext_size
        if offset < 0 or length < 0 or offset + length > size:
            raise InvalidArgument(
                f"range [{offset}, {offset + length}) is outside the plaintext of {size} bytes",
                reason=Reason.RANGE_OUT_OF_BOUNDS,
            )
        cipher = self._cipher(dek)
        if not self._tail_ok:
            wipe(self._open_tail(cipher))
        if length == 0:
            return b""
        first = offset // _CS
        last = (offset + length - 1) // _CS
        ct_offset, ct_len, msg_len = self._chunk_span(first, last)
        scratch = bytearray(msg_len)
        self._open_run(
            cipher, first, last - first + 1, self._read(ct_offset, ct_len), memoryview(scratch)
        )
        start = offset - first * _CS
        return bytes(scratch[start : start + length])

    def decrypt_all(
        self, dek: bytearray | memoryview, *, threads: int = 2, verify_digest: bool = False
    ) -> bytearray:
        """Decrypts the whole plaintext into one new buffer, in ``threads`` threads.

        Returns the buffer only if every chunk authenticated (and, with ``verify_digest``, if the
        SHA-256 of the plaintext equals the authenticated digest). On any failure the buffer is
        zeroed, nothing is returned and DecryptionFailed is raised. The buffer is allocated only
        after the commitment has authenticated the header's ``plaintext_size``.

        ``verify_digest`` recomputes SHA-256 over the plaintext (about 2 GB/s, single-threaded):
        the AEAD already authenticates every byte, so this only matters when the digest itself is
        relied on, e.g. to check a signature bundle against the plaintext.
        """
        ciphers, tail = self._prepare(dek, threads)
        out = output_buffer(self.header.plaintext_size)  # fully written below, or wiped
        self._decrypt(ciphers, tail, memoryview(out), verify_digest)
        return out

    def decrypt_into(
        self,
        dek: bytearray | memoryview,
        out: bytearray | memoryview,
        *,
        threads: int = 2,
        verify_digest: bool = False,
    ) -> None:
        """Like :meth:`decrypt_all`, into a caller's writable buffer of exactly ``plaintext_size``.

        For callers that reuse (or pre-fault, or map with huge pages) their buffer. On any failure
        every byte of ``out`` is zeroed before DecryptionFailed is raised.
        """
        dst = memoryview(out).cast("B")
        if dst.readonly or dst.nbytes != self.header.plaintext_size:
            raise InvalidArgument(
                f"the output buffer must be {self.header.plaintext_size} writable bytes",
                reason=Reason.INVALID_OUTPUT_BUFFER,
            )
        ciphers, tail = self._prepare(dek, threads)
        self._decrypt(ciphers, tail, dst, verify_digest)

    def _prepare(
        self, dek: bytearray | memoryview, threads: int
    ) -> tuple[list[c2sp.ChunkCipher], bytearray]:
        """One cipher per thread (commitment checked) and the authenticated tail."""
        if not 1 <= threads <= MAX_THREADS:
            raise ValueError(f"threads must be between 1 and {MAX_THREADS}")
        header = self.header
        preamble = self._read(header.header_size, c2sp.PREAMBLE_SIZE)
        ciphers = [
            c2sp.open_message(dek, preamble, header.encoded, suite=c2sp.AES_256_GCM)
            for _ in range(threads)
        ]
        return ciphers, self._open_tail(ciphers[0])

    def _decrypt(
        self,
        ciphers: list[c2sp.ChunkCipher],
        tail: bytearray,
        dst: memoryview,
        verify_digest: bool,
    ) -> None:
        size = self.header.plaintext_size
        full = size // _CS  # chunks made only of plaintext; the rest is in `tail`
        try:
            dst[full * _CS :] = memoryview(tail)[: size - full * _CS]
            if full:
                self._decrypt_full_chunks(ciphers, full, dst)
            if verify_digest and not hmac.compare_digest(
                hashlib.sha256(dst).digest(), tail[-FOOTER_SIZE:]
            ):
                _log.debug("artifact: plaintext digest does not match")
                raise DecryptionFailed()
        except BaseException:
            wipe(dst)
            raise
        finally:
            wipe(tail)

    def _decrypt_full_chunks(
        self, ciphers: list[c2sp.ChunkCipher], full: int, dst: memoryview
    ) -> None:
        threads = min(len(ciphers), max(1, full // _BATCH))
        failed = threading.Event()
        bounds = [full * t // threads for t in range(threads + 1)]

        def work(t: int) -> None:
            cipher = ciphers[t]
            first, stop = bounds[t], bounds[t + 1]
            scratch = None if self._mem is not None else memoryview(bytearray(_BATCH * _SEALED))
            try:
                for start in range(first, stop, _BATCH):
                    if failed.is_set():
                        return
                    count = min(_BATCH, stop - start)
                    offset = self.header.header_size + c2sp.PREAMBLE_SIZE + start * _SEALED
                    if scratch is None:
                        src: memoryview = self._mem[offset : offset + count * _SEALED]  # type: ignore[index]
                    else:
                        src = scratch[: count * _SEALED]
                        self._read_into(offset, src)
                    cipher.open_full_chunks_into(
                        start, count, src, dst[start * _CS : (start + count) * _CS]
                    )
            except BaseException:
                failed.set()
                raise

        if threads == 1:
            work(0)
            return
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="artifact-decrypt") as pool:
            futures = [pool.submit(work, t) for t in range(threads)]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            first_error = errors[0]
            assert first_error is not None
            raise first_error

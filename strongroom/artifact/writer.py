"""Encrypting a model into an artifact in one pass over its bytes, with bounded memory.

The header (with the plaintext size, known up front) is written first and is the C2SP context of
the body. The plaintext's SHA-256 can only be known at the end of the pass, so it travels at the end:
it is appended to the encrypted message (authenticated under the data key) and repeated in clear in
the 32-byte footer for keyless readers. See ARTIFACT_FORMAT.md, "Why the digest is at the end".
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import BinaryIO

from strongroom.artifact import c2sp
from strongroom.artifact._memory import wipe
from strongroom.artifact.format import (
    DEK_SIZE,
    FORMAT_VERSION,
    ArtifactHeader,
    WrapMechanism,
    build_header,
)
from strongroom.errors import InvalidArgument
from strongroom.reasons import Reason

__all__ = ["DEFAULT_BLOCK_SIZE", "ArtifactWriter", "encrypt_bytes", "encrypt_stream"]

DEFAULT_BLOCK_SIZE = 64 * c2sp.CHUNK_SIZE
"""Plaintext read per step of :func:`encrypt_stream` (1 MiB): 64 chunks."""

_CS = c2sp.CHUNK_SIZE
_SEALED = c2sp.SEALED_CHUNK_SIZE

Piece = bytes | bytearray | memoryview
"""What an iterable source may yield; a mutable piece may be reused by the source once resumed."""


def _check_dek(dek: bytearray | memoryview | bytes) -> None:
    if len(dek) != DEK_SIZE:
        raise InvalidArgument(
            f"the data key must be {DEK_SIZE} bytes", reason=Reason.INVALID_DEK_SIZE
        )


def _size_mismatch(declared: int) -> InvalidArgument:
    return InvalidArgument(
        f"the plaintext is not the declared {declared} bytes", reason=Reason.PLAINTEXT_SIZE_MISMATCH
    )


class ArtifactWriter:
    """Push-based artifact encryption for one header.

    ``start()`` returns the prefix, header and C2SP preamble; ``write(data)`` returns the chunks
    completed by ``data`` (any piece size); ``finish()`` seals the tail (the last plaintext bytes and
    the digest) and returns it with the footer. The writer keeps at most one partial chunk; it does
    not keep the data key (only the derived AEAD key, inside OpenSSL), so the caller may wipe the key
    as soon as the writer exists. Feeding more or fewer bytes than ``header.plaintext_size`` raises
    InvalidArgument(PLAINTEXT_SIZE_MISMATCH) and leaves the writer unusable, so a partial artifact
    never ends with a valid final chunk.
    """

    def __init__(
        self, header: ArtifactHeader, dek: bytearray | memoryview, *, salt: bytes | None = None
    ) -> None:
        _check_dek(dek)
        self.header = header
        self._cipher, preamble = c2sp.seal_message(
            dek, header.encoded, suite=c2sp.AES_256_GCM, salt=salt
        )
        self._start = header.head + preamble
        self._carry = bytearray()
        self._out = bytearray()
        self._hash = hashlib.sha256()
        self._consumed = 0
        self._index = 0
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return f"ArtifactWriter({self.header!r}, consumed={self._consumed})"

    def start(self) -> bytes:
        """The bytes before the first chunk: prefix, header, key slot (format 2), salt, commitment."""
        self._check_open()
        if self._started:
            raise ValueError("start() was already called")
        self._started = True
        return self._start

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the writer is finished or failed")

    def _fail(self, exc: Exception) -> Exception:
        self._closed = True
        wipe(self._carry)
        return exc

    def _account(self, size: int) -> None:
        if not self._started:
            raise ValueError("start() must be called before write()")
        if self._consumed + size > self.header.plaintext_size:
            raise self._fail(_size_mismatch(self.header.plaintext_size))
        self._consumed += size

    def write(self, data: bytes | bytearray | memoryview) -> bytes:
        """Hashes and encrypts the next plaintext bytes; returns the ciphertext completed so far."""
        self._check_open()
        view = memoryview(data).cast("B")
        self._account(view.nbytes)
        self._hash.update(view)
        return self._seal_stream(view)

    def _seal_stream(self, view: memoryview) -> bytes:
        """Encrypts every chunk completed by ``view`` (already accounted and hashed)."""
        full = (len(self._carry) + view.nbytes) // _CS
        if full == 0:
            self._carry += view
            return b""
        if len(self._out) < full * _SEALED:
            self._out = bytearray(full * _SEALED)
        out = memoryview(self._out)
        pos = 0
        begin = 0
        if self._carry:
            pos = _CS - len(self._carry)
            self._carry += view[:pos]
            self._cipher.seal_into(self._index, False, self._carry, out[:_SEALED])
            self._carry.clear()
            begin = 1
        rest = full - begin
        if rest:
            self._cipher.seal_full_chunks_into(
                self._index + begin,
                rest,
                view[pos : pos + rest * _CS],
                out[begin * _SEALED : full * _SEALED],
            )
            pos += rest * _CS
        self._index += full
        self._carry += view[pos:]
        result = bytes(out[: full * _SEALED])
        out.release()
        return result

    def finish(self) -> bytes:
        """Seals the last chunks (plaintext tail and digest) and returns them with the footer."""
        self._check_open()
        if not self._started:
            raise ValueError("start() must be called before finish()")
        if self._consumed != self.header.plaintext_size:
            raise self._fail(_size_mismatch(self.header.plaintext_size))
        digest = self._hash.digest()
        tail = self._carry + digest
        parts = []
        if len(tail) >= _CS:
            parts.append(self._cipher.seal(self._index, False, tail[:_CS]))
            self._index += 1
            del tail[:_CS]
        parts.append(self._cipher.seal(self._index, True, tail))
        if self._index + 1 != self.header.chunk_count:  # pragma: no cover - internal invariant
            raise AssertionError("artifact writer produced the wrong number of chunks")
        parts.append(digest)
        wipe(tail)
        wipe(self._carry)
        self._closed = True
        return b"".join(parts)

    def stream(
        self, source: BinaryIO | Iterable[Piece], *, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> Iterator[bytes]:
        """Yields the whole artifact, reading ``source`` once; SHA-256 runs in a second thread.

        A binary file is read with ``readinto`` into two reused buffers of ``block_size`` bytes
        (rounded up to whole chunks); an iterable's pieces are used as they come (a mutable piece
        is hashed before the source is resumed, so the source may reuse its buffer). Memory stays
        at a few blocks whatever the size.
        """
        if block_size < 1:
            raise ValueError("block_size must be positive")
        block_size = -(-block_size // _CS) * _CS
        yield self.start()
        hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="artifact-sha256")
        pending: list[Future[None]] = []
        buffers: list[bytearray] = []
        try:
            readinto = getattr(source, "readinto", None)
            if readinto is not None:
                buffers = [bytearray(block_size), bytearray(block_size)]
                k = 0
                while True:
                    buf = buffers[k % 2]
                    if len(pending) >= 2:
                        # The hash of the block that last used this buffer must be done first.
                        pending.pop(0).result()
                    n = _read_full(readinto, buf)
                    if n == 0:
                        break
                    view = memoryview(buf)[:n]
                    self._account(n)
                    pending.append(hasher.submit(self._hash.update, view))
                    yield self._seal_stream(view)
                    k += 1
            else:
                for piece in source:
                    view = memoryview(piece).cast("B")
                    if len(pending) >= 2:
                        pending.pop(0).result()
                    self._account(view.nbytes)
                    hashed = hasher.submit(self._hash.update, view)
                    pending.append(hashed)
                    yield self._seal_stream(view)
                    if not isinstance(view.obj, bytes):
                        # A mutable piece may be reused or changed by the source once it is
                        # resumed (one buffer read into again): its hash must be finished first,
                        # or the digest would take in bytes that were never encrypted.
                        hashed.result()
            for fut in pending:
                fut.result()
            pending.clear()
            yield self.finish()
        except BaseException:
            self._closed = True
            raise
        finally:
            for fut in pending:
                fut.cancel()
            hasher.shutdown(wait=True)
            for buf in buffers:
                wipe(buf)
            wipe(self._carry)


def _read_full(readinto: object, buf: bytearray) -> int:
    """Fills ``buf`` from a ``readinto`` method until full or EOF; returns the byte count."""
    view = memoryview(buf)
    total = 0
    while total < len(buf):
        n = readinto(view[total:])  # type: ignore[operator]
        if not n:
            break
        total += n
    view.release()
    return total


def _source_size(source: BinaryIO | Iterable[Piece]) -> int | None:
    """Bytes left in a regular file or seekable stream; None if it cannot be known up front."""
    fileno = getattr(source, "fileno", None)
    if fileno is not None:
        try:
            st = os.fstat(fileno())
        except (OSError, ValueError):
            st = None
        if st is not None and stat.S_ISREG(st.st_mode):
            return max(st.st_size - source.tell(), 0)  # type: ignore[union-attr]
    seekable = getattr(source, "seekable", None)
    if seekable is not None and seekable():
        here = source.tell()  # type: ignore[union-attr]
        end = source.seek(0, os.SEEK_END)  # type: ignore[union-attr]
        source.seek(here)  # type: ignore[union-attr]
        return max(int(end) - int(here), 0)
    return None


def encrypt_stream(
    source: BinaryIO | Iterable[Piece],
    dek: bytearray | memoryview,
    *,
    model_name: str,
    model_version: str,
    content_type: str,
    key_id: str,
    key_version: int,
    wrapped_dek: bytes,
    plaintext_size: int | None = None,
    wrap_mechanism: WrapMechanism = WrapMechanism.AES_KEY_WRAP_PAD,
    created_at: datetime | None = None,
    signature_bundle: bytes = b"",
    signature_bundle_media_type: str = "",
    block_size: int = DEFAULT_BLOCK_SIZE,
    format_version: int = FORMAT_VERSION,
) -> Iterator[bytes]:
    """Encrypts ``source`` into an artifact in one pass; returns an iterator over its bytes.

    ``format_version`` 3 (the default) writes a re-wrappable key slot and a body key bound to the
    model: ``dek`` is then the bound key (:func:`~strongroom.artifact.keybinding.bind_data_key`,
    what the key broker's GenerateDataKey returns). 2 and 1 write the older layouts, whose body key
    is the slot's key itself.

    The header is built and checked, and the data key consumed, before this function returns (so
    invalid fields fail here and the caller may wipe ``dek`` right away); the source is read only as
    the iterator is consumed. ``plaintext_size`` is taken from the file (``fstat``/``seek``) when
    ``source`` is a regular file or seekable stream and must be given otherwise; if the source
    turns out shorter or longer, iteration raises InvalidArgument(PLAINTEXT_SIZE_MISMATCH) before
    the final chunk, so no valid artifact is ever produced from an inconsistent source.
    """
    known = _source_size(source)
    if plaintext_size is None:
        if known is None:
            raise InvalidArgument(
                "plaintext_size is required for a source of unknown length",
                reason=Reason.PLAINTEXT_SIZE_REQUIRED,
            )
        plaintext_size = known
    elif known is not None and known != plaintext_size:
        raise _size_mismatch(plaintext_size)
    header = build_header(
        model_name=model_name,
        model_version=model_version,
        content_type=content_type,
        key_id=key_id,
        key_version=key_version,
        wrapped_dek=wrapped_dek,
        plaintext_size=plaintext_size,
        wrap_mechanism=wrap_mechanism,
        created_at=created_at,
        signature_bundle=signature_bundle,
        signature_bundle_media_type=signature_bundle_media_type,
        format_version=format_version,
    )
    return ArtifactWriter(header, dek).stream(source, block_size=block_size)


def encrypt_bytes(
    plaintext: bytes | bytearray | memoryview,
    dek: bytearray | memoryview,
    *,
    header: ArtifactHeader,
    salt: bytes | None = None,
) -> bytes:
    """Encrypts an in-memory plaintext under an already built header; returns the whole artifact."""
    writer = ArtifactWriter(header, dek, salt=salt)
    return b"".join((writer.start(), writer.write(plaintext), writer.finish()))

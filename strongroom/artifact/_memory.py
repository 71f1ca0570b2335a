"""Overwriting secret or unauthenticated bytes in place."""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable

_log = logging.getLogger(__name__)


def _bytearray_api() -> Callable[[None, int], bytearray] | None:
    try:
        fn = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except AttributeError:  # pragma: no cover - not CPython
        return None
    fn.restype = ctypes.py_object
    fn.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    return fn


_NEW_BYTEARRAY = _bytearray_api()


def _bytes_api() -> tuple[Callable[[None, int], bytes], Callable[[bytes], int]] | None:
    try:
        new = ctypes.pythonapi.PyBytes_FromStringAndSize
        address = ctypes.pythonapi.PyBytes_AsString
    except AttributeError:  # pragma: no cover - not CPython
        return None
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    address.restype = ctypes.c_void_p
    address.argtypes = [ctypes.py_object]
    return new, address


_BYTES_API = _bytes_api()

_PYBUF_WRITE = 0x200


def _memoryview_api() -> Callable[[int, int, int], memoryview] | None:
    try:
        fn = ctypes.pythonapi.PyMemoryView_FromMemory
    except AttributeError:  # pragma: no cover - not CPython
        return None
    fn.restype = ctypes.py_object
    fn.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
    return fn


# A view of raw memory without a ctypes array type: ``c_char * n`` makes a new type for each n not
# in use at that moment, and types live in reference cycles, freed only by the garbage collector
# (a full collection, for one that lived long enough) — ~1.7 KiB of native heap each, which made
# the key broker's memory creep between full collections (~170,000 releases apart).
_VIEW_OF_MEMORY = _memoryview_api()


def output_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new ``bytes`` object of ``size`` uninitialised bytes and a writable view of its storage.

    For consumers that accept only ``bytes`` (ONNX Runtime's Python API): the plaintext is written
    into the object once, instead of being decrypted into a bytearray and then copied into an
    immutable ``bytes`` that could never be wiped. Until the caller hands the object on, it is the
    only reference; the view lets the owner :func:`wipe` it afterwards. The object must stay alive
    while the view is used.
    """
    if size < 0:
        raise ValueError("size must not be negative")
    if _BYTES_API is None or _VIEW_OF_MEMORY is None:  # pragma: no cover - not CPython
        raise NotImplementedError("output_bytes needs CPython")
    new, address = _BYTES_API
    obj = new(None, size)
    if size == 0:
        return obj, memoryview(bytearray())
    return obj, _VIEW_OF_MEMORY(address(obj), size, _PYBUF_WRITE)


def output_buffer(size: int) -> bytearray:
    """A ``bytearray`` of ``size`` bytes whose contents are NOT initialised; the caller must overwrite
    every byte (or :func:`wipe` it) before anyone else sees it.

    ``bytearray(size)`` zero-fills, which for a multi-GiB model means faulting in every page once,
    single-threaded, before decryption even starts (≈ 3 GB/s here); left uninitialised, a fresh
    mapping is faulted in by the decrypting threads themselves, in parallel, as they write. Used only
    by the whole-artifact decryptors, which write every byte or wipe the buffer on any failure.
    """
    if size < 0:
        raise ValueError("size must not be negative")
    if _NEW_BYTEARRAY is None or size < (1 << 20):  # small: not worth it
        return bytearray(size)
    return _NEW_BYTEARRAY(None, size)


def wipe(buf: bytearray | memoryview) -> None:
    """Overwrites every byte of a writable buffer with zeros, in place and without allocating.

    Use it on a data key once it is no longer needed and on plaintext that must not outlive a failed
    authentication. Immutable ``bytes`` cannot be wiped, which is why this library takes keys as
    ``bytearray``. Python may still hold copies elsewhere (the caller's own, or the OpenSSL key
    schedule until its object is collected); wiping is hygiene, not a guarantee.
    """
    view = memoryview(buf)
    if view.readonly:
        raise TypeError("wipe() needs a writable buffer (bytearray or writable memoryview)")
    size = view.nbytes
    if size == 0:
        return
    if not view.c_contiguous:
        raise TypeError("wipe() needs a contiguous buffer")
    # ``view`` keeps the buffer exported (so not resizable) while memset writes to it.
    ctypes.memset(buffer_address(view), 0, size)


def wipe_bytes(obj: bytes) -> None:
    """Overwrites the contents of a ``bytes`` object with zeros, in place.

    Only for a secret that a library hands back as a new ``bytes`` object nothing else refers to
    (OpenSSL's RSA decryption through ``cryptography``, say): copied into a ``bytearray`` that is
    wiped later, the object itself would otherwise go back to the allocator with the secret in it.
    ``bytes`` are immutable to Python code, so one that may be shared must never be passed here;
    CPython's shared empty and one-byte objects are left as they are.
    """
    if type(obj) is not bytes:
        raise TypeError("wipe_bytes() needs a bytes object")
    if len(obj) < 2:
        return
    if _BYTES_API is None:  # pragma: no cover - not CPython
        raise NotImplementedError("wipe_bytes needs CPython")
    ctypes.memset(_BYTES_API[1](obj), 0, len(obj))


# -- pre-faulting a fresh output buffer ------------------------------------------------------------

_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_PAGE = 4096  # the base page size on x86-64 and most arm64 kernels; huge pages are multiples
_MIN_PREFAULT = 2 << 20


def _madvise_api() -> Callable[[int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


_MADVISE = _madvise_api()


_MADV_DONTNEED = 4  # Linux


def discard(view: memoryview) -> None:
    """Zeroes a buffer made by :func:`output_bytes` or :func:`output_buffer` that is about to be
    freed, without writing most of it.

    Those buffers are malloc's, that is private anonymous memory: after ``MADV_DONTNEED`` their
    whole pages read as zeros (the kernel drops them and maps zero pages on the next touch), so
    only the partial pages at either end are overwritten. For a 512 MiB model that is a few
    milliseconds instead of the ~50 ms of writing zeros over it, on the model load's critical path.
    Not for other buffers: a file-backed mapping would read back its file. Falls back to
    :func:`wipe` when ``madvise`` is unavailable or refuses.
    """
    size = view.nbytes
    start = buffer_address(view) if size else 0
    # Whole pages inside the buffer (the Prefaulter rounds the other way, to the pages around it).
    first = (start + _PAGE - 1) & ~(_PAGE - 1)
    last = (start + size) & ~(_PAGE - 1)
    if _MADVISE is None or last - first < _PAGE:
        wipe(view)
        return
    if _MADVISE(first, last - first, _MADV_DONTNEED) != 0:
        _log.warning("madvise(MADV_DONTNEED) failed (errno %d): wiping instead", ctypes.get_errno())
        wipe(view)
        return
    wipe(view[: first - start])
    wipe(view[last - start :])


def buffer_address(view: memoryview) -> int:
    """The address of a writable, contiguous buffer's first byte (the view must stay alive)."""
    if view.readonly or not view.c_contiguous:
        raise TypeError("buffer_address() needs a writable contiguous buffer")
    raw = ctypes.c_char.from_buffer(view.cast("B"))
    address = ctypes.addressof(raw)
    del raw  # drop the export at once, so the owner can release its view later
    return address


class Prefaulter:
    """Faults in the pages of a fresh output buffer on a thread, ahead of the threads that fill it.

    The first write to each 4 KiB page of fresh memory traps into the kernel, which zeroes it; on
    this 2-core machine that costs ≈ 0.35-0.4 s of CPU per 512 MiB, paid by whoever writes first —
    the decrypting threads, on the critical path of a model load. This thread instead populates the
    pages a slice at a time with ``MADV_POPULATE_WRITE`` (one system call per slice, no trap per
    page: ≈ 0.2-0.27 s of CPU per 512 MiB here) while the key release and the download are still
    under way. It changes only the mapping, never the contents, so the writers may overtake it: a
    page they reach first is faulted in the ordinary way. (It asks for no huge pages itself; in
    the inference service malloc already does, ``glibc.malloc.hugetlb=1``. An earlier landing
    blamed slow huge-page faults here on synchronous compaction; the cause was this VM's free page
    reporting, see the README's "Performance".)

    It never runs further than :meth:`allow` lets it (the caller paces it by the bytes actually
    received), so a header that merely *claims* a huge size commits no memory beyond what arrived.
    Without Linux ≥ 5.14 (no ``MADV_POPULATE_WRITE``) it does nothing. :meth:`stop` must be called
    before the buffer's memory is freed.
    """

    def __init__(self, view: memoryview, *, slice_bytes: int = 16 << 20) -> None:
        active = _MADVISE is not None and view.nbytes >= _MIN_PREFAULT  # small: not worth it
        self._start = buffer_address(view) if active else 0
        self._end = self._start + view.nbytes
        self._done = self._start
        self._allowed = self._start
        self._slice = slice_bytes
        self._cond = threading.Condition()
        self._stopped = False
        self.faulted = 0
        """Bytes populated so far (for figures and tests)."""
        self._thread: threading.Thread | None = None
        if active:
            self._thread = threading.Thread(target=self._run, name="artifact-prefault", daemon=True)
            self._thread.start()

    def allow(self, upto: int) -> None:
        """Lets the thread populate the first ``upto`` bytes of the buffer."""
        with self._cond:
            target = min(self._end, self._start + max(0, upto))
            if target > self._allowed:
                self._allowed = target
                # Woken for a whole slice (or the buffer's end) only: paced by each download
                # message (512 KiB), it woke and populated that much at a time, ~1,000 thread
                # hand-offs per 512 MiB, which cost more CPU than the faults it moved.
                if target - self._done >= self._slice or target == self._end:
                    self._cond.notify()

    def stop(self) -> None:
        """Stops the thread and waits for it (at most one slice's madvise)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        assert _MADVISE is not None
        while True:
            with self._cond:
                while not self._stopped and self._done >= self._allowed:
                    self._cond.wait()
                if self._stopped:
                    return
                lo = self._done
                hi = min(self._allowed, lo + self._slice)
            # Whole pages around the slice: the pages holding the buffer's ends are its own mapping.
            page_lo = lo & ~(_PAGE - 1)
            page_hi = (hi + _PAGE - 1) & ~(_PAGE - 1)
            if page_hi > page_lo and _MADVISE(page_lo, page_hi - page_lo, _MADV_POPULATE_WRITE):
                _log.debug(
                    "prefault: madvise(MADV_POPULATE_WRITE) failed: errno %d", ctypes.get_errno()
                )
                return  # an older kernel: the writers fault the pages in themselves
            with self._cond:
                self._done = hi
                self.faulted = hi - self._start

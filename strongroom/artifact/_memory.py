"""Overwriting secret or unauthenticated bytes in place."""

from __future__ import annotations

import ctypes
from collections.abc import Callable


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
    if _BYTES_API is None:  # pragma: no cover - not CPython: fall back to a copy-free bytearray
        raise NotImplementedError("output_bytes needs CPython")
    new, address = _BYTES_API
    obj = new(None, size)
    if size == 0:
        return obj, memoryview(bytearray())
    view = memoryview((ctypes.c_char * size).from_address(address(obj))).cast("B")
    return obj, view


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
    raw = (ctypes.c_char * size).from_buffer(view.cast("B"))
    ctypes.memset(ctypes.addressof(raw), 0, size)
    del raw

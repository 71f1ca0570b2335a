"""Overwriting secret or unauthenticated bytes in place."""

from __future__ import annotations

import ctypes


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

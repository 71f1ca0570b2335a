"""The ioctl layer of the legacy guest devices, injectable so tests can stand in for the kernel.

Requests are ctypes buffers laid out exactly like the kernel UAPI structs; embedded pointers are
real addresses of other ctypes buffers, so a fake device reads and writes them the way the kernel's
copy_from_user/copy_to_user would. Failures are ``OSError`` with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from typing import Protocol

from strongroom.attesters._base import AttestationUnavailable, AttesterNotConfigured
from strongroom.errors import StrongroomError
from strongroom.files import errno_name
from strongroom.reasons import Reason

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_WRITE = 1
_IOC_READ = 2

Buffer = ctypes.Array[ctypes.c_char]
"""A request struct: a fixed-address, mutable ctypes byte buffer."""


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (ord(kind) << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def iowr(kind: str, nr: int, size: int) -> int:
    """Linux ``_IOWR(kind, nr, size)``."""
    return _ioc(_IOC_READ | _IOC_WRITE, kind, nr, size)


def ior(kind: str, nr: int, size: int) -> int:
    """Linux ``_IOR(kind, nr, size)``."""
    return _ioc(_IOC_READ, kind, nr, size)


def new_buffer(data: bytes | int) -> Buffer:
    """A zeroed ctypes buffer of ``data`` bytes, or holding ``data``, without a trailing NUL."""
    if isinstance(data, int):
        return ctypes.create_string_buffer(data)
    buf = ctypes.create_string_buffer(len(data))
    ctypes.memmove(buf, data, len(data))
    return buf


_NOT_PERMITTED = frozenset({errno.EACCES, errno.EPERM})


def open_error(device: str, exc: OSError, unavailable_reason: str) -> StrongroomError:
    """Why ``device`` could not be opened: not permitted is permanent (FAILED_PRECONDITION: the
    device is not given to this process's user or group), anything else UNAVAILABLE."""
    code = errno_name(exc)
    if exc.errno in _NOT_PERMITTED:
        return AttesterNotConfigured(
            f"cannot open {device}: {code}; give the device to this service's user or group",
            reason=Reason.GUEST_DEVICE_NOT_PERMITTED,
        )
    return AttestationUnavailable(f"cannot open {device}: {code}", reason=unavailable_reason)


def check_openable(io: DeviceIo, device: str) -> None:
    """Opens and closes ``device`` once; raises :func:`open_error`'s error if it cannot."""
    try:
        fd = io.open(device)
    except OSError as exc:
        raise open_error(device, exc, Reason.ATTESTATION_UNAVAILABLE) from None
    io.close(fd)


class DeviceIo(Protocol):
    """Opens a guest device and issues ioctls on it."""

    def exists(self, path: str) -> bool:
        """Whether the device node exists."""
        ...

    def open(self, path: str) -> int:
        """Opens the device read-write; raises OSError."""
        ...

    def ioctl(self, fd: int, request: int, arg: Buffer) -> None:
        """Issues ``ioctl(fd, request, arg)``; the kernel may write into ``arg``; raises OSError."""
        ...

    def close(self, fd: int) -> None:
        """Closes the device."""
        ...


class OsDeviceIo:
    """The real device layer."""

    def exists(self, path: str) -> bool:
        """Whether the device node exists."""
        return os.path.exists(path)

    def open(self, path: str) -> int:
        """Opens the device read-write, close-on-exec."""
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def ioctl(self, fd: int, request: int, arg: Buffer) -> None:
        """Passes ``arg`` to the kernel in place (mutate_flag=True)."""
        fcntl.ioctl(fd, request, arg, True)

    def close(self, fd: int) -> None:
        """Closes the device."""
        os.close(fd)

"""Private files: written atomically with mode 0600, and in-memory files for APIs that want paths."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from strongroom.files import atomic_write


def write_private(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Writes ``data`` to ``path`` atomically and durably; never with wider permissions."""
    atomic_write(path, data, mode=mode)


def write_public(path: Path, data: bytes) -> None:
    """Writes a non-secret file (certificates, configuration) atomically, mode 0644."""
    write_private(path, data, mode=0o644)


def read_private(path: Path) -> bytes:
    """Reads a secret file, refusing one that group or others may read or write."""
    info = path.stat()
    if info.st_mode & 0o077:
        raise PermissionError(
            f"{path} is accessible to group or others (mode {info.st_mode & 0o777:o}); "
            "it holds a secret: chmod 600 it"
        )
    return path.read_bytes()


@contextlib.contextmanager
def memory_file(data: bytes, name: str = "secret") -> Iterator[str]:
    """Yields a path whose contents are ``data`` and that lives only in memory (Linux memfd).

    ``ssl.SSLContext.load_cert_chain`` only reads keys from paths; this keeps the TLS key off disk.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)

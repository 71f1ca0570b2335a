"""Finds a file in the policy directory without leaving it: every name is looked up relative to a
directory already found, without following links; a symbolic link is read and its target resolved
the same way, and one leading out of the directory is refused without looking where it leads.

Letting the kernel follow the links (``stat``, ``open`` of the path) looked at the target first
and judged it after: the file judged was not necessarily the file then opened (a link swapped in
between to a device or a FIFO was opened all the same), and whether a link leading out was
refused as leading out or as missing told whoever planted it whether its target existed. Here
the file is held (``O_PATH``, which opens nothing: no FIFO waits, no device acts) before it is
judged, and a link's target is known to lie in the directory before anything of it is looked up.

Where a link's target leaves the directory (an absolute path, ``..`` from the directory) it is
followed by its spelling alone until it comes back to the directory, by its real path or by the
path it is configured as (``policies_dir`` may itself be a link): ``../policies/k0.yaml`` and
``/srv/policies/k0.yaml`` are in, ``../other/k0.yaml`` is out, whatever exists there. A spelling
that passes through a link outside the directory may be judged differently than the kernel would
resolve it, but only ever to a file in the directory, or to a refusal.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from types import TracebackType

MAX_LINKS = 40
"""Links followed in one lookup before it fails ``ELOOP``, the kernel's own bound."""

_LOOKUP = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class LeadsOut(Exception):
    """A symbolic link on the way leads out of the policy directory."""


class Found:
    """A file found in the policy directory, held open as a path (``O_PATH``) until closed: what
    is judged (``held``) is what is then read (reopened through ``/proc/self/fd``, or by ``name``
    in ``parent``)."""

    def __init__(self, fd: int, held: os.stat_result, parent: int, name: str, fds: list[int]):
        self.fd = fd
        self.held = held
        self.parent = parent
        self.name = name
        self._fds = fds

    def close(self) -> None:
        """Closes the file's and its directories' descriptors."""
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> Found:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def find(directory: str, name: str) -> Found:
    """``name`` (relative) in ``directory``, each link on the way resolved within it.

    :class:`LeadsOut` for a link leading out of the directory (its target untouched);
    ``OSError`` as a lookup fails (``ENOENT`` for a missing file or a dangling link within the
    directory, ``ELOOP`` past :data:`MAX_LINKS` links, ``ENOTDIR``)."""
    fds = [os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]
    try:
        return _walk(directory, fds, deque(name.split("/")))
    except BaseException:
        while fds:
            os.close(fds.pop())
        raise


def _walk(directory: str, fds: list[int], parts: deque[str]) -> Found:
    # fds[:depth]: the policy directory's descriptor and each directory entered below it, the
    # current one last, so that ".." is the previous one, not a lookup; the rest (links, and
    # directories left) wait to be closed with the file found.
    depth = 1
    outside: str | None = None  # where a link's spelling has led, out of the directory
    links = 0
    while parts:
        part = parts.popleft()
        if part in ("", "."):
            continue
        if outside is not None:
            outside = os.path.normpath(os.path.join(outside, part))
            if outside in _spellings(directory):
                outside, depth = None, 1
            continue
        if part == "..":
            if depth == 1:
                outside = os.path.dirname(os.path.realpath(directory))
            else:
                depth -= 1
            continue
        fd = os.open(part, _LOOKUP, dir_fd=fds[depth - 1])
        fds.insert(depth, fd)
        held = os.fstat(fd)
        if stat.S_ISLNK(held.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            target = os.readlink("", dir_fd=fd)  # the link held, not its name looked up again
            if target.startswith("/"):
                outside = "/"
            parts.extendleft(reversed(target.split("/")))
        elif stat.S_ISDIR(held.st_mode):
            depth += 1
        elif any(rest not in ("", ".") for rest in parts):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        else:
            return Found(fd, held, fds[depth - 1], part, fds)
    if outside is not None:
        raise LeadsOut
    # A directory (refused by whoever judges it as a policy file).
    return Found(fds[depth - 1], os.fstat(fds[depth - 1]), fds[max(depth - 2, 0)], ".", fds)


def _spellings(directory: str) -> tuple[str, str]:
    """The paths that name the policy directory: its real path and the one it is configured as."""
    return os.path.realpath(directory), os.path.abspath(directory)

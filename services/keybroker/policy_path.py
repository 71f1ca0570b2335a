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

from strongroom.closing import Closing

MAX_LINKS = 40
"""Links followed in one lookup before it fails ``ELOOP``, the kernel's own bound."""

MAX_NAMES = 4096
"""Names (path components, ``..`` and empty ones included) the links followed in one lookup may
spell before it fails ``ELOOP``. Each is a step of this interpreter's, not the kernel's: 40
links of 4,095 bytes, each leaving the directory and coming back hundreds of times, made every
lookup of a policy walk 25,000 names (18 ms, its interpreter lock held). A ConfigMap's spell 3."""

_LOOKUP = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class LeadsOut(Exception):
    """A symbolic link on the way leads out of the policy directory."""


class Found(Closing):
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
        _close(self._fds)


TRIES = 3
"""How many times a name is looked up when one its links led to is missing (or, read without
``/proc``, when the file found is gone from its name when reopened). A ConfigMap update
swaps ``..data`` for a link to a new directory and then removes the one it named: a lookup that
read ``..data`` before the swap looked in that directory after its removal. The kubelet's updates
of a mount are seconds apart: a lookup made again finds the new document."""


class _Vanished(FileNotFoundError):
    """A name missing where a link followed led (the lookup is made again)."""


def find(directory: str, name: str) -> Found:
    """``name`` (relative) in ``directory``, each link on the way resolved within it.

    :class:`LeadsOut` for a link leading out of the directory (its target untouched);
    ``OSError`` as a lookup fails (``ENOENT`` for a missing file or a dangling link within the
    directory, ``ELOOP`` past :data:`MAX_LINKS` links or :data:`MAX_NAMES` names spelt by them,
    ``ENOTDIR``)."""
    tries = TRIES
    while True:
        tries -= 1
        fds = [os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]
        try:
            return _walk(directory, fds, deque(name.split("/")))
        except _Vanished:
            _close(fds)
            if not tries:  # a dangling link, not a swap
                raise
        except BaseException:
            _close(fds)
            raise


def _close(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


def _walk(directory: str, fds: list[int], parts: deque[str]) -> Found:
    # fds[:depth]: the policy directory's descriptor and each directory entered below it, the
    # current one last, so that ".." is the previous one, not a lookup; the rest (links, and
    # directories left) wait to be closed with the file found.
    depth = 1
    # Where a link's spelling has led out of the directory, by its components (None: within).
    # Components, not a path normalised at each one: a link's target of thousands of them,
    # leaving and re-entering, cost a path's length per component, and the directory's real path
    # (a lookup of each of its own components) at each re-entry: a second a policy per request.
    outside: list[str] | None = None
    home: _Home | None = None  # worked out once, at the first link leaving the directory
    links = names = 0
    while parts:
        part = parts.popleft()
        if part in ("", "."):
            continue
        if outside is not None:
            if part != "..":
                outside.append(part)
            elif outside:
                outside.pop()  # "/.." is "/"
            assert home is not None
            if home.named_by(outside):
                outside, depth = None, 1
            continue
        if part == "..":
            if depth == 1:
                home = home or _Home(directory)
                outside = list(home.real[:-1])
            else:
                depth -= 1
            continue
        try:
            fd = os.open(part, _LOOKUP, dir_fd=fds[depth - 1])
        except FileNotFoundError as exc:
            if links:
                raise _Vanished(exc.errno, exc.strerror) from None
            raise
        fds.insert(depth, fd)
        held = os.fstat(fd)
        if stat.S_ISLNK(held.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            target = os.readlink("", dir_fd=fd)  # the link held, not its name looked up again
            names += target.count("/") + 1
            if names > MAX_NAMES:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            if target.startswith("/"):
                home = home or _Home(directory)
                outside = []
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


class _Home:
    """The paths that name the policy directory, as components: its real path and the one it is
    configured as."""

    def __init__(self, directory: str) -> None:
        self.real = _components(os.path.realpath(directory))
        self._spellings = {self.real, _components(os.path.abspath(directory))}
        self._lengths = {len(spelling) for spelling in self._spellings}

    def named_by(self, components: list[str]) -> bool:
        """Whether ``components`` (from the root) name the policy directory."""
        return len(components) in self._lengths and tuple(components) in self._spellings


def _components(path: str) -> tuple[str, ...]:
    return tuple(part for part in path.split("/") if part)

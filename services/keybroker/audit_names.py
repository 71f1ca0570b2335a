"""Which names in an audit directory are sealed files of a log, and what each holds: the one
reading of a directory that the broker (:mod:`strongroom.keybroker.audit`, at start and while it
rotates) and ``strongroom audit verify DIR`` (:mod:`strongroom.keybroker.audit_verify`) both
apply, so that they cannot judge one directory two ways. Both read one log's names: the broker
its own (its path's file name), ``audit verify`` the one it is told (``--log-name``) or the one
log whose files the directory holds (of several, it asks); another log's names, sealed or not,
are not that log's files, whatever their numbers (a sealed pair renamed ``zz.3-5`` is a pair
missing from the series).

**Names.** A rotation renames the log ``<log>`` to :func:`sealed_log_name` ``<log>.<first
seq>-<last seq>`` and its head to that name + ``.head``. Any name of that shape (digits, a dash,
digits after the log's name and a dot; a head's name without ``.head``) is a *sealed name* of the
log. It is *canonical* when it is exactly what :func:`sealed_log_name` writes: plain decimal, no
leading zeros, at most 19 digits, first seq not after the last (a sealed file holds a record at
least). Hidden names (a head's temporary file) are never sealed names.

**A sealed name that is not canonical is tampering**, for the broker (``DATA_LOSS
AUDIT_LOG_TAMPERED`` at start, naming it: it does not start) and for ``audit verify``
(``SERIES_NAME_MISMATCH`` naming it), wherever it sorts and whatever it holds, head or not. The
broker never writes such a name, and only the broker writes this directory, so one is a sealed
file renamed or a file put there by hand. Ignoring it (the broker did) and reading its numbers
(``audit verify`` did) disagreed: ``audit.log.3-5`` renamed ``audit.log.03-05`` was a sealed file
deleted from the middle for one and an intact series for the other; and ignoring it on both sides
would report the gap it leaves under its neighbours' names, or nothing at all for the oldest file,
never naming the file to restore or archive. Nothing lost by the stricter reading: a deployment
that never renames files never meets it.

**Being shipped.** The sealed files at the start of a log's series (by range) that have lost
their log or their head, up to the first that has both, are *being shipped*: the oldest files, the
deletion begun in either order, or cut short. Retention for both sides: the broker logs a WARNING
naming them, ``audit verify`` leaves them out of the series and names them; neither opens them.
A sealed file without its log or head after one that has both is not being shipped.

**Never followed.** A sealed file or head is opened only as a regular file of the directory
itself (:func:`open_regular`, ``O_NOFOLLOW``): a symbolic link is followed neither out of the
directory nor within it, and a FIFO is not waited on. Either side refuses to check a series that
holds one, as the broker does for its active log and head (a file it cannot read is
``AUDIT_UNAVAILABLE`` for the broker, which does not start, and the same error, naming the file,
for ``audit verify``): the broker makes only regular files, and what a link points to is not in
the directory whose series is checked. A name being shipped is never opened, whatever it is.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

HEAD_SUFFIX = ".head"
_SHAPE = re.compile(r"(.+)\.([0-9]+)-([0-9]+)")
_NUMBER = re.compile(r"0|[1-9][0-9]{0,18}")


def sealed_log_name(log_name: str, first_seq: int, last_seq: int) -> str:
    """The name a rotation gives a sealed log: ``<log name>.<first seq>-<last seq>``."""
    return f"{log_name}.{first_seq}-{last_seq}"


@dataclass(frozen=True, order=True, slots=True)
class Sealed:
    """A sealed file of a log found in a directory: its range, its name (its head's is
    ``name + ".head"``) and which of the two files the listing held."""

    first: int
    last: int
    name: str
    has_log: bool = field(compare=False)
    has_head: bool = field(compare=False)


@dataclass(frozen=True)
class SealedListing:
    """A directory's sealed names (:func:`list_sealed`)."""

    files: tuple[Sealed, ...]
    """Every canonical sealed name found as a log, a head or both, in chain order (by range)."""
    shipping: tuple[str, ...]
    """The names of the files in ``files`` being shipped (see the module doc)."""
    not_canonical: tuple[str, ...]
    """Names (as found: logs or heads) of sealed shape that the broker never writes."""

    def not_canonical_problem(self) -> str | None:
        """Why the directory is tampered with when it holds sealed names not canonical; None
        when it holds none."""
        if not self.not_canonical:
            return None
        named = self.not_canonical
        shown = ", ".join(named) if len(named) <= 3 else f"{named[0]} .. {named[-1]} ({len(named)})"
        return (
            f"{shown}: named like a sealed audit log but not as a rotation names one (plain "
            "decimal seq numbers, no leading zeros, first not after last): a sealed file was "
            "renamed or a file put there by hand"
        )


def _split(name: str, log_name: str | None) -> tuple[str, str, str] | None:
    """(log name, first, last) as written, if ``name`` (a log's, not a head's) has sealed shape."""
    if log_name is None:
        if name.startswith("."):
            return None
        match = _SHAPE.fullmatch(name)
    else:
        match = _shape_of(log_name).fullmatch(name)
    return None if match is None else (match[1], match[2], match[3])


@functools.lru_cache(maxsize=8)
def _shape_of(log_name: str) -> re.Pattern[str]:
    return re.compile(f"({re.escape(log_name)})" + r"\.([0-9]+)-([0-9]+)")


def _canonical(first: str, last: str) -> bool:
    return bool(_NUMBER.fullmatch(first) and _NUMBER.fullmatch(last)) and int(first) <= int(last)


def sealed_range(name: str) -> tuple[int, int] | None:
    """The range the sealed log ``name`` holds by its name, if it is a canonical sealed name
    (of any log); None otherwise."""
    split = _split(name, None)
    if split is None or not _canonical(split[1], split[2]):
        return None
    return int(split[1]), int(split[2])


def has_sealed_shape(name: str) -> bool:
    """Whether ``name`` (a log's, not a head's) has the shape of a sealed name of some log."""
    return _split(name, None) is not None


def sealed_owner(name: str) -> str | None:
    """The log whose sealed name ``name`` (a log's, not a head's) has the shape of, canonical or
    not (``audit.log`` for ``audit.log.3-5``); None if it has no sealed shape."""
    split = _split(name, None)
    return None if split is None else split[0]


def list_sealed(names: Iterable[str], log_name: str | None = None) -> SealedListing:
    """The sealed names among ``names`` (a directory's listing): of the log ``log_name``, or of
    every log the names show when it is None."""
    found: dict[tuple[str, int, int], list[bool]] = {}
    odd: list[str] = []
    for name in names:
        log = name.removesuffix(HEAD_SUFFIX)
        split = _split(log, log_name)
        if split is None:
            continue
        owner, first_text, last_text = split
        if not _canonical(first_text, last_text):
            odd.append(name)
            continue
        present = found.setdefault((owner, int(first_text), int(last_text)), [False, False])
        present[log != name] = True
    # Sorted by plain tuples: the dataclass's own comparisons made a listing several times slower.
    ordered = sorted(
        (first, last, sealed_log_name(owner, first, last), owner) for owner, first, last in found
    )
    files: list[Sealed] = []
    shipping: list[str] = []
    whole: set[str] = set()  # logs whose series has begun (a file with both log and head)
    for first, last, name, owner in ordered:
        has_log, has_head = found[owner, first, last]
        files.append(Sealed(first, last, name, has_log, has_head))
        if owner in whole:
            continue
        if has_log and has_head:
            whole.add(owner)
        else:
            shipping.append(name)
    return SealedListing(
        files=tuple(files), shipping=tuple(shipping), not_canonical=tuple(sorted(odd))
    )


def open_regular(path: str | Path, *, dir_fd: int | None = None) -> int:
    """A read-only descriptor of ``path`` (relative to ``dir_fd`` if given) if it is a regular
    file; OSError naming it otherwise. Never follows a symbolic link (the last component), and
    never waits: O_NONBLOCK, so a FIFO put in a file's place cannot block the open (a head is
    opened while holding the log's ``flock``, which every commit waits for)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as exc:
        # ELOOP is also a directory of the path's that loops (or links past the kernel's limit):
        # the file itself is a link only if lstat, which follows the same directories, says so.
        if exc.errno == errno.ELOOP and _is_link(path, dir_fd):
            raise OSError(
                errno.ELOOP,
                "a symbolic link, which the broker never makes: not followed",
                str(path),
            ) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device)", str(path))
    except BaseException as exc:
        os.close(fd)
        # A call on the descriptor names no file: the broker's catch-alls took it for the log's.
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)
        raise
    return fd


def _is_link(path: str | Path, dir_fd: int | None) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path, dir_fd=dir_fd).st_mode)
    except OSError:
        return False

"""Reads a key's policy file as the broker may: a regular file in the policy directory, bounded.

Whoever can write the policy directory (a share, a volume another team's tooling syncs) is not
thereby trusted with the broker's own files. A policy read whole and through any symlink let them
point ``<key>.yaml`` at the broker's HSM PIN file or signing key, whose bytes then reached the
load error that ``keys get-policy`` answers and the broker logs (YAML syntax errors quote the
text); at ``/dev/zero``, read until the broker ran out of memory; at a FIFO, hang every request
that read it. So a policy file is read only if it is a regular file, at most
:data:`~strongroom.keybroker.policy_bounds.MAX_POLICY_BYTES` of it, and only if it lies in the
policy directory, its only name (a hard link is no symlink, but it too can name another file).

Symlinks *inside* the directory are followed: a Kubernetes ConfigMap mount (the Helm chart's
policy store) is made of them (``<key>.yaml -> ..data/<key>.yaml``, ``..data -> ..<timestamp>``,
swapped atomically on an update), and a link within the directory shows nothing its writer could
not have written there anyway.
"""

from __future__ import annotations

import os
import stat

from strongroom.keybroker.errors import PolicyUnreadable, StoredPolicyInvalid
from strongroom.keybroker.policy_bounds import MAX_POLICY_BYTES
from strongroom.reasons import Reason


def unreadable(key_id: str, problem: str) -> PolicyUnreadable:
    """The key's policy file cannot be read, for ``problem``."""
    # The problem, not the path: the message may reach a caller; the operator knows the directory.
    return PolicyUnreadable(f"the release policy of {key_id!r} cannot be read: {problem}")


def _not_regular(key_id: str) -> PolicyUnreadable:
    return unreadable(
        key_id, "it is not a regular file (a directory, FIFO, socket or device, or a link to one)"
    )


def _hard_linked(key_id: str, links: int) -> PolicyUnreadable:
    return unreadable(
        key_id,
        f"its file has {links} hard links, and a policy file must have no name but its own: a "
        "hard link made in the policy directory to another file (the broker's PIN file) would "
        "be read as a policy; copy the file instead",
    )


def _too_large(key_id: str) -> StoredPolicyInvalid:
    # The loader's reason for a document past the bound, which a larger file was refused with
    # once read whole.
    return StoredPolicyInvalid(
        f"the stored release policy of {key_id!r} does not load: the policy file is larger than "
        f"{MAX_POLICY_BYTES} bytes, the limit",
        reason=Reason.POLICY_TOO_LARGE,
    )


def _opened_path(fd: int) -> str | None:
    """Where the file open as ``fd`` is, every link resolved (None: /proc is not mounted)."""
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    # A ConfigMap's previous timestamped directory, removed by its update since the open.
    return where.removesuffix(" (deleted)")


def _outside(fd: int, held: os.stat_result, path: str, directory: str) -> str | None:
    """Why the file open as ``fd`` (named ``path``) is not in ``directory``; None if it is."""
    try:
        named = os.lstat(path)
    except OSError:
        named = None
    if (
        named is not None
        and stat.S_ISREG(named.st_mode)
        and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
    ):
        return None  # the directory's own entry, no link involved
    where = _opened_path(fd)
    if where is None:
        return (
            "it is reached through a symbolic link, and where the link leads cannot be told "
            "here (/proc is not mounted)"
        )
    root = os.path.join(os.path.realpath(directory), "")
    if where.startswith(root):
        return None
    return (
        "it is a symbolic link to a file outside the policy directory, which the broker does "
        "not follow (links within it, as a ConfigMap's, are)"
    )


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_policy_text(path: str, directory: str, key_id: str) -> str:
    """The text of ``key_id``'s policy file ``path`` in ``directory``, as stored (line ends
    kept: the document judged, shown and hashed is the file's bytes).

    :class:`PolicyUnreadable` when it cannot be read (missing, permissions, I/O), is not a
    regular file, lies outside the directory (a symbolic link leading out), has another name (a
    hard link) or is not UTF-8;
    :class:`StoredPolicyInvalid` (``POLICY_TOO_LARGE``) past the policy size bound, of which no
    more than the bound and a byte is read."""
    try:
        # Before the open: opening a FIFO waits for a writer, and opening a device may act.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise _not_regular(key_id)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise unreadable(key_id, exc.strerror or type(exc).__name__) from None
    try:
        held = os.fstat(fd)
        if not stat.S_ISREG(held.st_mode):  # replaced between the stat and the open
            raise _not_regular(key_id)
        why = _outside(fd, held, path, directory)
        if why is not None:
            raise unreadable(key_id, why)
        # A hard link is the directory's own entry, which no link check sees: one to the
        # broker's file (made over NFS by the server, past the client's protected_hardlinks)
        # would be read. Neither the broker's writes nor a ConfigMap ever give a file two names.
        if held.st_nlink > 1:
            raise _hard_linked(key_id, held.st_nlink)
        if held.st_size > MAX_POLICY_BYTES:
            raise _too_large(key_id)
        data = _read_at_most(fd, MAX_POLICY_BYTES + 1)  # a file growing meanwhile
    except OSError as exc:
        raise unreadable(key_id, exc.strerror or type(exc).__name__) from None
    finally:
        os.close(fd)
    if len(data) > MAX_POLICY_BYTES:
        raise _too_large(key_id)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise unreadable(key_id, "it is not UTF-8 text") from None

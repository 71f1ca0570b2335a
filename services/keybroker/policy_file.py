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
not have written there anyway. They are followed by :mod:`~strongroom.keybroker.policy_path`,
never by the kernel: the file is held before it is judged, and the file judged is the file read.
"""

from __future__ import annotations

import errno
import os
import stat

from strongroom.keybroker import policy_path
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


LEADS_OUT = (
    "it is a symbolic link to a file outside the policy directory, which the broker does "
    "not follow (links within it, as a ConfigMap's, are)"
)
"""Why a policy reached through a link leading out is unreadable, whether or not the link's
target exists (which is neither looked at nor told)."""

_READ = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY


def policy_stat(path: str, directory: str, key_id: str) -> os.stat_result:
    """What ``stat`` says of the file ``key_id``'s policy file ``path`` leads to in
    ``directory``, its links resolved within it; ``OSError`` as a lookup fails (FileNotFoundError:
    no policy), :class:`PolicyUnreadable` for a link leading out of the directory."""
    try:
        with policy_path.find(directory, os.path.basename(path)) as found:
            return found.held
    except policy_path.LeadsOut:
        raise unreadable(key_id, LEADS_OUT) from None


def _judge(key_id: str, held: os.stat_result) -> None:
    if not stat.S_ISREG(held.st_mode):
        raise _not_regular(key_id)
    # A hard link is the directory's own entry, which no link check sees: one to the broker's
    # file (made over NFS by the server, past the client's protected_hardlinks) would be read.
    # Neither the broker's writes nor a ConfigMap ever give a file two names.
    if held.st_nlink > 1:
        raise _hard_linked(key_id, held.st_nlink)
    if held.st_size > MAX_POLICY_BYTES:
        raise _too_large(key_id)


def _open_judged(found: policy_path.Found) -> int | None:
    """A descriptor to read the file ``found`` holds, judged regular: that very file (None: it is
    no longer at its name, which is all there is to reopen without ``/proc``)."""
    try:
        # The held file itself, whatever its name now leads to.
        return os.open(f"/proc/self/fd/{found.fd}", _READ)
    except FileNotFoundError:
        pass  # /proc is not mounted
    # By its name in the directory found to hold it, as no link (O_NOFOLLOW), and kept only if
    # it is still the file judged. A FIFO put there meanwhile is opened without waiting
    # (O_NONBLOCK) and refused unread; a device node would be opened (and refused unread), which
    # takes the right to make one in the policy directory (CAP_MKNOD) and this instant.
    try:
        fd = os.open(found.name, _READ | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=found.parent)
    except OSError as exc:
        # Replaced by a link, or removed: a ConfigMap update removes the directory it replaced.
        if exc.errno in (errno.ELOOP, errno.ENOENT):
            return None
        raise
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (found.held.st_dev, found.held.st_ino):
        os.close(fd)
        return None
    return fd


def _open_policy(directory: str, name: str, key_id: str) -> int:
    """A descriptor to read the policy file ``name`` of ``directory``, judged: the file found."""
    for _ in range(policy_path.TRIES):
        with policy_path.find(directory, name) as found:
            _judge(key_id, found.held)
            fd = _open_judged(found)
        if fd is not None:
            return fd
    raise unreadable(key_id, "it was replaced while it was read; try again")


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
    kept: the document judged, shown and hashed is the file's bytes). ``path`` names a file of
    the directory itself, as every key's policy file does.

    :class:`PolicyUnreadable` when it cannot be read (missing, permissions, I/O), is not a
    regular file, lies outside the directory (a symbolic link leading out, whether or not its
    target exists), has another name (a hard link) or is not UTF-8;
    :class:`StoredPolicyInvalid` (``POLICY_TOO_LARGE``) past the policy size bound, of which no
    more than the bound and a byte is read."""
    try:
        fd = _open_policy(directory, os.path.basename(path), key_id)
        try:
            data = _read_at_most(fd, MAX_POLICY_BYTES + 1)  # a file growing meanwhile
        finally:
            os.close(fd)
    except policy_path.LeadsOut:
        raise unreadable(key_id, LEADS_OUT) from None
    except OSError as exc:
        raise unreadable(key_id, exc.strerror or type(exc).__name__) from None
    if len(data) > MAX_POLICY_BYTES:
        raise _too_large(key_id)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise unreadable(key_id, "it is not UTF-8 text") from None

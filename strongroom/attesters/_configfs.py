"""Attestation through the Linux configfs-tsm report interface (``/sys/kernel/config/tsm/report``).

Linux 6.7+ exposes one vendor-neutral interface for SEV-SNP (provider ``sev_guest``) and TDX
(provider ``tdx_guest``). A report entry is a directory: writing ``inblob`` sets REPORT_DATA;
reading ``outblob`` makes the kernel produce the report (for TDX a quote, through the host's quoting
service); ``auxblob`` holds SNP's certificate table; ``generation`` counts every write to the entry.
Entries can be shared by any process with access, so after reading the blobs we re-read
``generation``: if it is not the number of writes we made, someone else wrote into the entry between
our write and our read, the blobs may not be ours, and we start again with a fresh entry.

**Entries are removed on every exit path.** Each attestation removes its entry in ``finally``; a
removal that fails is retried before the next attestation. A process that dies mid-attestation
(SIGKILL, OOM) cannot, so entries are named ``strongroom-<pid namespace>-<pid>-<random>`` and a new
attester removes, when it starts, the ones of its own pid namespace whose process is gone (or that
are its own process's but no attester of it holds): a leftover's inblob and report are nobody's
business, and configfs keeps them until the VM restarts. It never touches another name, nor an entry
of another pid namespace (a container beside it), whose process it cannot see; names of the form
before this (``strongroom-<pid>-<random>``, no namespace) are left alone for the same reason. A
process that cannot tell its pid namespace (no ``/proc``) names its entries with namespace 0, as any
other such process does in any container, so it removes none: it cannot tell whose they are.

**privlevel** (SEV-SNP only): the VMPL the report is requested at, 0-3, written before ``inblob``;
the kernel refuses one below ``privlevel_floor`` (the VMPL the guest runs at, e.g. 2 under an SVSM),
so the attester checks it against the floor when it starts (``TSM_PRIVLEVEL_BELOW_FLOOR``) rather
than failing every report. TDX has no such attribute: a privlevel given there is ignored, logged.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import threading
from pathlib import Path
from typing import Protocol

from strongroom.attesters._base import (
    AttestationUnavailable,
    AttesterNotConfigured,
    EvidenceBundle,
    TeeType,
    check_echo,
    require_report_data,
)
from strongroom.attesters._certtable import endorsement_chain, parse_cert_table
from strongroom.attesters._layouts import snp_report_data, snp_signing_key, tdx_quote_report_data
from strongroom.files import errno_name
from strongroom.reasons import Reason

log = logging.getLogger(__name__)

DEFAULT_TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
PROVIDERS: dict[str, TeeType] = {"sev_guest": TeeType.SEV_SNP, "tdx_guest": TeeType.TDX}
ENTRY_PREFIX = "strongroom-"
_ENTRY_RE = re.compile(r"^strongroom-(?P<ns>[0-9]+)-(?P<pid>[0-9]+)-[0-9a-f]{16}$")
# Entries this process's attesters hold right now (a sweep by another attester of this process
# must not remove them), by name.
_HELD: set[str] = set()
_HELD_LOCK = threading.Lock()


def _pid_namespace() -> int:
    """This process's pid namespace (its inode number; 0 where /proc does not tell)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class TsmFs(Protocol):
    """The file operations the attester performs on configfs (injectable for tests)."""

    def mkdir(self, path: Path) -> None:
        """Creates a report entry."""
        ...

    def rmdir(self, path: Path) -> None:
        """Removes a report entry (configfs removes its attribute files with it)."""
        ...

    def read(self, path: Path) -> bytes:
        """Reads a whole attribute."""
        ...

    def write(self, path: Path, data: bytes) -> None:
        """Writes a whole attribute; configfs commits binary attributes when the file is closed."""
        ...

    def exists(self, path: Path) -> bool:
        """Whether a path exists (attributes a provider hides do not)."""
        ...

    def listdir(self, path: Path) -> list[str]:
        """The names in a directory (the report entries under the root)."""
        ...


class OsTsmFs:
    """The real file operations."""

    def mkdir(self, path: Path) -> None:
        """Creates a report entry."""
        os.mkdir(path, 0o700)

    def rmdir(self, path: Path) -> None:
        """Removes a report entry."""
        os.rmdir(path)

    def read(self, path: Path) -> bytes:
        """Reads a whole attribute, unbuffered."""
        with open(path, "rb", buffering=0) as f:
            return f.read()

    def write(self, path: Path, data: bytes) -> None:
        """Writes a whole attribute in one call; errors from the kernel surface on close."""
        with open(path, "wb", buffering=0) as f:
            written = f.write(data)
        if written != len(data):
            raise OSError(errno.EIO, f"short write to {path.name}: {written} of {len(data)} bytes")

    def exists(self, path: Path) -> bool:
        """Whether a path exists."""
        return path.exists()

    def listdir(self, path: Path) -> list[str]:
        """The names in a directory."""
        return os.listdir(path)


class _Raced(Exception):
    """Another writer touched our report entry."""


class ConfigfsTsmAttester:
    """Attester over configfs-tsm; probes the provider (SNP or TDX) when constructed."""

    def __init__(
        self,
        root: Path = DEFAULT_TSM_REPORT_ROOT,
        *,
        fs: TsmFs | None = None,
        privlevel: int | None = None,
        max_attempts: int = 3,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if privlevel is not None and not 0 <= privlevel <= 3:
            raise ValueError("privlevel must be between 0 and 3")
        self._root = Path(root)
        self._fs: TsmFs = fs or OsTsmFs()
        self._privlevel = privlevel
        self._max_attempts = max_attempts
        self._namespace = _pid_namespace()
        # Entries whose removal failed: retried before the next attestation.
        self._leftovers: list[Path] = []
        self._leftovers_lock = threading.Lock()
        self._provider = self._probe_provider()
        self._tee_type = PROVIDERS[self._provider]
        self.remove_stale_entries()
        if privlevel is not None:
            self._check_privlevel(privlevel)

    def remove_stale_entries(self) -> list[str]:
        """Removes the report entries a dead process of this pid namespace left (see the module
        docstring); returns their names. Never fails: a sweep that cannot list or remove logs it."""
        if self._namespace == 0:
            # Namespace 0 is every process's that cannot read /proc, in any container: a pid in
            # such a name means nothing here, and a live one elsewhere would look dead.
            log.warning(
                "configfs-tsm: this process's pid namespace is unknown (/proc/self/ns/pid not "
                "readable), so entries left by processes that died are not removed"
            )
            return []
        try:
            names = self._fs.listdir(self._root)
        except OSError as exc:
            log.warning(
                "could not list configfs-tsm report entries to remove stale ones",
                extra={"errno": errno_name(exc)},
            )
            return []
        removed = []
        for name in sorted(names):
            match = _ENTRY_RE.match(name)
            if match is None or int(match["ns"]) != self._namespace:
                continue
            pid = int(match["pid"])
            if pid == os.getpid():
                with _HELD_LOCK:
                    if name in _HELD:
                        continue
            elif _process_exists(pid):
                continue
            if self._remove(self._root / name, retry=False):
                removed.append(name)
        if removed:
            log.warning(
                "removed configfs-tsm report entries left by a process that died",
                extra={"entries": removed},
            )
        return removed

    def _check_privlevel(self, privlevel: int) -> None:
        if self._tee_type is not TeeType.SEV_SNP:
            log.warning(
                "configfs-tsm privlevel applies to SEV-SNP only; ignored for this TEE",
                extra={"provider": self._provider, "privlevel": privlevel},
            )
            self._privlevel = None
            return
        entry = self._new_entry()
        try:
            floor_path = entry / "privlevel_floor"
            text = self._read_text(floor_path) if self._fs.exists(floor_path) else "0"
        finally:
            self._remove(entry)
        floor = _number(text, "privlevel_floor", Reason.TSM_IO_ERROR)
        if privlevel < floor:
            raise AttestationUnavailable(
                f"configfs-tsm privlevel {privlevel} is below this guest's privlevel_floor "
                f"{floor} (the VMPL it runs at): the kernel would refuse every report; configure "
                f"a privlevel between {floor} and 3",
                reason=Reason.TSM_PRIVLEVEL_BELOW_FLOOR,
            )

    def __repr__(self) -> str:
        return f"ConfigfsTsmAttester(root={str(self._root)!r}, provider={self._provider!r})"

    @property
    def tee_type(self) -> TeeType:
        """SEV_SNP for provider ``sev_guest``, TDX for ``tdx_guest``."""
        return self._tee_type

    @property
    def provider(self) -> str:
        """The kernel's provider name."""
        return self._provider

    def attest(self, report_data: bytes) -> EvidenceBundle:
        """Produces a report (SNP) or quote (TDX) over a fresh entry; retries after a race."""
        data = require_report_data(report_data)
        for attempt in range(1, self._max_attempts + 1):
            try:
                return self._attest_once(data)
            except _Raced as raced:
                log.warning(
                    "configfs-tsm report entry was written concurrently; retrying",
                    extra={"attempt": attempt, "detail": str(raced)},
                )
        raise AttestationUnavailable(
            f"configfs-tsm report entries were written concurrently {self._max_attempts} times "
            "in a row; another process is interfering",
            reason=Reason.TSM_REPORT_RACE,
        )

    def _probe_provider(self) -> str:
        if not self._fs.exists(self._root):
            raise AttesterNotConfigured(
                f"{self._root} does not exist (kernel without configfs-tsm, or configfs not mounted)",
                reason=Reason.TSM_NOT_AVAILABLE,
            )
        try:
            entry = self._new_entry()
            try:
                provider = self._read_text(entry / "provider")
            finally:
                self._remove(entry)
        except AttestationUnavailable as exc:
            # No provider, or an interface this process may not use (configfs is root's, 0755, so a
            # service user given only /dev/sev-guest gets EACCES): not configured, so that "auto"
            # goes on to the guest devices instead of failing the start.
            if exc.reason in (Reason.TSM_NO_PROVIDER, Reason.TSM_PERMISSION_DENIED):
                raise AttesterNotConfigured(exc.message, reason=exc.reason) from None
            raise
        if provider not in PROVIDERS:
            raise AttesterNotConfigured(
                f"configfs-tsm provider {provider!r} is not supported "
                f"(supported: {', '.join(sorted(PROVIDERS))})",
                reason=Reason.TSM_PROVIDER_UNSUPPORTED,
            )
        return provider

    def _attest_once(self, data: bytes) -> EvidenceBundle:
        with self._leftovers_lock:
            leftovers, self._leftovers = self._leftovers, []
        for leftover in leftovers:
            self._remove(leftover)  # kept again if it still fails
        entry = self._new_entry()
        try:
            writes = 0
            if self._privlevel is not None:
                self._write(entry / "privlevel", f"{self._privlevel}\n".encode())
                writes += 1
            self._write(entry / "inblob", data)
            writes += 1
            self._check_generation(entry, writes)
            provider = self._read_text(entry / "provider")
            if provider != self._provider:
                raise AttestationUnavailable(
                    f"configfs-tsm provider changed from {self._provider!r} to {provider!r}",
                    reason=Reason.TSM_PROVIDER_CHANGED,
                )
            outblob = self._read(entry / "outblob")
            auxblob = b""
            if self._tee_type is TeeType.SEV_SNP and self._fs.exists(entry / "auxblob"):
                auxblob = self._read(entry / "auxblob")
            self._check_generation(entry, writes)
        finally:
            self._remove(entry)
        if self._tee_type is TeeType.SEV_SNP:
            check_echo(snp_report_data(outblob), data, "SNP report")
            certificates = endorsement_chain(parse_cert_table(auxblob), snp_signing_key(outblob))
        else:
            check_echo(tdx_quote_report_data(outblob), data, "TDX quote")
            certificates = ()
        return EvidenceBundle(
            tee_type=self._tee_type,
            report=outblob,
            certificates=certificates,
            source=f"configfs-tsm:{self._provider}",
        )

    def _new_entry(self) -> Path:
        name = f"{ENTRY_PREFIX}{self._namespace}-{os.getpid()}-{secrets.token_hex(8)}"
        entry = self._root / name
        with _HELD_LOCK:
            _HELD.add(name)
        try:
            self._fs.mkdir(entry)
        except OSError as exc:
            with _HELD_LOCK:
                _HELD.discard(name)
            raise _io_error("create a report entry in", self._root, exc) from None
        return entry

    def _remove(self, entry: Path, *, retry: bool = True) -> bool:
        """Removes ``entry``; True once it is gone. A failure is logged (and, with ``retry``, the
        entry is kept to be removed before the next attestation), never raised."""
        with _HELD_LOCK:
            _HELD.discard(entry.name)
        try:
            self._fs.rmdir(entry)
        except FileNotFoundError:
            return True
        except OSError as exc:
            # A leftover entry keeps its inblob and report in kernel memory; it must not hide the
            # real outcome, and the next attestation tries again.
            log.error(
                "could not remove configfs-tsm report entry",
                extra={"entry": str(entry), "errno": errno_name(exc)},
            )
            if retry:
                with self._leftovers_lock:
                    self._leftovers.append(entry)
            return False
        return True

    def _check_generation(self, entry: Path, expected: int) -> None:
        generation = _number(
            self._read_text(entry / "generation"), "generation", Reason.TSM_GENERATION_MALFORMED
        )
        if generation != expected:
            raise _Raced(f"generation {generation}, expected {expected}")

    def _read_text(self, path: Path) -> str:
        return self._read(path).decode("ascii", "replace").strip()

    def _read(self, path: Path) -> bytes:
        try:
            return self._fs.read(path)
        except OSError as exc:
            raise _io_error("read", path, exc) from None

    def _write(self, path: Path, data: bytes) -> None:
        try:
            self._fs.write(path, data)
        except OSError as exc:
            raise _io_error("write", path, exc) from None


def _number(text: str, what: str, reason: Reason) -> int:
    """``text`` (an attribute file's content) as an integer; AttestationUnavailable naming ``what``
    with ``reason`` when it is not one."""
    try:
        return int(text)
    except ValueError:
        raise AttestationUnavailable(
            f"configfs-tsm {what} is not a number: {text[:20]!r}", reason=reason
        ) from None


def _io_error(
    action: str, path: Path, exc: OSError
) -> AttestationUnavailable | AttesterNotConfigured:
    code = errno_name(exc)
    if exc.errno == errno.ENOTTY:
        # sev_guest answers ENOTTY once its driver has wiped the VMPCK after a failed exchange
        # (until the VM restarts), and kernels before 6.8 when the provider went away: neither
        # passes with a retry, so not UNAVAILABLE, which the loader retries forever.
        return AttesterNotConfigured(
            f"could not {action} {path}: ENOTTY: the TSM provider refuses reports (for sev_guest, "
            "the driver disabled the VMPCK after a failed exchange and the VM must be restarted)",
            reason=Reason.TSM_REPORT_REFUSED,
        )
    if exc.errno == errno.ENXIO:
        return AttestationUnavailable(
            f"could not {action} {path}: no TSM provider is registered (ENXIO)",
            reason=Reason.TSM_NO_PROVIDER,
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return AttestationUnavailable(
            f"could not {action} {path}: {code} (this process may not use configfs-tsm)",
            reason=Reason.TSM_PERMISSION_DENIED,
        )
    return AttestationUnavailable(f"could not {action} {path}: {code}", reason=Reason.TSM_IO_ERROR)

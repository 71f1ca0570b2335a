"""Stand-ins for the TEE guest kernel interfaces (the only mocks allowed: TEE hardware).

- :class:`EmulatedConfigfs` does real file I/O on a tmp dir and reproduces configfs-tsm's rules:
  ``mkdir`` creates the provider's attributes (ENXIO without a provider), ``inblob`` is at most 64
  bytes and bumps ``generation``, reading ``outblob``/``auxblob`` (re)generates the report when the
  generation moved, EINVAL without an inblob, ``rmdir`` takes the attributes with it.
- :class:`FakeSevGuest` and :class:`FakeTdxGuest` implement the ioctl layer with the UAPI struct
  layouts, following pointers with ctypes like copy_from_user/copy_to_user, with the driver's errno
  behaviour (EINVAL for msg_version 0 or unaligned cert buffers, EIO with VMM error INVALID_LEN and
  the needed size written back for a small cert buffer, EIO with fw_error, ENOTTY for unknown
  commands).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import struct
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from strongroom.attesters import (
    ARK_GUID,
    ASK_GUID,
    VCEK_GUID,
    OsTsmFs,
    build_cert_table,
)
from strongroom.attesters import _sevguest as snp
from strongroom.attesters import _tdxguest as tdx

SNP_REPORT_SIZE = 1184
FAKE_VCEK = b"0\x82fake-vcek-der" + bytes(300)
FAKE_ASK = b"0\x82fake-ask-der" + bytes(900)
FAKE_ARK = b"0\x82fake-ark-der" + bytes(900)
FAKE_CHAIN = ((VCEK_GUID, FAKE_VCEK), (ASK_GUID, FAKE_ASK), (ARK_GUID, FAKE_ARK))


def fake_snp_report(report_data: bytes, vmpl: int = 0, *, signing_key: int = 0) -> bytes:
    """A structurally plausible SNP report (version 2) with ``report_data`` at 0x50, signed (as
    its key-information field at 0x48 says) by the VCEK (``signing_key`` 0) or VLEK (1)."""
    report = bytearray(SNP_REPORT_SIZE)
    struct.pack_into("<IIQ", report, 0, 2, 0, 0x30000)
    struct.pack_into("<II", report, 0x30, vmpl, 1)
    struct.pack_into("<I", report, 0x48, signing_key << 2)
    report[0x50:0x90] = report_data
    report[0x2A0 : 0x2A0 + 144] = os.urandom(144)
    return bytes(report)


def fake_tdreport(report_data: bytes) -> bytes:
    """A TDREPORT_STRUCT-shaped blob with REPORTDATA at 128."""
    tdreport = bytearray(1024)
    struct.pack_into("<B", tdreport, 0, 0x81)
    tdreport[128:192] = report_data
    tdreport[224:256] = os.urandom(32)
    return bytes(tdreport)


def fake_tdx_quote(report_data: bytes, version: int = 4) -> bytes:
    """A quote-shaped blob (v4 or v5 header/body) with REPORTDATA where a verifier expects it."""
    header = struct.pack("<HHI", version, 2, 0x81) + bytes(40)
    body = bytearray(584)
    body[520:584] = report_data
    body_part = struct.pack("<HI", 2, 584) + bytes(body) if version == 5 else bytes(body)
    signature = os.urandom(64) + os.urandom(64) + bytes(200)
    return header + body_part + struct.pack("<I", len(signature)) + signature


@dataclass
class _Entry:
    write_generation: int = 0
    read_generation: int = 0
    inblob: bytes = b""
    privlevel: int = 0
    outblob: bytes | None = None
    auxblob: bytes = b""


@dataclass
class EmulatedConfigfs(OsTsmFs):
    """configfs-tsm semantics on a real tmp directory."""

    root: Path
    provider: str | None = "sev_guest"
    cert_chain: tuple[tuple[uuid.UUID, bytes], ...] = FAKE_CHAIN
    raw_auxblob: bytes | None = None
    echo: bool = True
    before_outblob: Callable[[Path], None] | None = None
    snp_report: Callable[[bytes, int], bytes] = fake_snp_report
    tdx_quote: Callable[[bytes], bytes] = fake_tdx_quote
    privlevel_floor: int = 0
    entries: dict[Path, _Entry] = field(default_factory=dict)
    generated: int = 0
    # The kernel takes tsm_rwsem around every attribute store and report generation.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    # -- kernel side --------------------------------------------------------------------------
    def _attributes(self) -> tuple[str, ...]:
        common = ("generation", "provider", "inblob", "outblob")
        if self.provider == "sev_guest":
            return (*common, "auxblob", "privlevel", "privlevel_floor")
        return common

    def _report_new(self, entry: _Entry) -> None:
        if len(entry.inblob) != 64:
            raise OSError(errno.EINVAL, "inblob must be 64 bytes")
        data = entry.inblob if self.echo else bytes(64)
        self.generated += 1
        if self.provider == "sev_guest":
            entry.outblob = self.snp_report(data, entry.privlevel)
            entry.auxblob = (
                self.raw_auxblob
                if self.raw_auxblob is not None
                else build_cert_table(self.cert_chain)
            )
        else:
            entry.outblob = self.tdx_quote(data)
            entry.auxblob = b""

    # -- the file operations the attester performs -------------------------------------------
    def mkdir(self, path: Path) -> None:
        with self.lock:
            self._mkdir(path)

    def _mkdir(self, path: Path) -> None:
        if self.provider is None:
            raise OSError(errno.ENXIO, "no TSM provider")
        super().mkdir(path)
        self.entries[path] = _Entry()
        for name in self._attributes():
            (path / name).write_bytes(b"")
        (path / "provider").write_text(f"{self.provider}\n")
        if self.provider == "sev_guest":
            (path / "privlevel_floor").write_text(f"{self.privlevel_floor}\n")
        (path / "generation").write_text("0\n")

    def rmdir(self, path: Path) -> None:
        with self.lock:
            # Any entry, this emulation's or one another process made in the same tree.
            self.entries.pop(path, None)
            shutil.rmtree(path)

    def write(self, path: Path, data: bytes) -> None:
        with self.lock:
            self._write(path, data)

    def _write(self, path: Path, data: bytes) -> None:
        if path.parent not in self.entries:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        entry = self.entries[path.parent]
        if path.name == "inblob":
            if len(data) > 64:
                raise OSError(errno.EFBIG, "inblob too large")
            entry.inblob = data
        elif path.name == "privlevel":
            level = int(data)
            if not self.privlevel_floor <= level <= 3:  # the kernel's tsm_report_privlevel_store
                raise OSError(errno.EINVAL, "privlevel out of range")
            entry.privlevel = level
        else:
            raise OSError(errno.EACCES, f"{path.name} is read-only")
        super().write(path, data)
        entry.write_generation += 1
        (path.parent / "generation").write_text(f"{entry.write_generation}\n")

    def read(self, path: Path) -> bytes:
        if path.name == "outblob" and self.before_outblob is not None:
            self.before_outblob(path.parent)
        with self.lock:
            return self._read(path)

    def _read(self, path: Path) -> bytes:
        if path.parent not in self.entries:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        entry = self.entries[path.parent]
        if path.name in ("outblob", "auxblob"):
            if not entry.inblob:
                raise OSError(errno.EINVAL, "no inblob")
            if entry.outblob is None or entry.read_generation != entry.write_generation:
                self._report_new(entry)
                entry.read_generation = entry.write_generation
            blob = entry.outblob if path.name == "outblob" else entry.auxblob
            assert blob is not None
            path.write_bytes(blob)
        return super().read(path)

    def racing_writer(self, times: int) -> Callable[[Path], None]:
        """A hook that writes into the entry like another process would, ``times`` times."""
        remaining = [times]

        def hook(entry_path: Path) -> None:
            if remaining[0] > 0:
                remaining[0] -= 1
                self.write(entry_path / "inblob", os.urandom(64))

        return hook


class _FakeDevice:
    """Device-node bookkeeping shared by the fakes."""

    def __init__(self, nodes: tuple[str, ...]) -> None:
        self.nodes = set(nodes)
        self.open_fds: set[int] = set()
        self.calls: list[int] = []
        self._next_fd = 100

    def exists(self, path: str) -> bool:
        return path in self.nodes

    def open(self, path: str) -> int:
        if path not in self.nodes:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        self._next_fd += 1
        self.open_fds.add(self._next_fd)
        return self._next_fd

    def close(self, fd: int) -> None:
        self.open_fds.remove(fd)


def _copy_from_user(address: int, size: int) -> bytes:
    if address == 0:
        raise OSError(errno.EFAULT, "bad address")
    return ctypes.string_at(address, size)


def _copy_to_user(address: int, data: bytes) -> None:
    if address == 0:
        raise OSError(errno.EFAULT, "bad address")
    ctypes.memmove(address, data, len(data))


class FakeSevGuest(_FakeDevice):
    """``/dev/sev-guest`` as the sev-guest driver presents it."""

    def __init__(
        self,
        *,
        cert_chain: tuple[tuple[uuid.UUID, bytes], ...] = FAKE_CHAIN,
        certs_size: int | None = None,
        nodes: tuple[str, ...] = ("/dev/sev-guest",),
        snp_report: Callable[[bytes, int], bytes] = fake_snp_report,
    ) -> None:
        super().__init__(nodes)
        self.snp_report = snp_report
        table = build_cert_table(cert_chain) if cert_chain else b""
        # The host hands out whole pages.
        pages = -(-len(table) // 4096)
        self.host_certs = table + bytes(pages * 4096 - len(table))
        if certs_size is not None:
            self.host_certs = table + bytes(certs_size - len(table))
        self.fail_next: tuple[int, int, int] | None = None
        self.vmpck_disabled = False
        self.response_status = 0
        self.echo = True
        self.seen_certs_len: list[int] = []

    def ioctl(self, fd: int, request: int, arg: ctypes.Array[ctypes.c_char]) -> None:
        assert fd in self.open_fds
        self.calls.append(request)
        if request not in (snp.SNP_GET_REPORT, snp.SNP_GET_EXT_REPORT, snp.SNP_GET_DERIVED_KEY):
            raise OSError(errno.ENOTTY, "inappropriate ioctl")
        raw = bytes(arg)[: snp.GUEST_REQUEST.size]
        msg_version, req_data, resp_data, _ = snp.GUEST_REQUEST.unpack(raw)
        if msg_version == 0:
            raise OSError(errno.EINVAL, "msg_version must be non-zero")
        if self.vmpck_disabled:
            raise OSError(errno.ENOTTY, "VMPCK disabled")

        def fail(err: int, fw_error: int, vmm_error: int) -> None:
            exitinfo2 = (vmm_error << 32) | fw_error
            packed = snp.GUEST_REQUEST.pack(msg_version, req_data, resp_data, exitinfo2)
            ctypes.memmove(arg, packed, len(packed))
            raise OSError(err, os.strerror(err))

        if self.fail_next is not None:
            err, fw_error, vmm_error = self.fail_next
            self.fail_next = None
            fail(err, fw_error, vmm_error)
        if not req_data or not resp_data:
            raise OSError(errno.EINVAL, "null request or response")
        certs = b""
        if request == snp.SNP_GET_REPORT:
            user_data, vmpl = snp.REPORT_REQ.unpack(_copy_from_user(req_data, snp.REPORT_REQ.size))
        elif request == snp.SNP_GET_EXT_REPORT:
            user_data, vmpl, certs_address, certs_len = snp.EXT_REPORT_REQ.unpack(
                _copy_from_user(req_data, snp.EXT_REPORT_REQ.size)
            )
            self.seen_certs_len.append(certs_len)
            if certs_len and certs_address:
                if certs_len > snp.SEV_FW_BLOB_MAX_SIZE or certs_len % 4096:
                    raise OSError(errno.EINVAL, "bad certs_len")
                if len(self.host_certs) > certs_len:
                    # The driver re-issues a plain request, then reports the size it needs.
                    needed = snp.EXT_REPORT_REQ.pack(
                        user_data, vmpl, certs_address, len(self.host_certs)
                    )
                    _copy_to_user(req_data, needed)
                    fail(errno.EIO, 0, snp.SNP_GUEST_VMM_ERR_INVALID_LEN)
                certs = self.host_certs + bytes(certs_len - len(self.host_certs))
                _copy_to_user(certs_address, certs)
        else:
            raise OSError(errno.EINVAL, "derived keys are not emulated")
        report = self.snp_report(user_data if self.echo else bytes(64), vmpl)
        body = snp.MSG_REPORT_RSP_HEADER.pack(self.response_status, len(report)) + report
        _copy_to_user(resp_data, body + bytes(snp.REPORT_RESP_SIZE - len(body)))


class FakeTdxGuest(_FakeDevice):
    """``/dev/tdx_guest``: GET_REPORT0 always; GET_QUOTE under the given command number, if any."""

    def __init__(
        self,
        *,
        quote_command: int | None = None,
        quote_status: int = tdx.GET_QUOTE_SUCCESS,
        quote_version: int = 4,
        nodes: tuple[str, ...] = ("/dev/tdx_guest",),
        tdx_quote: Callable[[bytes], bytes] | None = None,
    ) -> None:
        super().__init__(nodes)
        self.tdx_quote = tdx_quote
        self.quote_command = quote_command
        self.quote_status = quote_status
        self.quote_version = quote_version
        self.report_errno: int | None = None

    def ioctl(self, fd: int, request: int, arg: ctypes.Array[ctypes.c_char]) -> None:
        assert fd in self.open_fds
        self.calls.append(request)
        if request == tdx.TDX_CMD_GET_REPORT0:
            if self.report_errno is not None:
                raise OSError(self.report_errno, os.strerror(self.report_errno))
            assert len(arg) == tdx.REPORT_REQ_SIZE
            report_data = bytes(arg)[:64]
            ctypes.memmove(ctypes.addressof(arg) + 64, fake_tdreport(report_data), 1024)
            return
        if request != self.quote_command or request is None:
            raise OSError(errno.ENOTTY, "inappropriate ioctl")
        buf_address, length = tdx.QUOTE_REQ.unpack(bytes(arg)[: tdx.QUOTE_REQ.size])
        if not length or length > tdx.QUOTE_BUFFER_SIZE:
            raise OSError(errno.EINVAL, "bad quote buffer length")
        version, _status, in_len, _out = tdx.QUOTE_HDR.unpack(
            _copy_from_user(buf_address, tdx.QUOTE_HDR.size)
        )
        if version != 1 or in_len != 1024:
            _copy_to_user(buf_address + 8, struct.pack("<Q", tdx.GET_QUOTE_ERROR))
            return
        tdreport = _copy_from_user(buf_address + tdx.QUOTE_HDR.size, in_len)
        if self.quote_status != tdx.GET_QUOTE_SUCCESS:
            _copy_to_user(buf_address + 8, struct.pack("<Q", self.quote_status))
            return
        report_data = tdreport[128:192]
        if self.tdx_quote is not None:
            quote = self.tdx_quote(report_data)
        else:
            quote = fake_tdx_quote(report_data, self.quote_version)
        header = tdx.QUOTE_HDR.pack(1, tdx.GET_QUOTE_SUCCESS, in_len, len(quote))
        _copy_to_user(buf_address, header + quote)

"""TDX attestation through the legacy ``/dev/tdx_guest`` ioctls.

What this path can and cannot produce:

- ``TDX_CMD_GET_REPORT0`` (upstream since Linux 6.2; ``include/uapi/linux/tdx-guest.h``:
  ``struct tdx_report_req { u8 reportdata[64]; u8 tdreport[1024]; }``, ``_IOWR('T', 1, ...)``)
  returns a TDREPORT. A TDREPORT is MAC'd with a CPU-local key, not signed: only software on the
  same machine (the Quoting Enclave) can check it, so it is useless to a remote key broker.
- A quote needs the host's quoting service. Upstream Linux never merged an ioctl for it; since 6.7
  quotes come from configfs-tsm (:class:`ConfigfsTsmAttester`, the preferred path). Some vendor
  kernels of the 6.2 to 6.6 era carried ``TDX_CMD_GET_QUOTE`` with ``struct tdx_quote_req { u64 buf;
  u64 len; }`` pointing at a GHCI GetQuote buffer (``struct tdx_quote_hdr { u64 version; u64
  status; u32 in_len; u32 out_len; }`` followed by the TDREPORT in, the quote out), under two
  numbers: ``_IOR('T', 2, ...)`` (the posted RFC, used by go-tdx-guest) and ``_IOWR('T', 4, ...)``
  (Intel's TDX kernel tree). Both are tried; ENOTTY from both means this kernel cannot quote here
  and :meth:`TdxGuestAttester.attest` fails with ``TDX_QUOTE_UNSUPPORTED``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import struct

from strongroom.attesters._base import (
    AttestationUnavailable,
    AttesterNotConfigured,
    EvidenceBundle,
    TeeType,
    check_echo,
    require_report_data,
)
from strongroom.attesters._devio import DeviceIo, OsDeviceIo, ior, iowr, new_buffer, open_error
from strongroom.attesters._layouts import (
    TDREPORT_SIZE,
    tdreport_report_data,
    tdx_quote_report_data,
)
from strongroom.files import errno_name
from strongroom.reasons import Reason

log = logging.getLogger(__name__)

DEFAULT_TDX_GUEST_DEVICES = ("/dev/tdx_guest", "/dev/tdx-guest")

TDX_REPORTDATA_LEN = 64
REPORT_REQ_SIZE = TDX_REPORTDATA_LEN + TDREPORT_SIZE
QUOTE_REQ = struct.Struct("<QQ")
QUOTE_HDR = struct.Struct("<QQII")

TDX_CMD_GET_REPORT0 = iowr("T", 1, REPORT_REQ_SIZE)
TDX_CMD_GET_QUOTE_RFC = ior("T", 2, QUOTE_REQ.size)
TDX_CMD_GET_QUOTE_INTEL = iowr("T", 4, QUOTE_REQ.size)
_QUOTE_COMMANDS = (TDX_CMD_GET_QUOTE_RFC, TDX_CMD_GET_QUOTE_INTEL)

QUOTE_HDR_VERSION = 1
GET_QUOTE_SUCCESS = 0
GET_QUOTE_IN_FLIGHT = 0xFFFFFFFFFFFFFFFF
GET_QUOTE_ERROR = 0x8000000000000000
GET_QUOTE_SERVICE_UNAVAILABLE = 0x8000000000000001
QUOTE_BUFFER_SIZE = 4 * 4096


class TdxGuestAttester:
    """TDX attester over the legacy device; quotes only where the kernel has TDX_CMD_GET_QUOTE."""

    def __init__(
        self,
        device: str = DEFAULT_TDX_GUEST_DEVICES[0],
        *,
        io: DeviceIo | None = None,
        quote_buffer_size: int = QUOTE_BUFFER_SIZE,
    ) -> None:
        if quote_buffer_size < QUOTE_HDR.size + TDREPORT_SIZE:
            raise ValueError("quote_buffer_size cannot even hold a TDREPORT")
        self._device = device
        self._io: DeviceIo = io or OsDeviceIo()
        self._quote_size = quote_buffer_size
        self._quote_command: int | None = None

    def __repr__(self) -> str:
        return f"TdxGuestAttester(device={self._device!r})"

    @property
    def tee_type(self) -> TeeType:
        """Always TDX."""
        return TeeType.TDX

    def tdreport(self, report_data: bytes) -> bytes:
        """A TDREPORT binding ``report_data``: MAC'd for local verification only, never for a broker."""
        data = require_report_data(report_data)
        fd = self._open()
        try:
            return self._tdreport(fd, data)
        finally:
            self._io.close(fd)

    def attest(self, report_data: bytes) -> EvidenceBundle:
        """A signed DCAP quote, through TDX_CMD_GET_QUOTE; fails where the kernel lacks it."""
        data = require_report_data(report_data)
        fd = self._open()
        try:
            tdreport = self._tdreport(fd, data)
            quote = self._quote(fd, tdreport)
        finally:
            self._io.close(fd)
        check_echo(tdx_quote_report_data(quote), data, "TDX quote")
        return EvidenceBundle(tee_type=TeeType.TDX, report=quote, source="tdx-guest")

    def _open(self) -> int:
        try:
            return self._io.open(self._device)
        except OSError as exc:
            raise open_error(self._device, exc, Reason.TDX_DEVICE_UNAVAILABLE) from None

    def _tdreport(self, fd: int, data: bytes) -> bytes:
        arg = new_buffer(data + bytes(TDREPORT_SIZE))
        try:
            self._io.ioctl(fd, TDX_CMD_GET_REPORT0, arg)
        except OSError as exc:
            code = errno_name(exc)
            if exc.errno == errno.ENOTTY:
                # A kernel without TDX_CMD_GET_REPORT0 (before 6.2, or a vendor tree numbering it
                # otherwise): permanent, so no UNAVAILABLE for the loader to retry forever.
                raise AttesterNotConfigured(
                    f"{self._device} has no TDX_CMD_GET_REPORT0 on this kernel (ENOTTY); use "
                    "configfs-tsm (Linux 6.7 or later)",
                    reason=Reason.TDX_REPORT_UNSUPPORTED,
                ) from None
            raise AttestationUnavailable(
                f"TDX_CMD_GET_REPORT0 failed: {code}", reason=Reason.TDX_REPORT_FAILED
            ) from None
        tdreport = arg.raw[TDX_REPORTDATA_LEN:]
        check_echo(tdreport_report_data(tdreport), data, "TDREPORT")
        return tdreport

    def _quote(self, fd: int, tdreport: bytes) -> bytes:
        commands = (self._quote_command,) if self._quote_command is not None else _QUOTE_COMMANDS
        for command in commands:
            buf = new_buffer(self._quote_size)
            header = QUOTE_HDR.pack(QUOTE_HDR_VERSION, 0, len(tdreport), 0)
            ctypes.memmove(buf, header + tdreport, len(header) + len(tdreport))
            req = new_buffer(QUOTE_REQ.pack(ctypes.addressof(buf), self._quote_size))
            try:
                self._io.ioctl(fd, command, req)
            except OSError as exc:
                if exc.errno == errno.ENOTTY:
                    continue
                code = errno_name(exc)
                raise AttestationUnavailable(
                    f"TDX_CMD_GET_QUOTE failed: {code}", reason=Reason.TDX_QUOTE_FAILED
                ) from None
            self._quote_command = command
            return _quote_from_buffer(buf.raw)
        raise AttesterNotConfigured(
            f"{self._device} cannot produce TDX quotes on this kernel (no TDX_CMD_GET_QUOTE); "
            "use configfs-tsm (Linux 6.7 or later), whose outblob is a quote",
            reason=Reason.TDX_QUOTE_UNSUPPORTED,
        )


def _quote_from_buffer(buf: bytes) -> bytes:
    _version, status, _in_len, out_len = QUOTE_HDR.unpack_from(buf, 0)
    if status == GET_QUOTE_IN_FLIGHT:
        raise AttestationUnavailable(
            "the host's quoting service did not finish", reason=Reason.TDX_QUOTE_IN_FLIGHT
        )
    if status == GET_QUOTE_SERVICE_UNAVAILABLE:
        raise AttestationUnavailable(
            "the host's quoting service is unavailable", reason=Reason.TDX_QUOTE_SERVICE_UNAVAILABLE
        )
    if status != GET_QUOTE_SUCCESS:
        raise AttestationUnavailable(
            f"the host's quoting service failed (status 0x{status:x})",
            reason=Reason.TDX_QUOTE_FAILED,
        )
    if not 0 < out_len <= len(buf) - QUOTE_HDR.size:
        raise AttestationUnavailable(
            f"the quoting service returned an impossible quote length {out_len}",
            reason=Reason.TDX_QUOTE_MALFORMED,
        )
    return buf[QUOTE_HDR.size : QUOTE_HDR.size + out_len]

"""SEV-SNP attestation through the legacy ``/dev/sev-guest`` ioctls (Linux 5.19+).

Struct layouts follow ``include/uapi/linux/sev-guest.h``:

- ``struct snp_guest_request_ioctl`` (32 bytes): ``u8 msg_version`` (must be non-zero), 7 bytes of
  padding, ``u64 req_data``, ``u64 resp_data`` (user pointers), ``u64 exitinfo2`` = firmware error
  (low 32 bits) and VMM error (high 32 bits).
- ``struct snp_report_req`` (96 bytes): ``u8 user_data[64]``, ``u32 vmpl``, ``u8 rsvd[28]``.
- ``struct snp_ext_report_req`` (112 bytes): ``snp_report_req``, ``u64 certs_address``,
  ``u32 certs_len`` (page-aligned, at most 16 KiB), 4 bytes of padding.
- ``struct snp_report_resp``: 4000 bytes holding the firmware's MSG_REPORT_RSP: ``u32 status``,
  ``u32 report_size``, 24 reserved bytes, then the report.

When the certificate buffer is too small, the kernel re-issues a plain request (to keep the message
sequence numbers in step), then fails the ioctl with EIO, VMM error 1 (INVALID_LEN) in the upper half
of ``exitinfo2`` and the required size written back into ``certs_len``; we retry once with that size.
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
from strongroom.attesters._certtable import endorsement_chain, parse_cert_table
from strongroom.attesters._devio import Buffer, DeviceIo, OsDeviceIo, iowr, new_buffer, open_error
from strongroom.attesters._layouts import snp_report_data, snp_signing_key
from strongroom.files import errno_name
from strongroom.reasons import Reason

log = logging.getLogger(__name__)

DEFAULT_SEV_GUEST_DEVICE = "/dev/sev-guest"

GUEST_REQUEST = struct.Struct("<B7xQQQ")
REPORT_REQ = struct.Struct("<64sI28x")
EXT_REPORT_REQ = struct.Struct("<64sI28xQI4x")
REPORT_RESP_SIZE = 4000
MSG_REPORT_RSP_HEADER = struct.Struct("<II24x")

SNP_GET_REPORT = iowr("S", 0x0, GUEST_REQUEST.size)
SNP_GET_DERIVED_KEY = iowr("S", 0x1, GUEST_REQUEST.size)
SNP_GET_EXT_REPORT = iowr("S", 0x2, GUEST_REQUEST.size)

MSG_VERSION = 1
PAGE_SIZE = 4096
SEV_FW_BLOB_MAX_SIZE = 0x4000
SNP_GUEST_VMM_ERR_INVALID_LEN = 1
SNP_GUEST_VMM_ERR_BUSY = 2
# What the driver leaves in exitinfo2 when no request reached the firmware (0xff in early
# drivers, SEV_RET_NO_FW_CALL, all ones, since).
_NO_FIRMWARE_CALL = frozenset({0xFF, 0xFFFFFFFF})


class SevGuestAttester:
    """SEV-SNP attester over ``/dev/sev-guest``; the extended report also returns the VCEK/VLEK."""

    def __init__(
        self,
        device: str = DEFAULT_SEV_GUEST_DEVICE,
        *,
        io: DeviceIo | None = None,
        vmpl: int = 0,
        extended: bool = True,
        certs_buffer_size: int = SEV_FW_BLOB_MAX_SIZE,
    ) -> None:
        if not 0 <= vmpl <= 3:
            raise ValueError("vmpl must be between 0 and 3")
        if certs_buffer_size <= 0 or certs_buffer_size % PAGE_SIZE:
            raise ValueError("certs_buffer_size must be a positive multiple of the page size")
        self._device = device
        self._io: DeviceIo = io or OsDeviceIo()
        self._vmpl = vmpl
        self._extended = extended
        self._certs_size = min(certs_buffer_size, SEV_FW_BLOB_MAX_SIZE)

    def __repr__(self) -> str:
        return f"SevGuestAttester(device={self._device!r}, extended={self._extended})"

    @property
    def tee_type(self) -> TeeType:
        """Always SEV_SNP."""
        return TeeType.SEV_SNP

    def attest(self, report_data: bytes) -> EvidenceBundle:
        """Requests an attestation report (and, if extended, the host's certificate table)."""
        data = require_report_data(report_data)
        try:
            fd = self._io.open(self._device)
        except OSError as exc:
            raise open_error(self._device, exc, Reason.SNP_DEVICE_UNAVAILABLE) from None
        try:
            if self._extended:
                report, certs = self._ext_report(fd, data)
            else:
                report, certs = self._report(fd, data), b""
        finally:
            self._io.close(fd)
        check_echo(snp_report_data(report), data, "SNP report")
        return EvidenceBundle(
            tee_type=TeeType.SEV_SNP,
            report=report,
            certificates=endorsement_chain(parse_cert_table(certs), snp_signing_key(report)),
            source="sev-guest",
        )

    def _report(self, fd: int, data: bytes) -> bytes:
        req = new_buffer(REPORT_REQ.pack(data, self._vmpl))
        resp = new_buffer(REPORT_RESP_SIZE)
        self._issue(fd, SNP_GET_REPORT, req, resp)
        return _report_from_response(resp.raw)

    def _ext_report(self, fd: int, data: bytes) -> tuple[bytes, bytes]:
        size = self._certs_size
        for attempt in (1, 2):
            certs = new_buffer(size)
            req = new_buffer(EXT_REPORT_REQ.pack(data, self._vmpl, ctypes.addressof(certs), size))
            resp = new_buffer(REPORT_RESP_SIZE)
            needed = self._issue(fd, SNP_GET_EXT_REPORT, req, resp, ext_req=req)
            if needed is None:
                return _report_from_response(resp.raw), certs.raw
            if attempt == 2 or needed <= size or needed > SEV_FW_BLOB_MAX_SIZE:
                raise AttestationUnavailable(
                    f"the host's certificate table needs {needed} bytes "
                    f"(buffer {size}, kernel limit {SEV_FW_BLOB_MAX_SIZE})",
                    reason=Reason.SNP_CERTS_TOO_LARGE,
                )
            log.info("SNP certificate buffer too small; retrying", extra={"needed": needed})
            size = needed
        raise AssertionError("unreachable")

    def _issue(
        self, fd: int, request: int, req: Buffer, resp: Buffer, *, ext_req: Buffer | None = None
    ) -> int | None:
        """Issues one guest request; returns the needed certificate size on INVALID_LEN, else None."""
        arg = new_buffer(
            GUEST_REQUEST.pack(MSG_VERSION, ctypes.addressof(req), ctypes.addressof(resp), 0xFF)
        )
        try:
            self._io.ioctl(fd, request, arg)
        except OSError as exc:
            _, _, _, exitinfo2 = GUEST_REQUEST.unpack(arg.raw)
            fw_error = exitinfo2 & 0xFFFFFFFF
            vmm_error = exitinfo2 >> 32
            if (
                ext_req is not None
                and exc.errno == errno.EIO
                and vmm_error == SNP_GUEST_VMM_ERR_INVALID_LEN
            ):
                *_, certs_len = EXT_REPORT_REQ.unpack(ext_req.raw)
                return int(certs_len)
            raise _guest_request_error(exc, fw_error, vmm_error) from None
        return None


def _report_from_response(resp: bytes) -> bytes:
    status, size = MSG_REPORT_RSP_HEADER.unpack_from(resp, 0)
    if status != 0:
        raise AttestationUnavailable(
            f"SNP firmware refused the report request (status 0x{status:x})",
            reason=Reason.SNP_REPORT_STATUS,
        )
    if not 0 < size <= REPORT_RESP_SIZE - MSG_REPORT_RSP_HEADER.size:
        raise AttestationUnavailable(
            f"SNP firmware returned an impossible report size {size}",
            reason=Reason.SNP_REPORT_MALFORMED,
        )
    start = MSG_REPORT_RSP_HEADER.size
    return resp[start : start + size]


def _guest_request_error(
    exc: OSError, fw_error: int, vmm_error: int
) -> AttestationUnavailable | AttesterNotConfigured:
    """One precise reason per way a guest request fails (``exitinfo2`` tells the firmware's
    error, low half, from the host's, high half).

    The driver disables the VMPCK after any failed exchange but a short certificate buffer (the
    message sequence number can no longer be trusted), so every later request fails with ENOTTY
    until the VM restarts: that is a permanent condition (FAILED_PRECONDITION), not one to retry.
    """
    code = errno_name(exc)
    no_call = fw_error in _NO_FIRMWARE_CALL and vmm_error in (0, 0xFFFFFFFF)
    if no_call:
        fw_error = vmm_error = 0
    detail = f"{code}, fw_error=0x{fw_error:x}, vmm_error=0x{vmm_error:x}"
    log.error(
        "SNP guest request failed",
        extra={"errno": code, "fw_error": fw_error, "vmm_error": vmm_error},
    )
    if exc.errno == errno.ENOTTY:
        return AttesterNotConfigured(
            "the SEV guest device refuses guest requests: the request is unsupported, or "
            f"the driver disabled the VMPCK after a failed exchange and the VM must be restarted "
            f"({detail})",
            reason=Reason.SNP_REQUEST_UNSUPPORTED,
        )
    if exc.errno == errno.ETIMEDOUT or vmm_error == SNP_GUEST_VMM_ERR_BUSY:
        reason, what = Reason.SNP_HOST_BUSY, "the host kept throttling the request"
    elif exc.errno == errno.EINVAL:
        reason, what = Reason.SNP_REQUEST_REJECTED, "the kernel rejected the request"
    elif exc.errno == errno.EIO and vmm_error:
        reason, what = Reason.SNP_HOST_ERROR, "the host (VMM) failed the request"
    elif exc.errno == errno.EIO and fw_error:
        reason, what = Reason.SNP_FIRMWARE_ERROR, "the SNP firmware failed the request"
    else:
        reason, what = Reason.SNP_GUEST_REQUEST_FAILED, "the guest request failed"
    return AttestationUnavailable(f"{what} ({detail})", reason=reason)

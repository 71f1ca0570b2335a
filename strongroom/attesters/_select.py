"""Choosing the attester: hardware automatically, the simulator only when asked and not in production."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from strongroom.attesters._base import Attester, AttesterNotConfigured, TeeType
from strongroom.attesters._configfs import (
    DEFAULT_TSM_REPORT_ROOT,
    ConfigfsTsmAttester,
    TsmFs,
)
from strongroom.attesters._devio import DeviceIo, OsDeviceIo, check_openable
from strongroom.attesters._sevguest import DEFAULT_SEV_GUEST_DEVICE, SevGuestAttester
from strongroom.attesters._simulated import SimulatedAttester, SimulatedTee
from strongroom.attesters._tdxguest import DEFAULT_TDX_GUEST_DEVICES, TdxGuestAttester
from strongroom.reasons import Reason

log = logging.getLogger(__name__)

ATTESTER_KINDS = ("auto", "configfs-tsm", "sev-guest", "tdx-guest", "simulated")


def select_attester(
    kind: str = "auto",
    *,
    production: bool,
    configfs_root: Path = DEFAULT_TSM_REPORT_ROOT,
    sev_guest_device: str = DEFAULT_SEV_GUEST_DEVICE,
    tdx_guest_devices: Sequence[str] = DEFAULT_TDX_GUEST_DEVICES,
    fs: TsmFs | None = None,
    io: DeviceIo | None = None,
    simulator: SimulatedTee | None = None,
    simulator_tee_type: TeeType | None = None,
    simulator_claims: Mapping[str, Any] | None = None,
    privlevel: int | None = None,
) -> Attester:
    """Returns the attester for ``kind``.

    ``auto`` tries configfs-tsm (with a registered provider), then ``/dev/sev-guest``, then
    ``/dev/tdx_guest``, and fails with NO_ATTESTER when none exists: it never falls back to the
    simulator. ``simulated`` needs ``simulator``, ``simulator_tee_type`` and ``simulator_claims``
    (see :class:`SimulatedAttester`) and is refused when ``production`` is true. ``privlevel``
    (0-3; SEV-SNP) is the VMPL reports are requested at: configfs-tsm's ``privlevel`` attribute,
    ``/dev/sev-guest``'s ``vmpl`` (default: the kernel's, 0 for the device).
    """
    if privlevel is not None and not 0 <= privlevel <= 3:
        raise ValueError("privlevel must be between 0 and 3")
    io = io or OsDeviceIo()
    if kind == "simulated":
        if simulator is None or simulator_tee_type is None:
            raise AttesterNotConfigured(
                "attester kind 'simulated' needs a simulator and its TEE type",
                reason=Reason.SIMULATOR_MISSING,
            )
        return SimulatedAttester(
            simulator, simulator_tee_type, production=production, claims=simulator_claims
        )
    if kind == "configfs-tsm":
        return ConfigfsTsmAttester(configfs_root, fs=fs, privlevel=privlevel)
    if kind == "sev-guest":
        if not io.exists(sev_guest_device):
            raise AttesterNotConfigured(
                f"{sev_guest_device} does not exist", reason=Reason.NO_ATTESTER
            )
        check_openable(io, sev_guest_device)
        return SevGuestAttester(sev_guest_device, io=io, vmpl=privlevel or 0)
    if kind == "tdx-guest":
        for device in tdx_guest_devices:
            if io.exists(device):
                check_openable(io, device)
                return TdxGuestAttester(device, io=io)
        raise AttesterNotConfigured(
            f"none of {', '.join(tdx_guest_devices)} exists", reason=Reason.NO_ATTESTER
        )
    if kind != "auto":
        raise AttesterNotConfigured(
            f"unknown attester kind {kind!r} (known: {', '.join(ATTESTER_KINDS)})",
            reason=Reason.ATTESTER_KIND_UNKNOWN,
        )
    tried: list[str] = []
    try:
        attester: Attester = ConfigfsTsmAttester(configfs_root, fs=fs, privlevel=privlevel)
    except AttesterNotConfigured as exc:
        tried.append(f"configfs-tsm ({exc.reason})")
    else:
        log.info("attester selected", extra={"attester": "configfs-tsm"})
        return attester
    # A device that exists but this process may not open (not given to its user or group) is
    # refused here, at the start, rather than failing every attestation as UNAVAILABLE later.
    if io.exists(sev_guest_device):
        check_openable(io, sev_guest_device)
        log.info("attester selected", extra={"attester": "sev-guest"})
        return SevGuestAttester(sev_guest_device, io=io, vmpl=privlevel or 0)
    tried.append(sev_guest_device)
    for device in tdx_guest_devices:
        if io.exists(device):
            check_openable(io, device)
            log.info("attester selected", extra={"attester": "tdx-guest"})
            return TdxGuestAttester(device, io=io)
        tried.append(device)
    raise AttesterNotConfigured(
        f"no TEE attestation interface found (tried {', '.join(tried)}); this is not a "
        "confidential VM, or its guest drivers are not loaded",
        reason=Reason.NO_ATTESTER,
    )

"""Attesters: exactly 64 bytes of REPORT_DATA in, hardware evidence (report, certificates) out.

Implementations: :class:`ConfigfsTsmAttester` (Linux configfs-tsm, SEV-SNP and TDX; preferred),
:class:`SevGuestAttester` (``/dev/sev-guest`` ioctls), :class:`TdxGuestAttester`
(``/dev/tdx_guest``; quotes only on kernels with TDX_CMD_GET_QUOTE) and :class:`SimulatedAttester`
(development only; refused in production). :func:`select_attester` picks one.
"""

from strongroom.attesters._base import (
    REPORT_DATA_SIZE,
    AttestationUnavailable,
    Attester,
    AttesterNotConfigured,
    Collateral,
    CollateralKind,
    EvidenceBundle,
    InvalidReportData,
    ReportBindingMismatch,
    TeeType,
)
from strongroom.attesters._certtable import (
    ARK_GUID,
    ASK_GUID,
    VCEK_GUID,
    VLEK_GUID,
    CertTableEntry,
    MalformedCertTable,
    build_cert_table,
    parse_cert_table,
)
from strongroom.attesters._configfs import (
    DEFAULT_TSM_REPORT_ROOT,
    ConfigfsTsmAttester,
    OsTsmFs,
    TsmFs,
)
from strongroom.attesters._devio import DeviceIo, OsDeviceIo
from strongroom.attesters._select import ATTESTER_KINDS, select_attester
from strongroom.attesters._sevguest import SevGuestAttester
from strongroom.attesters._simulated import SimulatedAttester, SimulatedTee
from strongroom.attesters._tdxguest import TdxGuestAttester

__all__ = [
    "ARK_GUID",
    "ASK_GUID",
    "ATTESTER_KINDS",
    "DEFAULT_TSM_REPORT_ROOT",
    "REPORT_DATA_SIZE",
    "VCEK_GUID",
    "VLEK_GUID",
    "AttestationUnavailable",
    "Attester",
    "AttesterNotConfigured",
    "CertTableEntry",
    "Collateral",
    "CollateralKind",
    "ConfigfsTsmAttester",
    "DeviceIo",
    "EvidenceBundle",
    "InvalidReportData",
    "MalformedCertTable",
    "OsDeviceIo",
    "OsTsmFs",
    "ReportBindingMismatch",
    "SevGuestAttester",
    "SimulatedAttester",
    "SimulatedTee",
    "TdxGuestAttester",
    "TeeType",
    "TsmFs",
    "build_cert_table",
    "parse_cert_table",
    "select_attester",
]

"""TDX TCB status evaluation against verified Intel collateral.

Follows Intel's quote verification library: the first platform TCB level whose SGX components and
PCESVN are not above the PCK certificate's, and whose TDX components are not above TEE_TCB_SVN
(from index 2 when the TDX module major version, TEE_TCB_SVN[1], is non-zero: the module is then
judged by its own identity ``TDX_<major>`` and TEE_TCB_SVN[0]). The QE identity's first level with
ISVSVN not above the QE's gives the QE status (any but UpToDate and Revoked counts as OutOfDate,
as in Intel's QVL). Statuses converge: an out-of-date component makes
the result OutOfDate (or OutOfDateConfigurationNeeded), a revoked one Revoked. For TD 1.5 a TD out
of date only because of its TDX module, whose current module (TEE_TCB_SVN2) is the newest, is
TdRelaunchAdvised (:func:`relaunch`).
"""

from __future__ import annotations

from dataclasses import dataclass

from strongroom.attestation.claims import TCB_NO_MATCHING_LEVEL
from strongroom.attestation.collateral import (
    ModuleTcbLevel,
    QeIdentity,
    TcbInfo,
    TcbLevel,
    TdxModuleIdentity,
)

UP_TO_DATE = "UpToDate"
OUT_OF_DATE = "OutOfDate"
REVOKED = "Revoked"
CONFIGURATION_NEEDED = "ConfigurationNeeded"
SW_HARDENING_NEEDED = "SWHardeningNeeded"
CONFIG_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
OUT_OF_DATE_CONFIG_NEEDED = "OutOfDateConfigurationNeeded"
TD_RELAUNCH_ADVISED = "TdRelaunchAdvised"
TD_RELAUNCH_ADVISED_CONFIG_NEEDED = "TdRelaunchAdvisedConfigurationNeeded"

INTEL_STATUSES = frozenset(
    {
        UP_TO_DATE,
        OUT_OF_DATE,
        REVOKED,
        CONFIGURATION_NEEDED,
        SW_HARDENING_NEEDED,
        CONFIG_AND_SW_HARDENING_NEEDED,
        OUT_OF_DATE_CONFIG_NEEDED,
        TD_RELAUNCH_ADVISED,
        TD_RELAUNCH_ADVISED_CONFIG_NEEDED,
    }
)
_CONFIG_NEEDED = {
    CONFIGURATION_NEEDED,
    OUT_OF_DATE_CONFIG_NEEDED,
    CONFIG_AND_SW_HARDENING_NEEDED,
    TD_RELAUNCH_ADVISED_CONFIG_NEEDED,
}


@dataclass(frozen=True)
class TcbEvaluation:
    """The outcome of one evaluation."""

    status: str
    platform_status: str
    module_status: str | None
    qe_status: str | None
    tcb_date: str | None
    advisory_ids: tuple[str, ...]


def module_identity(tcb_info: TcbInfo, tee_tcb_svn: bytes) -> TdxModuleIdentity | None:
    """The module identity that judges this TEE_TCB_SVN (the base ``tdxModule`` for major 0)."""
    major = tee_tcb_svn[1]
    if major == 0:
        return tcb_info.tdx_module
    wanted = f"TDX_{major:02X}"
    return next((m for m in tcb_info.tdx_module_identities if m.id.upper() == wanted), None)


def _first_module_level(levels: tuple[ModuleTcbLevel, ...], svn: int) -> ModuleTcbLevel | None:
    return next((lv for lv in levels if svn >= lv.isvsvn), None)


def _meets_sgx(level: TcbLevel, pck_components: tuple[int, ...], pck_pcesvn: int) -> bool:
    """The PCK certificate's SGX components and PCESVN are each at least the level's."""
    return (
        all(p >= c for p, c in zip(pck_components, level.sgx_components, strict=True))
        and pck_pcesvn >= level.pcesvn
    )


def _converge(platform: str, components: list[str]) -> str:
    status = platform
    if OUT_OF_DATE in components:
        if platform in (UP_TO_DATE, SW_HARDENING_NEEDED):
            status = OUT_OF_DATE
        elif platform in (CONFIGURATION_NEEDED, CONFIG_AND_SW_HARDENING_NEEDED):
            status = OUT_OF_DATE_CONFIG_NEEDED
    if REVOKED in components:
        status = REVOKED
    return status


def evaluate(
    *,
    tcb_info: TcbInfo,
    qe_identity: QeIdentity | None,
    pck_components: tuple[int, ...],
    pck_pcesvn: int,
    tee_tcb_svn: bytes,
    qe_isv_svn: int,
) -> TcbEvaluation:
    """Evaluates one TEE_TCB_SVN (see the module docstring)."""
    no_match = TcbEvaluation(TCB_NO_MATCHING_LEVEL, TCB_NO_MATCHING_LEVEL, None, None, None, ())
    start = 2 if tee_tcb_svn[1] > 0 else 0
    platform = next(
        (
            level
            for level in tcb_info.tcb_levels
            if _meets_sgx(level, pck_components, pck_pcesvn)
            and all(tee_tcb_svn[i] >= level.tdx_components[i] for i in range(start, 16))
        ),
        None,
    )
    if platform is None:
        return no_match
    components: list[str] = []
    dates = [platform.tcb_date]
    advisories = list(platform.advisory_ids)
    module_status: str | None = None
    if tee_tcb_svn[1] > 0:
        ident = module_identity(tcb_info, tee_tcb_svn)
        level = _first_module_level(ident.tcb_levels, tee_tcb_svn[0]) if ident else None
        if level is None:
            return TcbEvaluation(
                TCB_NO_MATCHING_LEVEL, platform.tcb_status, TCB_NO_MATCHING_LEVEL, None, None, ()
            )
        module_status = level.tcb_status
        components.append(level.tcb_status)
        dates.append(level.tcb_date)
        advisories += level.advisory_ids
    qe_status: str | None = None
    if qe_identity is not None:
        qe_level = _first_module_level(qe_identity.tcb_levels, qe_isv_svn)
        if qe_level is None:
            return TcbEvaluation(
                TCB_NO_MATCHING_LEVEL,
                platform.tcb_status,
                module_status,
                TCB_NO_MATCHING_LEVEL,
                None,
                (),
            )
        qe_status = qe_level.tcb_status
        # Intel's QVL (EnclaveReportVerifier) reads a QE level that is neither UpToDate nor
        # Revoked as "ISVSVN out of date", whatever its label (ConfigurationNeeded,
        # OutOfDateConfigurationNeeded, SWHardeningNeeded, a status it does not know).
        components.append(qe_status if qe_status in (UP_TO_DATE, REVOKED) else OUT_OF_DATE)
        dates.append(qe_level.tcb_date)
        advisories += qe_level.advisory_ids
    return TcbEvaluation(
        status=_converge(platform.tcb_status, components),
        platform_status=platform.tcb_status,
        module_status=module_status,
        qe_status=qe_status,
        tcb_date=min(dates),
        advisory_ids=tuple(dict.fromkeys(advisories)),
    )


def _sgx_level(
    tcb_info: TcbInfo, pck_components: tuple[int, ...], pck_pcesvn: int
) -> TcbLevel | None:
    """The first level whose SGX components and PCESVN the PCK certificate meets (Intel's
    ``sgxTcbLevel``: the TDX components are not looked at)."""
    return next(
        (lv for lv in tcb_info.tcb_levels if _meets_sgx(lv, pck_components, pck_pcesvn)), None
    )


def relaunch(
    launch: TcbEvaluation,
    *,
    tcb_info: TcbInfo,
    pck_components: tuple[int, ...],
    pck_pcesvn: int,
    tee_tcb_svn2: bytes,
) -> str:
    """The status of a TD 1.5 quote: Intel's TD relaunch check (QVL ``checkForRelaunch``) on the
    launch-time evaluation ``launch`` (of TEE_TCB_SVN) and the current TEE_TCB_SVN2.

    Relaunch is advised only when the TD is out of date *because of its TDX module* (module status
    OutOfDate, the platform's SGX level not out of date, the QE neither out of date nor revoked)
    and TEE_TCB_SVN2 meets the newest TCB level (module SVN and TEE_TCB_SVN2[2]); in every other
    case the launch-time status stands. Judging TEE_TCB_SVN2 as a whole against any level instead
    advised relaunch where Intel says OutOfDate (a module that was never out of date, a major-0
    module, an SVN2 short of the newest level), which a policy accepting TdRelaunchAdvised let
    through.
    """
    if launch.qe_status not in (None, UP_TO_DATE):  # Intel: any other QE status is not OK
        return launch.status
    if launch.module_status != OUT_OF_DATE:  # None (major 0) is Intel's STATUS_OK
        return launch.status
    sgx = _sgx_level(tcb_info, pck_components, pck_pcesvn)
    if sgx is None or sgx.tcb_status not in (
        UP_TO_DATE,
        SW_HARDENING_NEEDED,
        CONFIGURATION_NEEDED,
        CONFIG_AND_SW_HARDENING_NEEDED,
    ):
        return launch.status
    tdx_status = _converge(launch.platform_status, [OUT_OF_DATE])  # the module's, checked above
    if tdx_status not in (OUT_OF_DATE, OUT_OF_DATE_CONFIG_NEEDED):
        return launch.status
    latest = tcb_info.tcb_levels[0]  # Intel publishes the levels newest first
    if tee_tcb_svn2[1] == 0:
        module_current = tee_tcb_svn2[0] >= latest.tdx_components[0]
    else:
        ident = module_identity(tcb_info, tee_tcb_svn2)
        if ident is None or not ident.tcb_levels:
            return TCB_NO_MATCHING_LEVEL  # Intel: TDX module mismatch / not supported
        module_current = tee_tcb_svn2[0] >= ident.tcb_levels[0].isvsvn
    if not (module_current and tee_tcb_svn2[2] >= latest.tdx_components[2]):
        return launch.status
    if sgx.tcb_status in _CONFIG_NEEDED or tdx_status in _CONFIG_NEEDED:
        return TD_RELAUNCH_ADVISED_CONFIG_NEEDED
    return TD_RELAUNCH_ADVISED

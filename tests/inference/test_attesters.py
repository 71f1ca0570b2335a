"""Attesters against emulated kernel interfaces (configfs-tsm, /dev/sev-guest, /dev/tdx_guest)."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from strongroom import attesters
from strongroom.api.attestation.v1 import evidence_pb2
from strongroom.attestation.evidence import Evidence
from strongroom.attesters import (
    ARK_GUID,
    ASK_GUID,
    VCEK_GUID,
    VLEK_GUID,
    AttestationUnavailable,
    AttesterNotConfigured,
    ConfigfsTsmAttester,
    EvidenceBundle,
    InvalidReportData,
    MalformedCertTable,
    ReportBindingMismatch,
    SevGuestAttester,
    SimulatedAttester,
    TdxGuestAttester,
    TeeType,
    build_cert_table,
    parse_cert_table,
    select_attester,
)
from strongroom.attesters import _sevguest as snp
from strongroom.attesters import _tdxguest as tdx
from strongroom.reasons import Reason
from tests.inference.fake_tee import (
    FAKE_ARK,
    FAKE_ASK,
    FAKE_VCEK,
    EmulatedConfigfs,
    FakeSevGuest,
    FakeTdxGuest,
    fake_snp_report,
    fake_tdx_quote,
)

RD = bytes(range(64))


# -- REPORT_DATA is exactly 64 bytes ------------------------------------------------------------


@pytest.mark.parametrize("bad", [b"", bytes(32), bytes(63), bytes(65), bytes(128)])
def test_every_attester_rejects_report_data_that_is_not_64_bytes(
    tmp_path: Path, bad: bytes
) -> None:
    fs = EmulatedConfigfs(tmp_path / "report")
    instances: list[attesters.Attester] = [
        ConfigfsTsmAttester(fs.root, fs=fs),
        SevGuestAttester(io=FakeSevGuest()),
        TdxGuestAttester(io=FakeTdxGuest(quote_command=tdx.TDX_CMD_GET_QUOTE_RFC)),
        SimulatedAttester(_EchoSim(), TeeType.SEV_SNP, production=False, claims=SNP_CLAIMS),
    ]
    for attester in instances:
        with pytest.raises(InvalidReportData) as info:
            attester.attest(bad)
        assert info.value.reason == "REPORT_DATA_LENGTH"
    assert fs.generated == 0


def test_report_data_must_be_bytes() -> None:
    with pytest.raises(InvalidReportData):
        SevGuestAttester(io=FakeSevGuest()).attest("x" * 64)  # type: ignore[arg-type]


# -- configfs-tsm -----------------------------------------------------------------------------


def test_configfs_snp_report_with_certificate_chain(tmp_path: Path) -> None:
    fs = EmulatedConfigfs(tmp_path / "report")
    attester = ConfigfsTsmAttester(fs.root, fs=fs)
    assert attester.tee_type is TeeType.SEV_SNP
    assert attester.provider == "sev_guest"
    bundle = attester.attest(RD)
    assert bundle.tee_type is TeeType.SEV_SNP
    assert len(bundle.report) == 1184
    assert bundle.report[0x50:0x90] == RD
    assert bundle.certificates == (FAKE_VCEK, FAKE_ASK, FAKE_ARK)
    assert bundle.source == "configfs-tsm:sev_guest"
    assert list(fs.root.iterdir()) == []  # the probe entry and the report entry are gone
    assert fs.generated == 1


def _vlek_signed(data: bytes, vmpl: int) -> bytes:
    return fake_snp_report(data, vmpl, signing_key=1)


def test_configfs_orders_endorsement_key_first(tmp_path: Path) -> None:
    chain = ((ARK_GUID, FAKE_ARK), (ASK_GUID, FAKE_ASK), (VLEK_GUID, b"vlek-der"))
    fs = EmulatedConfigfs(tmp_path / "report", cert_chain=chain, snp_report=_vlek_signed)
    bundle = ConfigfsTsmAttester(fs.root, fs=fs).attest(RD)
    assert bundle.certificates == (b"vlek-der", FAKE_ASK, FAKE_ARK)


@pytest.mark.parametrize(
    ("signing_key", "expected"),
    [
        (0, (FAKE_VCEK, FAKE_ASK, FAKE_ARK)),
        (1, (b"vlek-der", FAKE_ASK, FAKE_ARK)),
        (7, (FAKE_ASK, FAKE_ARK)),
    ],
)
def test_only_the_endorsement_key_that_signed_the_report_is_sent(
    tmp_path: Path, signing_key: int, expected: tuple[bytes, ...]
) -> None:
    """A host whose table lists a VCEK and a VLEK: the verifier refuses evidence carrying two
    endorsement keys, so the attester sends the one the report's SIGNING_KEY field names."""
    chain = (
        (VLEK_GUID, b"vlek-der"),
        (VCEK_GUID, FAKE_VCEK),
        (ASK_GUID, FAKE_ASK),
        (ARK_GUID, FAKE_ARK),
    )

    def report(data: bytes, vmpl: int) -> bytes:
        return fake_snp_report(data, vmpl, signing_key=signing_key)

    fs = EmulatedConfigfs(tmp_path / "report", cert_chain=chain, snp_report=report)
    assert ConfigfsTsmAttester(fs.root, fs=fs).attest(RD).certificates == expected
    device = FakeSevGuest(cert_chain=chain, snp_report=report)
    assert SevGuestAttester(io=device).attest(RD).certificates == expected


def test_configfs_snp_without_host_certificates(tmp_path: Path) -> None:
    fs = EmulatedConfigfs(tmp_path / "report", raw_auxblob=b"")
    bundle = ConfigfsTsmAttester(fs.root, fs=fs).attest(RD)
    assert bundle.certificates == ()


def test_configfs_tdx_quote(tmp_path: Path) -> None:
    fs = EmulatedConfigfs(tmp_path / "report", provider="tdx_guest")
    attester = ConfigfsTsmAttester(fs.root, fs=fs)
    assert attester.tee_type is TeeType.TDX
    bundle = attester.attest(RD)
    assert bundle.tee_type is TeeType.TDX
    assert bundle.report[568:632] == RD
    assert bundle.certificates == ()
    assert list(fs.root.iterdir()) == []


def test_configfs_writes_privlevel_before_inblob(tmp_path: Path) -> None:
    fs = EmulatedConfigfs(tmp_path / "report")
    bundle = ConfigfsTsmAttester(fs.root, fs=fs, privlevel=2).attest(RD)
    assert int.from_bytes(bundle.report[0x30:0x34], "little") == 2


def test_configfs_racing_writer_is_detected_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fs = EmulatedConfigfs(tmp_path / "report")
    attester = ConfigfsTsmAttester(fs.root, fs=fs)
    fs.before_outblob = fs.racing_writer(times=1)
    with caplog.at_level(logging.WARNING):
        bundle = attester.attest(RD)
    assert bundle.report[0x50:0x90] == RD
    assert "written concurrently" in caplog.text
    assert list(fs.root.iterdir()) == []


def test_configfs_persistent_racing_writer_fails(tmp_path: Path) -> None:
    fs = EmulatedConfigfs(tmp_path / "report")
    attester = ConfigfsTsmAttester(fs.root, fs=fs, max_attempts=3)
    fs.before_outblob = fs.racing_writer(times=100)
    with pytest.raises(AttestationUnavailable) as info:
        attester.attest(RD)
    assert info.value.reason == "TSM_REPORT_RACE"
    assert list(fs.root.iterdir()) == []


@pytest.mark.parametrize("attribute", ["inblob", "privlevel"])
def test_configfs_threads_and_a_co_tenant_writing_every_entry(
    tmp_path: Path, attribute: str
) -> None:
    """Report entries are machine-wide: a co-tenant (root in the same VM) writes into every entry
    it sees while eight threads attest. Every report returned carries its own REPORT_DATA and
    VMPL 0: a foreign ``privlevel`` write keeps REPORT_DATA intact, so only the generation check
    (the kernel counts every write) catches it. Failures are TSM_REPORT_RACE only, and no entry is
    left behind."""
    fs = EmulatedConfigfs(tmp_path / "report")
    attester = ConfigfsTsmAttester(fs.root, fs=fs, max_attempts=20)
    stop = threading.Event()
    interfered = [0]

    def co_tenant() -> None:
        while not stop.is_set():
            for entry in list(fs.entries):
                data = os.urandom(64) if attribute == "inblob" else b"3\n"
                try:
                    fs.write(entry / attribute, data)
                    interfered[0] += 1
                except (OSError, KeyError):
                    pass  # the entry went away meanwhile
            time.sleep(0.0005)

    def worker(i: int) -> list[object]:
        out: list[object] = []
        for j in range(8):
            data = bytes([i, j]) * 32
            try:
                bundle = attester.attest(data)
            except AttestationUnavailable as exc:
                out.append(exc.reason)
                continue
            assert bundle.report[0x50:0x90] == data
            assert int.from_bytes(bundle.report[0x30:0x34], "little") == 0  # VMPL
            out.append("ok")
        return out

    thread = threading.Thread(target=co_tenant, daemon=True)
    thread.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            outcomes = [o for r in pool.map(worker, range(8)) for o in r]
    finally:
        stop.set()
        thread.join(10)
    assert interfered[0] > 0
    assert set(outcomes) <= {"ok", "TSM_REPORT_RACE"}
    assert "ok" in outcomes
    assert list(fs.root.iterdir()) == []


def test_configfs_without_provider_is_not_configured(tmp_path: Path) -> None:
    fs = EmulatedConfigfs(tmp_path / "report", provider=None)
    with pytest.raises(AttesterNotConfigured) as info:
        ConfigfsTsmAttester(fs.root, fs=fs)
    assert info.value.reason == "TSM_NO_PROVIDER"


def test_configfs_missing_root(tmp_path: Path) -> None:
    with pytest.raises(AttesterNotConfigured) as info:
        ConfigfsTsmAttester(tmp_path / "nope")
    assert info.value.reason == "TSM_NOT_AVAILABLE"


def test_configfs_unknown_provider(tmp_path: Path) -> None:
    fs = EmulatedConfigfs(tmp_path / "report", provider="arm_cca_guest")
    with pytest.raises(AttesterNotConfigured) as info:
        ConfigfsTsmAttester(fs.root, fs=fs)
    assert info.value.reason == "TSM_PROVIDER_UNSUPPORTED"


def test_configfs_provider_change_is_reported(tmp_path: Path) -> None:
    fs = EmulatedConfigfs(tmp_path / "report")
    attester = ConfigfsTsmAttester(fs.root, fs=fs)
    fs.provider = "tdx_guest"
    with pytest.raises(AttestationUnavailable) as info:
        attester.attest(RD)
    assert info.value.reason == "TSM_PROVIDER_CHANGED"
    assert list(fs.root.iterdir()) == []


def test_configfs_report_not_bound_to_request_is_refused(tmp_path: Path) -> None:
    fs = EmulatedConfigfs(tmp_path / "report", echo=False)
    with pytest.raises(ReportBindingMismatch):
        ConfigfsTsmAttester(fs.root, fs=fs).attest(RD)


def test_configfs_malformed_certificate_table(tmp_path: Path) -> None:
    table = bytearray(build_cert_table([(VCEK_GUID, FAKE_VCEK)]))
    table[16:20] = (10_000).to_bytes(4, "little")  # offset past the end
    fs = EmulatedConfigfs(tmp_path / "report", raw_auxblob=bytes(table))
    with pytest.raises(MalformedCertTable) as info:
        ConfigfsTsmAttester(fs.root, fs=fs).attest(RD)
    assert info.value.reason == "SNP_CERT_TABLE_MALFORMED"
    assert list(fs.root.iterdir()) == []


def test_configfs_kernel_error_maps_to_unavailable(tmp_path: Path) -> None:
    class Failing(EmulatedConfigfs):
        def read(self, path: Path) -> bytes:
            if path.name == "outblob":
                raise OSError(errno.EIO, "firmware error")
            return super().read(path)

    fs = Failing(tmp_path / "report")
    with pytest.raises(AttestationUnavailable) as info:
        ConfigfsTsmAttester(fs.root, fs=fs).attest(RD)
    assert info.value.reason == "TSM_IO_ERROR"
    assert "EIO" in info.value.message
    assert list(fs.root.iterdir()) == []


def test_configfs_enotty_is_permanent_not_retryable(tmp_path: Path) -> None:
    """sev_guest's report_new answers ENOTTY once the driver has wiped the VMPCK: every later
    report fails until the VM restarts, so it is no UNAVAILABLE for the loader to retry forever."""

    class Wiped(EmulatedConfigfs):
        def read(self, path: Path) -> bytes:
            if path.name == "outblob":
                raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")
            return super().read(path)

    fs = Wiped(tmp_path / "report")
    with pytest.raises(AttesterNotConfigured) as info:
        ConfigfsTsmAttester(fs.root, fs=fs).attest(RD)
    assert info.value.reason == "TSM_REPORT_REFUSED"
    assert "restarted" in info.value.message
    assert list(fs.root.iterdir()) == []


# -- /dev/sev-guest -----------------------------------------------------------------------------


def test_uapi_ioctl_numbers_and_struct_sizes() -> None:
    assert snp.GUEST_REQUEST.size == 32
    assert snp.REPORT_REQ.size == 96
    assert snp.EXT_REPORT_REQ.size == 112
    assert snp.SNP_GET_REPORT == 0xC0205300
    assert snp.SNP_GET_DERIVED_KEY == 0xC0205301
    assert snp.SNP_GET_EXT_REPORT == 0xC0205302
    assert tdx.TDX_CMD_GET_REPORT0 == 0xC4405401
    assert tdx.TDX_CMD_GET_QUOTE_RFC == 0x80105402
    assert tdx.TDX_CMD_GET_QUOTE_INTEL == 0xC0105404
    assert tdx.QUOTE_HDR.size == 24


def test_sev_guest_extended_report() -> None:
    device = FakeSevGuest()
    bundle = SevGuestAttester(io=device).attest(RD)
    assert bundle.report[0x50:0x90] == RD
    assert bundle.certificates == (FAKE_VCEK, FAKE_ASK, FAKE_ARK)
    assert bundle.source == "sev-guest"
    assert device.calls == [snp.SNP_GET_EXT_REPORT]
    assert device.open_fds == set()


def test_sev_guest_plain_report_has_no_certificates() -> None:
    device = FakeSevGuest()
    bundle = SevGuestAttester(io=device, extended=False, vmpl=1).attest(RD)
    assert bundle.report[0x50:0x90] == RD
    assert int.from_bytes(bundle.report[0x30:0x34], "little") == 1
    assert bundle.certificates == ()
    assert device.calls == [snp.SNP_GET_REPORT]


def test_sev_guest_small_cert_buffer_is_grown_to_what_the_kernel_asks() -> None:
    device = FakeSevGuest(certs_size=3 * 4096)
    bundle = SevGuestAttester(io=device, certs_buffer_size=4096).attest(RD)
    assert bundle.certificates == (FAKE_VCEK, FAKE_ASK, FAKE_ARK)
    assert device.seen_certs_len == [4096, 3 * 4096]


def test_sev_guest_cert_table_larger_than_the_kernel_allows() -> None:
    device = FakeSevGuest(certs_size=8 * 4096)
    with pytest.raises(AttestationUnavailable) as info:
        SevGuestAttester(io=device).attest(RD)
    assert info.value.reason == "SNP_CERTS_TOO_LARGE"
    assert device.open_fds == set()


def test_sev_guest_firmware_error_is_reported_with_codes() -> None:
    device = FakeSevGuest()
    device.fail_next = (errno.EIO, 0x16, 0)
    with pytest.raises(AttestationUnavailable) as info:
        SevGuestAttester(io=device).attest(RD)
    assert info.value.reason == "SNP_FIRMWARE_ERROR"
    assert "fw_error=0x16" in info.value.message


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        # exitinfo2's high half is the host's (VMM) error, its low half the firmware's.
        ((errno.EIO, 0, 3), "SNP_HOST_ERROR"),
        ((errno.EIO, 0x16, 0), "SNP_FIRMWARE_ERROR"),
        ((errno.EIO, 0, snp.SNP_GUEST_VMM_ERR_BUSY), "SNP_HOST_BUSY"),
        ((errno.ETIMEDOUT, 0, snp.SNP_GUEST_VMM_ERR_BUSY), "SNP_HOST_BUSY"),
        ((errno.EINVAL, 0xFF, 0), "SNP_REQUEST_REJECTED"),
        # The driver's "no firmware call" marker is no firmware error.
        ((errno.EIO, 0xFFFFFFFF, 0xFFFFFFFF), "SNP_GUEST_REQUEST_FAILED"),
        ((errno.EFAULT, 0xFF, 0), "SNP_GUEST_REQUEST_FAILED"),
    ],
)
def test_sev_guest_failures_tell_the_firmware_from_the_host(
    failure: tuple[int, int, int], reason: str
) -> None:
    device = FakeSevGuest()
    device.fail_next = failure
    with pytest.raises(AttestationUnavailable) as info:
        SevGuestAttester(io=device).attest(RD)
    assert info.value.reason == reason
    assert info.value.reason in Reason.__members__  # a catalogued code, not a bare string
    if reason == "SNP_GUEST_REQUEST_FAILED":
        assert "fw_error=0x0, vmm_error=0x0" in info.value.message
    assert device.open_fds == set()


def test_sev_guest_vmpck_disabled_is_permanent_not_retryable() -> None:
    # Once the driver has wiped the VMPCK every request fails with ENOTTY until the VM restarts:
    # UNAVAILABLE made the loader retry it forever.
    device = FakeSevGuest()
    device.vmpck_disabled = True
    with pytest.raises(AttesterNotConfigured) as info:
        SevGuestAttester(io=device).attest(RD)
    assert info.value.reason == "SNP_REQUEST_UNSUPPORTED"
    assert info.value.reason in Reason.__members__
    assert "restarted" in info.value.message


def test_sev_guest_throttled() -> None:
    device = FakeSevGuest()
    device.fail_next = (errno.ETIMEDOUT, 0, snp.SNP_GUEST_VMM_ERR_BUSY)
    with pytest.raises(AttestationUnavailable) as info:
        SevGuestAttester(io=device).attest(RD)
    assert info.value.reason == "SNP_HOST_BUSY"


def test_sev_guest_firmware_status_in_response() -> None:
    device = FakeSevGuest()
    device.response_status = 0x16
    with pytest.raises(AttestationUnavailable) as info:
        SevGuestAttester(io=device).attest(RD)
    assert info.value.reason == "SNP_REPORT_STATUS"


def test_sev_guest_report_not_bound_to_request_is_refused() -> None:
    device = FakeSevGuest()
    device.echo = False
    with pytest.raises(ReportBindingMismatch):
        SevGuestAttester(io=device).attest(RD)


def test_sev_guest_missing_device() -> None:
    with pytest.raises(AttestationUnavailable) as info:
        SevGuestAttester("/dev/nope", io=FakeSevGuest()).attest(RD)
    assert info.value.reason == "SNP_DEVICE_UNAVAILABLE"


def test_sev_guest_on_a_device_that_is_not_sev_guest_uses_the_real_ioctl() -> None:
    # /dev/null answers every ioctl with ENOTTY: this exercises the real fcntl path end to end.
    with pytest.raises(AttesterNotConfigured) as info:
        SevGuestAttester("/dev/null").attest(RD)
    assert info.value.reason == "SNP_REQUEST_UNSUPPORTED"
    assert "ENOTTY" in info.value.message


# -- /dev/tdx_guest -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [tdx.TDX_CMD_GET_QUOTE_RFC, tdx.TDX_CMD_GET_QUOTE_INTEL])
def test_tdx_guest_quote_through_either_get_quote_number(command: int) -> None:
    device = FakeTdxGuest(quote_command=command)
    attester = TdxGuestAttester(io=device)
    bundle = attester.attest(RD)
    assert bundle.tee_type is TeeType.TDX
    assert bundle.report[568:632] == RD
    assert bundle.source == "tdx-guest"
    # The working command is remembered.
    attester.attest(RD)
    assert device.calls.count(command) == 2
    assert device.open_fds == set()


def test_tdx_guest_v5_quote() -> None:
    device = FakeTdxGuest(quote_command=tdx.TDX_CMD_GET_QUOTE_RFC, quote_version=5)
    bundle = TdxGuestAttester(io=device).attest(RD)
    assert bundle.report[574:638] == RD


def test_tdx_guest_tdreport_is_available_for_local_use() -> None:
    tdreport = TdxGuestAttester(io=FakeTdxGuest()).tdreport(RD)
    assert len(tdreport) == 1024
    assert tdreport[128:192] == RD


def test_tdx_guest_without_get_quote_explains_what_to_use() -> None:
    device = FakeTdxGuest(quote_command=None)
    with pytest.raises(AttesterNotConfigured) as info:
        TdxGuestAttester(io=device).attest(RD)
    assert info.value.reason == "TDX_QUOTE_UNSUPPORTED"
    assert "configfs-tsm" in info.value.message
    assert device.calls == [
        tdx.TDX_CMD_GET_REPORT0,
        tdx.TDX_CMD_GET_QUOTE_RFC,
        tdx.TDX_CMD_GET_QUOTE_INTEL,
    ]


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (tdx.GET_QUOTE_SERVICE_UNAVAILABLE, "TDX_QUOTE_SERVICE_UNAVAILABLE"),
        (tdx.GET_QUOTE_ERROR, "TDX_QUOTE_FAILED"),
        (tdx.GET_QUOTE_IN_FLIGHT, "TDX_QUOTE_IN_FLIGHT"),
    ],
)
def test_tdx_guest_quote_status_errors(status: int, reason: str) -> None:
    device = FakeTdxGuest(quote_command=tdx.TDX_CMD_GET_QUOTE_INTEL, quote_status=status)
    with pytest.raises(AttestationUnavailable) as info:
        TdxGuestAttester(io=device).attest(RD)
    assert info.value.reason == reason


def test_tdx_guest_without_get_report0_is_not_configured() -> None:
    device = FakeTdxGuest(quote_command=tdx.TDX_CMD_GET_QUOTE_RFC)
    device.report_errno = errno.ENOTTY
    with pytest.raises(AttesterNotConfigured) as info:
        TdxGuestAttester(io=device).attest(RD)
    assert info.value.reason == "TDX_REPORT_UNSUPPORTED"
    assert device.open_fds == set()


def test_tdx_guest_report_failure() -> None:
    device = FakeTdxGuest(quote_command=tdx.TDX_CMD_GET_QUOTE_RFC)
    device.report_errno = errno.EIO
    with pytest.raises(AttestationUnavailable) as info:
        TdxGuestAttester(io=device).attest(RD)
    assert info.value.reason == "TDX_REPORT_FAILED"


# -- simulated ------------------------------------------------------------------------------


class _EchoSim:
    """A minimal simulator: structurally correct, unsigned reports (see test_attesters_verify)."""

    def __init__(self, tee_type: TeeType = TeeType.SEV_SNP) -> None:
        self.tee_type = tee_type
        self.claims: dict[str, object] = {}

    def evidence(self, report_data: bytes, /, **claims: object) -> Evidence:
        self.claims = claims
        if self.tee_type is TeeType.SEV_SNP:
            return Evidence(TeeType.SEV_SNP, fake_snp_report(report_data), (b"sim-vcek",))
        return Evidence(TeeType.TDX, fake_tdx_quote(report_data))


SNP_CLAIMS = {"measurement": bytes(48)}
TDX_CLAIMS = {"mrtd": bytes(48)}


def test_simulated_attester_refuses_production() -> None:
    with pytest.raises(AttesterNotConfigured) as info:
        SimulatedAttester(_EchoSim(), TeeType.SEV_SNP, production=True, claims=SNP_CLAIMS)
    assert info.value.reason == "SIMULATOR_IN_PRODUCTION"
    with pytest.raises(AttesterNotConfigured) as info:
        select_attester(
            "simulated",
            production=True,
            simulator=_EchoSim(),
            simulator_tee_type=TeeType.SEV_SNP,
            simulator_claims=SNP_CLAIMS,
        )
    assert info.value.reason == "SIMULATOR_IN_PRODUCTION"


def test_simulated_attester_wraps_the_simulator() -> None:
    sim = _EchoSim()
    claims = {"measurement": bytes(48), "vmpl": 0}
    attester = SimulatedAttester(sim, TeeType.SEV_SNP, production=False, claims=claims)
    bundle = attester.attest(RD)
    assert bundle.report[0x50:0x90] == RD
    assert bundle.certificates == (b"sim-vcek",)
    assert bundle.source == "simulated"
    assert sim.claims == claims
    tdx = SimulatedAttester(_EchoSim(TeeType.TDX), TeeType.TDX, production=False, claims=TDX_CLAIMS)
    assert tdx.attest(RD).tee_type is TeeType.TDX


def test_simulated_attester_needs_the_measurement_and_the_right_tee() -> None:
    with pytest.raises(AttesterNotConfigured) as info:
        SimulatedAttester(_EchoSim(), TeeType.SEV_SNP, production=False)
    assert info.value.reason == "SIMULATOR_CLAIMS_MISSING"
    mismatched = SimulatedAttester(_EchoSim(), TeeType.TDX, production=False, claims=TDX_CLAIMS)
    with pytest.raises(AttesterNotConfigured) as info:
        mismatched.attest(RD)
    assert info.value.reason == "SIMULATOR_TEE_MISMATCH"


# -- selection ------------------------------------------------------------------------------


def test_select_prefers_configfs(tmp_path: Path) -> None:
    fs = EmulatedConfigfs(tmp_path / "report")
    chosen = select_attester(production=True, configfs_root=fs.root, fs=fs, io=FakeSevGuest())
    assert isinstance(chosen, ConfigfsTsmAttester)


def test_select_falls_back_to_sev_guest_when_configfs_has_no_provider(tmp_path: Path) -> None:
    fs = EmulatedConfigfs(tmp_path / "report", provider=None)
    chosen = select_attester(production=True, configfs_root=fs.root, fs=fs, io=FakeSevGuest())
    assert isinstance(chosen, SevGuestAttester)


class _NotPermitted(EmulatedConfigfs):
    """configfs-tsm as a non-root service user sees it: the report directory is root's (0755)."""

    def mkdir(self, path: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))


def test_configfs_not_permitted_is_not_configured(tmp_path: Path) -> None:
    fs = _NotPermitted(tmp_path / "report")
    with pytest.raises(AttesterNotConfigured) as info:
        ConfigfsTsmAttester(fs.root, fs=fs)
    assert info.value.reason == "TSM_PERMISSION_DENIED"
    assert "EACCES" in info.value.message


def test_select_falls_back_to_sev_guest_when_configfs_is_not_permitted(tmp_path: Path) -> None:
    """A service user given /dev/sev-guest (the documented udev rule) on a kernel with configfs-tsm:
    auto failed the start with TSM_IO_ERROR instead of using the device it may use."""
    fs = _NotPermitted(tmp_path / "report")
    chosen = select_attester(production=True, configfs_root=fs.root, fs=fs, io=FakeSevGuest())
    assert isinstance(chosen, SevGuestAttester)
    with pytest.raises(AttesterNotConfigured) as info:
        select_attester(production=True, configfs_root=fs.root, fs=fs, io=FakeSevGuest(nodes=()))
    assert info.value.reason == "NO_ATTESTER"
    assert "TSM_PERMISSION_DENIED" in info.value.message


def test_configfs_other_kernel_errors_at_probe_still_fail(tmp_path: Path) -> None:
    class Broken(EmulatedConfigfs):
        def mkdir(self, path: Path) -> None:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")

    fs = Broken(tmp_path / "report")
    with pytest.raises(AttestationUnavailable) as info:
        select_attester(production=True, configfs_root=fs.root, fs=fs, io=FakeSevGuest())
    assert info.value.reason == "TSM_IO_ERROR"


class _Unopenable(FakeSevGuest):
    """A guest device node not given to this service's user or group (mode 0600, root's)."""

    def open(self, path: str) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", path)


def test_a_guest_device_this_process_may_not_open_fails_the_start(tmp_path: Path) -> None:
    """It used to be selected, and every attestation then failed as UNAVAILABLE
    (SNP_DEVICE_UNAVAILABLE), which the loader retries forever: a permission is no outage."""
    for kind in ("auto", "sev-guest"):
        with pytest.raises(AttesterNotConfigured) as info:
            select_attester(
                kind, production=True, configfs_root=tmp_path / "none", io=_Unopenable()
            )
        assert info.value.reason == "GUEST_DEVICE_NOT_PERMITTED", kind
        assert "EACCES" in info.value.message
    with pytest.raises(AttesterNotConfigured) as info:
        SevGuestAttester(io=_Unopenable()).attest(RD)
    assert info.value.reason == "GUEST_DEVICE_NOT_PERMITTED"

    class UnopenableTdx(FakeTdxGuest):
        def open(self, path: str) -> int:
            raise PermissionError(errno.EPERM, "Operation not permitted", path)

    for kind in ("auto", "tdx-guest"):
        with pytest.raises(AttesterNotConfigured) as info:
            select_attester(
                kind, production=True, configfs_root=tmp_path / "none", io=UnopenableTdx()
            )
        assert info.value.reason == "GUEST_DEVICE_NOT_PERMITTED", kind
    with pytest.raises(AttesterNotConfigured) as info:
        TdxGuestAttester(io=UnopenableTdx()).attest(RD)
    assert info.value.reason == "GUEST_DEVICE_NOT_PERMITTED"


class _UnnamedError(FakeSevGuest):
    """A guest device whose open fails with an errno this system has no name for."""

    def open(self, path: str) -> int:
        raise OSError(4095, "Unknown error 4095", path)


def test_a_guest_device_open_error_without_a_name_says_eunknown() -> None:
    """Every message naming an errno shows one this system does not name as EUNKNOWN
    (strongroom.files.errno_name); the device's open error alone said ``?``."""
    with pytest.raises(AttestationUnavailable) as info:
        SevGuestAttester(io=_UnnamedError()).attest(RD)
    assert info.value.reason == "SNP_DEVICE_UNAVAILABLE"
    assert info.value.message == "cannot open /dev/sev-guest: EUNKNOWN"


def test_selection_leaves_no_device_open(tmp_path: Path) -> None:
    device = FakeSevGuest()
    select_attester(production=True, configfs_root=tmp_path / "none", io=device)
    assert device.open_fds == set()


def test_select_falls_back_to_tdx_guest(tmp_path: Path) -> None:
    device = FakeTdxGuest(nodes=("/dev/tdx-guest",))
    chosen = select_attester(production=True, configfs_root=tmp_path / "none", io=device)
    assert isinstance(chosen, TdxGuestAttester)
    assert chosen.tee_type is TeeType.TDX


def test_select_never_falls_back_to_the_simulator(tmp_path: Path) -> None:
    device = FakeSevGuest(nodes=())
    with pytest.raises(AttesterNotConfigured) as info:
        select_attester(
            production=False,
            configfs_root=tmp_path / "none",
            io=device,
            simulator=_EchoSim(),
            simulator_tee_type=TeeType.SEV_SNP,
        )
    assert info.value.reason == "NO_ATTESTER"


def test_select_explicit_kinds(tmp_path: Path) -> None:
    assert isinstance(
        select_attester("sev-guest", production=True, io=FakeSevGuest()), SevGuestAttester
    )
    assert isinstance(
        select_attester("tdx-guest", production=True, io=FakeTdxGuest()), TdxGuestAttester
    )
    sim = select_attester(
        "simulated",
        production=False,
        simulator=_EchoSim(),
        simulator_tee_type=TeeType.SEV_SNP,
        simulator_claims=SNP_CLAIMS,
    )
    assert isinstance(sim, SimulatedAttester)
    for kind, reason in [
        ("sev-guest", "NO_ATTESTER"),
        ("tdx-guest", "NO_ATTESTER"),
        ("simulated", "SIMULATOR_MISSING"),
        ("sgx", "ATTESTER_KIND_UNKNOWN"),
        ("configfs-tsm", "TSM_NOT_AVAILABLE"),
    ]:
        with pytest.raises(AttesterNotConfigured) as info:
            select_attester(
                kind, production=False, configfs_root=tmp_path / "none", io=FakeSevGuest(nodes=())
            )
        assert info.value.reason == reason, kind


def test_select_on_this_machine_finds_no_tee() -> None:
    if any(
        os.path.exists(p)
        for p in ("/sys/kernel/config/tsm/report", "/dev/sev-guest", "/dev/tdx_guest")
    ):
        pytest.skip("this machine has a TEE interface")
    with pytest.raises(AttesterNotConfigured) as info:
        select_attester(production=True)
    assert info.value.reason == "NO_ATTESTER"


# -- certificate table and bundle ------------------------------------------------------------


def test_cert_table_round_trip_and_zero_padding() -> None:
    table = build_cert_table([(VCEK_GUID, b"a" * 10), (ARK_GUID, b"b" * 5)], size=4096)
    assert len(table) == 4096
    # GUIDs are stored in RFC 4122 byte order.
    assert table[:16] == bytes.fromhex("63da758de6644564adc5f4b93be8accd")
    entries = parse_cert_table(table)
    assert [(e.guid, e.data) for e in entries] == [(VCEK_GUID, b"a" * 10), (ARK_GUID, b"b" * 5)]
    assert parse_cert_table(b"") == ()
    assert parse_cert_table(bytes(4096)) == ()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t[:24],  # no terminator
        lambda t: t[:24] + t[:24] + t[24:],  # duplicate GUID
        lambda t: t[:20] + bytes(4) + t[24:],  # zero length
        lambda t: t[:16] + (4).to_bytes(4, "little") + t[20:],  # points into the table
    ],
)
def test_cert_table_malformed(mutate: object) -> None:
    table = build_cert_table([(VCEK_GUID, b"x" * 40)])
    with pytest.raises(MalformedCertTable):
        parse_cert_table(mutate(table))  # type: ignore[operator]


def test_unknown_certificates_are_skipped() -> None:
    other = uuid.uuid4()
    fs_table = build_cert_table([(other, b"crl"), (VCEK_GUID, b"vcek")])
    assert attesters._certtable.endorsement_chain(parse_cert_table(fs_table)) == (b"vcek",)


def test_bundle_to_proto_and_repr() -> None:
    bundle = EvidenceBundle(
        tee_type=TeeType.TDX,
        report=b"q" * 100,
        certificates=(b"c",),
        collateral=(attesters.Collateral(attesters.CollateralKind.CRL, b"crl"),),
        source="x",
    )
    proto = bundle.to_proto()
    assert proto.tee_type == evidence_pb2.TEE_TYPE_TDX
    assert bundle.to_evidence().tee_type is TeeType.TDX
    assert proto.report == b"q" * 100
    assert list(proto.certificates) == [b"c"]
    assert proto.collateral[0].kind == evidence_pb2.COLLATERAL_KIND_CRL
    assert "qqq" not in repr(bundle)

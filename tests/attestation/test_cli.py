"""``strongroom attest verify`` through the real CLI entry point."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

import strongroom.cli.main as cli_main
from strongroom.cli.main import main
from tests.attestation.test_vectors import NEW_TCB_SIGNING


@pytest.fixture(autouse=True)
def _only_attestation_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep these tests about `attest`: other areas' command modules are loaded by their own tests.
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("strongroom.cli.attest",))


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["attest", "verify", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_snp_hex(vectors: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(
        capsys, str(vectors / "snp/milan_v2_virtee.hex"),
        "--cert", str(vectors / "snp/milan_v2_virtee_vcek.der"), "--at", "2026-03-01T00:00:00Z",
        "--allow-incomplete-collateral",
    )  # fmt: skip
    assert code == 0
    doc = json.loads(out)
    assert doc["collateral_complete"] is False  # no AMD CRL in the public record
    assert doc["format"] == {"container": "snp", "encoding": "hex"}
    assert doc["claims"]["measurement"].startswith("7a1e5c266c0108db")
    assert doc["claims"]["product"] == "Milan"


def test_verify_snp_base64_with_pinned_bundle(vectors: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    b64 = tmp_path / "report.b64"
    b64.write_bytes(base64.b64encode((vectors / "snp/milan_v2_azure_trustee.hcl.bin").read_bytes()))
    code, out, _ = run(
        capsys, str(b64), "--cert", str(vectors / "snp/milan_v2_azure_trustee_vcek_chain.pem"),
        "--at", "2026-03-01T00:00:00Z", "--allow-incomplete-collateral",
    )  # fmt: skip
    assert code == 0
    assert json.loads(out)["format"] == {"container": "azure-hcl", "encoding": "base64"}


def test_verify_snp_bundle_with_foreign_ask_fails(
    vectors: Path, tmp_path: Path, authority, capsys
) -> None:  # type: ignore[no-untyped-def]
    bundle = tmp_path / "bundle.pem"
    vcek = (vectors / "snp/milan_v3_azure_ms_vcek.pem").read_bytes()
    bundle.write_bytes(vcek + authority.amd_root_pems()[1])
    code, _, err = run(
        capsys,
        str(vectors / "snp/milan_v3_azure_ms.bin"),
        "--cert",
        str(bundle),
        "--at",
        "2026-03-01T00:00:00Z",
    )
    assert code == 2 and "INTERMEDIATE_NOT_PINNED" in err


def test_verify_tdx_with_collateral(vectors: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(
        capsys, str(vectors / "tdx/v4_gnr_trustee.dat"),
        "--collateral", str(vectors / "tdx/tcbinfo_00a06d080000_trustee.json"),
        "--collateral", str(vectors / "tdx/qe_identity_trustee.json"),
        "--collateral", str(NEW_TCB_SIGNING), "--at", "2025-11-01T00:00:00Z",
        "--allow-incomplete-collateral",
    )  # fmt: skip
    assert code == 0
    claims = json.loads(out)["claims"]
    assert claims["tcb_status"] == "OutOfDate" and claims["fmspc"] == "00a06d080000"


def test_verify_tdx_with_crls(vectors: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(
        capsys, str(vectors / "tdx/v4_spr_gotdxguest.dat"),
        "--collateral", str(vectors / "roots/intel/intel_pck_platform_ca_crl.der"),
        "--collateral", str(vectors / "roots/intel/intel_sgx_root_ca_crl.der"),
        "--collateral", str(vectors / "tdx/tcbinfo_50806f000000_gotdxguest.json"),
        "--collateral", str(vectors / "tdx/qe_identity_gotdxguest.json"),
        "--collateral", str(vectors / "roots/intel/intel_tcb_signing_chain.pem"),
        "--at", "2023-06-20T00:00:00Z",
    )  # fmt: skip
    assert code == 0 and json.loads(out)["claims"]["report_data"].startswith("6c62dec1")
    assert json.loads(out)["collateral_complete"] is True


def test_verify_expired_vlek_today_fails(vectors: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(
        capsys, str(vectors / "snp/milan_v3_vlek_aws_trustee.bin"),
        "--cert", str(vectors / "snp/milan_v3_vlek_aws_trustee_vlek.der"), "--at", "2026-11-25T00:00:00Z",
    )  # fmt: skip
    assert code == 2 and "CERT_NOT_VALID_AT_TIME" in err


def test_verify_missing_vcek_and_bad_inputs(vectors: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, str(vectors / "snp/milan_v2_trustee.bin"))
    assert code == 2 and "COLLATERAL_MISSING" in err
    junk = tmp_path / "junk"
    junk.write_bytes(b"not evidence")
    code, _, err = run(capsys, str(junk))
    assert code == 2 and "UNKNOWN_EVIDENCE_FORMAT" in err
    code, _, err = run(capsys, str(vectors / "snp/milan_v2_trustee.bin"), "--at", "yesterday")
    assert code == 1 and "BAD_TIME" in err
    code, _, err = run(capsys, str(tmp_path / "absent"))
    assert code == 1 and "FILE_UNREADABLE" in err


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: (9).to_bytes(4, "little") + b[4:], "UNSUPPORTED_VERSION"),
        (lambda b: b[:1000], "REPORT_SIZE"),
        (lambda b: b + bytes(16), "REPORT_SIZE"),
    ],
)
def test_snp_format_errors_have_precise_reasons(
    vectors: Path, tmp_path: Path, capsys, mutate, reason
) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "report.bin"
    bad.write_bytes(mutate((vectors / "snp/milan_v2_trustee.bin").read_bytes()))
    code, _, err = run(capsys, str(bad))
    assert code == 2 and reason in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [(0, b"\x06\x00", "UNSUPPORTED_VERSION"), (4, b"\x00\x00\x00\x00", "UNSUPPORTED_TEE_TYPE"),
     (2, b"\x03\x00", "UNSUPPORTED_ATTESTATION_KEY_TYPE")],
)  # fmt: skip
def test_tdx_format_errors_have_precise_reasons(
    vectors: Path, tmp_path: Path, capsys, offset, value, reason
) -> None:  # type: ignore[no-untyped-def]
    raw = bytearray((vectors / "tdx/v4_spr_gotdxguest.dat").read_bytes())
    raw[offset : offset + len(value)] = value
    bad = tmp_path / "quote.dat"
    bad.write_bytes(bytes(raw))
    code, _, err = run(capsys, str(bad))
    assert code == 2 and reason in err


def test_tdx_without_collateral_fails_closed(vectors: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(
        capsys, str(vectors / "tdx/v4_spr_gotdxguest.dat"), "--at", "2023-06-20T00:00:00Z"
    )
    assert code == 2 and "COLLATERAL_MISSING" in err


def test_collateral_ls_shows_the_files_the_cache_refuses(
    vectors: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    """A file the cache skips (damaged, foreign, or refused by a stricter parser) left a release
    COLLATERAL_MISSING while the file sat in the directory, and `ls` did not show it."""
    chain = (vectors / "roots/intel/intel_tcb_signing_chain.pem").read_bytes()
    tcb = tmp_path / "tdx" / "tcbinfo"
    tcb.mkdir(parents=True)
    (tcb / "50806f000000.json").write_bytes(
        (vectors / "tdx/tcbinfo_50806f000000_gotdxguest.json").read_bytes()
    )
    (tcb / "50806f000000.chain.pem").write_bytes(chain)
    crl = tmp_path / "crl"
    crl.mkdir()
    (crl / "0123456789abcdef-ca.der").write_bytes(b"\x30\x03not a CRL")
    code = main(["attest", "collateral", "ls", "--dir", str(tmp_path)])
    out, _ = capsys.readouterr()
    assert code == 0
    rows = json.loads(out)
    assert [r["kind"] for r in rows if "kind" in r] == ["tdx-tcb-info"]
    (refused,) = [r for r in rows if "refused" in r]
    assert refused["path"] == str(crl / "0123456789abcdef-ca.der") and refused["current"] is False
    assert refused["refused"]  # the reason, as the broker logged it when skipping the file

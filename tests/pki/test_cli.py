"""``strongroom pki init|token|enrol|serve`` end to end, secrets only from files and the environment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from strongroom.cli.main import main
from strongroom.pki import CaLayout, StepCa, WorkloadIdentity
from strongroom.pki._jose import unverified_claims
from strongroom.pki._state import STATE_FILE
from strongroom.pki.bootstrap import operator_template
from strongroom.pki.client import CaClient
from strongroom.pki.errors import CaRejected, CaUnavailable
from strongroom.reasons import Reason
from strongroom.spiffe import identity_dns_name
from tests.pki.helpers import as_made_before_derived_names, free_port


def test_init_token_enrol(
    step_ca_binary: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "ca"
    port = free_port()
    assert (
        main(
            [
                "pki",
                "init",
                "--dir",
                str(directory),
                "--trust-domain",
                "strongroom.test",
                "--dns",
                "127.0.0.1",
                "--address",
                f"127.0.0.1:{port}",
                "--min-lifetime",
                "10s",
            ]
        )
        == 0
    )
    assert "root SHA-256" in capsys.readouterr().out
    with StepCa(directory, binary=step_ca_binary) as ca:
        assert (
            main(
                [
                    "pki",
                    "token",
                    "--dir",
                    str(directory),
                    "--identity",
                    "spiffe://strongroom.test/modelstore",
                    "--dns",
                    "modelstore",
                    "--lifetime",
                    "2m",
                ]
            )
            == 0
        )
        token = capsys.readouterr().out.strip()
        claims = unverified_claims(token)
        modelstore = "spiffe://strongroom.test/modelstore"
        assert claims["sans"] == [modelstore, identity_dns_name(modelstore), "modelstore"]
        assert claims["exp"] - claims["iat"] == 120
        token_file = tmp_path / "token"
        token_file.write_text(token)
        root = tmp_path / "root.pem"
        root.write_bytes(ca.root_pem)
        state = tmp_path / "state"
        assert (
            main(
                [
                    "pki",
                    "enrol",
                    "--ca-url",
                    ca.url,
                    "--root",
                    str(root),
                    "--token-file",
                    str(token_file),
                    "--state-dir",
                    str(state),
                    "--lifetime",
                    "1m",
                ]
            )
            == 0
        )
        assert "enrolled spiffe://strongroom.test/modelstore" in capsys.readouterr().out
        assert (state / STATE_FILE).stat().st_mode & 0o077 == 0


def test_token_for_a_foreign_trust_domain_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "ca"
    assert main(["pki", "init", "--dir", str(directory), "--trust-domain", "strongroom.test"]) == 0
    assert (
        main(["pki", "token", "--dir", str(directory), "--identity", "spiffe://evil.test/x"]) == 1
    )
    assert "trust domain" in capsys.readouterr().err


def test_init_into_a_file_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --dir that is a file raised NotADirectoryError out of the CLI: a traceback."""
    not_a_directory = tmp_path / "ca"
    not_a_directory.write_text("a file\n")
    code = main(["pki", "init", "--dir", str(not_a_directory), "--trust-domain", "strongroom.test"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"strongroom: error: {not_a_directory}") and "Not a directory" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_enrol_without_a_token_says_where_to_put_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STRONGROOM_PKI_TOKEN", raising=False)
    directory = tmp_path / "ca"
    assert main(["pki", "init", "--dir", str(directory), "--trust-domain", "strongroom.test"]) == 0
    code = main(
        [
            "pki",
            "enrol",
            "--ca-url",
            "https://127.0.0.1:1",
            "--root",
            str(directory / "certs" / "root_ca.crt"),
            "--state-dir",
            str(tmp_path / "s"),
        ]
    )
    assert code == 1
    assert "STRONGROOM_PKI_TOKEN" in capsys.readouterr().err


def test_serve_runs_until_sigterm(step_ca_binary: Path, tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    port = free_port()
    assert (
        main(
            [
                "pki",
                "init",
                "--dir",
                str(directory),
                "--trust-domain",
                "strongroom.test",
                "--dns",
                "127.0.0.1",
                "--address",
                f"127.0.0.1:{port}",
            ]
        )
        == 0
    )
    layout = CaLayout.load(directory)
    process = subprocess.Popen(
        [sys.executable, "-m", "strongroom.cli.main", "pki", "serve", "--dir", str(directory)],
        env={**os.environ, "STRONGROOM_STEP_CA": str(step_ca_binary)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        client = CaClient(layout.url, layout.root_pem, timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.health()
                break
            except CaUnavailable:
                assert time.monotonic() < deadline, "strongroom pki serve never became healthy"
                time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        with pytest.raises(CaUnavailable):
            client.health()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_init_workload_token_directory(
    step_ca_binary: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--workload``: a token directory per workload that mints only that workload's tokens."""
    directory = tmp_path / "ca"
    port = free_port()
    argv = ["pki", "init", "--dir", str(directory), "--trust-domain", "strongroom.test"]
    argv += ["--dns", "127.0.0.1", "--address", f"127.0.0.1:{port}"]
    argv += ["--workload", "inference=inference,inference.ns", "--workload", "keybroker"]
    assert main(argv) == 0
    kit = directory / "provisioners" / "inference"
    assert f"workload inference: {kit}" in capsys.readouterr().out
    with StepCa(directory, binary=step_ca_binary) as ca:
        own = ["--identity", "spiffe://strongroom.test/inference", "--dns", "inference"]
        own += ["--dns", "inference.ns"]
        assert main(["pki", "token", "--dir", str(kit), *own]) == 0
        token = capsys.readouterr().out.strip()
        assert unverified_claims(token)["iss"] == "strongroom-inference"
        token_file = tmp_path / "token"
        token_file.write_text(token)
        root = tmp_path / "root.pem"
        root.write_bytes(ca.root_pem)
        enrol = ["pki", "enrol", "--ca-url", ca.url, "--root", str(root)]
        enrol += ["--token-file", str(token_file), "--state-dir", str(tmp_path / "state")]
        assert main(enrol) == 0
        assert "enrolled spiffe://strongroom.test/inference" in capsys.readouterr().out

        # Another identity, or its own without its DNS names: refused before a token exists.
        for other in (
            ["--identity", "spiffe://strongroom.test/admin"],
            ["--identity", "spiffe://strongroom.test/inference"],
        ):
            assert main(["pki", "token", "--dir", str(kit), *other]) == 1
            captured = capsys.readouterr()
            assert captured.out == ""
            assert "'strongroom-inference' issues only" in captured.err


def test_template_prints_what_init_puts_in_ca_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "ca"
    argv = ["pki", "init", "--dir", str(directory), "--trust-domain", "strongroom.test"]
    assert main([*argv, "--workload", "modelstore=modelstore,modelstore.ns"]) == 0
    capsys.readouterr()
    argv = ["pki", "template", "--identity", "spiffe://strongroom.test/modelstore"]
    assert main([*argv, "--dns", "modelstore", "--dns", "modelstore.ns"]) == 0
    printed = capsys.readouterr().out
    config = json.loads((directory / "config" / "ca.json").read_text())
    (entry,) = [
        p for p in config["authority"]["provisioners"] if p["name"] == "strongroom-modelstore"
    ]
    assert entry["options"]["x509"]["template"] == printed


@pytest.mark.parametrize("url", ["http://ca.test:9000", "https://ca.test:99999", "https://:9000"])
def test_init_refuses_a_ca_url_no_client_could_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    """An unusable --url made a CA every later command refused (and a second init refused as
    existing): the CA directory had to be deleted by hand."""
    directory = tmp_path / "ca"
    code = main(["pki", "init", "--dir", str(directory), "--url", url])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("strongroom: error: INVALID_PKI_CONFIG: CA URL ") and url in err
    assert not (directory / "config" / "ca.json").exists()


def test_a_ca_url_with_a_bad_port_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``https://host:99999`` raised ValueError out of CaClient: a traceback from enrol and revoke."""
    directory = tmp_path / "ca"
    assert main(["pki", "init", "--dir", str(directory), "--trust-domain", "strongroom.test"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("STRONGROOM_PKI_TOKEN", "not-used")
    root = str(directory / "certs" / "root_ca.crt")
    url = "https://localhost:99999"
    commands = [
        ["pki", "enrol", "--ca-url", url, "--root", root, "--state-dir", str(tmp_path / "s")],
        ["pki", "revoke", "--dir", str(directory), "--serial", "0x5", "--ca-url", url],
    ]
    for argv in commands:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("strongroom: error: INVALID_PKI_CONFIG: CA URL ") and url in err
        assert err.count("\n") == 1


def test_a_token_file_that_is_not_text_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --token-file of binary bytes (the wrong file) raised UnicodeDecodeError: a traceback."""
    directory = tmp_path / "ca"
    assert main(["pki", "init", "--dir", str(directory), "--trust-domain", "strongroom.test"]) == 0
    capsys.readouterr()
    token_file = tmp_path / "token"
    token_file.write_bytes(b"\xff\xfe\x00binary")
    root = str(directory / "certs" / "root_ca.crt")
    argv = ["pki", "enrol", "--ca-url", "https://127.0.0.1:1", "--root", root]
    code = main([*argv, "--token-file", str(token_file), "--state-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("strongroom: error: BAD_TOKEN: ") and str(token_file) in err
    assert err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_an_earlier_ca_is_upgraded_to_issue_the_derived_name(
    step_ca_binary: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CA whose workload provisioners do not issue the derived name: its token directory
    refuses to mint, saying what to do; ``pki upgrade`` updates it; the workload then enrols
    with the derived name, and renewals keep it."""
    directory = tmp_path / "ca"
    argv = ["pki", "init", "--dir", str(directory), "--trust-domain", "strongroom.test"]
    argv += ["--dns", "127.0.0.1", "--address", f"127.0.0.1:{free_port()}"]
    argv += ["--workload", "inference=inference"]
    assert main(argv) == 0
    as_made_before_derived_names(directory)
    kit = directory / "provisioners" / "inference"
    own = ["--identity", "spiffe://strongroom.test/inference", "--dns", "inference"]
    capsys.readouterr()
    assert main(["pki", "token", "--dir", str(kit), *own]) == 1
    captured = capsys.readouterr()
    assert "PROVISIONER_OUTDATED" in captured.err and "pki upgrade" in captured.err

    assert main(["pki", "upgrade", "--dir", str(directory)]) == 0
    assert "updated the provisioners of inference" in capsys.readouterr().err
    config = json.loads((directory / "config" / "ca.json").read_text())
    operator = next(p for p in config["authority"]["provisioners"] if p["name"] == "strongroom")
    assert operator["options"]["x509"]["template"] == operator_template()
    assert main(["pki", "upgrade", "--dir", str(directory)]) == 0
    assert "up to date" in capsys.readouterr().err
    with StepCa(directory, binary=step_ca_binary) as ca:
        assert main(["pki", "token", "--dir", str(kit), *own]) == 0
        token = capsys.readouterr().out.strip()
        identity = WorkloadIdentity.enrol(ca.client(), token, auto_renew=False)
        with identity:
            derived = identity_dns_name("spiffe://strongroom.test/inference")
            assert derived in identity.credentials.sans
            assert derived in identity.renew_now().sans


def test_upgrading_a_ca_without_workload_provisioners_says_to_restart_step_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CA made by an earlier version without token directories (compose's: every token is the
    operator's): ``pki upgrade`` changes only the operator's template, and said to mint from
    "its updated provisioners/<service>/ directory", which such a CA does not have, while the
    restart is what applies it (compose's ``up`` leaves step-ca running). It says so now."""
    directory = tmp_path / "ca"
    argv = ["pki", "init", "--dir", str(directory), "--trust-domain", "strongroom.test"]
    assert main([*argv, "--dns", "127.0.0.1", "--address", f"127.0.0.1:{free_port()}"]) == 0
    as_made_before_derived_names(directory)
    capsys.readouterr()
    assert main(["pki", "upgrade", "--dir", str(directory)]) == 0
    err = capsys.readouterr().err
    assert "strongroom (the operator's)" in err and "restart step-ca" in err
    assert "docker-compose restart step-ca" in err and "provisioners/<service>/" not in err
    assert main(["pki", "upgrade", "--dir", str(directory)]) == 0
    assert "up to date" in capsys.readouterr().err


def test_upgrading_a_missing_ca_directory_is_ca_dir_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pki upgrade --dir`` of a path that is no directory (mistyped, a volume not mounted) said
    only the OS's "No such file or directory"; it is CA_DIR_MISSING, as for ``pki token``."""
    for missing in (tmp_path / "none", tmp_path / "file"):
        if missing.name == "file":
            missing.write_text("")
        capsys.readouterr()
        assert main(["pki", "upgrade", "--dir", str(missing)]) == 1
        err = capsys.readouterr().err
        assert "CA_DIR_MISSING" in err and "not an initialised CA directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _workload_ca(directory: Path) -> None:
    argv = ["pki", "init", "--dir", str(directory), "--trust-domain", "strongroom.test"]
    argv += ["--dns", "127.0.0.1", "--address", f"127.0.0.1:{free_port()}"]
    assert main([*argv, "--workload", "inference=inference"]) == 0


def test_enrolling_at_a_step_ca_not_restarted_after_the_upgrade_says_to_restart_it(
    step_ca_binary: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pki upgrade`` of an earlier CA while its step-ca runs (or before it is restarted, as a
    Helm step-ca pod keeps running when its Secret changes): step-ca still judges tokens by the
    earlier template, and the workload's enrolment with its updated token directory was refused
    CA_REJECTED with step-ca's bare "issues only [...], not [...]" and the token used up. It is
    now PROVISIONER_OUTDATED naming the derived name, the restart and the fresh token, which
    then enrols."""
    directory = tmp_path / "ca"
    _workload_ca(directory)
    as_made_before_derived_names(directory)
    kit = directory / "provisioners" / "inference"
    own = ["--identity", "spiffe://strongroom.test/inference", "--dns", "inference"]
    derived = identity_dns_name("spiffe://strongroom.test/inference")
    with StepCa(directory, binary=step_ca_binary) as ca:  # serving the earlier templates
        assert main(["pki", "upgrade", "--dir", str(directory)]) == 0
        capsys.readouterr()
        assert main(["pki", "token", "--dir", str(kit), *own]) == 0
        token = capsys.readouterr().out.strip()
        with pytest.raises(CaRejected) as refused:
            WorkloadIdentity.enrol(ca.client(), token, auto_renew=False)
    assert refused.value.reason == Reason.PROVISIONER_OUTDATED
    message = refused.value.message
    assert derived in message and "restart step-ca" in message and "fresh token" in message
    with StepCa(directory, binary=step_ca_binary) as ca:  # restarted: reads the new ca.json
        assert main(["pki", "token", "--dir", str(kit), *own]) == 0
        token = capsys.readouterr().out.strip()
        with WorkloadIdentity.enrol(ca.client(), token, auto_renew=False) as identity:
            assert derived in identity.credentials.sans


@pytest.mark.parametrize(
    ("file", "content"),
    [
        ("ca.json", "{"),  # cut short
        ("ca.json", '{"root": "certs/root_ca.crt"}'),  # no authority
        ("ca.json", "[]"),
        ("strongroom.json", '{"trust_domain": "strongroom.test", "workloads": {"x": 1}}'),
    ],
)
def test_upgrading_a_malformed_ca_directory_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str, content: str
) -> None:
    """``pki upgrade`` of a directory whose ca.json or strongroom.json is not what ``init``
    writes (cut short, edited by hand) ended in a Python traceback (JSONDecodeError, KeyError);
    it is now refused in one line naming the file, and nothing is written."""
    directory = tmp_path / "ca"
    _workload_ca(directory)
    as_made_before_derived_names(directory)
    (directory / "config" / file).write_text(content)
    files = sorted(directory.rglob("*.json"))
    before = [path.read_bytes() for path in files]
    capsys.readouterr()
    assert main(["pki", "upgrade", "--dir", str(directory)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("strongroom: error: INVALID_PKI_CONFIG: ") and file in err
    assert err.count("\n") == 1
    assert [path.read_bytes() for path in files] == before


def test_upgrade_reads_the_templates_not_only_the_recorded_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CA whose strongroom.json records the derived name but whose ca.json templates lack it
    (a ca.json restored from a backup made before the upgrade, or copied from an earlier PKI):
    ``pki upgrade`` judged it from strongroom.json alone and said it was up to date, while its
    provisioner refused every token its workload minted. The templates are read too."""
    directory = tmp_path / "ca"
    _workload_ca(directory)
    recorded = {
        path: path.read_bytes() for path in directory.rglob("strongroom.json")
    }  # with the derived name
    as_made_before_derived_names(directory)
    for path, data in recorded.items():
        path.write_bytes(data)
    capsys.readouterr()
    assert main(["pki", "upgrade", "--dir", str(directory)]) == 0
    assert "updated the provisioners of inference" in capsys.readouterr().err
    config = json.loads((directory / "config" / "ca.json").read_text())
    template = next(
        p["options"]["x509"]["template"]
        for p in config["authority"]["provisioners"]
        if p["name"] == "strongroom-inference"
    )
    assert identity_dns_name("spiffe://strongroom.test/inference") in template
    assert [path.read_bytes() for path in recorded] == list(recorded.values())
    assert main(["pki", "upgrade", "--dir", str(directory)]) == 0
    assert "up to date" in capsys.readouterr().err

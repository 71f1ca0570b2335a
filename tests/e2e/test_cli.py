"""The operator commands against a real stack: keys, policies, publish, ls, inspect, rm, audit."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from strongroom.artifact import StructureValidator
from strongroom.cli import models as cli_models
from strongroom.cli.main import main
from strongroom.dev.devstack import DevStack
from strongroom.dev.devstack.model import train
from strongroom.errors import FailedPrecondition
from strongroom.keybroker.config import KeybrokerConfig
from strongroom.keybroker.server import build, trust_store
from strongroom.runtime.config import load_service_config
from tests.modelstore.artifacts import make_artifact


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_operator_workflow(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = str(stack.write_client_config("admin"))
    publisher = str(stack.write_client_config("publisher"))

    code, out, _ = run(capsys, "keys", "create", "cli-key", "--client-config", admin)
    assert code == 0 and json.loads(out)["key_id"] == "cli-key"
    code, out, err = run(capsys, "keys", "create", "cli-key", "--client-config", admin)
    assert code == 1 and "ALREADY_EXISTS: KEY_ALREADY_EXISTS" in err and "Traceback" not in err
    code, out, _ = run(capsys, "keys", "rotate", "cli-key", "--client-config", admin)
    assert json.loads(out)["current_version"] == 2
    policy = tmp_path / "policy.yaml"
    policy.write_text(stack.simulated_policy("cli-1"))
    code, out, _ = run(
        capsys, "keys", "set-policy", "cli-key", str(policy), "--client-config", admin
    )
    assert code == 0 and json.loads(out)["policy_version"] == "cli-1"
    code, out, _ = run(capsys, "keys", "list", "--client-config", admin)
    assert any(
        k["key_id"] == "cli-key" and k["policy_version"] == "cli-1" for k in json.loads(out)["keys"]
    )

    model = train(tmp_path / "model.onnx")
    code, out, _ = run(
        capsys,
        "model",
        "publish",
        str(model.path),
        "--name",
        "cli-model",
        "--version",
        "1",
        "--key-id",
        "cli-key",
        "--no-progress",
        "--client-config",
        publisher,
    )
    assert code == 0, out
    published = json.loads(out)
    assert published["key_version"] == 2 and len(published["artifact_sha256"]) == 64
    assert len(published["header_sha256"]) == 64  # what LoadModel pins the version with
    # Publishing the same name/version again is refused; the first stays.
    code, _, err = run(
        capsys,
        "model",
        "publish",
        str(model.path),
        "--name",
        "cli-model",
        "--version",
        "1",
        "--key-id",
        "cli-key",
        "--no-progress",
        "--client-config",
        publisher,
    )
    assert code == 1 and "ALREADY_EXISTS" in err
    code, out, _ = run(capsys, "model", "ls", "cli-", "--client-config", publisher)
    assert out.split("\t")[:2] == ["cli-model", "1"]
    assert out.rstrip("\n").split("\t")[-1] == "format 3"
    # A model still in an unbound format (stored before format 3) is marked, and --unbound finds
    # exactly the models to re-publish.
    store = stack.services["modelstore"].handle.storage
    store.put([make_artifact("cli-legacy", "1", b"old", format_version=1)], StructureValidator())
    code, out, _ = run(capsys, "model", "ls", "cli-", "--unbound", "--client-config", publisher)
    assert code == 0 and [line.split("\t")[0] for line in out.splitlines()] == ["cli-legacy"]
    assert out.rstrip("\n").split("\t")[-1] == "format 1 unbound"

    # inspect reads a local artifact's header without any key.
    artifact = stack.services["modelstore"].handle.storage.open("cli-model", "1")
    local = tmp_path / "copy.artifact"
    with artifact as reader:
        local.write_bytes(b"".join(reader.chunks(1 << 20)))
    code, out, _ = run(capsys, "model", "inspect", str(local))
    header = json.loads(out)
    assert (header["name"], header["key_id"], header["plaintext_size"]) == (
        "cli-model",
        "cli-key",
        model.path.stat().st_size,
    )
    assert (header["format_version"], header["data_key_bound_to_model"]) == (3, True)
    code, _, err = run(capsys, "model", "inspect", str(model.path))
    assert code == 1 and "BAD_MAGIC" in err

    # Only an admin deletes.
    code, _, err = run(capsys, "model", "rm", "cli-model", "1", "--client-config", publisher)
    assert code == 1 and "PERMISSION_DENIED" in err
    code, out, _ = run(capsys, "model", "rm", "cli-model", "1", "--client-config", admin)
    assert code == 0 and "deleted cli-model/1" in out

    # A whole artifact file (as the store's quarantine keeps one) is uploaded again unchanged.
    code, out, _ = run(capsys, "model", "upload", str(local), "--client-config", publisher)
    assert code == 0, out
    uploaded = json.loads(out)
    assert (uploaded["name"], uploaded["version"], uploaded["artifact_format"]) == (
        "cli-model",
        "1",
        3,
    )
    assert uploaded["artifact_sha256"] == published["artifact_sha256"]
    assert uploaded["header_sha256"] == published["header_sha256"]
    code, _, err = run(capsys, "model", "upload", str(model.path), "--client-config", publisher)
    assert code == 1 and "BAD_MAGIC" in err  # refused before anything is sent

    audit = stack.root / "state" / "keybroker" / "audit.log"
    code, out, _ = run(
        capsys,
        "audit",
        "verify",
        str(audit),
        "--public-key",
        str(stack.secrets_dir / "audit-key.pub.pem"),
    )
    assert code == 0, out


def test_broker_refuses_the_simulated_chain_in_production(stack: DevStack) -> None:
    common, config = load_service_config(
        stack.config_path("keybroker"), "keybroker", KeybrokerConfig, environ={}
    )
    assert config.allow_simulated_tee and not common.production
    production = load_service_config(
        stack.config_path("keybroker"),
        "keybroker",
        KeybrokerConfig,
        # Production certificates carry no loopback name (the development stack's do).
        environ={
            "STRONGROOM__MODE": "production",
            "STRONGROOM__IDENTITY__DNS_NAMES": "[keybroker]",
        },
    )
    with pytest.raises(FailedPrecondition) as info:
        trust_store(*production)
    assert info.value.reason == "SIMULATED_TEE_IN_PRODUCTION"
    assert trust_store(common, config).includes_simulated


@pytest.mark.parametrize("variable", ["STRONGROOM_HSM_PIN", "STRONGROOM_NONCE_KEY"])
def test_a_production_broker_refuses_a_secret_given_as_file_and_variable(
    stack: DevStack, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """The variable silently won over the file the operator provisioned (a PIN or nonce key put
    into the container's environment replaced the mounted Secret). In production a secret
    configured as a file and also set in the environment now stops the broker's start."""
    common, config = load_service_config(
        stack.config_path("keybroker"),
        "keybroker",
        KeybrokerConfig,
        environ={
            "STRONGROOM__MODE": "production",
            "STRONGROOM__IDENTITY__DNS_NAMES": "[keybroker]",
            "STRONGROOM__KEYBROKER__ALLOW_SIMULATED_TEE": "false",
        },
    )
    assert common.production and config.pin_file is not None and config.nonce_key_file is not None
    monkeypatch.setenv(variable, "from-the-environment")
    with pytest.raises(FailedPrecondition) as info:
        build(common, config, identity=None)  # type: ignore[arg-type]  # refused before its use
    assert info.value.reason == "SECRET_AMBIGUOUS"
    assert variable in info.value.message and "from-the-environment" not in info.value.message


@pytest.mark.parametrize("mode", ["production", "development"])
def test_a_broker_refuses_its_audit_key_as_its_release_signing_key(
    stack: DevStack, mode: str
) -> None:
    """Both are Ed25519 file keys in the same formats, so one file served as both: the audit
    key, whose public half auditors hold, then also made every release answer an inference server
    trusts, and whoever took it for one could do both (forge the log and have a data key of its
    choosing used). The broker now refuses to start with one key for both."""
    common, config = load_service_config(
        stack.config_path("keybroker"),
        "keybroker",
        KeybrokerConfig,
        environ={
            "STRONGROOM__MODE": mode,
            "STRONGROOM__IDENTITY__DNS_NAMES": "[keybroker]",
            "STRONGROOM__KEYBROKER__ALLOW_SIMULATED_TEE": "false",
            "STRONGROOM__KEYBROKER__RELEASE_SIGNING_KEY_FILE": str(
                stack.secrets_dir / "audit-key.pem"
            ),
        },
    )
    assert config.release_signing_key_file == config.audit_key_file
    with pytest.raises(FailedPrecondition) as info:
        build(common, config, identity=None)  # type: ignore[arg-type]  # refused before its use
    assert info.value.reason == "RELEASE_SIGNING_KEY_REUSED"
    assert "audit" in info.value.message


def test_missing_client_config_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STRONGROOM_CLIENT_CONFIG", raising=False)
    code, _, err = run(capsys, "keys", "list")
    assert code == 1 and "no client configuration" in err and "Traceback" not in err


def test_a_model_file_growing_during_publish_is_one_clear_line(
    stack: DevStack,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file still being written (appended to after the upload began) fails the publish with
    the encryptor's reason, not gRPC's UNKNOWN "Exception iterating requests!" and its logged
    traceback; the store keeps nothing."""
    stack.create_release_key(stack.identity("admin"), "grow-key", policy_version="grow-1")
    model = tmp_path / "model.bin"
    model.write_bytes(bytes(3 << 20))

    class Appending:
        """Stands in for the progress bar: the first call appends to the file being read."""

        def __init__(self) -> None:
            self.appended = False

        def __call__(self, done: int, total: int) -> None:
            if not self.appended:
                self.appended = True
                with model.open("ab") as out:
                    out.write(b"appended")

        def done(self) -> None:
            pass

    monkeypatch.setattr(cli_models, "ProgressBar", Appending)
    publisher = str(stack.write_client_config("publisher"))
    code, out, err = run(
        capsys,
        *("model", "publish", str(model), "--name", "growing", "--version", "1"),
        *("--key-id", "grow-key", "--client-config", publisher),
    )
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "PLAINTEXT_SIZE_MISMATCH" in err, err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    code, out, _ = run(capsys, "model", "ls", "growing", "--client-config", publisher)
    assert code == 0 and out == ""


def test_an_artifact_file_rewritten_during_upload_is_refused(
    stack: DevStack,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``model upload`` announced the SHA-256 of the bytes it had sent, after sending them, so
    the store's check could never fail: a file rewritten in place while it was read (a copy still
    being made, another process) was stored with bytes no reader can decrypt, and reported as
    uploaded. The digest was then taken in a pass of its own before the upload (every byte read
    twice); now it is taken as the bytes are sent, and the last message waits until the file is
    seen unchanged since its check: the rewrite ends the upload before its last bytes."""
    stack.create_release_key(stack.identity("admin"), "rewrite-key", policy_version="rw-1")
    model = tmp_path / "model.bin"
    model.write_bytes(bytes(3 << 20))
    publisher = str(stack.write_client_config("publisher"))
    admin = str(stack.write_client_config("admin"))
    code, out, err = run(
        capsys,
        *("model", "publish", str(model), "--name", "rewritten", "--version", "1"),
        *("--key-id", "rewrite-key", "--client-config", publisher, "--no-progress"),
    )
    assert code == 0, err
    local = tmp_path / "rewritten.artifact"
    with stack.services["modelstore"].handle.storage.open("rewritten", "1") as reader:
        local.write_bytes(b"".join(reader.chunks(1 << 20)))
    code, _, err = run(capsys, "model", "rm", "rewritten", "1", "--client-config", admin)
    assert code == 0, err

    class Rewriting:
        """Stands in for the progress bar: the first call changes a byte not yet sent."""

        def __init__(self) -> None:
            self.rewritten = False

        def __call__(self, done: int, total: int) -> None:
            if not self.rewritten:
                self.rewritten = True
                with local.open("r+b") as f:
                    f.seek(total - (1 << 20))
                    byte = f.read(1)
                    f.seek(total - (1 << 20))
                    f.write(bytes([byte[0] ^ 1]))

        def done(self) -> None:
            pass

    monkeypatch.setattr(cli_models, "ProgressBar", Rewriting)
    code, out, err = run(capsys, "model", "upload", str(local), "--client-config", publisher)
    assert code == 1 and out == "" and "MODEL_FILE_CHANGED" in err, (out, err)
    code, out, _ = run(capsys, "model", "ls", "rewritten", "--client-config", publisher)
    assert code == 0 and out == ""


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_a_signing_key_that_is_not_ec_is_one_clear_line(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """An RSA or Ed25519 key passed to --sign-key (the help asks for an EC key) made
    model-signing raise AttributeError, a traceback out of the command line."""
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ed25519.Ed25519PrivateKey.generate()
    )
    sign_key = tmp_path / "signer.pem"
    sign_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    sign_key.chmod(0o600)
    model = train(tmp_path / "model.onnx")
    publisher = str(stack.write_client_config("publisher"))
    code, out, err = run(
        capsys,
        *("model", "publish", str(model.path), "--name", f"signed-{kind}", "--version", "1"),
        *("--key-id", "sign-key", "--sign-key", str(sign_key), "--no-progress"),
        *("--client-config", publisher),
    )
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "SIGNING_KEY_INVALID" in err and "not an EC private key" in err

"""deploy/compose/bootstrap.sh with the real ``strongroom pki`` CLI and a real SoftHSM2 token.

The compose mounts are replaced by directories under tmp_path (the script's STRONGROOM_BOOTSTRAP_*
variables); the identity configuration files are the compose stack's own.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from strongroom.attestation.release_certificate import certify
from strongroom.attestation.release_keys import load_trusted_keys
from strongroom.attestation.release_signature import ReleaseVerifier, signing_key_id
from strongroom.attestation.release_signature import load_signing_key as load_release_key
from strongroom.dev.simulated import SimulatedAuthority
from strongroom.keybroker.audit import load_signing_key
from strongroom.pki.bootstrap import operator_template
from strongroom.runtime.secrets import Secret
from strongroom.spiffe import identity_dns_name
from tests.deploy.conftest import DEPLOY, ROOT, token_login_works
from tests.pki.helpers import as_made_before_derived_names

SCRIPT = DEPLOY / "compose" / "bootstrap.sh"
CONFIG_DIR = DEPLOY / "compose" / "config"
IDENTITIES = ("keybroker", "modelstore", "inference", "publisher", "admin", "client")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


@pytest.fixture
def env(tmp_path: Path, softhsm_conf: Path) -> dict[str, str]:
    venv_bin = ROOT / ".venv" / "bin"
    if not (venv_bin / "strongroom").exists():
        pytest.skip("the strongroom CLI is not installed in .venv (run deploy/dev/setup.sh)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # The image installs the script as /usr/local/bin/softhsm-init-token.
    wrapper = bin_dir / "softhsm-init-token"
    wrapper.write_text(f'#!/bin/sh\nexec "{venv_bin / "python"}" -m strongroom.dev.softhsm "$@"\n')
    wrapper.chmod(0o755)
    for name in IDENTITIES:
        (tmp_path / "tokens" / name).mkdir(parents=True)
    for name in ("ca", "secrets", "pki", "simulated-tee"):
        (tmp_path / name).mkdir()
    return {
        "PATH": f"{bin_dir}:{venv_bin}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "SOFTHSM2_CONF": str(softhsm_conf),
        "STRONGROOM_CA_DIR": str(tmp_path / "ca"),
        "STRONGROOM_BOOTSTRAP_CONFIG_DIR": str(CONFIG_DIR),
        "STRONGROOM_BOOTSTRAP_TOKEN_ROOT": str(tmp_path / "tokens"),
        "STRONGROOM_BOOTSTRAP_SECRETS_DIR": str(tmp_path / "secrets"),
        "STRONGROOM_BOOTSTRAP_PKI_PUBLIC": str(tmp_path / "pki"),
        "STRONGROOM_BOOTSTRAP_HSM_DIR": str(softhsm_conf.parent / "softhsm"),
        "STRONGROOM_BOOTSTRAP_SIMULATED_TEE_DIR": str(tmp_path / "simulated-tee"),
    }


@pytest.fixture
def env_with_chain(env: dict[str, str], simulated_tee_dir: Path) -> dict[str, str]:
    """:func:`env` whose simulated-tee volume already holds the run's chain (a copy, so that a
    test cannot change the shared one): ``bootstrap.sh`` finds it and does not generate one (three
    RSA-4096 keys, 2-3 s a test). For the tests that are not about the chain: the first test
    checks that it is generated, the production one that the volume stays empty."""
    volume = Path(env["STRONGROOM_BOOTSTRAP_SIMULATED_TEE_DIR"])
    shutil.copytree(simulated_tee_dir, volume, dirs_exist_ok=True)  # copy2 keeps the keys' 0600
    return env


def bootstrap(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash") or "/bin/bash"
    return subprocess.run(
        [bash, str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_bootstrap_prepares_everything_and_is_idempotent(
    env: dict[str, str], tmp_path: Path
) -> None:
    first = bootstrap(env)
    assert first.returncode == 0, first.stderr

    ca = tmp_path / "ca"
    assert (ca / "config" / "ca.json").is_file()
    root = tmp_path / "pki" / "root_ca.crt"
    assert root.read_bytes() == (ca / "certs" / "root_ca.crt").read_bytes()
    assert mode(root) == 0o644  # public, read by every service
    meta = json.loads((ca / "config" / "strongroom.json").read_text())
    assert meta["url"] == "https://step-ca:9000"

    tokens = {}
    for name in IDENTITIES:
        path = tmp_path / "tokens" / name / f"{name}.token"
        assert mode(path) == 0o600, name
        tokens[name] = path.read_text().strip()
        identity = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())["identity"]
        claims = jwt_claims(tokens[name])
        # The CA signs only a CSR whose SANs equal the token's: exactly the config's identity.
        assert claims["sub"] == identity["spiffe_id"]
        assert claims["sans"] == [
            identity["spiffe_id"],
            identity_dns_name(identity["spiffe_id"]),
            *identity.get("dns_names", []),
        ]
        assert claims["aud"] == "https://step-ca:9000/1.0/sign"

    pin = tmp_path / "secrets" / "hsm-pin"
    nonce_key = tmp_path / "secrets" / "nonce-key"
    assert mode(pin) == 0o600 and mode(nonce_key) == 0o600
    assert len(nonce_key.read_bytes()) == 32
    assert len(pin.read_text()) == 32
    assert token_login_works(Path(env["SOFTHSM2_CONF"]), "strongroom", pin.read_text())
    assert pin.read_text() not in first.stdout + first.stderr
    # The SO PIN was used once and thrown away.
    assert not list(tmp_path.glob("**/so-pin*"))

    # The audit head-signing key: private 0600, public beside it for `strongroom audit verify`.
    audit_key = tmp_path / "secrets" / "audit-key"
    assert mode(audit_key) == 0o600
    key = load_signing_key(Secret(audit_key.read_bytes()))
    public = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    assert (tmp_path / "secrets" / "audit-key.pub.pem").read_bytes() == public
    # The release-signing key: private 0600 for the broker; on pki-public for inference, a
    # certificate over it (the bare public key was trusted for ever), valid a year from 5 minutes
    # before it was made, which is the file inference's configuration lists.
    release_key = tmp_path / "secrets" / "release-signing-key"
    assert mode(release_key) == 0o600
    release_public = tmp_path / "pki" / "release-signing-key.crt.pem"
    assert mode(release_public) == 0o644
    assert not (tmp_path / "pki" / "release-signing-key.pub.pem").exists()
    signer = load_release_key(release_key.read_bytes())
    assert ReleaseVerifier.from_files([release_public]).key_ids == (
        signing_key_id(signer.public_key()),
    )
    (trusted,) = load_trusted_keys(release_public.read_bytes(), source="pki")
    assert trusted.not_before is not None and trusted.not_after is not None
    assert trusted.not_after - trusted.not_before == dt.timedelta(days=365, minutes=5)
    assert trusted.not_before < dt.datetime.now(dt.UTC) - dt.timedelta(minutes=4)
    inference = yaml.safe_load((CONFIG_DIR / "inference.yaml").read_text())["inference"]
    assert inference["release_signing_public_keys"] == [
        "/run/strongroom/pki/release-signing-key.crt.pem"
    ]

    # The simulated TEE chain (development): loadable by the simulated attester, roots for the broker.
    tee = tmp_path / "simulated-tee"
    assert (tee / "amd_trust.pem").is_file() and (tee / "intel_root.pem").is_file()
    SimulatedAuthority.load(tee)

    def state() -> tuple[bytes, ...]:
        files = [pin, nonce_key, root, audit_key, release_key, release_public]
        files += [tee / "amd_trust.pem", tee / "ark.key"]
        return tuple(f.read_bytes() for f in files)

    saved = state()
    # As an earlier version made it: the operator's provisioner without a template, which the
    # next run gives it (before step-ca starts), and then leaves as it is.
    as_made_before_derived_names(ca)
    second = bootstrap(env)
    assert second.returncode == 0, second.stderr
    assert "already present" in second.stderr
    assert "kept the release-signing certificate" in second.stderr  # same bytes: state() below
    assert state() == saved
    config = json.loads((ca / "config" / "ca.json").read_text())
    (operator,) = config["authority"]["provisioners"]
    assert operator["options"]["x509"]["template"] == operator_template()
    for name in IDENTITIES:  # fresh one-time tokens on every run
        assert (tmp_path / "tokens" / name / f"{name}.token").read_text().strip() != tokens[name]


def test_an_existing_stack_gets_a_certificate_in_place_of_its_bare_key(
    env_with_chain: dict[str, str], tmp_path: Path
) -> None:
    """A stack bootstrapped before certificates published the bare public key, which inference
    trusted for ever: the next run certifies the key the broker holds (not a new one) and takes
    the bare key away, so an inference still listing it fails at start naming the file."""
    env = env_with_chain
    assert bootstrap(env).returncode == 0
    pki = tmp_path / "pki"
    secrets = tmp_path / "secrets"
    (pki / "release-signing-key.crt.pem").unlink()
    bare = pki / "release-signing-key.pub.pem"
    bare.write_bytes((secrets / "release-signing-key.pub.pem").read_bytes())
    key = (secrets / "release-signing-key").read_bytes()

    run = bootstrap(env)
    assert run.returncode == 0, run.stderr
    assert (secrets / "release-signing-key").read_bytes() == key
    assert not bare.exists()
    assert "removed the bare release-signing public key" in run.stderr
    certificate = pki / "release-signing-key.crt.pem"
    assert ReleaseVerifier.from_files([certificate]).key_ids == (
        signing_key_id(load_release_key(key).public_key()),
    )


def test_a_certificate_ending_soon_or_over_another_key_is_made_again(
    env_with_chain: dict[str, str], tmp_path: Path
) -> None:
    """The bootstrap keeps the certificate while it does (first test), and makes it again at the
    next run when it ends within 60 days, or certifies a key the broker no longer holds (the key
    rotated in keybroker-secrets)."""
    env = env_with_chain
    assert bootstrap(env).returncode == 0
    certificate = tmp_path / "pki" / "release-signing-key.crt.pem"
    key = load_release_key((tmp_path / "secrets" / "release-signing-key").read_bytes())
    now = dt.datetime.now(dt.UTC)
    for stale in (
        certify(key, days=59, now=now),
        certify(Ed25519PrivateKey.generate(), days=365, now=now),
    ):
        certificate.write_bytes(stale)
        run = bootstrap(env)
        assert run.returncode == 0, run.stderr
        assert "made the release-signing certificate" in run.stderr
        (trusted,) = load_trusted_keys(certificate.read_bytes(), source="pki")
        assert signing_key_id(trusted.key) == signing_key_id(key.public_key())
        assert trusted.not_after is not None and trusted.not_after > now + dt.timedelta(days=364)


def test_production_bootstrap_leaves_no_simulated_tee(env: dict[str, str], tmp_path: Path) -> None:
    """The confidential override bootstraps in production mode, but used to create the simulated
    chain and fill the production broker's collateral cache with its collateral: refused as
    evidence, yet recorded by the cache's anti-rollback state, where a simulated QE identity or TCB
    info newer than Intel's makes the genuine one look like a rollback."""
    collateral = tmp_path / "collateral"
    collateral.mkdir()
    env = env | {
        "STRONGROOM_BOOTSTRAP_MODE": "production",
        "STRONGROOM_BOOTSTRAP_COLLATERAL_DIR": str(collateral),
    }
    run = bootstrap(env)
    assert run.returncode == 0, run.stderr
    assert "production: no simulated TEE" in run.stderr
    assert list((tmp_path / "simulated-tee").iterdir()) == []
    assert list(collateral.iterdir()) == []


def test_token_subcommand_mints_only_what_it_is_asked(env: dict[str, str], tmp_path: Path) -> None:
    # The CA has to exist first; `token` never creates one.
    assert bootstrap(env, "token", "publisher").returncode != 0
    init = subprocess.run(
        [
            "strongroom",
            "pki",
            "init",
            "--dir",
            str(tmp_path / "ca"),
            "--dns",
            "step-ca",
            "--address",
            ":9000",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    result = bootstrap(env, "token", "publisher")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tokens" / "publisher" / "publisher.token").exists()
    assert not (tmp_path / "tokens" / "keybroker" / "keybroker.token").exists()
    assert not (tmp_path / "secrets" / "hsm-pin").exists()


def test_unknown_subcommand_and_missing_volume_fail(env: dict[str, str], tmp_path: Path) -> None:
    assert bootstrap(env, "bogus").returncode == 2
    assert bootstrap(env, "token").returncode == 2
    shutil.rmtree(tmp_path / "tokens" / "inference")
    result = bootstrap(env)
    assert result.returncode != 0
    assert "no token volume mounted for inference" in result.stderr

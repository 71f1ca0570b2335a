"""Fixtures for the key-broker library tests: every test gets its own SoftHSM2 token and module.

Each token lives in the test's ``tmp_path`` with its own ``softhsm2.conf`` and its own copy of
``libsofthsm2.so`` (see :mod:`strongroom.dev.softhsm` for why), so no HSM session, token or
module state is shared between tests. Backends are closed by the fixtures, never in ``__del__``.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.dev.softhsm import SYSTEM_MODULE, SoftHsmToken, init_softhsm_token
from strongroom.keybroker.hsm import Hsm, HsmConfig
from strongroom.keybroker.keys import KeyManager
from tests.keybroker.helpers import SO_PIN, USER_PIN, make_config


def _require_softhsm() -> None:
    if shutil.which("softhsm2-util") is None or not SYSTEM_MODULE.exists():
        pytest.skip("SoftHSM2 is not installed (Debian package softhsm2)")


@pytest.fixture
def softhsm_token(tmp_path: Path) -> SoftHsmToken:
    """A fresh token owned by this test."""
    _require_softhsm()
    return init_softhsm_token(
        tmp_path / "hsm", label=f"t-{uuid.uuid4().hex[:12]}", pin=USER_PIN, so_pin=SO_PIN
    )


@pytest.fixture
def open_hsm() -> Iterator[Callable[..., Hsm]]:
    """Opens backends for a test and closes every one of them afterwards."""
    opened: list[Hsm] = []

    def opener(config: HsmConfig, **kwargs: object) -> Hsm:
        hsm = Hsm.open(config, **kwargs)  # type: ignore[arg-type]
        opened.append(hsm)
        return hsm

    yield opener
    for hsm in opened:
        hsm.close()


@pytest.fixture
def hsm(softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm]) -> Hsm:
    """A connected backend on this test's token."""
    return open_hsm(make_config(softhsm_token))


@pytest.fixture
def km(hsm: Hsm) -> KeyManager:
    """A key manager on this test's backend."""
    return KeyManager(hsm)


@pytest.fixture
def replica(softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm]) -> Callable[[], KeyManager]:
    """Opens another broker's key manager on the test's token (its own SoftHSM2 instance, as a
    replica on another host), once the test has made the objects it should see."""
    return lambda: KeyManager(
        open_hsm(make_config(softhsm_token, softhsm_token.replica_module("b")))
    )


@pytest.fixture(scope="session")
def tee_key() -> rsa.RSAPrivateKey:
    """An RSA-3072 key standing in for a TEE's ephemeral key (just a key pair: no HSM state)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    """An audit log's signing key."""
    return Ed25519PrivateKey.generate()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    """An audit log's path in a directory of its own, as the services lay it out (modules whose
    log lives elsewhere define their own)."""
    (tmp_path / "audit").mkdir()
    return tmp_path / "audit" / "audit.log"

"""A workload identity persisted in a state directory: key and chain in ONE file, mode 0600.

One file replaced atomically means a crash never leaves a new key beside an old chain. A
certificate the identity replaced with a new key is kept beside it (``superseded-<serial>.pem``,
same mode) until step-ca has revoked it, so that a restart resumes the revocation instead of
leaving it renewable by whoever copied its key. It is written before the new identity replaces
it, so a crash between the two leaves a superseded file naming the current certificate, which
the identity ignores and removes.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from strongroom.pki._files import read_private, write_private
from strongroom.pki._x509 import load_chain, load_private_key
from strongroom.pki.credentials import Credentials

STATE_FILE = "identity.pem"
_SUPERSEDED_PREFIX = "superseded-"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\n?", re.DOTALL)


def prepare_state_dir(state_dir: Path) -> None:
    """Creates ``state_dir`` (0700) or checks an existing one: it must belong to this user
    (PermissionError otherwise), since its owner can read or swap the key whatever mode we set,
    and root's chmod would succeed on a directory another user prepared (in /tmp, say) and hand
    our key to them. An enrolment calls it before presenting its one-time token."""
    state_dir.mkdir(parents=True, exist_ok=True)
    owner = state_dir.stat().st_uid
    if owner != os.geteuid():
        raise PermissionError(
            f"identity state directory {state_dir} belongs to uid {owner}, not to this user "
            f"(uid {os.geteuid()}): its owner could read or replace the key; use a directory of "
            "this user's"
        )
    os.chmod(state_dir, 0o700)


def save_state(state_dir: Path, credentials: Credentials) -> None:
    """Writes key + chain to ``state_dir/identity.pem`` (directory 0700, checked as
    :func:`prepare_state_dir` does; file 0600)."""
    prepare_state_dir(state_dir)
    write_private(state_dir / STATE_FILE, credentials.key_pem + credentials.chain_pem)


def load_state(
    state_dir: Path,
) -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate], datetime]:
    """Reads key, chain and the time they were written (raises OSError or ValueError)."""
    return _read_pair(state_dir / STATE_FILE)


def save_superseded(state_dir: Path, credentials: Credentials) -> Path:
    """Keeps a replaced identity's key + chain until its revocation is confirmed (mode 0600)."""
    path = superseded_path(state_dir, credentials.serial)
    write_private(path, credentials.key_pem + credentials.chain_pem)
    return path


def superseded_path(state_dir: Path, serial: int) -> Path:
    """Where the superseded certificate ``serial`` is kept."""
    return state_dir / f"{_SUPERSEDED_PREFIX}{serial:x}.pem"


def superseded_files(state_dir: Path) -> list[Path]:
    """The superseded certificates kept in ``state_dir``, oldest name first."""
    return sorted(state_dir.glob(f"{_SUPERSEDED_PREFIX}*.pem"))


def load_superseded(path: Path) -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate]]:
    """Reads one kept superseded key + chain (raises OSError or ValueError)."""
    key, chain, _written = _read_pair(path)
    return key, chain


def _read_pair(
    path: Path,
) -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate], datetime]:
    data = read_private(path)
    blocks = list(_PEM_BLOCK.finditer(data))
    keys = [m.group(0) for m in blocks if m.group(1) == b"PRIVATE KEY"]
    certs = b"".join(m.group(0) for m in blocks if m.group(1) == b"CERTIFICATE")
    if len(keys) != 1:
        raise ValueError(f"{path.name} must hold exactly one private key")
    written = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    return load_private_key(keys[0]), load_chain(certs), written

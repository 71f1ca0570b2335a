"""A workload identity persisted in a state directory: key and chain in ONE file, mode 0600.

One file replaced atomically means a crash never leaves a new key beside an old chain.
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
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\n?", re.DOTALL)


def save_state(state_dir: Path, credentials: Credentials) -> None:
    """Writes key + chain to ``state_dir/identity.pem`` (directory 0700, file 0600)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    write_private(state_dir / STATE_FILE, credentials.key_pem + credentials.chain_pem)


def load_state(
    state_dir: Path,
) -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate], datetime]:
    """Reads key, chain and the time they were written (raises OSError or ValueError)."""
    path = state_dir / STATE_FILE
    data = read_private(path)
    blocks = list(_PEM_BLOCK.finditer(data))
    keys = [m.group(0) for m in blocks if m.group(1) == b"PRIVATE KEY"]
    certs = b"".join(m.group(0) for m in blocks if m.group(1) == b"CERTIFICATE")
    if len(keys) != 1:
        raise ValueError("the state file must hold exactly one private key")
    written = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    return load_private_key(keys[0]), load_chain(certs), written

"""The vendored test data is exactly what its SOURCES files describe: every pinned file is present
and unchanged, and nothing unpinned has crept in."""

from __future__ import annotations

import hashlib

import pytest

from tests.conftest import DATA

FOLDERS = ["artifact", "attestation", "wycheproof"]


@pytest.mark.parametrize("folder", FOLDERS)
def test_vendored_data_matches_its_checksums(folder: str) -> None:
    base = DATA / folder
    pinned = {}
    for line in (base / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        pinned[name] = digest
    assert "SOURCES.md" in pinned
    present = {
        str(p.relative_to(base)) for p in base.rglob("*") if p.is_file() and p.name != "SHA256SUMS"
    }
    assert present == set(pinned), "files added or missing against SHA256SUMS"
    for name, digest in pinned.items():
        assert hashlib.sha256((base / name).read_bytes()).hexdigest() == digest, name

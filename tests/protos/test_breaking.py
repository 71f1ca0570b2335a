"""`make protolint`'s breaking check compares against the committed API baseline, so it fails on a
breaking change even on a clean clone of main (where comparing against the `main` ref could not)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "protos" / "breaking.sh"
BUF = ROOT / ".build" / "tools" / "node_modules" / ".bin" / "buf"
STORE_PROTO = Path("strongroom/api/modelstore/v1/modelstore.proto")


@pytest.fixture
def protos(tmp_path: Path) -> Path:
    if not BUF.exists():
        pytest.fail(f"{BUF} is missing: run `make setup`")
    copy = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", copy, ignore=shutil.ignore_patterns("_gen"))
    return copy


def _check(protos: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT)],
        env={**os.environ, "PROTOS_DIR": str(protos)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_committed_protos_match_the_baseline(protos: Path) -> None:
    result = _check(protos)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("  uint64 offset = 2;\n", "", 'Previously present field "2" with name "offset"'),
        ("  uint64 offset = 2;\n", "  uint64 offset = 4;\n", 'field "2" with name "offset"'),
        ("  uint64 offset = 2;\n", "  int64 offset = 2;\n", "changed type"),
    ],
    ids=["field removed", "field renumbered", "field retyped"],
)
def test_a_breaking_change_fails(protos: Path, old: str, new: str, complaint: str) -> None:
    path = protos / STORE_PROTO
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    result = _check(protos)
    assert result.returncode != 0
    assert complaint in result.stdout + result.stderr


def test_an_added_field_passes(protos: Path) -> None:
    path = protos / STORE_PROTO
    text = path.read_text()
    old = "  bytes data = 3;\n"
    assert old in text
    path.write_text(text.replace(old, old + "  string note = 4;\n", 1))
    assert _check(protos).returncode == 0

"""softhsm-init-token (strongroom.dev.softhsm) against a real SoftHSM2: PINs from files, idempotent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.deploy.conftest import SOFTHSM_MODULE, token_login_works


def run(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "strongroom.dev.softhsm", "--module", str(SOFTHSM_MODULE), *args],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def pins(tmp_path: Path, pin: str = "user-pin-1234", so_pin: str = "so-pin-56789") -> list[str]:
    (tmp_path / "pin").write_text(pin + "\n")
    (tmp_path / "so-pin").write_text(so_pin)
    return ["--pin-file", str(tmp_path / "pin"), "--so-pin-file", str(tmp_path / "so-pin")]


def test_initialises_once_then_leaves_the_token_alone(softhsm_conf: Path, tmp_path: Path) -> None:
    args = ["--label", "strongroom", *pins(tmp_path)]
    first = run(softhsm_conf, *args)
    assert first.returncode == 0, first.stderr
    assert "initialised" in first.stdout
    assert token_login_works(softhsm_conf, "strongroom", "user-pin-1234")
    assert not token_login_works(softhsm_conf, "strongroom", "wrong-pin-0000")

    # A second run with other PINs must not re-initialise (that would destroy the KEKs).
    again = run(
        softhsm_conf, "--label", "strongroom", *pins(tmp_path, "another-pin-1", "another-so-1")
    )
    assert again.returncode == 0, again.stderr
    assert "already present" in again.stdout
    assert token_login_works(softhsm_conf, "strongroom", "user-pin-1234")


def test_a_second_label_gets_its_own_token(softhsm_conf: Path, tmp_path: Path) -> None:
    assert run(softhsm_conf, "--label", "first", *pins(tmp_path)).returncode == 0
    assert run(softhsm_conf, "--label", "second", *pins(tmp_path, "second-pin-1")).returncode == 0
    assert token_login_works(softhsm_conf, "first", "user-pin-1234")
    assert token_login_works(softhsm_conf, "second", "second-pin-1")


def test_pins_never_reach_the_output(softhsm_conf: Path, tmp_path: Path) -> None:
    result = run(softhsm_conf, "--label", "strongroom", *pins(tmp_path))
    assert "user-pin-1234" not in result.stdout + result.stderr
    assert "so-pin-56789" not in result.stdout + result.stderr


def test_rejects_bad_input_without_touching_the_token(softhsm_conf: Path, tmp_path: Path) -> None:
    short = run(softhsm_conf, "--label", "strongroom", *pins(tmp_path, pin="123"))
    assert short.returncode == 2 and "user PIN" in short.stderr
    assert "123" not in short.stderr.replace(str(tmp_path), "")
    long_label = run(softhsm_conf, "--label", "x" * 33, *pins(tmp_path))
    assert long_label.returncode == 2 and "label" in long_label.stderr
    missing = run(
        softhsm_conf,
        "--label",
        "strongroom",
        "--pin-file",
        str(tmp_path / "nope"),
        "--so-pin-file",
        str(tmp_path / "nope"),
    )
    assert missing.returncode == 2
    # None of the failures initialised anything.
    ok = run(softhsm_conf, "--label", "strongroom", *pins(tmp_path))
    assert "initialised" in ok.stdout


def test_a_module_that_cannot_load_is_an_error(softhsm_conf: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "strongroom.dev.softhsm",
            "--module",
            str(tmp_path / "missing.so"),
            "--label",
            "x",
            *pins(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0

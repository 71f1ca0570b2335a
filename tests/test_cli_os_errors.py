"""The ``strongroom`` command's one line for a file's ``OSError``: the file(s), the cause and the
errno's name, never a raw terminal control sequence. A file name is anyone's who could write the
directory it sits in: one planted with ESC, BEL and CR reached the operator's terminal as it was
(a title set, a line overwritten) for every command whose ``OSError`` named it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from strongroom.cli.main import run_command

REPO = Path(__file__).resolve().parents[1]

# ESC ] 0 ; ... BEL sets the terminal's title; CR returns to the line's start, to overwrite it.
PLANTED = "evil\x1b]0;owned\x07\rname"
SHOWN = "evil\\x1b]0;owned\\x07\\rname"

_MAIN = "import sys; from strongroom.cli.main import main; sys.exit(main())"


def test_a_planted_file_name_in_an_os_error_cannot_drive_the_terminal(tmp_path: Path) -> None:
    """``attest collateral import`` into a cache under a planted file (a file where a directory
    is expected: ENOTDIR, real), the command run as the operator runs it (its own process, the
    CLI's entry point): its error line printed the name raw. It shows each control character as
    its escape now, and names the errno."""
    (tmp_path / PLANTED).write_text("planted\n")
    source = tmp_path / "carried-in"
    source.mkdir()
    cache = tmp_path / PLANTED / "cache"
    command = ["attest", "collateral", "import", str(source), "--dir", str(cache)]
    shown = subprocess.run(
        [sys.executable, "-c", _MAIN, *command],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 1, shown.stderr
    assert not {b"\x1b", b"\x07", b"\r"} & {bytes([c]) for c in shown.stderr}, shown.stderr
    assert shown.stderr.decode() == (
        f"strongroom: error: {tmp_path}/{SHOWN}/cache: Not a directory (ENOTDIR)\n"
    )


def test_both_files_of_a_failed_rename_are_named_and_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ``OSError`` naming two files (a rename's: ``filename2``) printed only the first; both
    are named now, ``A -> B`` as Python says it, each escaped."""
    planted = tmp_path / PLANTED
    planted.write_text("planted\n")
    target = tmp_path / "missing" / f"{PLANTED}.2"

    def rename() -> int:
        planted.rename(target)
        return 0

    assert run_command(rename) == 1
    assert capsys.readouterr().err == (
        f"strongroom: error: {tmp_path}/{SHOWN} -> {tmp_path}/missing/{SHOWN}.2: No such file or "
        "directory (ENOENT)\n"
    )
    assert planted.read_text() == "planted\n"

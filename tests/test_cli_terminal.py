"""How the ``strongroom`` command prints what its terminal's encoding lacks (the command as a
process of its own, so that Python sets its streams up from the environment as it would)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from strongroom.cli.main import escape_what_the_terminal_cannot_encode

_PRINT = (
    "from strongroom.cli.main import escape_what_the_terminal_cannot_encode as escape; "
    "escape(); print('caf\\u00e9 \\u2713')"
)


@pytest.mark.parametrize(
    ("encoding", "printed"),
    [
        ("ascii", b"caf\\xe9 \\u2713\n"),  # no handler chosen: escaped, not a traceback
        ("latin-1", b"caf\xe9 \\u2713\n"),
        ("ascii:replace", b"caf? ?\n"),  # the user's handler
        ("latin-1:ignore", b"caf\xe9 \n"),
        (":xmlcharrefreplace", "caf\u00e9 \u2713\n".encode()),  # the locale's encoding (UTF-8)
    ],
)
def test_an_error_handler_the_user_chose_for_output_is_kept(encoding: str, printed: bytes) -> None:
    """The CLI made standard output escape what its encoding lacks (``backslashreplace``) even
    when the user had chosen another handler (``PYTHONIOENCODING=ascii:replace``): theirs is
    kept; without one, such characters are escaped as before."""
    env = {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "LANG")}
    env.update(PYTHONIOENCODING=encoding, LC_ALL="C.UTF-8")
    shown = subprocess.run(
        [sys.executable, "-c", _PRINT], capture_output=True, env=env, timeout=60, check=False
    )
    assert shown.returncode == 0, shown.stderr.decode("ascii", "backslashreplace")
    assert shown.stdout == printed


def test_a_strict_handler_the_user_chose_fails_rather_than_escape() -> None:
    """``:strict``: the user would rather the command failed than print anything but the text
    (a policy document saved from ``keys get-policy``)."""
    env = dict(os.environ, PYTHONIOENCODING="ascii:strict")
    shown = subprocess.run(
        [sys.executable, "-c", _PRINT], capture_output=True, env=env, timeout=60, check=False
    )
    assert shown.returncode != 0
    assert b"UnicodeEncodeError" in shown.stderr


def test_the_variable_is_not_taken_for_a_choice_when_python_ignores_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under ``python -E`` (or ``-I``) Python ignores PYTHONIOENCODING: its handler is no
    choice the streams carry, and output is escaped as without it."""
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(io.BytesIO(), encoding="ascii"))
    monkeypatch.setenv("PYTHONIOENCODING", "ascii:strict")
    monkeypatch.setattr(sys, "flags", SimpleNamespace(ignore_environment=1))
    escape_what_the_terminal_cannot_encode()
    assert stdout.errors == "backslashreplace"

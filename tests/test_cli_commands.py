"""The ``strongroom`` command line imports only the module of the command it runs."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

import pytest

from strongroom.cli.main import COMMAND_MODULES, COMMANDS, build_parser, command_of, main
from tests.conftest import REPO


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_module_registers_the_commands_mapped_to_it() -> None:
    for name in COMMAND_MODULES:
        parser = argparse.ArgumentParser()
        importlib.import_module(name).register(parser.add_subparsers())
        assert set(_commands(parser)) == {c for c, m in COMMANDS.items() if m == name}, name
    assert set(COMMANDS.values()) == set(COMMAND_MODULES)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_command_parses_as_it_does_with_every_command_registered(command: str) -> None:
    alone = _commands(build_parser(command))
    assert set(alone) == {c for c, m in COMMANDS.items() if m == COMMANDS[command]}
    assert alone[command].format_help() == _commands(build_parser())[command].format_help()


def test_the_command_is_the_first_word_that_is_not_an_option() -> None:
    assert command_of(["-v", "pki", "token", "--dir", "x"]) == "pki"
    assert command_of(["--verbose", "keys", "list"]) == "keys"
    assert command_of(["--help"]) is None
    assert command_of([]) is None


def test_running_a_command_imports_no_other_commands_module() -> None:
    """``strongroom pki token``, which the bootstrap job runs once per identity, took ~1.2 s to
    start, most of it importing the services' runtime for the other commands' modules."""
    others = [m for m in COMMAND_MODULES if m != COMMANDS["pki"]]
    script = (
        "import sys\n"
        "from strongroom.cli.main import main\n"
        "try:\n"
        "    main(['pki', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(set({others!r}) & set(sys.modules)))\n"
    )
    shown = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        timeout=120,
    )
    assert shown.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "argv", [["-h", "pki"], ["--help", "keys"], ["-vh", "audit"], ["--he", "pki"]]
)
def test_help_before_a_command_lists_every_command(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``strongroom -h pki`` is the top-level help (argparse acts on -h before it reaches the
    command): it listed only the commands of pki's module once the command line's first word
    chose which modules to import."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    listed = capsys.readouterr().out
    for command in COMMANDS:
        assert f"\n    {command} " in listed, command


def test_only_the_verbose_option_before_a_command_keeps_it_alone() -> None:
    """Any other word before the command (help, an abbreviation argparse would expand, ``--``)
    builds the full parser, which parses every command line as before."""
    assert command_of(["-v", "--verbose", "pki", "-h"]) == "pki"
    for before in (["-h"], ["--help"], ["-vh"], ["--verb"], ["--"], ["-x"]):
        assert command_of([*before, "pki"]) is None, before

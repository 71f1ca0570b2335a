"""Entry point of the ``strongroom`` command.

Each area contributes its subcommands through a module with ``register(subparsers)``; the handler it
sets as ``func`` takes the parsed arguments and returns the exit code. Expected failures are
:class:`~strongroom.errors.StrongroomError` and are printed as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

import grpc

from strongroom.cli._text import printable
from strongroom.errors import StrongroomError
from strongroom.files import os_error_cause

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

# ONNX Runtime's Linux wheel records telemetry unless this is set before it is first imported.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = (
    "strongroom.cli.serve",
    "strongroom.pki.cli",
    "strongroom.cli.keys",
    "strongroom.cli.audit",
    "strongroom.cli.attest",
    "strongroom.cli.models",
    "strongroom.cli.inference",
)
# The top-level commands each of COMMAND_MODULES registers (tests/test_cli_commands.py checks it):
# a command line naming one of them imports only its module. Importing them all (the services'
# runtime, gRPC servers, ONNX Runtime's wrappers) cost ~0.8 s per run, paid by every `strongroom
# pki token` of the bootstrap job and every script calling the CLI in a loop.
COMMANDS = {
    "serve": "strongroom.cli.serve",
    "health": "strongroom.cli.serve",
    "pki": "strongroom.pki.cli",
    "keys": "strongroom.cli.keys",
    "audit": "strongroom.cli.audit",
    "attest": "strongroom.cli.attest",
    "model": "strongroom.cli.models",
    "inference": "strongroom.cli.inference",
}
# Installed distributions (the development kit's `demo`) add commands through this entry-point group,
# so production code never imports them.
PLUGIN_GROUP = "strongroom.cli"


class _Parser(argparse.ArgumentParser):
    """The command line's parser: what it says on stderr (a usage error's usage and ``strongroom:
    error:`` line, exit 2) is written only if stderr takes it at once, as the command's own error
    line is (:func:`_print_error`). Printed, it waited for good on a full pipe whose collector
    had stopped reading (a service started with an argument its version does not know), and the
    process never ended. Help and the version go to stdout, written whole."""

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        if message and (file is None or file is sys.stderr):
            from strongroom.runtime.log_writer import write_at_once

            write_at_once(sys.stderr, message.removesuffix("\n"), cut_to_fit=True)
            return
        super()._print_message(message, file)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Builds the argument parser with every area's subcommands and those of installed plugins;
    given one of :data:`COMMANDS`, with only the subcommands of the module that registers it."""
    parser = _Parser(
        prog="strongroom",
        description="Strongroom: keep AI models confidential at rest, in transit and in use.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command]).register(sub)
        return parser
    for plugin in sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name):
        plugin.load()(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word that is not an option, or None.

    None too if anything but ``-v``/``--verbose`` comes before it: argparse acts on a ``-h`` there
    (``-vh``, ``--he``) before it reaches the command, printing the top-level help, which must list
    every command, and the full parser is right for whatever else may come first."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg
        if arg not in ("-v", "--verbose"):
            return None
    return None


def escape_what_the_terminal_cannot_encode() -> None:
    """Makes standard output and error print a character their encoding lacks as its Python
    escape (``\\xe9``) instead of raising.

    On a terminal that is not UTF-8 (LANG=C where Python does not coerce it, PYTHONIOENCODING=
    latin-1) a command printing such a character (a policy's description, a model name, a
    server's message) ended in a UnicodeEncodeError traceback, the rest of its output lost.
    Standard error already escapes (Python's default there); output did not. A policy document
    ``keys get-policy`` printed so is not the broker's byte for byte: save one from a UTF-8
    locale.

    An error handler the user chose for output (``PYTHONIOENCODING=latin-1:replace``, or
    ``:strict`` to fail rather than print anything but the document) is theirs: it was overridden
    too."""
    streams = (sys.stderr,) if _output_errors_chosen() else (sys.stdout, sys.stderr)
    for stream in streams:
        # Not a TextIOWrapper: replaced by the caller (a test's capture), which chose its own.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def _output_errors_chosen() -> bool:
    """Whether ``PYTHONIOENCODING`` names an error handler, which Python then gave standard
    output (not under ``-E``/``-I``, which make it ignore the variable)."""
    if sys.flags.ignore_environment:
        return False
    return bool(os.environ.get("PYTHONIOENCODING", "").partition(":")[2])


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line and returns its exit code."""
    escape_what_the_terminal_cannot_encode()  # before anything is printed, --help included
    words = sys.argv[1:] if argv is None else argv
    args = build_parser(command_of(words)).parse_args(words)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return run_command(lambda: args.func(args))


def _os_error_text(exc: OSError) -> str:
    """What an ``OSError`` says to the operator: the file(s) it names (``A -> B`` for a rename),
    its cause and its errno's name, each character that is not printable shown as its escape: a
    planted file name must not drive the terminal (it was printed raw)."""
    names = " -> ".join(
        os.fsdecode(name) if isinstance(name, (str, bytes)) else str(name)
        for name in (exc.filename, exc.filename2)
        if name is not None
    )
    where = f"{names}: " if names else ""
    return printable(f"{where}{os_error_cause(exc)}")


def run_command(command: Callable[[], int]) -> int:
    """Runs ``command`` and returns its exit code: an expected failure (a service's refusal, a
    :class:`~strongroom.errors.StrongroomError`, a file's ``OSError``) is printed as one line on
    stderr, status 1, never a traceback."""
    try:
        code = command()
    except grpc.RpcError as exc:
        # A service refused: its status and message (REASON: text) say why; no traceback. First:
        # a channel's own refusal before the call (the server's identity unchecked or another's)
        # is both, and its status (UNAVAILABLE: retry) matters as a service's does.
        status = exc.code()
        _print_error(f"strongroom: error: {status.name}: {printable(exc.details())}")
        return 1
    except StrongroomError as exc:
        _print_error(f"strongroom: error: {printable(exc)}")
        return 1
    except OSError as exc:
        # A file or directory the command needed (a mistyped path, permissions, a full disk):
        # the operator's to fix, so one line naming it, not a traceback.
        _print_error(f"strongroom: error: {_os_error_text(exc)}")
        return 1
    except KeyboardInterrupt:
        return 130
    return code


def _print_error(line: str) -> None:
    """Prints the command's error ``line`` on stderr, only if stderr takes it without waiting:
    printed, the line waited on a full pipe whose collector had stopped reading, and the
    process never ended. In a service's process (``strongroom serve``, its log configured on
    stderr), through the log (:meth:`ServiceLog.say
    <strongroom.runtime.log_writer.ServiceLog.say>`), after its lines: the log has said why the
    service stopped. Before its log is configured (a configuration refused: ``CONFIG_INVALID``)
    and in any other command, written at once or not at all (:func:`~strongroom.runtime.
    log_writer.write_at_once`), as the log's own lines are: whole to a terminal or a file, cut to
    what a pipe takes at once when longer (dropped, it left a failed command without a word)."""
    from strongroom.runtime.log_writer import ServiceLog, write_at_once

    for handler in logging.getLogger().handlers:
        if isinstance(handler, ServiceLog) and handler.stream is sys.stderr:
            handler.say(line)
            return
    write_at_once(sys.stderr, line, cut_to_fit=True)


if __name__ == "__main__":
    sys.exit(main())

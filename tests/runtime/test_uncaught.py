"""A service's exceptions that nothing caught (strongroom.runtime.uncaught): a line of its log.
The whole process, its stderr included, is tests/runtime/test_stopping.py's."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from strongroom.runtime import uncaught
from tests.conftest import REPO, buffered_service_log


@pytest.fixture
def service_hooks(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The service's log (JSON, into a buffer) and its hooks installed, pytest's put back
    afterwards; stderr is another buffer, which must stay empty. Yields what reads the log's
    lines (closing it)."""
    handler, log = buffered_service_log(monkeypatch)
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    uncaught.install()

    def lines() -> list[dict[str, Any]]:
        handler.close()
        return [json.loads(line) for line in log.getvalue().splitlines()]

    yield lines
    assert stderr.getvalue() == ""


def _run(target: Callable[[], None], name: str = "worker") -> None:
    thread = threading.Thread(target=target, name=name)
    thread.start()
    thread.join()


def test_an_exception_that_ends_a_thread_is_one_error_line(
    service_hooks: Callable[[], list[dict[str, Any]]],
) -> None:
    """Python's own hook printed the traceback on stderr (here the buffer that must stay
    empty), beside the service's lines. One ERROR line: the thread, the error's type and
    message, the traceback its ``exc``."""

    def fails() -> None:
        raise ConnectionResetError(104, "the peer went away")

    _run(fails, name="renewal")
    (line,) = service_hooks()
    assert (line["level"], line["logger"], line["msg"]) == (
        "ERROR",
        "strongroom.runtime.uncaught",
        "thread ended on an uncaught error",
    )
    assert (line["thread_name"], line["error_type"], line["error"]) == (
        "renewal",
        "ConnectionResetError",
        "[Errno 104] the peer went away",
    )
    assert line["exc"].startswith("Traceback (most recent call last)")
    assert "in fails" in line["exc"]
    assert line["exc"].endswith("ConnectionResetError: [Errno 104] the peer went away")


def test_an_error_of_a_library_is_named_with_its_module(
    service_hooks: Callable[[], list[dict[str, Any]]],
) -> None:
    def fails() -> None:
        raise json.JSONDecodeError("Expecting value", "", 0)

    _run(fails)
    (line,) = service_hooks()
    assert line["error_type"] == "json.decoder.JSONDecodeError"


def test_a_thread_ended_by_system_exit_is_silent(
    service_hooks: Callable[[], list[dict[str, Any]]],
) -> None:
    """``SystemExit`` ends its thread without a word, as with Python's own hook."""

    def exits() -> None:
        raise SystemExit(3)

    _run(exits)
    assert service_hooks() == []


def test_an_exception_python_cannot_raise_is_one_error_line(
    service_hooks: Callable[[], list[dict[str, Any]]],
) -> None:
    """A ``__del__``'s exception, which Python's own hook printed on stderr as ``Exception
    ignored in: ...`` and a traceback."""

    class Closing:
        def __del__(self) -> None:
            raise OSError("the descriptor was closed already")

    Closing()  # dropped at once
    (line,) = service_hooks()
    assert (line["level"], line["msg"]) == ("ERROR", "an error could not be raised")
    assert line["where"].startswith("Exception ignored in: <function ")
    assert "Closing.__del__" in line["where"]
    assert (line["error_type"], line["error"]) == ("OSError", "the descriptor was closed already")
    assert line["exc"].endswith("OSError: the descriptor was closed already")


def test_an_error_whose_message_fails_is_still_logged(
    service_hooks: Callable[[], list[dict[str, Any]]],
) -> None:
    """An exception whose ``__str__`` raises too: the line is still written (a hook that
    raised had Python print both tracebacks on stderr)."""

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no message")

    def fails() -> None:
        raise Unprintable

    _run(fails)
    (line,) = service_hooks()
    assert line["msg"] == "thread ended on an uncaught error"
    assert line["error"].startswith("(its message could not be read")


def test_importing_the_services_installs_no_hook() -> None:
    """The hooks are the service process's (``run_service``), never an import's: a process
    that imports the services (a test run, whose pytest fails a test whose thread raised)
    keeps its own."""
    code = (
        "import sys, threading\n"
        "before = threading.excepthook, sys.excepthook, sys.unraisablehook\n"
        "import strongroom.runtime.bootstrap, strongroom.runtime.uncaught\n"
        "import strongroom.keybroker.server, strongroom.modelstore.server\n"
        "import strongroom.inference.server\n"
        "assert (threading.excepthook, sys.excepthook, sys.unraisablehook) == before\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_an_exception_that_ends_the_main_thread_is_one_error_line(
    service_hooks: Callable[[], list[dict[str, Any]]],
) -> None:
    """What the interpreter hands ``sys.excepthook`` as the main thread ends on an error."""
    try:
        raise KeyError("tape")
    except KeyError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    (line,) = service_hooks()
    assert (line["level"], line["msg"]) == ("ERROR", "thread ended on an uncaught error")
    assert (line["thread_name"], line["error_type"], line["error"]) == (
        "MainThread",
        "KeyError",
        "'tape'",
    )
    assert line["exc"].endswith("KeyError: 'tape'")


_INNER = """
import threading

from strongroom.runtime import uncaught


def test_leaves_the_service_hooks_installed():
    uncaught.install()


def test_thread_raises():
    thread = threading.Thread(target=lambda: 1 / 0)
    thread.start()
    thread.join()


class _FailsToDelete:
    def __del__(self):
        raise ValueError("a finaliser failed")


def test_del_raises():
    _FailsToDelete()


def test_quiet():
    pass
"""


def test_a_test_run_still_fails_a_test_whose_thread_raised(tmp_path: Path) -> None:
    """With tests/conftest.py's guard and pyproject.toml's settings, as the suite runs: a test
    that leaves the service's hooks installed is an error (and pytest's are put back), and a test
    whose thread raised, or whose ``__del__`` did, still fails (pytest's own hooks caught them,
    not the service's, which would have logged them and let the test pass)."""
    (tmp_path / "test_inner.py").write_text(_INNER, encoding="utf-8")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider"),
            *("-p", "tests.conftest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO)),
            str(tmp_path / "test_inner.py"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    outcomes = {
        (words[0], words[1].rpartition("::")[2])
        for words in (line.split() for line in done.stdout.splitlines())
        if words[:1] in (["PASSED"], ["FAILED"], ["ERROR"]) and "::" in words[1]
    }
    assert outcomes == {
        ("PASSED", "test_leaves_the_service_hooks_installed"),  # its call; its teardown:
        ("ERROR", "test_leaves_the_service_hooks_installed"),
        ("FAILED", "test_thread_raises"),
        ("FAILED", "test_del_raises"),
        ("PASSED", "test_quiet"),
    }, done.stdout[-3000:]

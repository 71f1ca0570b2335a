"""Suite-wide fixtures: the repository root, the step-ca binary every real-CA test uses (and a
real CA per module), and the simulated TEE chain every local stack trusts."""

from __future__ import annotations

import datetime as dt
import io
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import pytest

from strongroom.dev.simulated import SimulatedAuthority
from strongroom.keybroker.policies import PolicyStore
from strongroom.pki import StepCa
from strongroom.pki.stepca import BINARY_ENV
from strongroom.runtime.config import LoggingConfig
from strongroom.runtime.log_writer import ServiceLog
from strongroom.runtime.logs import configure_logging, restoring
from tests import signal_guard
from tests.pki.helpers import new_ca

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


@pytest.fixture(autouse=True)
def _pytest_keeps_its_exception_hooks() -> Iterator[None]:
    """Fails a test that leaves ``threading.excepthook``, ``sys.excepthook`` or
    ``sys.unraisablehook`` changed (and puts the run's back): pytest's own fail the test whose thread raised, or whose ``__del__``
    did (``filterwarnings`` in pyproject.toml), and a service's
    (:func:`strongroom.runtime.uncaught.install`) left installed would have every later test's
    such exception logged, and passed. ``run_service`` gives them back when it ends
    (:mod:`strongroom.runtime.lifetime`); this fails a test of it that ends with them not."""
    before = threading.excepthook, sys.excepthook, sys.unraisablehook
    yield
    after = threading.excepthook, sys.excepthook, sys.unraisablehook
    if after != before:
        threading.excepthook, sys.excepthook, sys.unraisablehook = before
        pytest.fail(f"the test left the process's exception hooks changed: {after}")


@pytest.fixture(autouse=True)
def _policy_stores_are_closed() -> Iterator[None]:
    """Closes, when a test ends, every key broker :class:`PolicyStore` it made. A store whose
    failing policy's repeats were still to be counted kept a timer that said them a minute later,
    in whichever test ran then: a test asserting the policy logger's lines (test_lifecycle's
    broken-policy test) failed in a CI rehearsal on a line of test_audit_floods' store. Closed,
    a store says its counts at once and runs no timer after."""
    made: list[PolicyStore] = []
    init = PolicyStore.__init__

    def tracked(self: PolicyStore, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    # Not through monkeypatch: an autouse fixture using it has it set up before the others,
    # and torn down after them, so the hooks a test's monkeypatch put back were checked first.
    setattr(PolicyStore, "__init__", tracked)  # noqa: B010  # mypy: no assigning to a method
    try:
        yield
    finally:
        setattr(PolicyStore, "__init__", init)  # noqa: B010
        for store in made:
            store.close()


@pytest.fixture(autouse=True)
def _signal_handlers_stay_as_the_test_found_them() -> Iterator[None]:
    """Fails a test (its function-scoped fixtures included) that leaves a signal's handler
    changed, naming the signal and the handler, and puts the one before back
    (tests/signal_guard.py says why). Nothing of the runner's needs allowing: pytest installs no
    handler of these, faulthandler's are C handlers of other signals (SIGSEGV, SIGABRT...),
    gRPC installs none; SIGALRM, pytest-timeout's, is not guarded."""
    before = signal_guard.handlers()
    yield
    changed = signal_guard.put_back(before)
    if changed:
        pytest.fail(f"the test left signal handlers changed: {'; '.join(changed)}")


def _wider_guard(what: str) -> Iterator[None]:
    before = signal_guard.handlers()
    yield
    changed = signal_guard.put_back(before)
    if changed:
        pytest.fail(f"{what} left signal handlers changed: {'; '.join(changed)}")


@pytest.fixture(autouse=True, scope="module")
def _module_fixtures_leave_signal_handlers_as_they_found_them(
    request: pytest.FixtureRequest,
) -> Iterator[None]:
    """As :func:`_signal_handlers_stay_as_the_test_found_them`, for a module's fixtures (a stack
    started for the module): set up before them and torn down after them, it fails the module's
    last test at teardown, not a later module's test that finds a handler it did not expect."""
    yield from _wider_guard(f"the module {request.module.__name__}'s fixtures")


@pytest.fixture(autouse=True, scope="session")
def _session_fixtures_leave_signal_handlers_as_they_found_them() -> Iterator[None]:
    """As :func:`_module_fixtures_leave_signal_handlers_as_they_found_them`, for the session's."""
    yield from _wider_guard("the session's fixtures")


@pytest.fixture(scope="session")
def step_ca_binary() -> Path:
    """``$STRONGROOM_STEP_CA``, or step-ca built by ``pki/step-ca/build.sh`` (a failed build fails)."""
    configured = os.environ.get(BINARY_ENV)
    if configured:
        if not os.access(configured, os.X_OK):
            pytest.fail(f"{BINARY_ENV}={configured} is not an executable step-ca")
        return Path(configured)
    out = REPO / ".build" / "bin" / "step-ca"
    result = subprocess.run(
        [str(REPO / "pki" / "step-ca" / "build.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"step-ca could not be built: {result.stderr.strip()[-500:]}")
    os.environ[BINARY_ENV] = str(out)
    return out


@pytest.fixture(scope="module")
def ca(step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StepCa]:
    """A real step-ca with its own fresh CA (``tests.pki.helpers.new_ca``), shared by one module."""
    running = new_ca(tmp_path_factory.mktemp("ca") / "ca", step_ca_binary)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def sim_now() -> dt.datetime:
    """The time the simulated TEE's certificates are issued and verified at."""
    return dt.datetime.now(dt.UTC)


@pytest.fixture(scope="session")
def sim_authority(sim_now: dt.datetime) -> SimulatedAuthority:
    """A simulated AMD/Intel PKI (test-only roots), generated once per run.

    Generating one costs three RSA-4096 keys (2-3 s on this machine); the attestation, inference
    and key-broker tests and the stacks each generated their own. It holds only keys and
    certificates (nothing a test changes), and no test relies on two of them being unrelated
    except through ``other_authority``-style fixtures that still generate their own.
    """
    return SimulatedAuthority.generate(now=sim_now)


@pytest.fixture(scope="session")
def simulated_tee_dir(
    tmp_path_factory: pytest.TempPathFactory, sim_authority: SimulatedAuthority
) -> Path:
    """:func:`sim_authority` saved once per run (:meth:`SimulatedAuthority.save`'s layout).

    Each module's stack used to generate its own chain; a stack's chain is only ever trusted by
    that stack's own broker, so one chain per run exercises the same verification as one per stack.
    """
    directory = tmp_path_factory.mktemp("simulated-tee")
    sim_authority.save(directory)
    return directory


def stack_root(
    tmp_path_factory: pytest.TempPathFactory, name: str, simulated_tee_dir: Path
) -> Path:
    """A fresh directory for a :class:`~strongroom.dev.devstack.DevStack` that already holds the
    run's simulated TEE chain (the stack then uses it instead of generating one)."""
    root = tmp_path_factory.mktemp(name)
    shutil.copytree(simulated_tee_dir, root / "simulated-tee")  # copy2 keeps the keys' 0600
    return root


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Lets a test configure the process's logging (``configure_logging``): the handlers it
    installed are closed afterwards, and the root logger's handlers and levels restored."""
    with restoring():
        yield


def buffered_service_log(
    monkeypatch: pytest.MonkeyPatch,
    service: str = "test",
    log_format: Literal["json", "text"] = "json",
) -> tuple[ServiceLog, io.StringIO]:
    """The service's log (JSON unless ``log_format`` says) configured as a service configures it,
    into a buffer (stderr), with its refusal budget on a clock that never moves (no refill: the
    counts are exact). Use with :func:`restore_logging`; close the handler before reading the
    buffer (its thread writes it)."""
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    config = LoggingConfig(format=log_format)
    return configure_logging(config, service, clock=lambda: 0.0), stream


def refused_calls_not_logged(lines: Iterable[Mapping[str, Any]]) -> Counter[tuple[str, str]]:
    """The refused calls a JSON service log (its lines, parsed) counted and did not log, by
    caller and reason, over all of its ``refused calls not logged`` summaries. The summary is
    timed on the real clock (at most every SUMMARY_SECONDS, then at the close), whatever clock
    paces the budget: a test that ran longer than that (a loaded machine) has two or more, each
    with the calls counted since the one before."""
    counted: Counter[tuple[str, str]] = Counter()
    for line in lines:
        if line["msg"] == "refused calls not logged":
            counted.update(
                {(caller, reason): n for caller, reason, n in line["by_caller_and_reason"]}
            )
    return counted

"""Runs the step-ca binary for a CA directory and waits until it is healthy."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from strongroom.pki import layout
from strongroom.pki.client import CaClient
from strongroom.pki.errors import CaUnavailable, CertificateInvalid, InvalidPkiConfig
from strongroom.pki.layout import CaLayout
from strongroom.reasons import Reason

_log = logging.getLogger(__name__)

BINARY_ENV = "STRONGROOM_STEP_CA"
# What step-ca may see of the environment that starts it: locale, time zone, temporary directory
# and the Go runtime's own tuning. Everything else stays out, since the process that starts it
# (a service, the CLI, a test run) may hold secrets there (an HSM PIN, an enrolment token) that
# step-ca has no use for and that anyone able to read /proc/PID/environ of the CA could read.
_PASSED_ENV = frozenset({"PATH", "TZ", "TMPDIR", "LANG", "GODEBUG", "GOMAXPROCS", "GOMEMLIMIT"})
_PASSED_ENV_PREFIXES = ("LC_",)


def default_binary() -> Path:
    """``$STRONGROOM_STEP_CA``, else ``step-ca`` on ``PATH`` (``make setup`` builds one into ``.build/bin``)."""
    configured = os.environ.get(BINARY_ENV)
    if configured:
        return Path(configured)
    found = shutil.which("step-ca")
    return Path(found) if found else Path("step-ca")


def step_ca_environment(directory: Path) -> dict[str, str]:
    """The environment step-ca runs with: the allow-listed part of ours, ``STEPPATH`` the CA
    directory (so it never reads an operator's ``~/.step``) and ``HOME`` that directory too."""
    passed = {
        name: value
        for name, value in os.environ.items()
        if name in _PASSED_ENV or name.startswith(_PASSED_ENV_PREFIXES)
    }
    return {**passed, "STEP_CA_QUIET": "true", "STEPPATH": str(directory), "HOME": str(directory)}


def _check_database(ca: CaLayout) -> None:
    """Refuses a ``ca.json`` without a database: step-ca then answers every revocation with HTTP
    501 and forgets used tokens at each restart, so a superseded or stolen certificate could never
    be revoked (``pki init`` no longer offers that mode; older directories may have it)."""
    try:
        config = json.loads(ca.config_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise InvalidPkiConfig(f"cannot read {ca.config_path}: {exc}") from None
    database = config.get("db") if isinstance(config, dict) else None
    if not isinstance(database, dict) or not database.get("type") or not database.get("dataSource"):
        raise InvalidPkiConfig(
            f"{ca.config_path} configures no database: step-ca could revoke nothing and would "
            'accept used tokens again after a restart; add "db": {"type": "bbolt", '
            '"dataSource": "db/step.db"}',
            reason=Reason.CA_DATABASE_MISSING,
        )


def probe_address(address: str) -> tuple[str, int]:
    """Where the process that started step-ca reaches it: its listen address ``HOST:PORT``, a
    wildcard (``:9000``, ``0.0.0.0``, ``[::]``) meaning the loopback address of that family."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host in {"", "0.0.0.0"}:  # noqa: S104 - read from ca.json, not bound here
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)


class StepCa:
    """A step-ca process serving one CA directory; a context manager that stops it on exit.

    The CA keys' password reaches step-ca as ``--password-file`` (never on the command line), and
    the process runs in the CA directory so the relative paths in ``ca.json`` resolve.
    """

    def __init__(
        self,
        ca: CaLayout | Path | str,
        *,
        binary: Path | str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.layout = ca if isinstance(ca, CaLayout) else CaLayout.load(ca)
        self.binary = Path(binary) if binary is not None else default_binary()
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        # The start-up probe goes to the listen address, not to the URL's host: that name may not
        # resolve on the CA's own host (a load balancer's, a cluster's), or may reach another
        # server. The certificate is still verified against the root and the URL's host name.
        self._client = CaClient(
            self.layout.url,
            self.layout.root_pem,
            timeout=2.0,
            connect_to=probe_address(self.layout.address),
        )

    @property
    def url(self) -> str:
        """The CA's base URL (``https://host:port``)."""
        return self.layout.url

    @property
    def root_pem(self) -> bytes:
        """The root certificate to pin."""
        return self.layout.root_pem

    @property
    def pid(self) -> int | None:
        """The process id while running."""
        return self._process.pid if self._process is not None else None

    def client(self, *, timeout: float = 10.0) -> CaClient:
        """A :class:`CaClient` for this CA with its root pinned."""
        return CaClient(self.url, self.root_pem, timeout=timeout)

    def running(self) -> bool:
        """Tells whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = self.layout.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> StepCa:
        """Starts step-ca and returns once ``/health`` answers ok (raises otherwise)."""
        if self.running():
            return self
        if not self.binary.is_file() or not os.access(self.binary, os.X_OK):
            raise InvalidPkiConfig(
                f"step-ca binary {self.binary} not found: run pki/step-ca/build.sh {self.binary} "
                f"or set {BINARY_ENV}",
                reason=Reason.STEP_CA_MISSING,
            )
        _check_database(self.layout)
        log_path = self.layout.log_path
        log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # step-ca logs the one-time tokens it accepts: its log is for the CA's operator only.
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "ab") as log_file:
            self._process = subprocess.Popen(
                [
                    str(self.binary),
                    # urfave/cli stops parsing flags at the first positional argument.
                    "--password-file",
                    str(layout.PASSWORD),
                    str(layout.CONFIG),
                ],
                cwd=self.layout.directory,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=step_ca_environment(self.layout.directory),
            )
        deadline = time.monotonic() + self.startup_timeout
        last_error = ""
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise CaUnavailable(
                    f"step-ca exited with status {code} during start-up; log tail:\n{self._log_tail()}",
                    reason=Reason.STEP_CA_EXITED,
                )
            try:
                self._client.health()
            except CaUnavailable as exc:
                last_error = exc.message
                time.sleep(0.05)
                continue
            except CertificateInvalid:
                # What listens is not the CA the URL names (its certificate is for another name
                # or root): waiting will not change that, and the process must not be left behind.
                self.stop()
                raise
            _log.info("step-ca is up", extra={"url": self.url, "pid": self._process.pid})
            return self
        self.stop()
        raise CaUnavailable(
            f"step-ca did not become healthy within {self.startup_timeout:.0f}s ({last_error}); "
            f"log tail:\n{self._log_tail()}",
            reason=Reason.STEP_CA_TIMEOUT,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stops step-ca (SIGTERM, then SIGKILL after ``timeout``); idempotent."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def terminate(self) -> None:
        """Asks step-ca to exit (SIGTERM) without waiting; safe inside a signal handler."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()

    def wait(self) -> int:
        """Blocks until step-ca exits and returns its status (for ``strongroom pki serve``)."""
        if self._process is None:
            raise InvalidPkiConfig("step-ca is not running", reason=Reason.STEP_CA_NOT_RUNNING)
        return self._process.wait()

    def __enter__(self) -> StepCa:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

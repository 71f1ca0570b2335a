"""``strongroom serve``: an operating-system error that stops a service is in the service's log
with where it happened, while the command line prints it as one line (strongroom.cli.main)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from strongroom.errors import StrongroomError
from strongroom.runtime import bootstrap
from strongroom.runtime.config import TracingConfig
from tests.conftest import REPO


class _Identity:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_an_os_error_that_stops_a_service_is_logged_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    identity = _Identity()
    common = SimpleNamespace(production=False, logging=None, tracing=TracingConfig(), identity=None)
    monkeypatch.setattr(bootstrap, "load_service_config", lambda *a: (common, object()))
    # The log stays pytest's, which captures it (the service's hooks are given back).
    monkeypatch.setattr(bootstrap.logs, "configured", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(bootstrap, "open_identity", lambda *a: identity)

    def build(*args: Any) -> Any:
        raise IsADirectoryError(21, "Is a directory", "/var/lib/strongroom/audit/audit.log")

    with caplog.at_level(logging.ERROR), pytest.raises(IsADirectoryError):
        bootstrap.run_service("keybroker", None, object, build)  # type: ignore[arg-type]
    (record,) = [r for r in caplog.records if "operating-system error" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is IsADirectoryError
    assert identity.closed


def test_a_service_that_cannot_enrol_says_why_in_its_log(tmp_path: Path) -> None:
    """A fatal start-up error, the way a service really stops on one (``strongroom serve``, the
    error raised to the command line, the process's exit): enrolment's failures (here the CA's
    root missing) were printed by the command line only, never in the service's log, which said
    nothing of why the process ended. The reason is the log's last line now, written by the
    log's own thread (its queue, flushed at exit) before the process ends."""
    config = tmp_path / "modelstore.yaml"
    config.write_text(
        json.dumps(
            {
                "service": "modelstore",
                "mode": "development",
                "listen": "127.0.0.1:0",
                "health_listen": "127.0.0.1:0",
                "identity": {
                    "trust_domain": "strongroom.internal",
                    "spiffe_id": "spiffe://strongroom.internal/modelstore",
                    "ca_url": "https://127.0.0.1:9",
                    "ca_root_file": str(tmp_path / "missing-root.crt"),
                    "state_dir": str(tmp_path / "identity"),
                },
                "logging": {"level": "INFO", "format": "json"},
                "modelstore": {"data_dir": str(tmp_path / "models")},
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "strongroom.cli.main", "serve", "modelstore", "--config", config],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert lines, done.stderr
    last = lines[-1]
    assert (last["level"], last["service"]) == ("ERROR", "modelstore")
    assert last["msg"].startswith("modelstore cannot run: CA_ROOT_MISSING: ")
    # The command line's own line, after the log's (ServiceLog.say).
    assert done.stderr.splitlines()[-1].startswith("strongroom: error: CA_ROOT_MISSING: ")


def _identity_config(tmp_path: Path, root: Path, token: Path | None = None) -> Any:
    from strongroom.runtime.config import IdentityConfig

    return IdentityConfig(
        trust_domain="strongroom.internal",
        spiffe_id="spiffe://strongroom.internal/modelstore",
        ca_url="https://127.0.0.1:9",
        ca_root_file=root,
        token_file=token,
        state_dir=tmp_path / "identity",
    )


@pytest.mark.parametrize("content", [b"", b"-----BEGIN CERTIFICATE-----\nAAAA\n"])
def test_a_ca_root_file_that_holds_no_certificate_is_named(tmp_path: Path, content: bytes) -> None:
    """An empty or truncated identity.ca_root_file stopped the start with "MALFORMED: malformed
    PEM certificate: Unable to load PEM file. See https://cryptography.io/...", naming neither
    the setting nor the file."""
    root = tmp_path / "root.crt"
    root.write_bytes(content)
    with pytest.raises(StrongroomError) as info:
        bootstrap.open_identity(_identity_config(tmp_path, root))
    assert f"identity.ca_root_file {root} is not the CA's root certificate" in str(info.value)
    assert info.value.reason == "MALFORMED"


def test_a_missing_enrolment_token_is_named(tmp_path: Path) -> None:
    """A first start whose identity.token_file is not there said only "NO_IDENTITY: no identity
    persisted in <state_dir>", which reads as a state directory problem."""
    from tests.pki.helpers import make_ca, pem

    root = tmp_path / "root.crt"
    root.write_bytes(pem(make_ca("Root")[0]))
    token = tmp_path / "missing.token"
    with pytest.raises(StrongroomError) as info:
        bootstrap.open_identity(_identity_config(tmp_path, root, token))
    assert info.value.reason == "NO_IDENTITY"
    assert f"identity.token_file {token} does not exist" in str(info.value)

"""``strongroom serve``: an operating-system error that stops a service is in the service's log
with where it happened, while the command line prints it as one line (strongroom.cli.main)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from strongroom.runtime import bootstrap


class _Identity:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_an_os_error_that_stops_a_service_is_logged_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    identity = _Identity()
    common = SimpleNamespace(production=False, logging=None, tracing=None, identity=None)
    monkeypatch.setattr(bootstrap, "load_service_config", lambda *a: (common, object()))
    monkeypatch.setattr(bootstrap, "configure_logging", lambda *a: None)
    monkeypatch.setattr(bootstrap, "install_meter_provider", lambda *a, **k: None)
    monkeypatch.setattr(bootstrap, "open_identity", lambda *a: identity)

    def build(*args: Any) -> Any:
        raise IsADirectoryError(21, "Is a directory", "/var/lib/strongroom/audit/audit.log")

    with caplog.at_level(logging.ERROR), pytest.raises(IsADirectoryError):
        bootstrap.run_service("keybroker", None, object, build)  # type: ignore[arg-type]
    (record,) = [r for r in caplog.records if "operating-system error" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is IsADirectoryError
    assert identity.closed

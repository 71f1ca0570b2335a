"""The broker says at start which collateral source it cannot reach.

A broker whose egress blocks AMD KDS or Intel PCS stays ready (its cache still serves, and an
upstream outage must not take every replica out of service), so before this check nothing showed the
cause until releases were refused COLLATERAL_MISSING.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from strongroom.attestation import TrustStore
from strongroom.dev.devstack.stack import free_port
from strongroom.keybroker.config import KeybrokerConfig
from strongroom.keybroker.server import collateral_service

PROBE_LOGGER = "strongroom.keybroker.server"


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe honours the proxy environment, as urllib does: start every test without one."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def listening() -> Iterator[str]:
    """An http:// URL of a local port that accepts connections."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def closed() -> str:
    """An http:// URL of a local port nothing listens on (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"


def _start_broker_collateral(tmp_path: Path, **settings: object) -> None:
    """Builds the broker's collateral service as ``build`` does and waits for its start-up probe."""
    config = KeybrokerConfig(
        pkcs11_module=Path("/usr/lib/softhsm/libsofthsm2.so"),
        token_label="strongroom",
        audit_log=tmp_path / "audit.log",
        policies_dir=tmp_path / "policies",
        collateral_dir=tmp_path / "collateral",
        collateral_timeout_seconds=5.0,
        **settings,  # type: ignore[arg-type]
    )
    collateral_service(config, TrustStore.production())
    for thread in threading.enumerate():
        if thread.name == "collateral-probe":
            thread.join()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == PROBE_LOGGER and r.levelno == logging.WARNING
    ]


def test_an_unreachable_source_is_named_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, listening: str, closed: str
) -> None:
    caplog.set_level(logging.INFO, logger=PROBE_LOGGER)
    _start_broker_collateral(tmp_path, pcs_url=listening, kds_url=closed)
    (warning,) = _warnings(caplog)
    assert closed in warning and "COLLATERAL_MISSING" in warning
    assert "keybroker.collateral.egress" in warning
    assert listening not in warning  # the PCCS (and its root CA CRL path) answered


def test_reachable_sources_log_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, listening: str
) -> None:
    caplog.set_level(logging.INFO, logger=PROBE_LOGGER)
    _start_broker_collateral(tmp_path, pcs_url=listening, kds_url=listening)
    assert not _warnings(caplog)


@pytest.mark.parametrize("settings", [{"collateral_fetch": False}, {"collateral_read_only": True}])
def test_a_broker_that_fetches_nothing_probes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, closed: str, settings: dict[str, bool]
) -> None:
    caplog.set_level(logging.INFO, logger=PROBE_LOGGER)
    (tmp_path / "collateral").mkdir()  # a read-only cache is another writer's, already there
    _start_broker_collateral(tmp_path, pcs_url=closed, kds_url=closed, **settings)
    assert not _warnings(caplog)


def test_a_source_behind_a_proxy_is_judged_by_the_proxy(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    listening: str,
    closed: str,
) -> None:
    """urllib fetches through ``http_proxy``: a direct connection says nothing about that path."""
    caplog.set_level(logging.INFO, logger=PROBE_LOGGER)
    monkeypatch.setenv("http_proxy", closed)
    monkeypatch.setenv("no_proxy", "")
    _start_broker_collateral(tmp_path, pcs_url=listening, kds_url=listening)
    warnings = _warnings(caplog)
    assert warnings and all(closed.removeprefix("http://") in w for w in warnings)

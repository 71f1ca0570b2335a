"""A key broker whose start fails once its HSM and audit log are open closes both (step-ca,
SoftHSM2 and the audit log real; the broker built in this process, never started)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from strongroom.dev.devstack import DevStack
from strongroom.errors import Unavailable
from strongroom.keybroker.config import KeybrokerConfig
from strongroom.keybroker.server import build
from strongroom.reasons import Reason
from strongroom.runtime.bootstrap import open_identity
from strongroom.runtime.config import load_service_config
from tests.conftest import stack_root


@pytest.fixture(scope="module")
def stack(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> Iterator[DevStack]:
    """step-ca and the broker's HSM token, secrets and configuration; no broker running."""
    with DevStack(
        stack_root(tmp_path_factory, "build-failure", simulated_tee_dir),
        step_ca_binary=step_ca_binary,
    ) as dev:
        dev.write_config("keybroker")
        yield dev


def _open_descriptors_of(path: Path) -> list[str]:
    """This process's descriptors open on ``path``."""
    fds = Path("/proc/self/fd")
    out = []
    for fd in os.listdir(fds):
        try:
            if os.readlink(fds / fd) == str(path):
                out.append(fd)
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
    return out


def test_a_broker_that_cannot_listen_closes_its_hsm_and_its_audit_log(stack: DevStack) -> None:
    """Only a failure of the audit log's opening closed the HSM: anything that stopped the build
    later (its port taken, here; a SIGTERM while it starts) left the HSM's module loaded (a
    second build in the process was refused HSM_ALREADY_OPEN) and the audit log's descriptor
    open. Both are closed now, and the broker builds once its port is free."""
    path = stack.config_path("keybroker")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        common, config = load_service_config(
            path, "keybroker", KeybrokerConfig, environ={"STRONGROOM__LISTEN": address}
        )
        identity = open_identity(common.identity)
        try:
            with pytest.raises(Unavailable) as refused:
                build(common, config, identity=identity)
            assert refused.value.reason == Reason.LISTEN_ADDRESS_IN_USE
            assert _open_descriptors_of(config.audit_log.resolve()) == []
            common, config = load_service_config(path, "keybroker", KeybrokerConfig, environ={})
            broker = build(common, config, identity=identity)  # was: HSM_ALREADY_OPEN
            broker.close()
        finally:
            identity.close()

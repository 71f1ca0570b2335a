"""One real stack per module for the abuse suite: step-ca, SoftHSM2, key broker, model store."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from strongroom.dev.devstack import DevStack
from tests.abuse.releases import genuine_release
from tests.abuse.traffic import IDLE_TIMEOUT, KEY_ID, Identities
from tests.conftest import stack_root

SERVER = {"stream_idle_timeout_seconds": IDLE_TIMEOUT}


@contextlib.contextmanager
def abuse_stack(
    step_ca_binary: Path,
    tmp_path_factory: pytest.TempPathFactory,
    simulated_tee_dir: Path,
    server: dict[str, Any],
) -> Iterator[DevStack]:
    """step-ca + key broker + model store in this process over real mTLS with ``server``
    limits; a release key exists."""
    root = stack_root(tmp_path_factory, "abuse", simulated_tee_dir)
    with DevStack(root, step_ca_binary=step_ca_binary) as dev:
        dev.start_in_process("keybroker", server=server)
        dev.start_in_process("modelstore", server=server)
        dev.create_release_key(dev.identity("admin"), KEY_ID, policy_version="1")
        yield dev


@pytest.fixture(scope="module")
def stack(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> Iterator[DevStack]:
    """The stack with default limits except a short idle timeout."""
    with abuse_stack(step_ca_binary, tmp_path_factory, simulated_tee_dir, SERVER) as dev:
        yield dev


@pytest.fixture(scope="module")
def who(stack: DevStack) -> Identities:
    """The legitimate client and the attackers, each with a certificate from the stack's CA."""
    return Identities.enrol(stack)


@pytest.fixture(scope="module")
def genuine(stack: DevStack) -> Any:
    """A genuine replica's releases from the module's stack
    (:func:`~tests.abuse.releases.genuine_release`)."""
    return genuine_release(stack)

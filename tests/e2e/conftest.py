"""A real local Strongroom per test module: step-ca, SoftHSM2, key broker and model store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from strongroom.dev.devstack import DevStack
from strongroom.dev.devstack.model import train
from tests.conftest import stack_root


@pytest.fixture(scope="module")
def stack(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> Iterator[DevStack]:
    """step-ca + key broker + model store, in this process, over real mTLS."""
    root = stack_root(tmp_path_factory, "stack", simulated_tee_dir)
    with DevStack(root, step_ca_binary=step_ca_binary) as dev:
        dev.start_in_process("keybroker")
        dev.start_in_process("modelstore")
        yield dev


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    """A small trained ONNX model, in the test's own directory."""
    return train(tmp_path / "m.onnx").path


@pytest.fixture
def stopped(stack: DevStack) -> Iterator[None]:
    """Stops, after the test, the inference server it started in the module's stack (if any)."""
    yield
    earlier = stack.services.pop("inference", None)
    if earlier is not None:
        earlier.stop()

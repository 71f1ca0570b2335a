"""Start-up order does not matter: a model whose key broker is down loads once it is back."""

from __future__ import annotations

import time
from pathlib import Path

from strongroom.client.publish import publish_model
from strongroom.dev.devstack import DevStack
from strongroom.dev.devstack.model import train


def wait_until(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_model_loads_after_the_broker_comes_back(stack: DevStack, tmp_path: Path) -> None:
    stack.create_release_key(stack.identity("admin"), "late", policy_version="1")
    publisher = stack.identity("publisher")
    publish_model(
        train(tmp_path / "m.onnx").path,
        name="late",
        version="1",
        key_id="late",
        broker=stack.channel(publisher, "keybroker"),
        store=stack.channel(publisher, "modelstore"),
    )
    stack.services.pop("keybroker").stop()

    section = {**stack.default_section("inference"), "models": [{"name": "late", "version": "1"}]}
    inference = stack.start_in_process("inference", section).handle
    inference.retry_initial = 0.2
    inference.load_configured_models()
    repository = inference.repository

    def failed_unavailable() -> bool:
        versions = repository.status("late").versions
        return any(
            v.failure is not None and v.failure.reason == "KEY_RELEASE_UNAVAILABLE"
            for v in versions
        )

    assert wait_until(failed_unavailable, 30), repository.status("late")
    assert not repository.is_ready("late")
    stack.start_in_process("keybroker")
    assert wait_until(lambda: repository.is_ready("late", "1"), 30), repository.status("late")

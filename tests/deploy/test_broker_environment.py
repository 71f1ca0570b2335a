"""The key broker runs with the same process environment wherever it is deployed: the Dockerfile's
broker images, compose, every values set of the chart, and the development stack the soaks and
benchmarks start (:data:`strongroom.keybroker.process.PROCESS_ENV`)."""

from __future__ import annotations

import re
from typing import Any

from strongroom.keybroker.process import PROCESS_ENV
from tests.deploy.conftest import DEPLOY, kind, load_compose
from tests.deploy.test_chart import component, containers


def test_the_broker_images_set_it() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)
    brokers = [s for s in stages if re.match(r"\S+ AS keybroker(-softhsm)?\n", s)]
    assert len(brokers) == 2
    for stage in brokers:
        for name, value in PROCESS_ENV.items():
            assert f"ENV {name}={value}\n" in stage, stage.splitlines()[0]


def test_compose_sets_it() -> None:
    environment = load_compose()["services"]["keybroker"]["environment"]
    assert {k: environment.get(k) for k in PROCESS_ENV} == dict(PROCESS_ENV)


def test_every_values_set_of_the_chart_sets_it(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    (broker,) = [d for d in kind(docs, "Deployment") if component(d) == "keybroker"]
    (main,) = [c for w, c in containers(broker) if w == "main" and c["name"] == "keybroker"]
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert {k: env.get(k) for k in PROCESS_ENV} == dict(PROCESS_ENV)

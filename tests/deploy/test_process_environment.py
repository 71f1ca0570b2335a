"""Every service runs with its process environment wherever it is deployed: the Dockerfile's
images, compose, every values set of the chart, and the development stack the soaks and benchmarks
start (:data:`strongroom.runtime.process.SERVICE_ENV`). It was the key broker's alone until a soak
showed the model store and inference keeping native memory without it; inference adds huge pages
for its model loads."""

from __future__ import annotations

import re
from typing import Any

import pytest

from strongroom.runtime.process import PROCESS_ENV, SERVICE_ENV
from tests.deploy.conftest import DEPLOY, kind, load_compose
from tests.deploy.test_chart import component, containers

SERVICES = ("keybroker", "modelstore", "inference")


def _stage_env(stages: dict[str, str], name: str) -> dict[str, str]:
    """The ENV settings a stage has, its own and those of the stages it is built FROM."""
    body = stages[name]
    parent = body.split(maxsplit=1)[0]
    inherited = _stage_env(stages, parent) if parent in stages else {}
    own = dict(re.findall(r"^ENV (\w+)=(\S+)$", body, flags=re.MULTILINE))
    return {**inherited, **own}


def test_every_service_image_sets_it() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    stages = {
        m.group(2): m.group(1) + "\n" + m.group(3)
        for m in re.finditer(r"^FROM (\S+) AS (\S+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S)
    }
    images = [name for name in stages if name.split("-")[0] in SERVICES]
    assert sorted(images) == ["inference", "keybroker", "keybroker-softhsm", "modelstore"]
    for image in images:
        env = _stage_env(stages, image)
        expected = SERVICE_ENV[image.split("-")[0]]
        assert {k: env.get(k) for k in PROCESS_ENV} == dict(expected), image


@pytest.mark.parametrize("service", SERVICES)
def test_compose_sets_it(service: str) -> None:
    environment = load_compose()["services"][service].get("environment") or {}
    assert {k: environment.get(k) for k in PROCESS_ENV} == dict(SERVICE_ENV[service])


@pytest.mark.parametrize("service", SERVICES)
def test_every_values_set_of_the_chart_sets_it(
    rendered: tuple[str, list[dict[str, Any]]], service: str
) -> None:
    _, docs = rendered
    (deployment,) = [d for d in kind(docs, "Deployment") if component(d) == service]
    (main,) = [c for w, c in containers(deployment) if w == "main" and c["name"] == service]
    env = {e["name"]: e.get("value") for e in main.get("env", [])}
    assert {k: env.get(k) for k in PROCESS_ENV} == dict(SERVICE_ENV[service])


def test_only_inference_asks_for_huge_pages() -> None:
    assert set(SERVICE_ENV) == set(SERVICES)
    assert "glibc.malloc.hugetlb=1" in SERVICE_ENV["inference"]["GLIBC_TUNABLES"].split(":")
    assert SERVICE_ENV["keybroker"] == SERVICE_ENV["modelstore"] == PROCESS_ENV

"""HSM memory soak: the key broker's RSS slope per 10,000 releases, with and without recycling.

Each configuration runs in its own child process (a clean RSS): a SoftHSM2 token, one key, and
:data:`RELEASES` calls of :meth:`KeyManager.release_to_ephemeral` from one thread, sampling RSS
every :data:`SAMPLE_EVERY` releases. The slope (KiB per 10,000 releases, least squares) is taken
after the first :data:`WARMUP` of the run.

- ``recycled``: the shipped default (``recycle_after_operations``; the module re-initialised
  every N operations so SoftHSM2 frees its session objects);
- ``baseline_never_recycled``: the same with recycling effectively off — what the broker did
  before (about 0.4 KB per release, kept forever).

Both run at the same time (two children on the two cores), so that load from anything else on
the machine affects both alike; the release rates then show the cost of recycling as a ratio.
Usage:
``python -m tests.bench.run hsmsoak``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

RELEASES = 50_000
SAMPLE_EVERY = 1_000
WARMUP = 0.2
_NEVER = 2**31

_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from strongroom.dev.softhsm import init_softhsm_token
    from strongroom.keybroker.hsm import Hsm, HsmConfig
    from strongroom.keybroker.keys import KeyManager
    from strongroom.oaep import OaepHash
    from strongroom.runtime.secrets import Secret

    def rss():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    directory, releases, every, quota = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    pin = Secret(b"bench-user-pin")
    token = init_softhsm_token(directory / "hsm", label="soak", pin=pin, so_pin=Secret(b"bench-so-pin"))
    config = HsmConfig(module_path=token.module_path, token_label=token.label, pin=pin,
                       module_env=token.module_env, operation_timeout=30.0,
                       recycle_after_operations=quota)
    target = rsa.generate_private_key(public_exponent=65537, key_size=3072).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    samples = []
    with Hsm.open(config) as hsm:
        km = KeyManager(hsm)
        km.create_key("soak")
        data_key = km.generate_data_key("soak", "soak/model", "1")
        start = time.perf_counter()
        for n in range(releases):
            km.release_to_ephemeral("soak", data_key.version, data_key.wrapped, target, [OaepHash.SHA1])
            if (n + 1) % every == 0:
                samples.append((n + 1, rss()))
        elapsed = time.perf_counter() - start
        recycles = hsm.status().recycles
    print(json.dumps({"samples": samples, "seconds": elapsed, "recycles": recycles}))
    """
)


def _run_together(quotas: list[int], releases: int, sample_every: int) -> list[dict[str, Any]]:
    """Runs one child per quota at the same time, so that both see the same machine load."""
    with tempfile.TemporaryDirectory(prefix="strongroom-hsmsoak-") as tmp:
        children = []
        for n, quota in enumerate(quotas):
            directory = Path(tmp, str(n))
            directory.mkdir()
            argv = [sys.executable, "-c", _CHILD, str(directory), str(releases)]
            argv += [str(sample_every), str(quota)]
            children.append(
                subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
        outputs = []
        for child in children:
            stdout, stderr = child.communicate(timeout=3600)
            if child.returncode != 0:
                raise RuntimeError(f"soak child failed: {stderr[-2000:]}")
            outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outputs


def _figures(raw: dict[str, Any], sample_every: int) -> dict[str, Any]:
    samples = raw["samples"]
    kept = samples[int(len(samples) * WARMUP) :]
    x = np.array([n for n, _ in kept], dtype=float) / 10_000
    y = np.array([r for _, r in kept], dtype=float)
    slope = float(np.polyfit(x, y, 1)[0]) if len(kept) >= 3 else float("nan")
    return {
        "rss_slope_kib_per_10k_releases": round(slope, 1),
        "rss_first_kib": samples[0][1],
        "rss_last_kib": samples[-1][1],
        "releases_per_s": round(len(samples) * sample_every / raw["seconds"], 1),
        "recycles": raw["recycles"],
        "rss_kib_every_5k_releases": [r for n, r in samples if n % 5_000 == 0],
    }


def run(
    results: dict[str, Any], releases: int = RELEASES, *, sample_every: int = SAMPLE_EVERY
) -> None:
    """Measures and records the figures described in the module docstring into ``results``,
    sampling RSS every ``sample_every`` releases."""
    import dataclasses

    from strongroom.keybroker.hsm import HsmConfig

    fields = {f.name: f for f in dataclasses.fields(HsmConfig)}
    default_quota = fields["recycle_after_operations"].default
    assert isinstance(default_quota, int)
    started = time.perf_counter()
    recycled_raw, baseline_raw = _run_together([default_quota, _NEVER], releases, sample_every)
    recycled = _figures(recycled_raw, sample_every)
    baseline = _figures(baseline_raw, sample_every)
    results.update(
        {
            "releases": releases,
            "recycle_after_operations": default_quota,
            "recycled": recycled,
            "baseline_never_recycled": baseline,
            "rate_ratio_recycled_over_baseline": round(
                recycled["releases_per_s"] / baseline["releases_per_s"], 3
            ),
            "wall_s": round(time.perf_counter() - started, 1),
        }
    )

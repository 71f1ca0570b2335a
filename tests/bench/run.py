"""Runs the benchmarks and writes their figures to ``tests/bench/results.json`` and ``RESULTS.md``.

Each benchmark module ``tests/bench/<area>_bench.py`` exposes ``run(results: dict) -> None`` and
records its figures under its own key, always with the baseline it was measured against in the same
run. Usage: ``make bench`` or ``python -m tests.bench.run [--profile] [--out JSON] [--markdown MD]
[AREA ...]``. ``tests/bench/test_bench_smoke.py`` runs every area through :func:`run_area` at
tiny sizes in the test suite.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from tests.bench._vm import vm_state

HERE = Path(__file__).resolve().parent
AREAS = (
    "artifact",
    "anchors",
    "attestation",
    "audit",
    "hsm",
    "hsmsoak",
    "brokersoak",
    "keybroker",
    "releasecpu",
    "grpcserver",
    "modelstore",
    "inference",
    "mtls",
    "coldstart",
    "multipart",
    "s3",
    "abuse",
)


def main(argv: list[str] | None = None) -> int:
    """Runs the selected benchmark areas (all by default) and writes the results files."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("areas", nargs="*", default=list(AREAS))
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="areas that support it also run under a profiler (releasecpu: PROFILE.md)",
    )
    args = parser.parse_args(argv)
    previous: dict[str, Any] = {}
    if args.out.exists():
        previous = json.loads(args.out.read_text())
    results: dict[str, Any] = previous.get("areas", {})
    failed = []
    for area in args.areas:
        try:
            module = importlib.import_module(f"tests.bench.{area}_bench")
        except ModuleNotFoundError:
            print(f"bench: no benchmark for {area}", file=sys.stderr)
            continue
        print(f"bench: {area} ...", flush=True)
        try:
            if args.profile and getattr(module, "SUPPORTS_PROFILE", False):
                results[area] = run_area(area, profile=True)
            else:
                results[area] = run_area(area)
        except Exception:
            traceback.print_exc()
            failed.append(area)
    document = {
        "machine": {
            "cpus": __import__("os").cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "areas": results,
    }
    args.out.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    args.markdown.write_text(render_markdown(document))
    print(f"bench: wrote {args.out} and {args.markdown}")
    return 1 if failed else 0


def run_area(area: str, **options: Any) -> dict[str, Any]:
    """One area's figures: its module's ``run(results, **options)`` (any exception propagates),
    then how long it took, when, and the VM's settings (:func:`vm_state`)."""
    module = importlib.import_module(f"tests.bench.{area}_bench")
    started = time.monotonic()
    area_results: dict[str, Any] = {}
    module.run(area_results, **options)
    area_results["_seconds"] = round(time.monotonic() - started, 1)
    area_results["_measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    area_results["_vm"] = vm_state()
    return area_results


def render_markdown(document: dict[str, Any]) -> str:
    """A readable summary of the results document."""
    lines = ["# Benchmark results", "", f"Machine: {document['machine']}", ""]
    for area, figures in sorted(document["areas"].items()):
        lines += [f"## {area}", "", "| figure | value |", "| --- | --- |"]
        for key, value in _flatten(figures):
            lines.append(f"| {key} | {value} |")
        lines.append("")
    return "\n".join(lines)


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    # Sorted as results.json is, so that a re-run's RESULTS.md diff shows changed figures only.
    for key, value in sorted(d.items()):
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _flatten(value, name + ".")
        else:
            out.append((name, value))
    return out


if __name__ == "__main__":
    sys.exit(main())

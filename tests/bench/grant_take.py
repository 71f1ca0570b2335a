"""What the release grant budget adds to a key release: its take, in process, against a same-run
baseline.

Before the budget, a release the policy allowed went to the HSM; now it first takes a token from
its certificate's and its SPIFFE ID's buckets (``GrantBudget.take``), and one refused after that
gives it back (``refund``). Timed here, alternated in rounds (the median of each's per-call time
over the rounds): the take of one certificate of one identity (a replica releasing), the take of
a new certificate each time with the table at its bound of 4,096 (a replica minting them: each
take forgets the oldest), and a take with its refund; against the check every release already
made before it (``UnwrapFirst.applies``: two bucket lookups of the same certificate and identity)
and a bare ``CallerBuckets.take``. No threshold: the figures are for the notes.

    python -m tests.bench.grant_take [--rounds N] [--calls N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from itertools import count

from strongroom.keybroker.grant_budget import GrantBudget, GrantLimits
from strongroom.keybroker.unwrap_first import UnwrapFirst
from strongroom.runtime.callers import MAX_CERTIFICATES_TRACKED
from strongroom.runtime.ratelimit import CallerBuckets

FLEET = "spiffe://strongroom.test/inference"
# Never met within a run: every take succeeds, as an honest fleet's do.
UNMET = GrantLimits(
    certificate_burst=10**9, certificate_rate=1e9, identity_burst=10**9, identity_rate=1e9
)


def _per_call(work: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        work()
    return (time.perf_counter() - started) / calls


def measure(rounds: int, calls: int) -> dict[str, float]:
    """Per-call microseconds (median over ``rounds``) of each variant, and the ratios."""
    budget = GrantBudget(UNMET, time.monotonic)
    minting = GrantBudget(UNMET, time.monotonic)
    serials = count(1)
    for _ in range(MAX_CERTIFICATES_TRACKED):  # the table at its bound
        minting.take(FLEET, next(serials))
    unwrap = UnwrapFirst(time.monotonic)
    buckets = CallerBuckets(1e9, 10**9)

    def take_and_refund() -> None:
        budget.take(FLEET, 0x2A)
        budget.refund(FLEET, 0x2A)

    variants: dict[str, Callable[[], object]] = {
        "baseline_unwrap_first_applies": lambda: unwrap.applies(FLEET, 0x2A),
        "baseline_caller_buckets_take": lambda: buckets.take(FLEET),
        "take_one_certificate": lambda: budget.take(FLEET, 0x2A),
        "take_new_certificate_table_full": lambda: minting.take(FLEET, next(serials)),
        "take_and_refund": take_and_refund,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, work in variants.items():
            times[name].append(_per_call(work, calls))
    us = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    base = us["baseline_unwrap_first_applies"]
    figures = {f"{name}_us": round(value, 3) for name, value in us.items()}
    for name in ("take_one_certificate", "take_new_certificate_table_full", "take_and_refund"):
        figures[f"ratio_{name}_to_unwrap_first_applies"] = round(us[name] / base, 2)
    figures["certificates_tracked"] = minting.certificates_tracked()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50_000)
    args = parser.parse_args()
    print(json.dumps(measure(args.rounds, args.calls), indent=2))


if __name__ == "__main__":
    main()

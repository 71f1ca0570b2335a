"""The release grant budget of the key brokers the benchmarks and the soak start.

They release hundreds of keys a second from one inference identity (16 callers, of one or a few
certificates), far past the broker's default grant budget (64 at once, then 1 a second, per
certificate; 1,024, then 8 a second, per SPIFFE ID: ``keybroker.release_budget_*``). Left at the
defaults, all but their first thousand releases would be ``RELEASES_RATE_LIMITED`` refusals and
their figures would time the refusal, not the release. So each sets the budget explicitly, to the
most the configuration admits (a million at once, then 100,000 a second: never met at ~340 a
second), and says so in its notes. What the budget costs a release is measured on its own
(``tests/bench/grant_take.py``).
"""

from __future__ import annotations

from typing import Any

from strongroom.dev.devstack import DevStack
from strongroom.keybroker.config import MAX_RELEASE_BURST, MAX_RELEASE_RATE

RELEASES_UNBUDGETED: dict[str, Any] = {
    "release_budget_certificate_burst": MAX_RELEASE_BURST,
    "release_budget_certificate_rate": MAX_RELEASE_RATE,
    "release_budget_identity_burst": MAX_RELEASE_BURST,
    "release_budget_identity_rate": MAX_RELEASE_RATE,
}
"""The ``keybroker:`` settings that keep a benchmark's releases within their grant budget."""


def bench_broker_section(stack: DevStack) -> dict[str, Any]:
    """The development ``keybroker:`` section of ``stack`` with :data:`RELEASES_UNBUDGETED`."""
    return {**stack.default_section("keybroker"), **RELEASES_UNBUDGETED}

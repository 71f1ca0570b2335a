"""Per-caller token buckets: what they remember, and for how long."""

from __future__ import annotations

import pytest

from strongroom.runtime.ratelimit import CallerBuckets


def test_full_buckets_are_forgotten_past_1024_callers_and_the_others_kept() -> None:
    now = [0.0]
    buckets = CallerBuckets(1.0, 4, clock=lambda: now[0])
    for i in range(1024):
        buckets.take(f"old {i}")
    now[0] = 3.0
    buckets.take("recent")
    buckets.take("recent")
    now[0] = 4.0  # the old ones are full again; "recent" is not
    buckets.take("new")
    assert len(buckets) == 2
    assert [buckets.take("recent") for _ in range(4)] == [True, True, True, False]


def test_max_tracked_forgets_the_caller_counted_longest_ago() -> None:
    now = [0.0]
    buckets = CallerBuckets(1.0, 2, clock=lambda: now[0], max_tracked=3)
    for caller in ("a", "b", "c"):
        assert buckets.take(caller) and buckets.take(caller)
        now[0] += 0.1
    assert not buckets.take("a")  # counted again: "b" is now the oldest
    assert buckets.take("d")
    assert len(buckets) == 3
    assert not buckets.take("a") and not buckets.take("c")  # kept, still empty
    assert buckets.take("b")  # forgotten: a full bucket


def test_max_tracked_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_tracked"):
        CallerBuckets(1.0, 1, max_tracked=0)

"""The lines a stored release policy that does not read or load leaves in the broker's log.

A real :class:`~strongroom.keybroker.policies.PolicyStore` on a real directory: each failing
policy is logged once (ERROR, its file and cause), at once again when its cause changes, and its
repeats are counted; a policy that loads again ends its failure; past
:data:`~strongroom.keybroker.policy_lines.MAX_KEYS` keys one failure stands for the rest. The
real broker over gRPC is :mod:`tests.e2e.test_outage_refusal_lines`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from strongroom.errors import StrongroomError
from strongroom.keybroker import outage_lines, policy_lines
from strongroom.keybroker.errors import PolicyUnreadable
from strongroom.keybroker.policies import PolicyStore
from tests.keybroker.test_policy_store import DOMAIN, document

_LOGGER = "strongroom.keybroker.policies"


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    found = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == _LOGGER]
    caplog.clear()
    return found


def _meet(store: PolicyStore, key_id: str, times: int = 1) -> StrongroomError | None:
    """What a release naming ``key_id`` does ``times`` times: get, and say a failure."""
    failure = None
    for _ in range(times):
        try:
            store.get(key_id, judge=False)
        except StrongroomError as exc:
            store.does_not_load(key_id, exc)
            failure = exc
    return failure


def test_a_failing_policy_is_logged_once_again_when_it_changes_and_ended_when_it_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, _LOGGER)
    store = PolicyStore(tmp_path / "policies", trust_domain=DOMAIN, production=False)
    store.put("k1", document())
    path = tmp_path / "policies" / "k1.yaml"
    path.write_text("version: [")
    syntax = _meet(store, "k1", 20)
    assert syntax is not None
    first = (
        "the release policy of a key does not load; nothing is released under it: "
        f"{syntax.message} (its file: {path})"
    )
    assert _lines(caplog) == [("ERROR", first)]  # before: 20
    # Another cause: logged at once, after the count of the one before it.
    path.write_bytes(b'version: "caf\xe9"\n')
    unreadable = _meet(store, "k1", 3)
    assert unreadable is not None and unreadable.reason == "POLICY_UNREADABLE"
    second = first.replace(syntax.message, unreadable.message)
    assert _lines(caplog) == [
        ("ERROR", f"{first} (19 more times after its last line)"),
        ("ERROR", second),
    ]
    # Fixed: its count is said, and a failure after it is a new one, logged at once.
    store.put("k1", document())
    assert _meet(store, "k1") is None
    assert _lines(caplog) == [("ERROR", f"{second} (2 more times after its last line)")]
    path.write_text("version: [")
    _meet(store, "k1", 2)
    assert _lines(caplog) == [("ERROR", first)]
    # A key without a policy is no failure; the close says what is still counted.
    assert _meet(store, "k2", 5) is not None
    assert _lines(caplog) == []
    store.close()
    assert _lines(caplog) == [("ERROR", f"{first} (1 more times after its last line)")]


def test_past_max_keys_one_failure_stands_for_the_further_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A directory the broker cannot search fails every key id a caller invents, each its own
    failure: the keys logged one by one are bounded."""
    caplog.set_level(logging.INFO, _LOGGER)
    store = PolicyStore(tmp_path / "policies", trust_domain=DOMAIN, production=False)
    store.put("k0", document())
    keys = [f"k{n}" for n in range(policy_lines.MAX_KEYS + 5)]
    for key_id in keys:
        (tmp_path / "policies" / f"{key_id}.yaml").write_text("version: [")
    for key_id in keys * 2:
        _meet(store, key_id)
    lines = _lines(caplog)
    assert len(lines) == policy_lines.MAX_KEYS + 1, len(lines)
    assert lines[-1] == ("ERROR", policy_lines.MORE_KEYS)
    assert {message.split("'")[1] for _, message in lines[:-1]} == set(
        keys[: policy_lines.MAX_KEYS]
    )
    # One of them loads again: a further key takes its place.
    store.put("k0", document())
    assert _meet(store, "k0") is None
    assert _lines(caplog) == [("ERROR", f"{lines[0][1]} (1 more times after its last line)")]
    _meet(store, keys[-1])
    assert [m.split(":")[0] for _, m in _lines(caplog)] == [
        "the release policy of a key does not load; nothing is released under it"
    ]
    store.close()
    counts = _lines(caplog)
    assert ("ERROR", f"{policy_lines.MORE_KEYS} (9 more times after its last line)") in counts


def test_keys_that_stopped_failing_give_their_place_to_a_real_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory the broker could not search for a while failed every key id a caller invented,
    and each took a place of its own until a release named it again once the directory was back:
    nobody does, so the places stayed taken and a real policy failing afterwards was logged only
    as one of the further keys, its key and file never named. A key not failing for
    REPEAT_SECONDS gives its place up (its count said) to a key that fails now."""
    caplog.set_level(logging.INFO, _LOGGER)
    now = [1000.0]
    store = PolicyStore(tmp_path / "policies", trust_domain=DOMAIN, production=False)
    monkeypatch.setattr(
        store, "_load_lines", policy_lines.PolicyLoadLines(store_log(), clock=lambda: now[0])
    )
    # What every key id meets while the directory cannot be searched (the tests run as root,
    # whom its mode would not stop).
    unsearchable = PolicyUnreadable("the policy directory cannot be searched: EACCES")
    for n in range(policy_lines.MAX_KEYS):  # the outage: invented key ids, each named once
        store.does_not_load(f"made-up-{n}", unsearchable)
    assert len(_lines(caplog)) == policy_lines.MAX_KEYS
    # The directory is back; a minute on, a real policy is damaged.
    now[0] += outage_lines.REPEAT_SECONDS + 1
    store.put("real", document())
    path = tmp_path / "policies" / "real.yaml"
    path.write_text("version: [")
    failure = _meet(store, "real", 3)
    assert failure is not None
    lines = _lines(caplog)
    assert lines == [  # before: [("ERROR", MORE_KEYS)]
        (
            "ERROR",
            "the release policy of a key does not load; nothing is released under it: "
            f"{failure.message} (its file: {path})",
        )
    ]
    # Keys still failing keep their places: within the minute nobody takes them.
    for n in range(policy_lines.MAX_KEYS - 1):
        store.does_not_load(f"fresh-{n}", unsearchable)
    store.does_not_load("one-too-many", unsearchable)
    assert _lines(caplog)[-1] == ("ERROR", policy_lines.MORE_KEYS)
    store.close()


def store_log() -> logging.Logger:
    """The logger a PolicyStore writes to."""
    return logging.getLogger(_LOGGER)

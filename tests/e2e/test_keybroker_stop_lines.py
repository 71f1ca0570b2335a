"""A key broker stopped while releases are in flight: the records that arrive after its audit log
closed are refused, and that is one WARNING, not an operator's ERROR per refused batch.

The stop drains the handlers before it closes the log (``ServiceHost.stop``), but only for
``HANDLER_DRAIN_SECONDS``: a handler still deciding past that (stuck storage, a slow HSM) met a
closed log, and each of its batches logged ERROR ``the audit log is closed``. Here four releases
are held inside their handlers (right before their first audit record) while the broker is stopped
with the drain bound 0, which leaves them running and closes the log; let go once it is closed,
each meets the closed log. The broker is real, over real mTLS.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.broker_child import outcome as run_child

SCRIPT = textwrap.dedent(
    """
    import json, logging, sys, threading, time
    from pathlib import Path
    import grpc
    from strongroom.api.keybroker.v1 import keybroker_pb2 as pb, keybroker_pb2_grpc as pb_grpc
    from strongroom.dev.devstack import DevStack
    from tests.e2e.broker_child import KeptLines
    from strongroom.runtime import server as host_module

    host_module.HANDLER_DRAIN_SECONDS = 0.0  # the handlers in flight are left running
    out = {"released": 0}

    Kept = KeptLines.install()
    with DevStack(Path(sys.argv[1])) as stack:
        running = stack.start_in_process("keybroker")
        stack.create_release_key(stack.identity("admin"), "k", policy_version="1")
        publisher = pb_grpc.KeyBrokerServiceStub(stack.channel(stack.identity("publisher"), "keybroker"))
        generated = publisher.GenerateDataKey(pb.GenerateDataKeyRequest(key_id="k", model_name="m", model_version="1"), timeout=30)
        client = stack.release_client()
        # Releases held inside their handlers (once their HSM work is asked for, right before
        # their first audit record) while the stop runs to its end: with the drain bound 0 the
        # stop leaves them running and closes the audit log; let go then, each meets the closed
        # log. Held there, not queued on the log's lock (a commit under way could take queued
        # records before the close took the lock, and nothing was refused), nor earlier, at the
        # evidence's verification (the stop could close the HSM before they asked it for their
        # re-wrap, and they were refused as the HSM's instead).
        holding, gate, held = threading.Event(), threading.Event(), []
        audit = running.handle.audit
        append = audit.append
        def held_append(*args, **kwargs):
            if holding.is_set() and not gate.is_set():
                held.append(threading.current_thread().name)
                gate.wait(60)
            return append(*args, **kwargs)
        audit.append = held_append
        client.release("k", generated.key_version, generated.wrapped_data_key)
        holding.set()
        def release_once():
            try:
                client.release("k", generated.key_version, generated.wrapped_data_key)
                out["released"] += 1
            except grpc.RpcError:
                pass
        threads = [threading.Thread(target=release_once) for _ in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(held) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        out["held"] = len(held)
        closing = threading.Thread(target=running.handle.close, kwargs={"grace": 0})
        closing.start()
        while not audit.closed and time.monotonic() < deadline:
            time.sleep(0.02)
        out["closed_first"] = audit.closed
        gate.set()
        closing.join()
        for thread in threads:
            thread.join()
        out["lines"] = Kept.lines
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory, step_ca_binary: Path) -> dict[str, Any]:
    """The broker's log lines (level, message, detail) and how many releases it granted."""
    return run_child(SCRIPT, str(tmp_path_factory.mktemp("stop-lines") / "stack"), timeout=300)


def test_releases_refused_by_the_stop_are_one_warning(outcome: dict[str, Any]) -> None:
    assert outcome["held"] == 4, outcome["held"]
    assert outcome["closed_first"], "the stop never closed the audit log"
    lines = outcome["lines"]
    closed = [line for line in lines if line[1].startswith("the audit log is closed")]
    assert closed == [
        [
            "WARNING",
            "the audit log is closed: records still arriving are refused (not logged again)",
            None,
        ]
    ], closed
    assert [line for line in lines if line[0] in ("ERROR", "CRITICAL")] == []
    # The refused releases' own lines say the broker is stopping, no more.
    stopped = [line for line in lines if line[1] == "key release denied" and line[2]]
    assert stopped, lines[-20:]
    assert {line[2] for line in stopped} == {
        "the key broker is stopping: its audit log takes no more records"
    }

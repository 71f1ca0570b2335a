"""``strongroom demo``: the whole lifecycle on loopback, each step with what was checked.

It starts a real step-ca, a SoftHSM2 token, the key broker, the model store and the inference
service (with the simulated TEE) as separate processes, trains and publishes a small model, serves
it from the "confidential VM", and then shows the refusals: a VM whose measurement is not in the
release policy, a tampered artifact, and a model written under another model's data key.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from strongroom.errors import StrongroomError

KEY_ID = "demo-classifier"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
MODEL = "classifier"


def register(sub: Any) -> None:
    """Adds ``demo``."""
    demo = sub.add_parser(
        "demo", help="run the whole lifecycle locally (step-ca, SoftHSM2, simulated TEE)"
    )
    demo.add_argument(
        "--dir",
        type=Path,
        default=Path(".build/demo"),
        help="working directory (recreated each run)",
    )
    demo.add_argument("--keep", action="store_true", help="leave the services running until Ctrl-C")
    demo.set_defaults(func=run)


class Narrator:
    """Prints numbered steps and the checks made in each."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.checks = 0

    def step(self, number: str, title: str) -> None:
        print(f"\n=== {number}. {title}", flush=True)

    def check(self, text: str) -> None:
        self.checks += 1
        print(f"  ✔ {text}", flush=True)

    def info(self, text: str) -> None:
        print(f"    {text}", flush=True)

    def warn(self, text: str) -> None:
        """Something the demo found wrong that is not one of its checks (printed, not counted)."""
        print(f"  ! {text}", flush=True)

    def refused(self, text: str) -> None:
        self.checks += 1
        print(f"  ✘ refused, as it must be: {text}", flush=True)


def _expect_failure(fn: Callable[[], object]) -> str:
    try:
        fn()
    except grpc.RpcError as exc:
        return f"{exc.code().name} {exc.details()}"
    except StrongroomError as exc:
        return f"{exc.status_name} {exc}"
    raise AssertionError("the operation should have been refused")


def run(args: argparse.Namespace) -> int:
    """Runs the demo; returns 0 when every step behaved as expected."""
    # Imported here so that `strongroom --help` stays fast.
    from strongroom.dev import lifecycle
    from strongroom.dev.devstack import DevStack

    say = Narrator()
    root = args.dir.resolve()
    if root.exists():
        shutil.rmtree(root)
    # Everything the demo and its services write (logs, the plaintext model, state) is private.
    os.umask(0o077)
    root.mkdir(parents=True, mode=0o700)
    stack = DevStack(root)
    # SIGTERM and SIGHUP stop everything the demo started, as Ctrl-C does: without this the
    # interpreter exits at once and step-ca and the services are orphaned.
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in _STOP_SIGNALS}
    try:
        ids = lifecycle.platform(say, stack)
        _, publisher, client = ids
        model = lifecycle.train_model(say, root)
        published = lifecycle.publish(say, stack, publisher, model)
        store = lifecycle.store(say, stack, publisher, model, root)
        lifecycle.deploy(say, stack)
        oip = lifecycle.release(say, stack, client, root)
        lifecycle.serve(say, stack, client, model)
        lifecycle.refusals(
            say,
            stack,
            root=root,
            ids=ids,
            store=store,
            oip=oip,
            model=model,
            published=published,
        )

        elapsed = time.perf_counter() - say.started
        print(
            f"\nDemo complete: {say.checks} checks passed in {elapsed:.1f}s. Working directory: {root}"
        )
        if args.keep:
            # The announcement is inside the try: a signal sent as soon as it is read must still
            # end in the clean stop below, not in an interrupted exit.
            try:
                print("Services keep running; press Ctrl-C (or send SIGTERM) to stop.", flush=True)
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0
    except (AssertionError, StrongroomError, grpc.RpcError) as exc:
        print(f"\nDEMO FAILED: {exc}", file=sys.stderr)
        for name in ("keybroker", "modelstore", "inference", "inference-rogue"):
            log = stack.log_path(name)
            if log.exists():
                print(
                    f"--- last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-15:]),
                    file=sys.stderr,
                )
        return 1
    finally:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the clean-up short
        try:
            stack.close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _audit_records(root: Path) -> list[dict[str, Any]]:
    from strongroom.dev.devstack import read_audit_records  # imported here, as in run()

    # Read between two of the broker's writes: _wait_denied polls the log while it writes.
    return read_audit_records(root / "state" / "keybroker" / "audit.log")


def _last_release(root: Path) -> dict[str, Any]:
    return next(
        r
        for r in reversed(_audit_records(root))
        if r.get("action") == "key_release" and r["decision"] == "allowed"
    )


def _wait_denied(root: Path, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        denied = [
            r
            for r in _audit_records(root)
            if r.get("action") == "key_release" and r["decision"] == "denied"
        ]
        if denied:
            return denied[-1]
        time.sleep(0.2)
    raise StrongroomError("no denied release was audited")

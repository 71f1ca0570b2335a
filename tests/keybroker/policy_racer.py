"""A second broker process over one policy directory, for the tests of its change lock.

``python -m tests.keybroker.policy_racer DIR TEMPLATE`` opens a :class:`PolicyStore` on ``DIR``
and answers one line per command on stdin; ``TEMPLATE`` is a policy document whose version is
``"VERSION"``:

- ``set EXPECTED NEW [WAIT]``: writes the template at version ``NEW`` for key ``k1``, expecting
  the live version ``EXPECTED`` (``-`` for "no policy yet"), waiting at most ``WAIT`` seconds for
  the change lock (default: the store's); answers ``ok`` or the refusal's reason.
  ``why EXPECTED NEW [WAIT]`` does the same and answers a refusal's reason and message.
- ``hold [PATH]``: takes the directory's change lock on a thread of its own, through a second
  store over ``PATH`` when given (another path to the same directory, e.g. a bind mount), and
  answers ``held``; ``release`` lets it go (answers ``released``). Commands in between run
  while it is held, in the same process.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from strongroom.errors import StrongroomError
from strongroom.keybroker.policies import LOCK_WAIT, PolicyStore


def _store(directory: str) -> PolicyStore:
    return PolicyStore(Path(directory), trust_domain="strongroom.test", production=True)


def _hold(store: PolicyStore, release: threading.Event) -> threading.Thread:
    """Holds the change lock through ``store`` on a thread until ``release`` is set."""
    taken = threading.Event()

    def holding() -> None:
        with store._changing("k1", 30.0):
            taken.set()
            release.wait()

    thread = threading.Thread(target=holding)
    thread.start()
    taken.wait()
    return thread


def main() -> None:
    """Serves commands until stdin closes."""
    store = _store(sys.argv[1])
    template = Path(sys.argv[2]).read_text(encoding="utf-8")
    held: tuple[threading.Thread, threading.Event] | None = None
    for line in sys.stdin:
        command = line.split()
        if command[0] == "hold":
            release = threading.Event()
            through = _store(command[1]) if len(command) > 1 else store
            held = (_hold(through, release), release)
            print("held", flush=True)
            continue
        if command[0] == "release":
            assert held is not None
            held[1].set()
            held[0].join()
            held = None
            print("released", flush=True)
            continue
        expected, new = command[1], command[2]
        wait = float(command[3]) if len(command) > 3 else LOCK_WAIT
        try:
            stored = store.check("k1", template.replace('"VERSION"', f'"{new}"'))
            store.write(
                "k1",
                stored,
                expected_version="" if expected == "-" else expected,
                lock_wait=wait,
            )
        except StrongroomError as exc:
            print(exc.reason if command[0] == "set" else f"{exc.reason} {exc.message}", flush=True)
        else:
            print("ok", flush=True)
    if held is not None:  # stdin closed while holding (a failed test): let it go, and exit
        held[1].set()
        held[0].join()


if __name__ == "__main__":
    main()

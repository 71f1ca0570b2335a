"""A second broker process over one policy directory, for the tests of its change lock.

``python -m tests.keybroker.policy_racer DIR TEMPLATE`` opens a :class:`PolicyStore` on ``DIR``
and answers one line per command on stdin; ``TEMPLATE`` is a policy document whose version is
``"VERSION"``:

- ``set EXPECTED NEW``: writes the template at version ``NEW`` for key ``k1``, expecting the
  live version ``EXPECTED`` (``-`` for "no policy yet"); answers ``ok`` or the refusal's reason.
- ``hold``: takes the directory's change lock, answers ``held``, and keeps it until the next
  line arrives (then answers ``released``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from strongroom.errors import StrongroomError
from strongroom.keybroker.policies import PolicyStore


def main() -> None:
    """Serves commands until stdin closes."""
    store = PolicyStore(Path(sys.argv[1]), trust_domain="strongroom.test", production=True)
    template = Path(sys.argv[2]).read_text(encoding="utf-8")
    for line in sys.stdin:
        command = line.split()
        if command[0] == "hold":
            with store._changing("k1", 30.0):
                print("held", flush=True)
                sys.stdin.readline()
            print("released", flush=True)
            continue
        expected, new = command[1], command[2]
        try:
            stored = store.check("k1", template.replace('"VERSION"', f'"{new}"'))
            store.write("k1", stored, expected_version="" if expected == "-" else expected)
        except StrongroomError as exc:
            print(exc.reason, flush=True)
        else:
            print("ok", flush=True)


if __name__ == "__main__":
    main()

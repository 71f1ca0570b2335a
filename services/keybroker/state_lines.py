"""The key broker's log line for an operation that had to look its key version up again.

A release, ``ReWrap`` or new data key whose version's enabler went while the HSM used it (another
replica disabling, maybe enabling again) is retried on a fresh lookup
(:meth:`~strongroom.keybroker.keys.KeyManager._afresh_if_stale`); without a line, an operator
could not see a version flapping between replicas, only refusals that came and went. Each such
operation is one WARNING (key id, version, attempts, what moved, how it ended), never one per
attempt; and since every operation on a flapping version retries, under load that is bounded as
the broker's other repeating lines are (:class:`~strongroom.runtime.ratelimit.CallerBuckets`, as
the refusal budgets): per key version, one line at once, then one per :data:`REPEAT_SECONDS`, the
operations not logged in between counted on the next line (``operations_not_logged``). Both
remember 1,024 key versions at most, the one counted longest ago forgotten first: a version that
stopped flapping is never logged again, and its count must not keep a newer one's out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from strongroom.runtime.ratelimit import CallerBuckets

REPEAT_SECONDS = 60.0
"""A key version whose state keeps moving under operations is logged again at most this often."""
_MAX_VERSIONS = 1024  # key versions remembered (each flap is an admin's disable: few at once)


class StateMoveLines:
    """Logs, to ``log``, the operations that retried on a fresh lookup, bounded (see the module)."""

    def __init__(self, log: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._lines = CallerBuckets(1.0 / REPEAT_SECONDS, 1, clock=clock, max_tracked=_MAX_VERSIONS)
        self._lock = threading.Lock()
        self._unlogged: dict[str, int] = {}  # key version -> operations not logged since its line

    def retried(
        self,
        key_id: str,
        version: int | None,
        *,
        attempts: int,
        disabled: int,
        stale: int,
        outcome: str,
    ) -> None:
        """One operation on ``key_id`` took ``attempts`` attempts: ``disabled`` met ``version``'s
        enabler gone (None: none did), ``stale`` another handle gone stale; ``outcome`` is
        ``answered`` or the reason (or exception class) it ended with."""
        name = f"{key_id} {version}"  # a space is in no key id
        if not self._lines.take(name):
            with self._lock:
                # Moved to the end, and the one counted longest ago forgotten past the bound: a
                # version that stopped flapping is never logged again, and its count, kept for
                # good, crowded out those of versions flapping now (their lines then said 0).
                self._unlogged[name] = self._unlogged.pop(name, 0) + 1
                if len(self._unlogged) > _MAX_VERSIONS:
                    del self._unlogged[next(iter(self._unlogged))]
            return
        with self._lock:
            unlogged = self._unlogged.pop(name, 0)
        self._log.warning(
            "a key version's state moved under an operation; it was looked up again",
            extra={
                "key_id": key_id,
                "key_version": version,
                "attempts": attempts,
                "disabled_under_it": disabled,
                "stale_handles": stale,
                "outcome": outcome,
                "operations_not_logged": unlogged,
            },
        )

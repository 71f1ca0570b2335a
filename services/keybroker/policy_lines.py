"""The broker's log lines for stored release policies that do not read or load: one per failure.

A release naming a key whose stored policy does not load (a damaged, hand-edited or unreadable
file) logged an ERROR on every call, before its caller was checked: any holder of a certificate
the broker admits, naming that key id, wrote one ERROR per call and drowned the line the operator
needed. Now each key's failure is logged at ERROR once, naming the file and the cause, at once
again when the cause changes, and while it repeats counted and said a minute after its line
(:class:`~strongroom.keybroker.outage_lines.OutageLines`, as the HSM's failed connections: ``...
(N more times after its last line)``); a key whose policy loads again, or has none, ends its
failure (the next one is logged at once). The failures are the broker's to fix, not a caller's:
the refusals they cause stay ``CALLER_NOT_ALLOWED`` to every caller, and audited.

At most :data:`MAX_KEYS` keys are accounted one by one: a policy directory the broker cannot search
fails every key id a caller invents, each its own failure; past them, one failure stands for every
further key (:data:`MORE_KEYS`), logged once and then counted. A key that has not failed for
:data:`~strongroom.keybroker.outage_lines.REPEAT_SECONDS` gives its place up (its count said) to a
key failing now: the invented key ids of an outage that ended are named by nobody again, and
without this kept their places for good, so a real policy failing later was never named.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from strongroom.errors import StrongroomError
from strongroom.keybroker.outage_lines import REPEAT_SECONDS, OutageLines

MAX_KEYS = 64
"""Keys whose failing policies are logged one by one (a broker holds a few dozen keys)."""
MORE_KEYS = (
    f"the release policies of more than {MAX_KEYS} keys do not read or load; nothing is released "
    "under them (the further keys are not logged one by one: see the policy directory)"
)
_MORE = "*"  # their kind: no key id (KEY_ID_PATTERN) is this, nor the audit tally's ""


class PolicyLoadLines:
    """Logs, to ``log``, the stored policies that do not read or load, bounded (see the module)."""

    def __init__(self, log: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self._lines = OutageLines(log, clock)
        self._clock = clock
        self._lock = threading.Lock()
        # The keys whose failure is under way, logged one by one: when each last failed.
        self._keys: dict[str, float] = {}

    def failed(self, key_id: str, path: str, exc: StrongroomError) -> None:
        """``key_id``'s policy, its file ``path``, does not read or load (``exc``)."""
        now = self._clock()
        with self._lock:
            own = key_id in self._keys or len(self._keys) < MAX_KEYS
            stale = None if own else min(self._keys, key=self._keys.__getitem__)
            if stale is not None and self._keys[stale] <= now - REPEAT_SECONDS:
                del self._keys[stale]  # nobody names it any more: its place is this key's
                own = True
            else:
                stale = None
            if own:
                self._keys[key_id] = now
        if stale is not None:
            self._lines.ended(stale)
        if not own:
            self._lines.failed(_MORE, MORE_KEYS, reason=exc.reason)
            return
        self._lines.failed(
            key_id,
            "the release policy of a key does not load; nothing is released under it: "
            f"{exc.message} (its file: {path})",
            reason=exc.reason,
        )

    def loaded(self, key_id: str) -> None:
        """``key_id``'s policy loads again, or it has none: its failure, if any, is over."""
        if key_id not in self._keys:  # every release's path: one dict read, no lock
            return
        with self._lock:
            self._keys.pop(key_id, None)
        self._lines.ended(key_id)

    def closing(self) -> None:
        """The broker stops: the repeats not yet said are said now; no timer runs after this."""
        self._lines.closing()

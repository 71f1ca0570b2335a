"""Token buckets per caller: what one certified identity may do how often."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

_MAX_TRACKED = 1024


class CallerBuckets:
    """One token bucket per caller: ``burst`` tokens at once, refilled at ``rate`` a second.

    Full buckets are forgotten once more than 1,024 callers are tracked, so it holds only the
    callers of the last ``burst / rate`` seconds. With ``max_tracked``, it holds that many at most:
    past it the caller counted longest ago is forgotten, full or not (it gets a full bucket should
    it come back). Only for a budget beneath another that bounds whatever it forgets (one per
    certificate beneath its SPIFFE ID's): a holder of its service's provisioner mints
    certificates as fast as the CA signs (115 to 274 a second from one step-ca here), and each
    tracked ``burst / rate`` seconds made the table grow without bound.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int | None = None,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        if max_tracked is not None and max_tracked < 1:
            raise ValueError("max_tracked must be at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_tracked = max_tracked
        self._lock = threading.Lock()
        # Caller -> (tokens left, when counted), in the order they were last counted: the
        # forgettable ones are at the front, so forgetting them costs no walk over the rest (a
        # walk over every caller on each take was 13 ms a take at 65,000 callers).
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        """How many callers are tracked now."""
        with self._lock:
            return len(self._buckets)

    def _tokens(self, caller: str, now: float) -> float:
        tokens, then = self._buckets.get(caller, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - then) * self.rate)

    def _count(self, caller: str, tokens: float, now: float) -> None:
        self._buckets[caller] = (tokens, now)
        self._buckets.move_to_end(caller)

    def available(self, caller: str) -> bool:
        """Whether ``caller`` has a token left (none is taken)."""
        now = self._clock()
        with self._lock:
            return self._tokens(caller, now) >= 1.0

    def take(self, caller: str) -> bool:
        """Takes one of ``caller``'s tokens; False (nothing taken) when it has none left."""
        now = self._clock()
        with self._lock:
            tokens = self._tokens(caller, now)
            if tokens < 1.0:
                self._count(caller, tokens, now)
                return False
            self._count(caller, tokens - 1.0, now)
            if len(self._buckets) > _MAX_TRACKED:
                full = now - self.burst / self.rate
                while self._buckets and next(iter(self._buckets.values()))[1] <= full:
                    self._buckets.popitem(last=False)
            if self._max_tracked is not None:
                while len(self._buckets) > self._max_tracked:
                    self._buckets.popitem(last=False)
            return True

    def refund(self, caller: str) -> None:
        """Gives back a token :meth:`take` took for work that was not done."""
        with self._lock:
            counted = self._buckets.get(caller)
            if counted is not None:
                self._buckets[caller] = (min(float(self.burst), counted[0] + 1.0), counted[1])

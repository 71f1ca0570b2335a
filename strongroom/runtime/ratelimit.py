"""Token buckets per caller: what one certified identity may do how often."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

_MAX_TRACKED = 1024


class CallerBuckets:
    """One token bucket per caller: ``burst`` tokens at once, refilled at ``rate`` a second.

    Full buckets are forgotten once more than 1,024 callers are tracked, so it holds only the
    callers of the last ``burst / rate`` seconds.
    """

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        # Caller -> (tokens left, when counted).
        self._buckets: dict[str, tuple[float, float]] = {}

    def _tokens(self, caller: str, now: float) -> float:
        tokens, then = self._buckets.get(caller, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - then) * self.rate)

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
                self._buckets[caller] = (tokens, now)
                return False
            self._buckets[caller] = (tokens - 1.0, now)
            if len(self._buckets) > _MAX_TRACKED:
                full = now - self.burst / self.rate
                self._buckets = {k: v for k, v in self._buckets.items() if v[1] > full}
            return True

    def refund(self, caller: str) -> None:
        """Gives back a token :meth:`take` took for work that was not done."""
        with self._lock:
            counted = self._buckets.get(caller)
            if counted is not None:
                self._buckets[caller] = (min(float(self.burst), counted[0] + 1.0), counted[1])

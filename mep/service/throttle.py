"""Failed token checks per source address: past the limit, a source is refused for a while.

Tokens carry 256 random bits, so guessing one is hopeless; the limit is about
cost and noise: a script looping on a revoked token, or a peer probing, gets
one clear refusal (``auth_throttled``) per request instead of a token lookup
and a log line each. The source is the peer's network address as libzmq
reports it: the SDK makes a fresh CURVE key per connection, so a client key
would name nobody. Several researchers behind one address (a shared login
node) share its allowance; the default is generous for that reason.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from mep.errors import AuthenticationThrottledError

log = logging.getLogger(__name__)

_MAX_TRACKED_SOURCES = 10_000  # forget sources with no recent failure beyond this many


class FailedAuthentications:
    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit  # 0: no limit
        self.window = window
        self._failures: dict[str, deque[float]] = {}
        self._refused_until: dict[str, float] = {}

    def check(self, source: str) -> None:
        """Raise if ``source`` is being refused for its recent failures."""
        until = self._refused_until.get(source)
        if until is None:
            return
        now = time.monotonic()
        if now < until:
            raise AuthenticationThrottledError(
                f"too many failed authentications from {source or 'this address'} ({self.limit} within "
                f"{self.window:.0f} s); requests from it are refused for {until - now:.0f} s more. Check the "
                f"token your client uses (MEP_TOKEN), or ask your mep admin")
        del self._refused_until[source]

    def failed(self, source: str) -> None:
        if not self.limit:
            return
        now = time.monotonic()
        failures = self._failures.setdefault(source, deque())
        failures.append(now)
        while failures and failures[0] < now - self.window:
            failures.popleft()
        if len(failures) >= self.limit:
            self._refused_until[source] = now + self.window
            del self._failures[source]
            log.warning("refusing token-bearing requests from %s for %.0f s: %d failed authentications within "
                        "%.0f s", source or "an unknown address", self.window, self.limit, self.window)
        if len(self._failures) > _MAX_TRACKED_SOURCES:
            self._failures = {key: times for key, times in self._failures.items() if times[-1] >= now - self.window}

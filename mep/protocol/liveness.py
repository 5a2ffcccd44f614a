"""Liveness judged by each side's own clock: a process that was paused does not condemn its peers.

Every link declares its peer dead after a few heartbeat intervals without a
word from it. That silence is only the peer's if this process was listening
all along. When this process itself was stopped (SIGSTOP, a frozen virtual
machine, a host swapping hard), its loop did not turn, so it heard nothing
and sent nothing: the silence is its own. Each loop that judges peers calls
``PauseDetector.paused()`` once per turn; after a turn far longer than the
loop ever waits on purpose it returns the gap, and the caller gives every
peer a fresh window, counted from now. Heartbeats go out at once after such
a gap (they are overdue), so the peers' view of this process recovers too.
"""

from __future__ import annotations

import time


class PauseDetector:
    """Tells a loop that it did not run for a while (its own pause), once per pause."""

    def __init__(self, longest_turn: float) -> None:
        """``longest_turn``: the longest a turn of the loop takes when the process is running normally
        (its longest poll plus an allowance for work); a longer gap between two calls is a pause."""
        self.longest_turn = longest_turn
        self._last_turn = time.monotonic()

    def paused(self, now: float | None = None) -> float:
        """Call once per loop turn: the length of the gap since the last call if it was a pause, else 0."""
        now = time.monotonic() if now is None else now
        gap, self._last_turn = now - self._last_turn, now
        return gap if gap > self.longest_turn else 0.0

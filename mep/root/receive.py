"""The one guard every receive loop handles its messages in: no bytes from a peer stop a process.

Each loop (service, router from the service and from endpoints, spawner from
the router, endpoint, SDK thread) handles one message inside
``handling(...)``. Whatever that message makes the code raise becomes a
refusal: a ``MepError`` as it is (its message was written for the peer),
anything else (a bug, an ``OSError``) as a ``MepError`` with code
``internal`` that says only that it failed, while the admin's log gets the
traceback and the peer's identity. ``refuse`` answers the peer where there is
someone to answer; either way the loop carries on with its next message.
``KeyboardInterrupt``, ``SystemExit`` and other ``BaseException``\\ s still
propagate: they are how a process is told to stop.

``loop_turn`` is the last resort around a whole loop turn, for a fault outside
any one message's handling: it logs, pauses a moment so a fault that repeats
every turn can't spin, and lets the loop go on.
"""

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mep.root.errors import MepError

FAILED_TURN_PAUSE = 0.1  # seconds


def as_refusal(exc: Exception, what: str) -> MepError:
    """The error the peer is told: ours as written, anything else without the detail only the admin may see."""
    if isinstance(exc, MepError):
        return exc
    return MepError(f"{what} failed with an internal error ({type(exc).__name__}); the admin's log has the "
                    "details")


@contextmanager
def handling(log: logging.Logger, peer: str, what: str = "the message",
             refuse: Callable[[MepError], Any] | None = None,
             propagate: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Handle one message from ``peer``; turn any exception into a refusal (``refuse``) and a log line.

    ``propagate``: exceptions the caller handles itself, at a level above the message.
    """
    try:
        yield
    except propagate:
        raise
    except MepError as exc:
        log.warning("refused %s from %s: %s", what, peer, exc)
        _answer(log, peer, refuse, exc)
    except Exception as exc:
        log.exception("handling %s from %s failed; refused it and carrying on", what, peer)
        _answer(log, peer, refuse, as_refusal(exc, f"handling {what}"))


def _answer(log: logging.Logger, peer: str, refuse: Callable[[MepError], Any] | None, error: MepError) -> None:
    try:
        if refuse is not None:
            refuse(error)
    except Exception:  # answering is best effort: the peer may be gone, and we must not go with it
        log.exception("could not send %s the refusal (%s)", peer, error)


@contextmanager
def loop_turn(log: logging.Logger, role: str) -> Iterator[None]:
    """A whole turn of ``role``'s loop: a fault in it is logged, and the loop goes on after a pause."""
    try:
        yield
    except MepError as exc:  # says what is wrong already (say, a full disk): no traceback every turn
        log.error("a turn of the %s's loop failed: %s %s; carrying on", role, exc, exc.admin_detail)
        time.sleep(FAILED_TURN_PAUSE)
    except Exception:
        log.exception("a turn of the %s's loop failed; carrying on", role)
        time.sleep(FAILED_TURN_PAUSE)

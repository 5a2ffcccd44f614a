"""The guarded receive path: defined in ``mep.root.receive`` (the root process uses it too), used from here."""

from mep.root.receive import FAILED_TURN_PAUSE, as_refusal, handling, loop_turn  # noqa: F401 - re-exported

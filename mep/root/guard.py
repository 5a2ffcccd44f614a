"""Payloads stay opaque: an audit hook that refuses unpickling in brokering processes.

The service, the router and the spawner call ``forbid_unpickling`` at start.
From then on any ``pickle`` load that would resolve a class or function
(``pickle.find_class``, which dill goes through too) raises, so a bug or an
attacker can't make those processes execute a payload. ``process_status``
reports it, and whether dill was ever imported, for ``mep status``.
"""

import functools
import os
import pickle
import sys

from mep.root.messages import ProcessStatus


class UnpicklingForbidden(RuntimeError):
    """Raised by the audit hook: this process must never deserialise user data."""


def _refuse_unpickling(event: str, args: tuple) -> None:
    if event == "pickle.find_class":
        raise UnpicklingForbidden(f"unpickling is forbidden in this mep process (attempted to load "
                                  f"{args[0]}.{args[1]})")


@functools.cache  # once per process: a second hook would only slow every audited event
def forbid_unpickling() -> None:
    """Install the hook; audit hooks can't be removed, which is the point."""
    sys.addaudithook(_refuse_unpickling)


def unpickling_refused() -> bool:
    """Prove the hook works by trying a harmless load that needs ``find_class``."""
    try:
        pickle.loads(pickle.dumps(os.path.join))  # pickled by reference: loading it calls find_class
    except UnpicklingForbidden:
        return True
    return False


def process_status(role: str) -> ProcessStatus:
    return ProcessStatus(role=role, pid=os.getpid(), uid=os.getuid(), dill_loaded="dill" in sys.modules,
                         unpickling_refused=unpickling_refused())

"""Refuse at ``mep manager start`` an installation other accounts can't run, before the root process is exec'd.

A virtual environment under a 0700 directory (a pyenv interpreter in /root,
say) works for root and fails inside every user endpoint and in the router.
``mep manager start`` refuses to exec the root process with a message naming
the first directory on the way to the interpreter (or to the installed ``mep``
package) that other accounts can't pass. The check needs no privilege (it
reads permission bits), so it is the admin's CLI's, not root's: the packaged
systemd unit starts the root process from ``/opt/mep/venv``, which the package
makes world-readable. A root process started by hand from a private
installation still fails before anything is served: its first unprivileged
child (the identity-mapping helper, as ``identity_mapping_user``) can't exec
the interpreter, and the manager exits with that step's error, which names the
interpreter's path. The same holds for what a walk of the permission bits
can't see (an ACL, a file unreadable inside a readable directory).
"""

from __future__ import annotations

import os
import stat

import mep
from mep.errors import ConfigurationError

_REMEDY = (
    "Install mep into a world-readable virtual environment"
    " (e.g. /usr/bin/python3 -m venv /opt/mep/venv) and start the manager from it."
)


def check_interpreter_usable(python: str) -> None:
    """Raise ``ConfigurationError`` if other accounts can't reach ``python`` or the ``mep`` package it runs.

    Not running as root means single-user mode: endpoints run as this same
    account, which evidently can run the interpreter, so there is nothing to prove.
    """
    if os.geteuid() != 0:
        return
    for path in (python, os.path.dirname(mep.__file__)):
        blocked = first_blocked_component(path)
        if blocked is not None:
            raise ConfigurationError(f"the mep installation at {python} can't be used by other accounts: "
                                     f"{blocked[0]} is mode {blocked[1]:04o}. {_REMEDY}")


def first_blocked_component(path: str) -> tuple[str, int] | None:
    """The first directory (or the file itself) on the way to ``path`` that others can't pass.

    Walks the path as given and then its resolved form, since a venv's
    ``bin/python`` is usually a link into the interpreter it was made from.
    Returns the path and its permission bits, or None if every step has o+x.
    """
    for candidate in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        parts = candidate.split("/")
        for end in range(1, len(parts) + 1):
            component = "/".join(parts[:end]) or "/"
            try:
                mode = os.stat(component).st_mode
            except OSError:
                return None
            if not mode & stat.S_IXOTH:
                return component, stat.S_IMODE(mode)
    return None

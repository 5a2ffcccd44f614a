"""Prove at manager start that other accounts can run this mep installation.

A virtual environment under a 0700 directory (a pyenv interpreter in /root,
say) works for root and fails inside every user endpoint. The manager runs
``import mep`` with this interpreter as an unprivileged account, through the
same checked drop as a real endpoint (``privdrop.run_for_answer``), and refuses to start
with a message naming the directory that blocks other accounts.
"""

from __future__ import annotations

import os
import stat

from mep.root.errors import ConfigurationError, SpawnError
from mep.root.accounts import Account, unprivileged_account
from mep.root.privdrop import SpawnPlan, run_for_answer

PROBE_TIMEOUT_SECONDS = 60
# Says on fd 3 why the import failed (its stdout and stderr are /dev/null).
_PROBE = "import os\ntry:\n    import mep\nexcept BaseException as e:\n    os.write(3, repr(e).encode()[:2000])\n    raise"
_REMEDY = (
    "Install mep into a world-readable virtual environment"
    " (e.g. /usr/bin/python3 -m venv /opt/mep/venv) and start the manager from it."
)


def check_interpreter_usable(python: str, *, probe_account: str = "nobody") -> None:
    """Raise ``ConfigurationError`` unless ``probe_account`` can run ``python -c 'import mep'``.

    Not running as root means single-user mode: endpoints run as this same
    account, which evidently can run the interpreter, so there is nothing to prove.
    """
    if os.geteuid() != 0:
        return
    failure = _run_probe(python, unprivileged_account(probe_account, "the account that checks the interpreter"))
    if failure is None:
        return
    blocked = first_blocked_component(python)
    reason = f"{blocked[0]} is mode {blocked[1]:04o}" if blocked else failure
    raise ConfigurationError(
        f"the mep installation at {python} can't be used by other accounts: {reason}. {_REMEDY}"
    )


def first_blocked_component(python: str) -> tuple[str, int] | None:
    """The first directory (or the program itself) on the way to ``python`` that others can't pass.

    Walks the path as given and then its resolved form, since a venv's
    ``bin/python`` is usually a link into the interpreter it was made from.
    Returns the path and its permission bits, or None if every step has o+x.
    """
    for path in dict.fromkeys((os.path.abspath(python), os.path.realpath(python))):
        parts = path.split("/")
        for end in range(1, len(parts) + 1):
            component = "/".join(parts[:end]) or "/"
            try:
                mode = os.stat(component).st_mode
            except OSError:
                return None
            if not mode & stat.S_IXOTH:
                return component, stat.S_IMODE(mode)
    return None


def _run_probe(python: str, account: Account) -> str | None:
    """None if ``account`` could import mep with ``python``, else what went wrong."""
    plan = SpawnPlan(account=account, argv=[python, "-c", _PROBE], stdin_data=b"", log_path="",
                     title="the interpreter check")
    try:
        status, said = run_for_answer(plan, timeout=PROBE_TIMEOUT_SECONDS, limit=4096)
    except SpawnError as exc:
        return str(exc)
    if status == 0:
        return None
    output = said.decode("utf-8", "replace") or "no output"
    return f"'{python} -c \"import mep\"' as {account.name} exited with status {status} ({output})"

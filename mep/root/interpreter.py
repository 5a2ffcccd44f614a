"""Prove at manager start that other accounts can run this mep installation.

A virtual environment under a 0700 directory (a pyenv interpreter in /root,
say) works for root and fails inside every user endpoint. The manager runs
``import mep`` with this interpreter as an unprivileged account, through the
same checked drop as a real endpoint (``privdrop.spawn``), and refuses to start
with a message naming the directory that blocks other accounts.
"""

from __future__ import annotations

import os
import pwd
import select
import shutil
import signal
import stat
import tempfile

from mep.root.errors import ConfigurationError, SpawnError
from mep.root.accounts import Account
from mep.root.privdrop import SpawnPlan, read_log_tail, spawn

PROBE_TIMEOUT_SECONDS = 60
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
    failure = _run_probe(python, _probe_account(probe_account))
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


def _probe_account(name: str) -> Account:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigurationError(
            f"the account {name!r} used to check that other accounts can run mep does not exist"
        ) from None
    return Account.from_passwd(entry)


def _run_probe(python: str, account: Account) -> str | None:
    """None if ``account`` could import mep with ``python``, else what went wrong."""
    # The probe account usually has no home (nobody's is /nonexistent): give
    # its log a private directory it owns, in a place every account can reach.
    workdir = tempfile.mkdtemp(prefix="mep-interpreter-probe-", dir="/tmp")
    try:
        os.chown(workdir, account.uid, account.gid)
        log_path = os.path.join(workdir, "probe.log")
        plan = SpawnPlan(
            account=account,
            argv=[python, "-c", "import mep"],
            stdin_data=b"",
            log_path=log_path,
            title="the interpreter check",
        )
        try:
            child = spawn(plan)
        except SpawnError as exc:
            return str(exc)
        status = _wait(child.pid, child.pidfd)
        if status == 0:
            return None
        output = read_log_tail(account, log_path, max_lines=1) or "no output"
        return f"'{python} -c \"import mep\"' as {account.name} exited with status {status} ({output})"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _wait(pid: int, pidfd: int) -> int:
    """The probe's exit code (negative for a signal); killed if it outlives the timeout."""
    try:
        ready, _, _ = select.select([pidfd], [], [], PROBE_TIMEOUT_SECONDS)
        if not ready:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(pidfd)
    return os.waitstatus_to_exitcode(status)

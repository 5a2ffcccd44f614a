"""The PAM session holder: a small root process per user endpoint, as su and runuser hold a login session.

Session modules change the process that calls them (limits, keyrings,
namespaces, credentials), so the long-lived spawner never calls them: for
each endpoint it execs this module fresh (``start_session_holder``), in a
session of its own, with no descriptor but a request on stdin and a report
pipe on fd 3. The holder then runs, in order:

``pam_start(service, account)`` → ``pam_acct_mgmt`` → ``pam_setcred(ESTABLISH)``
→ ``pam_open_session`` → fork, drop and exec the endpoint (``privdrop.spawn``,
with the variables PAM exported, filtered by the same rules as any extra
environment) → report the endpoint's pid on fd 3 → wait for it, forwarding
SIGTERM/SIGINT/SIGHUP/SIGQUIT → ``pam_close_session`` → ``pam_setcred(DELETE)``
→ ``pam_end`` → exit with the endpoint's status (dying of the same signal).
A step that fails undoes the ones before it, in reverse order, and only then
is reported on fd 3 (``HolderReport``); the spawner raises what it says. No
signal handler runs in the holder: the signals it passes on stay blocked and
are taken one at a time with ``sigwait`` in its wait loop.

There is no ``pam_authenticate``: the identity comes from the mapping.

Before ``pam_setcred`` the holder sets the account's own groups (as su's
``initgroups``), so modules such as ``pam_group`` add to them; the groups the
endpoint gets are then read back, and root's group is refused.

The spawner watches the holder's pidfd: the holder's exit is the endpoint's.
It also holds the endpoint's own pidfd, for the one case where they differ:
a holder killed while its endpoint runs. The endpoint is then kept (watched
as an adopted one), told to finish its tasks and exit, and its exit is
reported once; its session is never closed (the PAM handle died with the
holder). The holder is not killed when the spawner exits, so the endpoint and
its session outlive a crash or restart of the manager; the session closes
when the endpoint ends.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import signal
import sys
import time
from contextlib import ExitStack, suppress
from typing import NamedTuple, NoReturn

import msgspec
from setproctitle import setproctitle

from mep.root.config import PamSettings
from mep.root.errors import SpawnError
from mep.root.accounts import AccountRefused, unprivileged_account
from mep.root.logs import setup_logging
from mep.root.pam import (PAM_DELETE_CRED, PAM_ESTABLISH_CRED, PAM_NEW_AUTHTOK_REQD, PAM_RUSER, REFUSED_BY_PAM,
                          PamError, PamHandle)
from mep.root.privdrop import DropStepError, SpawnPlan, allowed_environment, end_process_group, read_bounded, spawn

log = logging.getLogger("mep.session")

REPORT_FD = 3
#: From the spawner: the endpoint is hung, SIGKILL its process group (the holder, its parent, can check it is there).
KILL_ENDPOINT_SIGNAL = signal.SIGUSR1
# Blocked from the start, so they wait (pending) until there is an endpoint to pass them to (SIGCHLD too).
_HELD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, KILL_ENDPOINT_SIGNAL, signal.SIGCHLD)


class HolderRequest(msgspec.Struct, forbid_unknown_fields=True):
    """What the spawner hands the holder on stdin (the plan holds the endpoint's secret: stdin only)."""

    pam: PamSettings
    requested_by: str  # PAM_RUSER: the account the manager runs as
    plan: SpawnPlan


class HolderReport(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The holder's one message on fd 3: its endpoint's pid, or why it started nothing."""

    endpoint_pid: int = 0
    refused: bool = False  # by pam_acct_mgmt: the account is refused (``AccountRefused`` words the message)
    message: str = ""  # for the submitter
    detail: str = ""  # for the admin's log
    drop_step: str = ""  # the step of the privilege drop that failed (``DropStepError``)


class HeldEndpoint(NamedTuple):
    """An endpoint running under a session holder; wait on ``pidfd`` (the holder's) and close it."""

    holder_pid: int
    pidfd: int
    endpoint_pid: int


# --- the spawner's side ------------------------------------------------------------------


def start_session_holder(plan: SpawnPlan, pam: PamSettings) -> HeldEndpoint:
    """Exec a holder for ``plan`` and return once its endpoint runs; raises ``AccountRefused`` or ``SpawnError``.

    The holder starts through ``privdrop.spawn`` without a drop (it stays root) and without no_new_privs
    (it could not be undone for an endpoint that needs setuid helpers): request on stdin, report pipe at
    fd 3 (``REPORT_FD``), our stderr at fd 4 for its log lines.
    """
    ours = unprivileged_account(None, "the spawner's own account")
    request = HolderRequest(pam=pam, requested_by=ours.name, plan=plan)
    stderr = () if sys.stderr is None else (2,)  # None: this daemon started with fd 2 closed
    report_read, report_write = os.pipe()  # not inherited (PEP 446): spawn passes the holder a copy at fd 3
    with open(report_read, "rb", buffering=0) as reader:
        with open(report_write, "wb", buffering=0):  # ours is closed once the holder has its copy
            holder = spawn(SpawnPlan(account=ours, argv=[sys.executable, "-I", "-m", __name__],
                                     stdin_data=msgspec.json.encode(request), log_path="", drop_privileges=False,
                                     title=f"the session holder for {plan.account.name}",
                                     pass_fds=(report_write, *stderr), no_new_privs=False))
        data = read_bounded(reader.fileno(), time.monotonic() + pam.timeout, 65536)  # a report is a few KiB at most
    try:
        report = msgspec.json.decode(data or b"", type=HolderReport)
    except msgspec.MsgspecError:  # nothing before end-of-file or the deadline, or not a report
        report = HolderReport(
            message=f"could not start a session for {plan.account.name} on this endpoint; ask your admin",
            detail=f"the PAM session holder for {plan.account.name} (service {pam.service}) gave no report within"
            f" {pam.timeout:g} s or exited first; see its lines in this log")
    if report.endpoint_pid:
        return HeldEndpoint(holder_pid=holder.pid, pidfd=holder.pidfd, endpoint_pid=report.endpoint_pid)
    # It failed (and undid its steps before it said so), or was silent or too slow: it must not start anything later.
    end_process_group(holder)
    if report.refused:
        raise AccountRefused(plan.account.name, REFUSED_BY_PAM, report.detail)
    if report.drop_step:
        raise DropStepError(report.message, step=report.drop_step, errno=None)
    error = SpawnError(report.message)
    error.admin_detail = report.detail
    raise error


# --- the holder's side ---------------------------------------------------------------------


def main() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)  # until _wait_forwarding_signals takes them
    # fd 4, the spawner's stderr, becomes ours (left open: it is the same file); without it, /dev/null stays.
    with suppress(OSError):
        os.dup2(4, 2)
    os.environ["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # for the programs PAM runs
    setup_logging(verbose=False)
    code = 1  # the holder's own failures end like an endpoint that exited with status 1
    try:
        # Read to its end (the spawner wrote it all and closed its end): the modules' programs find only EOF.
        request = msgspec.json.decode(sys.stdin.buffer.read(), type=HolderRequest)
        who = f"{request.plan.account.name} (service {request.pam.service})"
        setproctitle(f"mep-session {request.plan.account.name} {request.plan.title}")
        code = _hold(request, who)
    except PamError as error:  # the session (whatever of it was open) is closed by now
        _report(HolderReport(refused=error.step == "pam_acct_mgmt", detail=f"PAM for {who}: {error.detail}",
                             message=f"could not open a session for {request.plan.account.name} on this endpoint"
                             f" ({error.step} failed); ask your admin"))
    except SpawnError as error:  # the endpoint could not start: a DropStepError names the step that failed
        _report(HolderReport(message=str(error), drop_step=getattr(error, "step", "")))
    # Any other exception is a bug: Python prints its traceback here (the spawner's log) and exits with status 1,
    # and the spawner, without a report, points the admin at these lines.
    _exit_like(code)


def _hold(request: HolderRequest, who: str) -> int:
    """The PAM steps around the endpoint, in order; returns its exit code (-N: signal N killed it).

    Raises ``PamError`` or ``SpawnError``, once the steps that succeeded are undone.
    """
    account = request.plan.account
    # On the way out, however it goes: the steps that succeeded are undone in reverse order, then pam_end.
    with PamHandle(request.pam.service, account.name, library=request.pam.library) as pam, ExitStack() as opened:
        pam.call("pam_set_item", PAM_RUSER, request.requested_by.encode())
        pam.call("pam_acct_mgmt", 0, accept=PAM_NEW_AUTHTOK_REQD)  # a password that has only aged: mep uses none
        os.setgroups(account.groups)  # as su's initgroups: pam_setcred's modules add to the account's groups
        pam.call("pam_setcred", PAM_ESTABLISH_CRED)
        opened.callback(_undo, pam, who, "pam_setcred", PAM_DELETE_CRED)
        pam.call("pam_open_session", 0)
        opened.callback(_undo, pam, who, "pam_close_session", 0)
        groups = tuple(os.getgroups())  # the account's, and what pam_group added
        if 0 in groups:
            raise PamError("pam_setcred", 0, "a module added the root group (gid 0); refusing", pam.messages)
        environment, refused = allowed_environment(pam.environment())
        for problem in refused:
            log.warning("not passing a PAM variable to the endpoint of %s: %s", who, problem)
        # The holder passes on no descriptor of its own; the environment is PAM's, checked like any extra_env.
        child = spawn(dataclasses.replace(request.plan, account=dataclasses.replace(account, groups=groups),
                                          extra_env=environment, pass_fds=()))
        os.close(child.pidfd)  # only _wait_forwarding_signals reaps it, so its pid stays its own until then
        _report(HolderReport(endpoint_pid=child.pid))  # the spawner logs that it started
        code = os.waitstatus_to_exitcode(_wait_forwarding_signals(child.pid))
    log.info("PAM session for %s closed; endpoint pid %d %s", who, child.pid,
             f"exited with status {code}" if code >= 0 else f"was killed by signal {-code}")
    return code


def _wait_forwarding_signals(pid: int) -> int:
    """Wait for the endpoint, passing on the signals the holder gets; returns its wait status.

    ``KILL_ENDPOINT_SIGNAL`` becomes SIGKILL for the endpoint's whole process
    group (it leads its own session). No handler runs: the signals stay blocked
    and are taken here, one at a time, so the endpoint is not reaped while one
    is sent and its pid and group id can't belong to anyone else.
    """
    while True:
        signum = signal.sigwait(_HELD_SIGNALS)
        if signum == KILL_ENDPOINT_SIGNAL:
            os.killpg(pid, signal.SIGKILL)
        elif signum != signal.SIGCHLD:
            os.kill(pid, signum)
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped:
            return status


def _undo(pam: PamHandle, who: str, function: str, flags: int) -> None:
    """One step of ending the session; a failure is logged and the steps before it still run."""
    try:
        pam.call(function, flags)
    except PamError as error:
        log.warning("ending the PAM session of %s: %s", who, error.detail)


def _report(report: HolderReport) -> None:
    """The one report to the spawner; should it have exited meanwhile (EPIPE), the holder goes on all the same."""
    with suppress(BrokenPipeError), open(REPORT_FD, "wb") as pipe:
        pipe.write(msgspec.json.encode(report))


def _exit_like(code: int) -> NoReturn:
    """Exit as the endpoint did (``code`` from ``_hold``), so the spawner sees the endpoint's end in the holder's."""
    if code < 0:  # killed by signal -code: die of it too, without a core dump of this root process
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        with suppress(OSError):  # SIGKILL, the one signal with no disposition to reset
            signal.signal(-code, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [-code])
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 128 - code)  # 128 + the signal only if it did not end this process


if __name__ == "__main__":
    main()

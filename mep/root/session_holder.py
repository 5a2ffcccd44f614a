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
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from setproctitle import setproctitle

from mep.root.config import PamSettings
from mep.root.errors import SpawnError
from mep.root.accounts import AccountRefused, unprivileged_account
from mep.root.pam import PAM_NEW_AUTHTOK_REQD, PAM_RUSER, PamError, PamHandle
from mep.root.privdrop import DropStepError, SpawnPlan, allowed_environment, pipe_above, read_bounded, spawn

log = logging.getLogger("mep.session")

REPORT_FD = 3
_STDERR_FD = 4  # the spawner's stderr, passed on
_MAX_REPORT_BYTES = 65536
_FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
#: From the spawner: the endpoint is hung, SIGKILL its process group (the holder, its parent, can check it is there).
KILL_ENDPOINT_SIGNAL = signal.SIGUSR1
# For the programs PAM modules run (pam_exec, pam_mkhomedir's helper): root's usual PATH.
_HOLDER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What waitpid reports for "exited with status 1": the holder's own failures end like that.
_FAILED_WAIT_STATUS = 1 << 8


class HolderRequest(msgspec.Struct, forbid_unknown_fields=True):
    """What the spawner hands the holder on stdin (the plan holds the endpoint's secret: stdin only)."""

    pam: PamSettings
    requested_by: str  # PAM_RUSER: the account the manager runs as
    plan: SpawnPlan


class HolderReport(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The holder's one message on fd 3. ``outcome``: started, refused, session_failed or spawn_failed."""

    outcome: str
    endpoint_pid: int = 0
    detail: str = ""  # for the admin's log
    step: str = ""
    errno: int = 0


@dataclass(frozen=True)
class HeldEndpoint:
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
    report_read, report_write = pipe_above()
    try:
        try:
            holder = spawn(SpawnPlan(account=ours, argv=[sys.executable, "-I", "-m", __name__],
                                     stdin_data=msgspec.json.encode(request), log_path="", drop_privileges=False,
                                     title=f"the session holder for {plan.account.name}",
                                     pass_fds=(report_write, *_stderr()), no_new_privs=False))
        finally:
            os.close(report_write)
        report = _read_report(report_read, pam.timeout)
    finally:
        os.close(report_read)
    if report is not None and report.outcome == "started":
        return HeldEndpoint(holder_pid=holder.pid, pidfd=holder.pidfd, endpoint_pid=report.endpoint_pid)
    if report is None:  # silent or too slow: it must not start anything later
        signal.pidfd_send_signal(holder.pidfd, signal.SIGKILL)
    _, status = os.waitpid(holder.pid, 0)
    os.close(holder.pidfd)
    raise _failure(plan.account.name, report, status, pam)


def _stderr() -> tuple[int, ...]:
    """Our stderr, for the holder's log lines, if we have one (a daemon may run with it closed)."""
    try:
        os.fstat(2)
    except OSError:
        return ()
    return (2,)


def _read_report(fd: int, timeout: float) -> HolderReport | None:
    """The holder's report, or None if it said nothing valid before EOF or the deadline."""
    data = read_bounded(fd, time.monotonic() + timeout, _MAX_REPORT_BYTES)
    try:
        return msgspec.json.decode(data, type=HolderReport) if data else None
    except msgspec.MsgspecError:
        return None


def _failure(account: str, report: HolderReport | None, status: int, pam: PamSettings) -> Exception:
    if report is not None and report.outcome == "refused":
        return AccountRefused(account, "is refused by this system's account checks (PAM)", report.detail)
    if report is not None and report.outcome == "spawn_failed":
        return DropStepError(report.detail, step=report.step, errno=report.errno or None)
    if report is None:
        error = SpawnError(f"could not start a session for {account} on this endpoint; ask your admin")
        error.admin_detail = (
            f"the PAM session holder for {account} (service {pam.service}) gave no report within"
            f" {pam.timeout:g} s or exited first (wait status {status}); see its lines in this log"
        )
        return error
    error = SpawnError(f"could not open a session for {account} on this endpoint ({report.step} failed);"
                       " ask your admin")
    error.admin_detail = report.detail
    return error


# --- the holder's side ---------------------------------------------------------------------


def _forward_signals(pid: int, pidfd: int) -> None:
    """Send the endpoint the signals the holder gets, through its pidfd; until now they were blocked (pending).

    ``KILL_ENDPOINT_SIGNAL`` becomes SIGKILL for the endpoint's whole process
    group (it leads its own session). The pidfd check first proves the
    endpoint is not reaped yet, so its group id can't belong to anyone else:
    only this thread reaps it, and not while this handler runs.
    """
    def forward(signum: int, _frame: object) -> None:
        try:
            if signum == KILL_ENDPOINT_SIGNAL:
                signal.pidfd_send_signal(pidfd, 0)
                os.killpg(pid, signal.SIGKILL)
            else:
                signal.pidfd_send_signal(pidfd, signum)
        except ProcessLookupError:
            pass  # already exited; the wait returns

    for signum in (*_FORWARDED_SIGNALS, KILL_ENDPOINT_SIGNAL):
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (*_FORWARDED_SIGNALS, KILL_ENDPOINT_SIGNAL))


def _report(report: HolderReport) -> None:
    data = msgspec.json.encode(report)
    try:
        while data:
            data = data[os.write(REPORT_FD, data):]
    except OSError as error:
        log.warning("could not report to the spawner (%s); it may have exited", os.strerror(error.errno))
    finally:
        os.close(REPORT_FD)


def _hold(request: HolderRequest) -> int:
    with PamHandle(request.pam.service, request.plan.account.name, library=request.pam.library) as pam:
        return _run_session(pam, request)


def _run_session(pam: PamHandle, request: HolderRequest) -> int:
    account = request.plan.account
    who = f"{account.name} (service {request.pam.service})"
    try:
        pam.set_item(PAM_RUSER, request.requested_by)
        if pam.account_management() == PAM_NEW_AUTHTOK_REQD:
            log.info("PAM says the password of %s has aged; mep uses no password, so the session proceeds", who)
    except PamError as error:
        _report(HolderReport(outcome="refused", step=error.step, detail=f"PAM refused {who}: {error.detail}"))
        return _FAILED_WAIT_STATUS
    opened: list[Callable[[], None]] = []  # how to undo each step that succeeded, in order
    try:
        os.setgroups(account.groups)  # as su's initgroups: pam_setcred's modules add to the account's groups
        pam.establish_credentials()
        opened.append(pam.delete_credentials)
        pam.open_session()
        opened.append(pam.close_session)
        groups = tuple(sorted(set(os.getgroups())))
        if 0 in groups:
            raise PamError("pam_setcred", 0, "a module added the root group (gid 0); refusing", pam.messages)
        environment, refused = allowed_environment(pam.environment())
        for problem in refused:
            log.warning("not passing a PAM variable to the endpoint of %s: %s", who, problem)
        # The holder passes on no descriptor of its own; the environment is PAM's, checked like any extra_env.
        child = spawn(dataclasses.replace(request.plan, account=dataclasses.replace(account, groups=groups),
                                          extra_env=environment, pass_fds=()))
    except (PamError, SpawnError) as error:
        if isinstance(error, PamError):
            _report(HolderReport(outcome="session_failed", step=error.step, detail=f"PAM for {who}: {error.detail}"))
        else:
            step, code = (error.step, error.errno or 0) if isinstance(error, DropStepError) else ("", 0)
            _report(HolderReport(outcome="spawn_failed", step=step, errno=code, detail=str(error)))
        _end_session(who, opened)
        return _FAILED_WAIT_STATUS
    _report(HolderReport(outcome="started", endpoint_pid=child.pid))
    _forward_signals(child.pid, child.pidfd)
    log.info("PAM session for %s open; endpoint pid %d", who, child.pid)
    _, status = os.waitpid(child.pid, 0)
    signal.pthread_sigmask(signal.SIG_BLOCK, (*_FORWARDED_SIGNALS, KILL_ENDPOINT_SIGNAL))  # nothing to forward to
    os.close(child.pidfd)
    _end_session(who, opened)
    log.info("PAM session for %s closed; endpoint pid %d %s", who, child.pid, _describe(status))
    return status


def _end_session(who: str, opened: list[Callable[[], None]]) -> None:
    """Close what was opened, in reverse order; a failure is logged, the rest still runs."""
    for step in reversed(opened):
        try:
            step()
        except PamError as error:
            log.warning("ending the PAM session of %s: %s", who, error.detail)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _exit_like(status: int) -> None:
    """Exit as the endpoint did, so the spawner's view of the holder is its view of the endpoint."""
    logging.shutdown()
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        if signum not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no disposition to reset
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def main() -> None:
    # Signals for the endpoint wait, pending, until it runs (_forward_signals).
    signal.pthread_sigmask(signal.SIG_BLOCK, (*_FORWARDED_SIGNALS, KILL_ENDPOINT_SIGNAL))
    try:
        os.dup2(_STDERR_FD, 2)
        os.close(_STDERR_FD)
    except OSError:
        pass  # the spawner has no stderr: stay on /dev/null
    os.environ["PATH"] = _HOLDER_PATH
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    try:
        request = msgspec.json.decode(sys.stdin.buffer.read(), type=HolderRequest)
    except msgspec.MsgspecError as error:
        log.error("unreadable request from the spawner: %s", error)
        os._exit(1)
    # The request held the endpoint's secret; stdin is done with.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    setproctitle(f"mep-session {request.plan.account.name} {request.plan.title}")
    try:
        status = _hold(request)
    except PamError as error:  # pam_start itself
        _report(HolderReport(outcome="session_failed", step=error.step, detail=error.detail))
        status = _FAILED_WAIT_STATUS
    except Exception:  # a bug: the spawner sees no report and points the admin at these lines
        log.exception("the session holder failed")
        status = _FAILED_WAIT_STATUS
    _exit_like(status)


if __name__ == "__main__":
    main()

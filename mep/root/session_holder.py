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
import pwd
import resource
import signal
import sys
import time
from dataclasses import dataclass

import msgspec
from setproctitle import setproctitle

from mep.root.errors import SpawnError
from mep.root.accounts import Account, AccountRefused
from mep.root.pam import DEFAULT_LIBRARY, DEFAULT_SERVICE, PAM_NEW_AUTHTOK_REQD, PAM_RUSER, PamError, PamHandle
from mep.root.privdrop import (
    RESETTABLE_SIGNALS,
    DropStepError,
    SpawnPlan,
    allowed_environment,
    pipe_above,
    preload_pipe,
    read_bounded,
    spawn,
)

log = logging.getLogger("mep.session")

REPORT_FD = 3
_MAX_REPORT_BYTES = 65536
_FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
#: From the spawner: the endpoint is hung, SIGKILL its process group (the holder, its parent, can check it is there).
KILL_ENDPOINT_SIGNAL = signal.SIGUSR1
_HOLDER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Above stdin and the report fd, so the dup2 file actions can never act on themselves.
_LOWEST_PARENT_FD = 10
# What waitpid reports for "exited with status 1": the holder's own failures end like that.
_FAILED_WAIT_STATUS = 1 << 8


@dataclass(frozen=True)
class PamSettings:
    """``pam:`` in the manager's config."""

    service: str = DEFAULT_SERVICE
    library: str = DEFAULT_LIBRARY
    timeout: float = 30.0  # how long the spawner waits for account and session management


class HolderRequest(msgspec.Struct, forbid_unknown_fields=True):
    """What the spawner hands the holder on stdin (it holds the endpoint's secret: stdin only)."""

    service: str
    library: str
    requested_by: str  # PAM_RUSER: the account the manager runs as
    account: dict
    argv: list[str]
    stdin_data: bytes
    log_path: str
    title: str
    resource_limits: list[tuple[str, int]] = []
    no_new_privs: bool = True


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
    """Exec a holder for ``plan`` and return once its endpoint runs; raises ``AccountRefused`` or ``SpawnError``."""
    account = plan.account
    request = HolderRequest(
        service=pam.service, library=pam.library, requested_by=_own_name(), account=dataclasses.asdict(account),
        argv=list(plan.argv), stdin_data=plan.stdin_data, log_path=plan.log_path, title=plan.title,
        resource_limits=list(plan.resource_limits), no_new_privs=plan.no_new_privs,
    )
    argv = [sys.executable, "-I", "-m", __name__]
    stdin_read, stdin_write = pipe_above(_LOWEST_PARENT_FD)
    report_read, report_write = pipe_above(_LOWEST_PARENT_FD)
    try:
        preload_pipe(stdin_write, msgspec.json.encode(request), "the session holder")
        os.close(stdin_write)
        stdin_write = -1
        pid = os.posix_spawn(
            sys.executable, argv, {"PATH": _HOLDER_PATH, "LANG": os.environ.get("LANG", "C.UTF-8")},
            file_actions=[(os.POSIX_SPAWN_DUP2, stdin_read, 0), (os.POSIX_SPAWN_DUP2, report_write, REPORT_FD)],
            setsid=True, setsigmask=(), setsigdef=RESETTABLE_SIGNALS,
        )
    except (OSError, SpawnError) as error:  # SpawnError: the request does not fit the pipe
        os.close(report_read)
        if isinstance(error, SpawnError):
            raise
        raise SpawnError(f"cannot start a session holder for {account.name}: {error}") from None
    finally:
        for fd in (stdin_read, stdin_write, report_write):
            if fd != -1:
                os.close(fd)
    pidfd = os.pidfd_open(pid)
    try:
        report = _read_report(report_read, pam.timeout)
    finally:
        os.close(report_read)
    if report is not None and report.outcome == "started":
        return HeldEndpoint(holder_pid=pid, pidfd=pidfd, endpoint_pid=report.endpoint_pid)
    if report is None:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # silent or too slow: it must not start anything later
    _, status = os.waitpid(pid, 0)
    os.close(pidfd)
    raise _failure(account, report, status, pam)


def _read_report(fd: int, timeout: float) -> HolderReport | None:
    """The holder's report, or None if it said nothing valid before EOF or the deadline."""
    data = read_bounded(fd, time.monotonic() + timeout, _MAX_REPORT_BYTES)
    try:
        return msgspec.json.decode(data, type=HolderReport) if data else None
    except msgspec.MsgspecError:
        return None


def _failure(account: Account, report: HolderReport | None, status: int, pam: PamSettings) -> Exception:
    if report is None:
        error = SpawnError(f"could not start a session for {account.name} on this endpoint; ask your admin")
        error.admin_detail = (
            f"the PAM session holder for {account.name} (service {pam.service}) gave no report within"
            f" {pam.timeout:g} s or exited first (wait status {status}); see its lines in this log"
        )
        return error
    if report.outcome == "refused":
        return AccountRefused(
            account.name, "is refused by this system's account checks (PAM)", report.detail
        )
    if report.outcome == "spawn_failed":
        return DropStepError(report.detail, step=report.step, errno=report.errno or None)
    error = SpawnError(
        f"could not open a session for {account.name} on this endpoint ({report.step} failed); ask your admin"
    )
    error.admin_detail = report.detail
    return error


def _own_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


# --- the holder's side ---------------------------------------------------------------------


class _Forwarder:
    """Signals for the endpoint: remembered until it exists, then sent through its pidfd.

    ``KILL_ENDPOINT_SIGNAL`` becomes SIGKILL for the endpoint's whole process
    group (it leads its own session). The pidfd check first proves the
    endpoint is not reaped yet, so its group id can't belong to anyone else:
    only this thread reaps it, and not while this handler runs.
    """

    def __init__(self) -> None:
        self.pidfd = -1
        self.pid = 0
        self.pending: list[int] = []
        for signum in (*_FORWARDED_SIGNALS, KILL_ENDPOINT_SIGNAL):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.pidfd == -1:
            self.pending.append(signum)
            return
        try:
            if signum == KILL_ENDPOINT_SIGNAL:
                signal.pidfd_send_signal(self.pidfd, 0)
                os.killpg(self.pid, signal.SIGKILL)
            else:
                signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass  # already exited; the wait returns

    def attach(self, pid: int, pidfd: int) -> None:
        self.pid, self.pidfd = pid, pidfd
        for signum in self.pending:
            self._handle(signum, None)

    def detach(self) -> None:
        self.pidfd = -1


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
    account = Account(**{**request.account, "groups": tuple(request.account["groups"])})
    forwarder = _Forwarder()
    pam = PamHandle(request.service, account.name, library=request.library)
    try:
        return _run_session(pam, request, account, forwarder)
    finally:
        pam.end()


def _run_session(pam: PamHandle, request: HolderRequest, account: Account, forwarder: _Forwarder) -> int:
    who = f"{account.name} (service {request.service})"
    try:
        pam.set_item(PAM_RUSER, request.requested_by)
        if pam.account_management() == PAM_NEW_AUTHTOK_REQD:
            log.info("PAM says the password of %s has aged; mep uses no password, so the session proceeds", who)
    except PamError as error:
        _report(HolderReport(outcome="refused", step=error.step, detail=f"PAM refused {who}: {error.detail}"))
        return _FAILED_WAIT_STATUS
    credentials = session = False
    try:
        os.setgroups(account.groups)  # as su's initgroups: pam_setcred's modules add to the account's groups
        pam.establish_credentials()
        credentials = True
        pam.open_session()
        session = True
        groups = tuple(sorted(set(os.getgroups())))
        if 0 in groups:
            raise PamError("pam_setcred", 0, "a module added the root group (gid 0); refusing", pam.messages)
        environment, refused = allowed_environment(pam.environment())
        for problem in refused:
            log.warning("not passing a PAM variable to the endpoint of %s: %s", who, problem)
        child = spawn(SpawnPlan(
            account=dataclasses.replace(account, groups=groups), argv=request.argv,
            stdin_data=request.stdin_data, log_path=request.log_path, extra_env=environment, title=request.title,
            resource_limits=tuple(map(tuple, request.resource_limits)), no_new_privs=request.no_new_privs,
        ))
    except PamError as error:
        _report(HolderReport(outcome="session_failed", step=error.step, detail=f"PAM for {who}: {error.detail}"))
        _end_session(pam, who, session=session, credentials=credentials)
        return _FAILED_WAIT_STATUS
    except SpawnError as error:
        step = error.step if isinstance(error, DropStepError) else ""
        code = error.errno if isinstance(error, DropStepError) and error.errno else 0
        _report(HolderReport(outcome="spawn_failed", step=step, errno=code, detail=str(error)))
        _end_session(pam, who, session=session, credentials=credentials)
        return _FAILED_WAIT_STATUS
    _report(HolderReport(outcome="started", endpoint_pid=child.pid))
    forwarder.attach(child.pid, child.pidfd)
    log.info("PAM session for %s open; endpoint pid %d", who, child.pid)
    _, status = os.waitpid(child.pid, 0)
    forwarder.detach()
    os.close(child.pidfd)
    _end_session(pam, who, session=True, credentials=True)
    log.info("PAM session for %s closed; endpoint pid %d %s", who, child.pid, _describe(status))
    return status


def _end_session(pam: PamHandle, who: str, *, session: bool, credentials: bool) -> None:
    """Close what was opened, in reverse order; a failure is logged, the rest still runs."""
    steps = ([pam.close_session] if session else []) + ([pam.delete_credentials] if credentials else [])
    for step in steps:
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
    setproctitle(f"mep-session {request.account['name']} {request.title}")
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

"""Start a process as another account, the checked way su, runuser and OpenSSH do it.

This module owns the path from "the spawner decided to start this program as
this account" to "a fresh interpreter runs as that account" (items 8-17 of
the root-spawner checklist): ``spawn`` forks, and the child runs the ordered
steps of ``CHILD_STEPS``, each a module-level function that does one thing and
checks it, ending in ``execve``.

Between fork and exec the child calls only os-level functions on values
computed before the fork (``ChildSetup``): no NSS lookups, no logging, no
ZeroMQ, no SQLite, nothing that takes a lock another thread may have held at
fork time. Signals are blocked and the garbage collector is off across the
fork, so no handler or finaliser of the parent's objects runs in the child,
and the child can never return into the caller's code: every path ends in
``execve`` or ``os._exit``.

A failed step is reported the way CPython's ``subprocess`` does it: the child
writes ``step NUL errno NUL message`` to a close-on-exec pipe and exits with
the step's status from ``CHILD_STEPS``; end-of-file on that pipe with nothing
written means the exec succeeded.

Root never opens a file in the account's home: the endpoint's log is created
by the child after the drop, and ``read_log_tail`` reads it in a child dropped
to the account. A link the user planted there reaches only what the account
could read or write anyway.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import gc
import os
import re
import resource
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import NoReturn

from mep.root.accounts import Account
from mep.root.config import EndpointLimits
from mep.root.errors import SpawnError

# Keys the spawner sets itself; extra_env may not redefine who the process is.
_RESERVED_ENV = frozenset({"HOME", "USER", "LOGNAME", "SHELL", "PATH", "LANG"})
# Locale names such as C, POSIX, C.UTF-8, en_US.UTF-8, de_DE@euro: anything
# else in the manager's LANG is replaced rather than handed to every endpoint.
_SANE_LOCALE = re.compile(r"(C|POSIX|[a-z]{2,3}_[A-Z]{2})(\.[A-Za-z0-9-]{1,20})?(@[a-z]{1,20})?")

_MAX_STDIN_BYTES = 1 << 20  # a pipe is grown to this for a large stdin (a mapping file), never further

_CAP_LAST_CAP = int(Path("/proc/sys/kernel/cap_last_cap").read_text())  # the highest capability this kernel knows
_NR_OPEN = int(Path("/proc/sys/fs/nr_open").read_text())  # every descriptor number is below it, whatever the rlimits
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38

# prctl is the one call the os module lacks.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class DropStepError(SpawnError):
    """A step between fork and exec failed; ``step`` is the name of one of ``CHILD_STEPS``."""

    def __init__(self, message: str, *, step: str, errno: int | None) -> None:
        super().__init__(message)
        self.step = step
        self.errno = errno


class _CheckFailed(Exception):
    """A step's own check (not a system call) refused to continue."""


@dataclasses.dataclass(frozen=True)
class SpawnPlan:
    """What to start, as whom, with which secrets and where its output goes.

    ``argv[0]`` is the absolute path of the program (no PATH search).
    ``stdin_data`` reaches the child through a pipe on fd 0 (secrets travel
    there, never in argv or the environment) and must fit the pipe's buffer.
    ``log_path`` is absolute: the child creates it and its missing directories
    (0700) as the account, after the drop, so only a child that drops (or
    single-user mode) may have one; "" sends stdout and stderr to
    ``/dev/null``. ``extra_env`` may not contain ``LD_*`` or ``PYTHON*`` keys,
    redefine the variables the spawner sets, or hold NUL bytes.
    ``drop_privileges=False`` is single-user mode: the caller already runs as
    ``account`` and every step but the drop still applies. ``title`` names
    the process in error messages. ``pass_fds`` are the parent's descriptors
    the child gets at 3, 4, ... in that order (every other one is closed).
    ``resource_limits``: (``RLIMIT_*`` name, value) pairs set as soft and hard
    limit before exec, each only ever lowered (see ``resource_limits``).
    ``no_new_privs=False`` leaves the capability bounding set and lets setuid
    programs gain privileges, for a scheduler's setuid client.
    """

    account: Account
    argv: list[str]
    stdin_data: bytes
    log_path: str
    extra_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    drop_privileges: bool = True
    title: str = "the endpoint"
    pass_fds: tuple[int, ...] = ()
    resource_limits: tuple[tuple[str, int], ...] = ()
    no_new_privs: bool = True


@dataclasses.dataclass(frozen=True)
class SpawnedProcess:
    """A child that exec'd successfully; the caller polls ``pidfd`` for its exit and closes it."""

    pid: int
    pidfd: int


@dataclasses.dataclass(frozen=True)
class ChildSetup:
    """Everything the child needs between fork and exec, computed before the fork (no NSS lookup mid-drop)."""

    plan: SpawnPlan
    stdin_fd: int
    error_fd: int
    pass_fds: tuple[int, ...]  # copies of plan.pass_fds above 2 + len(pass_fds): moving them to 3, 4, ... clobbers none
    env: Mapping[str, str]
    steps: tuple[Callable[[ChildSetup], None], ...]


# --- The child's steps, in order (CHILD_STEPS) -----------------------------------------


def attach_stdin(setup: ChildSetup) -> None:
    """Make the parent's pipe fd 0 before anything can fail, so nothing reads the manager's stdin."""
    os.dup2(setup.stdin_fd, 0)


def reset_signals(setup: ChildSetup) -> None:
    """Restore default dispositions and an empty mask: ignored signals and the mask survive exec."""
    for signum in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def new_session(setup: ChildSetup) -> None:
    """Leave the manager's session and process group; this also drops any controlling terminal."""
    os.setsid()


def set_gid(setup: ChildSetup) -> None:
    """Real, effective and saved gid, before the uid (a non-root process can't change gids)."""
    os.setresgid(setup.plan.account.gid, setup.plan.account.gid, setup.plan.account.gid)


def set_groups(setup: ChildSetup) -> None:
    """Replace root's supplementary groups with the account's list, resolved before the fork.

    ``initgroups`` would do an NSS lookup (sssd, LDAP sockets, locks) in the
    forked child; the list was computed by the parent instead.
    """
    os.setgroups(setup.plan.account.groups)


def drop_bounding_set(setup: ChildSetup) -> None:
    """Empty the capability bounding set while CAP_SETPCAP is still held.

    Together with no_new_privs this means no program the endpoint execs can
    gain a capability, file capabilities and setuid-root binaries included.
    """
    for capability in range(_CAP_LAST_CAP + 1):
        _prctl(_PR_CAPBSET_DROP, capability)


def set_uid(setup: ChildSetup) -> None:
    """Real, effective and saved uid: the point of no return."""
    os.setresuid(setup.plan.account.uid, setup.plan.account.uid, setup.plan.account.uid)


def verify_drop(setup: ChildSetup) -> None:
    """Re-read what the kernel now says (uids, gids, groups) and prove root can't be regained.

    Keep-caps (PR_SET_KEEPCAPS, SECBIT_KEEP_CAPS) would leave a permitted set
    that setuid(0) failing does not reveal: the kernel's CapPrm line is read
    (with os calls only) and must be zero.
    """
    account = setup.plan.account
    found = {"uids": os.getresuid(), "gids": os.getresgid(), "groups": sorted(set(os.getgroups()))}
    expected = {"uids": (account.uid,) * 3, "gids": (account.gid,) * 3, "groups": sorted(set(account.groups))}
    if found != expected:
        raise _CheckFailed(f"after the drop the ids are {found}, expected {expected}")
    status = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)  # on an error, the child exits
    permitted = int(os.read(status, 1 << 16).partition(b"\nCapPrm:")[2].split(b"\n", 1)[0], 16)
    os.close(status)
    if permitted:
        raise _CheckFailed(f"capabilities {permitted:#x} are still permitted after the drop")
    with suppress(PermissionError):  # what a complete drop raises
        os.setuid(0)
        raise _CheckFailed("setuid(0) succeeded after the drop")


def set_resource_limits(setup: ChildSetup) -> None:
    """The admin's limits as soft and hard limit, whether or not PAM (pam_limits) set others; each named if refused.

    A limit only ever lowers: raising a hard limit needs CAP_SYS_RESOURCE,
    which a container's root may lack, so one above the current hard limit
    (the manager's, or what pam_limits set) stays at it, which is still a
    limit. So NOFILE never exceeds fs.nr_open either: the kernel keeps every
    NOFILE hard limit at or below it.
    """
    for name, wanted in setup.plan.resource_limits:
        number = getattr(resource, name)
        hard = resource.getrlimit(number)[1]
        value = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(number, (value, value))
        except (OSError, ValueError) as exc:
            raise _CheckFailed(f"setting {name} to soft {value}, hard {value} failed: {exc}") from None


def set_no_new_privs(setup: ChildSetup) -> None:
    """No exec from here on can gain privileges (setuid bits and file capabilities are ignored).

    Nothing the endpoint runs needs a setuid helper unless the admin says a
    scheduler's setuid client does (``allow_setuid_helpers``, e.g. PBS's
    ``pbs_iff``): then this step and ``drop_bounding_set`` are skipped, since
    either would make that client fail. PAM modules run in the session
    holder, before this.
    """
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def set_umask(setup: ChildSetup) -> None:
    """Files the endpoint creates are private to the account unless it says otherwise."""
    os.umask(0o077)


def enter_home(setup: ChildSetup) -> None:
    """Start in the home directory, or in / when it is missing or unusable (like login)."""
    try:
        os.chdir(setup.plan.account.home)
    except OSError:
        os.chdir("/")


def open_log(setup: ChildSetup) -> None:
    """Create the log and its missing directories as the account, and make it fds 1 and 2 (or /dev/null).

    This runs after the drop, with the account's rights alone: a link the
    user planted anywhere on the path reaches only what the account could
    write anyway, so links are followed like any program of the user's would.
    The umask (077) makes new directories 0700. ``O_NONBLOCK`` turns a planted
    FIFO without a reader into an error instead of a hang (a regular file
    ignores it), ``O_NOCTTY`` keeps a terminal from becoming ours.
    """
    path = setup.plan.log_path or os.devnull
    os.makedirs(os.path.dirname(path), exist_ok=True)  # for /dev/null: /dev, which exists
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, 0o600)
    # With the manager's stdio closed the log itself may be 1 or 2, and dup2
    # onto itself would leave it close-on-exec.
    os.set_inheritable(log, True)
    os.dup2(log, 1)
    os.dup2(log, 2)


def close_descriptors(setup: ChildSetup) -> None:
    """Put the passed descriptors at 3, 4, ...; close every other one above 2 but the close-on-exec error pipe."""
    for number, fd in enumerate(setup.pass_fds, start=3):
        os.dup2(fd, number)  # inheritable
    os.closerange(3 + len(setup.pass_fds), setup.error_fd)
    os.closerange(setup.error_fd + 1, _NR_OPEN)


def exec_endpoint(setup: ChildSetup) -> None:
    """Replace the forked root image with a fresh interpreter: never run user code in a fork."""
    os.execve(setup.plan.argv[0], setup.plan.argv, setup.env)


#: The drop itself (single-user mode skips these steps).
DROP_STEPS = (set_gid, set_groups, drop_bounding_set, set_uid, verify_drop)

#: The child's steps in the order they run, each with the exit status of a child that failed at it, so an admin
#: who only sees "exited with status 206" can tell where it stopped. Single-user mode skips ``DROP_STEPS``;
#: ``no_new_privs=False`` (the admin's ``allow_setuid_helpers``) skips ``drop_bounding_set`` and ``set_no_new_privs``.
CHILD_STEPS: dict[Callable[[ChildSetup], None], int] = {
    # Before the drop, still as root:
    attach_stdin: 200, reset_signals: 201, new_session: 202,
    # The drop (DROP_STEPS):
    set_gid: 203, set_groups: 204, drop_bounding_set: 205, set_uid: 206, verify_drop: 207,
    # After it, as the account (set_resource_limits was added later: hence its number):
    set_resource_limits: 214, set_no_new_privs: 208, set_umask: 209, enter_home: 210, open_log: 211,
    close_descriptors: 212, exec_endpoint: 213,
}


def _prctl(option: int, argument: int) -> None:
    if _libc.prctl(option, argument, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


# --- The parent ------------------------------------------------------------------------


def prepare_child(plan: SpawnPlan, *, stdin_fd: int, error_fd: int, pass_fds: tuple[int, ...] = ()) -> ChildSetup:
    """Check ``plan`` and compute everything the child will need; raises ``SpawnError``.

    ``pass_fds`` are copies of ``plan.pass_fds`` above ``2 + len(plan.pass_fds)``, as is ``error_fd``.
    """
    account = plan.account
    if not plan.argv or not os.path.isabs(plan.argv[0]):
        raise SpawnError(f"cannot start {plan.title}: argv must start with an absolute program path")
    if plan.log_path and not os.path.isabs(plan.log_path):
        raise SpawnError(f"cannot start {plan.title}: log path {plan.log_path!r} is not an absolute path")
    if not plan.drop_privileges and account.uid != os.geteuid():
        raise SpawnError(f"cannot start {plan.title} as {account.name} (uid {account.uid}) in single-user mode: "
                         f"without a drop a child can only run as this process's own uid {os.geteuid()}")
    if not plan.drop_privileges and plan.log_path and account.uid == 0:
        raise SpawnError(f"cannot start {plan.title}: a child that stays root opens no log (it might follow a link)")
    extra_env, refused = allowed_environment(plan.extra_env)
    if refused:
        raise SpawnError(f"cannot start {plan.title}: {refused[0]}")
    lang = os.environ.get("LANG", "")
    env = {"HOME": account.home, "USER": account.name, "LOGNAME": account.name, "SHELL": account.shell,
           "PATH": ":".join(dict.fromkeys((os.path.dirname(plan.argv[0]), "/usr/local/bin", "/usr/bin", "/bin"))),
           "LANG": lang if _SANE_LOCALE.fullmatch(lang) else "C.UTF-8", **extra_env}
    skipped: set[Callable[[ChildSetup], None]] = set() if plan.drop_privileges else set(DROP_STEPS)
    if not plan.no_new_privs:
        skipped |= {drop_bounding_set, set_no_new_privs}
    return ChildSetup(plan=plan, stdin_fd=stdin_fd, error_fd=error_fd, pass_fds=pass_fds, env=env,
                      steps=tuple(step for step in CHILD_STEPS if step not in skipped))


def resource_limits(limits: EndpointLimits) -> tuple[tuple[str, int], ...]:
    """The manager config's ``endpoint_limits`` as ``SpawnPlan.resource_limits``."""
    names = {"nproc": "RLIMIT_NPROC", "address_space": "RLIMIT_AS", "cpu": "RLIMIT_CPU", "nofile": "RLIMIT_NOFILE",
             "core": "RLIMIT_CORE"}
    return tuple((name, getattr(limits, key)) for key, name in names.items() if getattr(limits, key) is not None)


def allowed_environment(env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Split variables another party exported (PAM modules) into those ``extra_env`` accepts and why not the rest."""
    kept: dict[str, str] = {}
    refused: list[str] = []
    for key, value in env.items():
        if not (key.isascii() and key.isidentifier()):  # [A-Za-z_][A-Za-z0-9_]*
            refused.append(f"{key!r} is not a valid environment variable name")
        elif key.upper().startswith(("LD_", "PYTHON")):
            refused.append(f"environment variable {key} is not allowed "
                           "(LD_* and PYTHON* variables change which code the endpoint loads)")
        elif key in _RESERVED_ENV:
            refused.append(f"environment variable {key} is set by the spawner")
        elif "\0" in value:
            refused.append(f"environment variable {key} contains a NUL byte")
        else:
            kept[key] = value
    return kept, refused


def spawn(plan: SpawnPlan) -> SpawnedProcess:
    """Start ``plan`` and return once the child has exec'd; ``DropStepError`` names a failed step.

    An invalid plan raises ``SpawnError`` before anything is forked, as does a
    lack of resources (descriptors, processes) in the parent.
    """
    lowest = 3 + len(plan.pass_fds)  # passed fds land on 3, 4, ...: every pipe and copy for the child sits above
    try:
        with ExitStack() as until_reported:
            error_read, error_write = pipe_above(lowest)
            until_reported.callback(os.close, error_read)
            with ExitStack() as parent_copies:
                parent_copies.callback(os.close, error_write)
                stdin_read, stdin_write = pipe_above(lowest)
                parent_copies.callback(os.close, stdin_read)
                parent_copies.callback(os.close, stdin_write)
                passed = []
                for fd in plan.pass_fds:
                    passed.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest))
                    parent_copies.callback(os.close, passed[-1])
                setup = prepare_child(plan, stdin_fd=stdin_read, error_fd=error_write, pass_fds=tuple(passed))
                preload_pipe(stdin_write, plan.stdin_data, plan.title)
                pid, pidfd = _fork_child(setup)
            # Our copy of the write end is closed: end-of-file now means the child exec'd or died.
            # The child's one report is at most PIPE_BUF bytes, so it arrives whole, in one read.
            report = os.read(error_read, select.PIPE_BUF)
    except OSError as exc:
        raise SpawnError(f"cannot start {plan.title} as {plan.account.name}: {exc}") from exc
    if not report:
        return SpawnedProcess(pid=pid, pidfd=pidfd)
    os.waitpid(pid, 0)
    os.close(pidfd)
    step, code, message = report.decode("utf-8", "replace").split("\0", 2)
    raise DropStepError(f"starting {plan.title} as {plan.account.name} failed at step {step!r}: {message}",
                        step=step, errno=int(code) if code else None)


def pipe_above(lowest: int = 3) -> tuple[int, int]:
    """A close-on-exec pipe whose ends are at least ``lowest``, so dup2 onto lower fds in a child can't clobber them."""
    ends = list(os.pipe2(os.O_CLOEXEC))
    try:
        for index, fd in enumerate(ends):
            if fd < lowest:
                ends[index] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)
                os.close(fd)
    except BaseException:
        for fd in ends:
            os.close(fd)
        raise
    return ends[0], ends[1]


def preload_pipe(fd: int, data: bytes, who: str) -> None:
    """Write all of stdin before the fork: in a pipe sized to hold it, it never blocks or hits EPIPE."""
    if len(data) > _MAX_STDIN_BYTES:
        raise SpawnError(f"cannot start {who}: {len(data)} bytes for its stdin exceed the pipe's "
                         f"{_MAX_STDIN_BYTES} bytes")
    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, len(data))  # at least that (and a page), so the write below never blocks
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def run_for_answer(plan: SpawnPlan, *, timeout: float, limit: int) -> tuple[int, bytes]:
    """Run ``plan`` to its end, with a pipe at fd 3 for its answer: (its exit code, what it wrote there).

    ``SpawnError`` if it could not start, or did not answer and exit within
    ``timeout``, or wrote more than ``limit`` bytes; it and its process group
    (it leads its own session) are killed then.
    """
    answer_read, answer_write = pipe_above()
    try:
        try:
            child = spawn(dataclasses.replace(plan, pass_fds=(answer_write,)))
        finally:
            os.close(answer_write)
        deadline = time.monotonic() + timeout
        answer = read_bounded(answer_read, deadline, limit)
        left = max(0.0, deadline - time.monotonic())
        exited = answer is not None and bool(select.select([child.pidfd], [], [], left)[0])
        status = end_process_group(child)
    finally:
        os.close(answer_read)
    if answer is None or not exited:
        raise SpawnError(f"{plan.title} as {plan.account.name} did not answer and exit within"
                         f" {timeout:g} s, or wrote more than {limit} bytes; it was killed")
    return os.waitstatus_to_exitcode(status), answer


def end_process_group(child: SpawnedProcess) -> int:
    """Kill ``child``'s process group (it leads its own session; an exited leader's leftovers too), reap it."""
    with suppress(ProcessLookupError):  # the whole group is gone already
        signal.pidfd_send_signal(child.pidfd, 0)  # not reaped yet: its group id is still its own
        os.killpg(child.pid, signal.SIGKILL)
    _, status = os.waitpid(child.pid, 0)
    os.close(child.pidfd)
    return status


def read_bounded(fd: int, deadline: float, limit: int) -> bytes | None:
    """What ``fd`` yields until end-of-file, or None past ``deadline`` (monotonic) or ``limit`` bytes."""
    data = b""
    while len(data) <= limit:
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk
    return None


_fork_lock = threading.Lock()  # the collector switch is process-wide: one fork at a time across threads


def _fork_child(setup: ChildSetup) -> tuple[int, int]:
    """Fork with signals blocked and the collector off; the child never returns from here."""
    with _fork_lock:
        gc.disable()  # nothing else in root switches the collector off
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            pid = os.fork()
            if pid == 0:
                _run_child(setup)
            try:
                return pid, os.pidfd_open(pid)
            except OSError:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            gc.enable()


def _run_child(setup: ChildSetup) -> NoReturn:
    """Run the steps; report the one that failed on the error pipe, in one write, and exit with its status."""
    step = setup.steps[0]
    try:
        for step in setup.steps:
            step(setup)
        raise _CheckFailed("the last step returned instead of exec'ing")
    except BaseException as exc:  # noqa: B036 - everything is reported, nothing escapes the child
        code = exc.errno if isinstance(exc, OSError) and exc.errno else ""
        report = f"{step.__name__}\0{code}\0{str(exc) or type(exc).__name__}"
        os.write(setup.error_fd, report.encode("utf-8", "replace")[: select.PIPE_BUF])  # one atomic write
    finally:
        os._exit(CHILD_STEPS[step])


# --- Reading what the account wrote -----------------------------------------------------

def read_log_tail(account: Account, path: str, max_lines: int = 20, max_bytes: int = 8192) -> str:
    """The last whole lines of a log, read with the account's rights alone, or "" if the account can't read it.

    Root never opens it: ``mep.endpoint.log_tail`` reads it in a child started
    through ``run_for_answer``, dropped to the account like an endpoint (no
    drop in single-user mode, where this process is the account), so a link
    the user planted reaches only what the account could read anyway. No
    effective id changes here: they are process-wide, and the spawner forks
    endpoints from other threads meanwhile.
    """
    argv = [sys.executable, "-I", "-m", "mep.endpoint.log_tail", path, str(max_lines), str(max_bytes)]
    plan = SpawnPlan(account=account, argv=argv, stdin_data=b"", log_path="", title=f"the reader of {path}",
                     drop_privileges=account.uid != os.geteuid())
    try:
        # Each byte that is no UTF-8 comes back as a replacement character, 3 bytes.
        _, tail = run_for_answer(plan, timeout=30, limit=3 * max_bytes)
    except SpawnError:
        return ""
    return tail.decode("utf-8", "replace")

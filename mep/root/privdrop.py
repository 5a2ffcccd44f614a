"""Start a process as another account, the checked way su, runuser and OpenSSH do it.

This module owns the path from "the spawner decided to start this program as
this account" to "a fresh interpreter runs as that account" (items 8-17 of
the root-spawner checklist): ``spawn`` forks, and the child runs the ordered
steps in ``CHILD_STEPS``, each a module-level function that does one thing and
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
the step's status from ``STEP_EXIT_CODES``; end-of-file on that pipe with
nothing written means the exec succeeded.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno as errno_codes
import fcntl
import gc
import os
import re
import resource
import select
import signal
import stat
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from mep.root.errors import SpawnError
from mep.root.accounts import Account

if TYPE_CHECKING:
    from mep.root.config import EndpointLimits

#: Exit status of a child that failed at each step, in the order the steps run,
#: so an admin who only sees "exited with status 206" can tell where it stopped.
#: Single-user mode (``drop_privileges=False``) skips the steps marked [drop];
#: ``no_new_privs=False`` (the admin's ``allow_setuid_helpers``) skips
#: ``drop_bounding_set`` and ``set_no_new_privs``.
STEP_EXIT_CODES: dict[str, int] = {
    "attach_stdin": 200,  # dup2 the parent's stdin pipe onto fd 0
    "reset_signals": 201,  # default dispositions, empty signal mask
    "new_session": 202,  # setsid: own session, no controlling terminal
    "set_gid": 203,  # [drop] setresgid(g, g, g)
    "set_groups": 204,  # [drop] setgroups(the account's groups)
    "drop_bounding_set": 205,  # [drop] empty the capability bounding set
    "set_uid": 206,  # [drop] setresuid(u, u, u)
    "verify_drop": 207,  # [drop] ids and groups re-read, no capability left, setuid(0) fails
    "set_resource_limits": 214,  # the admin's endpoint_limits, soft and hard (added later: hence its number)
    "set_no_new_privs": 208,  # prctl(PR_SET_NO_NEW_PRIVS)
    "set_umask": 209,  # umask 077
    "enter_home": 210,  # chdir to the home, or / if that fails
    "open_log": 211,  # create the log (and its directories) as the account, or /dev/null; fds 1 and 2
    "close_descriptors": 212,  # passed fds to 3, 4, ...; close every other inherited fd above 2
    "exec_endpoint": 213,  # execve the interpreter with the whitelisted environment
}


# Keys the spawner sets itself; extra_env may not redefine who the process is.
_RESERVED_ENV = frozenset({"HOME", "USER", "LOGNAME", "SHELL", "PATH", "LANG"})
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Locale names such as C, POSIX, C.UTF-8, en_US.UTF-8, de_DE@euro: anything
# else in the manager's LANG is replaced rather than handed to every endpoint.
_SANE_LOCALE = re.compile(r"(C|POSIX|[a-z]{2,3}_[A-Z]{2})(\.[A-Za-z0-9-]{1,20})?(@[a-z]{1,20})?")
_DEFAULT_LANG = "C.UTF-8"
_SYSTEM_PATH = ("/usr/local/bin", "/usr/bin", "/bin")

_MAX_REPORT_BYTES = 4096
_MAX_STDIN_BYTES = 1 << 20  # a pipe is grown to this for a large stdin (a mapping file), never further
# Passed descriptors land on 3, 4, ...; every pipe and copy the parent makes for the child sits above them.
_MAX_PASSED_FDS = 6
_LOWEST_PARENT_FD = 3 + _MAX_PASSED_FDS
RESETTABLE_SIGNALS = tuple(
    sorted(s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP))
)

_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38

# prctl is the one call the os module lacks.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


class DropStepError(SpawnError):
    """A step between fork and exec failed; ``step`` is a key of ``STEP_EXIT_CODES``."""

    def __init__(self, message: str, *, step: str, errno: int | None) -> None:
        super().__init__(message)
        self.step = step
        self.errno = errno


class _CheckFailed(Exception):
    """A step's own check (not a system call) refused to continue."""


@dataclass(frozen=True)
class SpawnPlan:
    """What to start, as whom, with which secrets and where its output goes.

    ``argv[0]`` is the absolute path of the program (no PATH search).
    ``stdin_data`` reaches the child through a pipe on fd 0 (secrets travel
    there, never in argv or the environment) and must fit the pipe's buffer.
    ``log_path`` is absolute, normalised and free of symbolic links in every
    component (pass a resolved home, e.g. ``os.path.realpath(account.home)``):
    the child creates it and its missing directories as the account, after the
    drop, and refuses to follow any link. ``extra_env`` may not contain
    ``LD_*`` or ``PYTHON*`` keys, redefine the variables the spawner sets, or
    hold NUL bytes. ``drop_privileges=False`` is single-user mode: the caller
    already runs as ``account`` and every step but the drop still applies.
    ``title`` names the process in error messages. ``log_path`` "" sends
    stdout and stderr to ``/dev/null``. ``pass_fds`` are the parent's
    descriptors the child gets at 3, 4, ... in that order (every other one is
    closed). ``resource_limits``: (``RLIMIT_*`` name, value) pairs set as soft
    and hard limit before exec, each only ever lowered (see
    ``resource_limits``). ``no_new_privs=False`` leaves the capability bounding
    set and lets setuid programs gain privileges, for a scheduler's setuid client.
    """

    account: Account
    argv: list[str]
    stdin_data: bytes
    log_path: str
    extra_env: Mapping[str, str] = field(default_factory=dict)
    drop_privileges: bool = True
    title: str = ""
    pass_fds: tuple[int, ...] = ()
    resource_limits: tuple[tuple[str, int], ...] = ()
    no_new_privs: bool = True


@dataclass(frozen=True)
class SpawnedProcess:
    """A child that exec'd successfully; the caller polls ``pidfd`` for its exit and closes it."""

    pid: int
    pidfd: int


@dataclass(frozen=True)
class ChildSetup:
    """Everything the child needs between fork and exec, computed before the fork (no NSS lookup mid-drop)."""

    uid: int
    gid: int
    groups: tuple[int, ...]  # sorted, without duplicates
    cap_last_cap: int  # the highest capability number this kernel knows
    stdin_fd: int
    error_fd: int
    pass_fds: tuple[int, ...]  # each above 2 + len(pass_fds), so moving them to 3, 4, ... clobbers none
    home: str
    log_path: str
    log_directories: tuple[tuple[str, str], ...]  # (component, its absolute path), from "/"
    log_name: str
    fd_ceiling: int
    executable: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    steps: tuple[Callable[[ChildSetup], None], ...]
    rlimits: tuple[tuple[str, int, int, int], ...] = ()  # (name, resource, soft, hard), already lowered only


# --- The child's steps, in order -------------------------------------------------------


def attach_stdin(setup: ChildSetup) -> None:
    """Make the parent's pipe fd 0 before anything can fail, so nothing reads the manager's stdin."""
    os.dup2(setup.stdin_fd, 0)


def reset_signals(setup: ChildSetup) -> None:
    """Restore default dispositions and an empty mask: ignored signals and the mask survive exec."""
    for signum in RESETTABLE_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def new_session(setup: ChildSetup) -> None:
    """Leave the manager's session and process group; this also drops any controlling terminal."""
    os.setsid()


def set_gid(setup: ChildSetup) -> None:
    """Real, effective and saved gid, before the uid (a non-root process can't change gids)."""
    os.setresgid(setup.gid, setup.gid, setup.gid)


def set_groups(setup: ChildSetup) -> None:
    """Replace root's supplementary groups with the account's list, resolved before the fork.

    ``initgroups`` would do an NSS lookup (sssd, LDAP sockets, locks) in the
    forked child; the list was computed by the parent instead.
    """
    os.setgroups(setup.groups)


def drop_bounding_set(setup: ChildSetup) -> None:
    """Empty the capability bounding set while CAP_SETPCAP is still held.

    Together with no_new_privs this means no program the endpoint execs can
    gain a capability, file capabilities and setuid-root binaries included.
    """
    for capability in range(setup.cap_last_cap + 1):
        _prctl(_PR_CAPBSET_DROP, capability)


def set_uid(setup: ChildSetup) -> None:
    """Real, effective and saved uid: the point of no return."""
    os.setresuid(setup.uid, setup.uid, setup.uid)


def verify_drop(setup: ChildSetup) -> None:
    """Re-read what the kernel now says and prove root can't be regained."""
    uids, gids = os.getresuid(), os.getresgid()
    if uids != (setup.uid,) * 3:
        raise _CheckFailed(f"uids are {uids} after the drop, expected {setup.uid}")
    if gids != (setup.gid,) * 3:
        raise _CheckFailed(f"gids are {gids} after the drop, expected {setup.gid}")
    groups = sorted(set(os.getgroups()))
    if groups != list(setup.groups):
        raise _CheckFailed(f"groups are {groups} after the drop, expected {list(setup.groups)}")
    # Keep-caps (PR_SET_KEEPCAPS, SECBIT_KEEP_CAPS) would leave a permitted set
    # that setuid(0) failing does not reveal.
    permitted = _permitted_capabilities()
    if permitted:
        raise _CheckFailed(f"capabilities {permitted:#x} are still permitted after the drop")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise _CheckFailed("setuid(0) succeeded after the drop")


def set_resource_limits(setup: ChildSetup) -> None:
    """The admin's limits, whether or not PAM (pam_limits) set others: each one reported by name if refused."""
    for name, number, soft, hard in setup.rlimits:
        try:
            resource.setrlimit(number, (soft, hard))
        except (OSError, ValueError) as exc:
            raise OSError(getattr(exc, "errno", None) or errno_codes.EINVAL,
                          f"setting {name} to soft {soft}, hard {hard} failed: {exc}") from None


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
        os.chdir(setup.home)
    except OSError:
        os.chdir("/")


def open_log(setup: ChildSetup) -> None:
    """Create the log as the account, never following a symbolic link, and make it fds 1 and 2.

    Without a log path, fds 1 and 2 are ``/dev/null``. Each directory is
    created 0700 when missing and then opened without following links, so a
    link the user planted anywhere on the way is refused rather than followed. ``O_NONBLOCK`` turns a planted FIFO into an error
    instead of a hang, ``O_NOCTTY`` keeps a terminal from becoming ours.
    """
    if not setup.log_path:
        log = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        return
    directory = _open_directories(setup.log_directories, create=True)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        log = os.open(setup.log_name, flags, 0o600, dir_fd=directory)
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(log).st_mode):
        raise _CheckFailed(f"{setup.log_path} is not a regular file")
    os.set_blocking(log, True)
    os.dup2(log, 1)
    os.dup2(log, 2)
    # With the manager's stdio closed the log itself may be 1 or 2, and dup2
    # onto itself would leave it close-on-exec.
    os.set_inheritable(1, True)
    os.set_inheritable(2, True)


def close_descriptors(setup: ChildSetup) -> None:
    """Put the passed descriptors at 3, 4, ...; close every other one above 2 but the close-on-exec error pipe."""
    for number, fd in enumerate(setup.pass_fds, start=3):
        os.dup2(fd, number)  # inheritable
    lowest = 3 + len(setup.pass_fds)
    os.closerange(lowest, setup.error_fd)
    os.closerange(setup.error_fd + 1, setup.fd_ceiling)


def exec_endpoint(setup: ChildSetup) -> None:
    """Replace the forked root image with a fresh interpreter: never run user code in a fork."""
    os.execve(setup.executable, setup.argv, setup.env)


#: The drop itself (single-user mode skips these steps).
DROP_STEPS: tuple[Callable[[ChildSetup], None], ...] = (
    set_gid,
    set_groups,
    drop_bounding_set,
    set_uid,
    verify_drop,
)

CHILD_STEPS: tuple[Callable[[ChildSetup], None], ...] = (
    attach_stdin,
    reset_signals,
    new_session,
    *DROP_STEPS,
    set_resource_limits,
    set_no_new_privs,
    set_umask,
    enter_home,
    open_log,
    close_descriptors,
    exec_endpoint,
)


def _directories(path: str) -> tuple[tuple[str, str], ...]:
    """Each directory of ``path`` below /, with its own absolute path for messages: ("home", "/home"), ..."""
    parts = [part for part in os.path.dirname(path).split("/") if part]
    return tuple((name, "/" + "/".join(parts[: index + 1])) for index, name in enumerate(parts))


def _open_directories(directories: tuple[tuple[str, str], ...], *, create: bool) -> int:
    """An O_PATH descriptor of the last of ``directories``, walked from / refusing every symbolic link.

    With ``create``, a missing directory is made 0700 (by whoever runs this: the account, after the drop).
    """
    directory = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name, path in directories:
            parent, directory = directory, _open_directory_nofollow(directory, name, path, create)
            os.close(parent)
    except BaseException:
        os.close(directory)
        raise
    return directory


def _open_directory_nofollow(parent: int, name: str, path: str, create: bool) -> int:
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            pass  # appeared meanwhile: the checks below still refuse anything but a directory
        fd = os.open(name, flags, dir_fd=parent)
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        return fd
    os.close(fd)
    if stat.S_ISLNK(mode):
        raise OSError(errno_codes.ELOOP, "refusing to follow a symbolic link", path)
    raise OSError(errno_codes.ENOTDIR, os.strerror(errno_codes.ENOTDIR), path)


def _prctl(option: int, argument: int) -> None:
    if _libc.prctl(option, argument, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _permitted_capabilities() -> int:
    """The kernel's CapPrm line, read with os calls only (this runs between fork and exec)."""
    fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    try:
        status = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    return int(status.partition(b"\nCapPrm:")[2].split(b"\n", 1)[0], 16)


# --- The parent ------------------------------------------------------------------------


def prepare_child(plan: SpawnPlan, *, stdin_fd: int, error_fd: int, pass_fds: tuple[int, ...] = ()) -> ChildSetup:
    """Check ``plan`` and compute everything the child will need; raises ``SpawnError``.

    ``pass_fds`` are copies of ``plan.pass_fds`` above ``2 + len(plan.pass_fds)``, as is ``error_fd``.
    """
    account = plan.account
    who = plan.title or "the endpoint"
    if not plan.argv or not os.path.isabs(plan.argv[0]):
        raise SpawnError(f"cannot start {who}: argv must start with an absolute program path")
    if any("\0" in arg for arg in plan.argv):
        raise SpawnError(f"cannot start {who}: an argument contains a NUL byte")
    log_path = plan.log_path
    if log_path and (not os.path.isabs(log_path) or os.path.normpath(log_path) != log_path or "\0" in log_path):
        raise SpawnError(f"cannot start {who}: log path {log_path!r} is not a normalised absolute path")
    if log_path == "/":
        raise SpawnError(f"cannot start {who}: log path {log_path!r} names no file")
    if not plan.drop_privileges and account.uid != os.geteuid():
        raise SpawnError(
            f"cannot start {who} as {account.name} (uid {account.uid}) in single-user mode: "
            f"without a drop a child can only run as this process's own uid {os.geteuid()}"
        )
    if len(plan.pass_fds) > _MAX_PASSED_FDS:
        raise SpawnError(f"cannot start {who}: at most {_MAX_PASSED_FDS} descriptors can be passed")
    skipped: set[Callable[..., None]] = set() if plan.drop_privileges else set(DROP_STEPS)
    if not plan.no_new_privs:
        skipped |= {drop_bounding_set, set_no_new_privs}
    steps = tuple(step for step in CHILD_STEPS if step not in skipped)
    return ChildSetup(
        uid=account.uid, gid=account.gid, groups=tuple(sorted(set(account.groups))),
        cap_last_cap=_read_int("/proc/sys/kernel/cap_last_cap"), stdin_fd=stdin_fd, error_fd=error_fd,
        pass_fds=pass_fds, home=account.home, log_path=log_path, log_name=os.path.basename(log_path),
        log_directories=_directories(log_path),
        # Every descriptor number is below fs.nr_open, whatever the rlimits were when it was opened.
        fd_ceiling=_read_int("/proc/sys/fs/nr_open"),
        executable=plan.argv[0], argv=tuple(plan.argv), env=_child_environment(plan, who), steps=steps,
        rlimits=tuple(_lowered_limit(name, value, who) for name, value in plan.resource_limits),
    )


def resource_limits(limits: EndpointLimits) -> tuple[tuple[str, int], ...]:
    """The manager config's ``endpoint_limits`` as ``SpawnPlan.resource_limits``."""
    names = {"nproc": "RLIMIT_NPROC", "address_space": "RLIMIT_AS", "cpu": "RLIMIT_CPU", "nofile": "RLIMIT_NOFILE",
             "core": "RLIMIT_CORE"}
    return tuple((name, getattr(limits, key)) for key, name in names.items() if getattr(limits, key) is not None)


def _lowered_limit(name: str, value: int, who: str) -> tuple[str, int, int, int]:
    """(name, resource, soft, hard) for ``value``, never above the current hard limit.

    Raising a hard limit needs CAP_SYS_RESOURCE, which a container's root may
    lack: a limit above it stays at the hard limit, which is still a limit.
    """
    number = getattr(resource, name, None)
    if not name.startswith("RLIMIT_") or not isinstance(number, int):
        raise SpawnError(f"cannot start {who}: {name} is not a resource limit")
    _, hard = resource.getrlimit(number)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    if number == resource.RLIMIT_NOFILE:
        value = min(value, _read_int("/proc/sys/fs/nr_open"))  # the kernel refuses more, even to root
    return name, number, value, value


def _child_environment(plan: SpawnPlan, who: str) -> dict[str, str]:
    """An environment built from nothing: the account's identity, a known PATH, a sane LANG."""
    account = plan.account
    path = ":".join(dict.fromkeys((os.path.dirname(plan.argv[0]), *_SYSTEM_PATH)))
    lang = os.environ.get("LANG", "")
    extra, refused = allowed_environment(plan.extra_env)
    if refused:
        raise SpawnError(f"cannot start {who}: {refused[0]}")
    return {"HOME": account.home, "USER": account.name, "LOGNAME": account.name, "SHELL": account.shell,
            "PATH": path, "LANG": lang if _SANE_LOCALE.fullmatch(lang) else _DEFAULT_LANG, **extra}


def _environment_problem(key: str, value: str) -> str:
    """Why ``key=value`` may not reach a child's environment, or "" when it may."""
    if not _ENV_KEY.fullmatch(key):
        return f"{key!r} is not a valid environment variable name"
    if key.upper().startswith(("LD_", "PYTHON")):
        return (f"environment variable {key} is not allowed "
                "(LD_* and PYTHON* variables change which code the endpoint loads)")
    if key in _RESERVED_ENV:
        return f"environment variable {key} is set by the spawner"
    if "\0" in value:
        return f"environment variable {key} contains a NUL byte"
    return ""


def allowed_environment(env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Split variables another party exported (PAM modules) into those ``extra_env`` accepts and why not the rest."""
    problems = {key: _environment_problem(key, value) for key, value in env.items()}
    kept = {key: env[key] for key, problem in problems.items() if not problem}
    return kept, [problem for problem in problems.values() if problem]


def spawn(plan: SpawnPlan) -> SpawnedProcess:
    """Start ``plan`` and return once the child has exec'd; ``DropStepError`` names a failed step.

    An invalid plan raises ``SpawnError`` before anything is forked, as does a
    lack of resources (descriptors, processes) in the parent.
    """
    who = plan.title or "the endpoint"
    try:
        with ExitStack() as until_reported:
            error_read, error_write = pipe_above(_LOWEST_PARENT_FD)
            until_reported.callback(os.close, error_read)
            with ExitStack() as parent_copies:
                parent_copies.callback(os.close, error_write)
                stdin_read, stdin_write = pipe_above(_LOWEST_PARENT_FD)
                parent_copies.callback(os.close, stdin_read)
                parent_copies.callback(os.close, stdin_write)
                passed = []
                for fd in plan.pass_fds[:_MAX_PASSED_FDS + 1]:  # one too many: prepare_child says so
                    passed.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _LOWEST_PARENT_FD))
                    parent_copies.callback(os.close, passed[-1])
                setup = prepare_child(plan, stdin_fd=stdin_read, error_fd=error_write, pass_fds=tuple(passed))
                preload_pipe(stdin_write, plan.stdin_data, who)
                pid, pidfd = _fork_child(setup)
            # Our copy of the write end is closed: EOF now means the child exec'd or died.
            report = _read_report(error_read)
    except OSError as exc:
        raise SpawnError(f"cannot start {who} as {plan.account.name}: {exc}") from exc
    if not report:
        return SpawnedProcess(pid=pid, pidfd=pidfd)
    os.waitpid(pid, 0)
    os.close(pidfd)
    raise _failure(plan, report)


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
    """Write all of stdin before the fork: fitting the pipe buffer (grown if need be), it can never block or hit EPIPE."""
    capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    if capacity < len(data) <= _MAX_STDIN_BYTES:
        try:
            capacity = fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, len(data))
        except OSError:
            pass  # above the system's pipe-max-size: refused below
    if len(data) > capacity:
        raise SpawnError(
            f"cannot start {who}: {len(data)} bytes for its stdin exceed the pipe's {capacity} bytes"
        )
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def run_for_answer(plan: SpawnPlan, *, timeout: float, limit: int) -> tuple[int, bytes]:
    """Run ``plan`` to its end, with a pipe at fd 3 for its answer: (its exit code, what it wrote there).

    ``SpawnError`` if it could not start, or did not answer and exit within
    ``timeout``, or wrote more than ``limit`` bytes; it and its process group
    (it leads its own session) are killed then.
    """
    answer_read, answer_write = pipe_above(_LOWEST_PARENT_FD)
    try:
        try:
            child = spawn(dataclasses.replace(plan, pass_fds=(answer_write,)))
        finally:
            os.close(answer_write)
        deadline = time.monotonic() + timeout
        answer = read_bounded(answer_read, deadline, limit)
        exited = answer is not None and bool(select.select([child.pidfd], [], [], max(0.0, deadline - time.monotonic()))[0])
        status = end_process_group(child)
    finally:
        os.close(answer_read)
    if answer is None or not exited:
        raise SpawnError(f"{plan.title or 'the process'} as {plan.account.name} did not answer and exit within"
                         f" {timeout:g} s, or wrote more than {limit} bytes; it was killed")
    return os.waitstatus_to_exitcode(status), answer


def end_process_group(child: SpawnedProcess) -> int:
    """Kill ``child``'s process group (it leads its own session; an exited leader's leftovers too), reap it."""
    try:
        signal.pidfd_send_signal(child.pidfd, 0)  # not reaped yet: its group id is still its own
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        _, status = os.waitpid(child.pid, 0)
        os.close(child.pidfd)
    return status


def read_bounded(fd: int, deadline: float, limit: int) -> bytes | None:
    """What ``fd`` yields until end-of-file, or None past ``deadline`` (monotonic) or ``limit`` bytes."""
    data = b""
    while len(data) <= limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
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
        gc_was_enabled = gc.isenabled()
        gc.disable()
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
            if gc_was_enabled:
                gc.enable()


def _run_child(setup: ChildSetup) -> NoReturn:
    step = setup.steps[0]
    try:
        for step in setup.steps:
            step(setup)
        raise _CheckFailed("the last step returned instead of exec'ing")
    except BaseException as exc:  # noqa: B036 - everything is reported, nothing escapes the child
        _report_failure(setup.error_fd, step.__name__, exc)
    finally:
        os._exit(STEP_EXIT_CODES[step.__name__])


def _report_failure(error_fd: int, step: str, exc: BaseException) -> None:
    code = exc.errno if isinstance(exc, OSError) and exc.errno else ""
    message = str(exc) or type(exc).__name__
    os.write(error_fd, f"{step}\0{code}\0{message}".encode("utf-8", "replace")[:_MAX_REPORT_BYTES])


def _read_report(fd: int) -> bytes:
    report = b""
    while chunk := os.read(fd, _MAX_REPORT_BYTES):
        report = (report + chunk)[:_MAX_REPORT_BYTES]
    return report


def _failure(plan: SpawnPlan, report: bytes) -> DropStepError:
    step, _, rest = report.decode("utf-8", "replace").partition("\0")
    code, _, message = rest.partition("\0")
    who = plan.title or "the endpoint"
    return DropStepError(
        f"starting {who} as {plan.account.name} failed at step {step!r}: {message}",
        step=step,
        errno=int(code) if code.isdigit() else None,
    )


def _read_int(path: str) -> int:
    with open(path, encoding="ascii") as file:
        return int(file.read())


# --- Reading what the account wrote -----------------------------------------------------


def read_log_tail(account: Account, path: str, max_lines: int = 20, max_bytes: int = 8192) -> str:
    """The last lines of a log the account owns, or "" if it is not such a file.

    Every directory on the path is opened without following a symbolic link,
    and the file must be a regular file owned by the account, so a link or a
    file of anyone else yields "" rather than root's data. No effective id
    changes (they are process-wide, and the spawner forks endpoints from
    other threads meanwhile): the checks stand in for the account's
    permissions, and what the account owns it could read anyway.
    """
    if not os.path.isabs(path) or os.path.normpath(path) != path:
        return ""
    try:
        directory = _open_directories(_directories(path), create=False)
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            fd = os.open(os.path.basename(path), flags, dir_fd=directory)
        finally:
            os.close(directory)
    except OSError:
        return ""
    try:
        size = os.fstat(fd)
        if not stat.S_ISREG(size.st_mode) or size.st_uid != account.uid:
            return ""
        if size.st_size > max_bytes:
            # One byte more than the window: if it is a newline, the first line is whole.
            data = os.pread(fd, max_bytes + 1, size.st_size - max_bytes - 1).partition(b"\n")[2]
        else:
            data = os.pread(fd, max_bytes, 0)
    finally:
        os.close(fd)
    lines = data.decode("utf-8", "replace").splitlines()
    return "\n".join(lines[max(0, len(lines) - max_lines) :])

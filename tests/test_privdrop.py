"""The root spawner's privilege drop and spawn, checked on real accounts and real processes.

Runs as root (as CI does): each test creates throwaway accounts, spawns real
children through ``privdrop.spawn`` and reads what the kernel says about them
(``/proc/self/status``, ``/proc/self/fd``, ``/proc/self/environ``). Single
steps run in a forked child of the test. Single-user mode runs under
``runuser`` as an ordinary account, because root hides permission bugs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import pwd
import re
import resource
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mep.errors import ConfigurationError, SpawnError
from mep.root.accounts import Account
from mep.cli.interpreter import check_interpreter_usable
from mep.root.privdrop import (
    CHILD_STEPS,
    ChildSetup,
    DropStepError,
    SpawnedProcess,
    SpawnPlan,
    allowed_environment,
    close_descriptors,
    drop_bounding_set,
    enter_home,
    new_session,
    prepare_child,
    read_log_tail,
    reset_signals,
    set_gid,
    set_groups,
    set_no_new_privs,
    set_resource_limits,
    set_uid,
    set_umask,
    spawn,
    verify_drop,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="creates accounts and drops privileges: needs root"),
]

# The test run's interpreter: the world-readable venv scripts/test.sh installs (every account can read it).
PYTHON = sys.executable
ENV_WHITELIST = {"HOME", "USER", "LOGNAME", "SHELL", "PATH", "LANG"}
WAIT_GUARD_SECONDS = 120  # only so a broken spawn fails the test instead of hanging it

# Run by the spawned child as the account: everything the kernel says about it, as JSON on stdout.
REPORT_SCRIPT = r"""
import json, os, sys
with open("/proc/self/status") as file:
    status = dict(line.rstrip("\n").split(":\t", 1) for line in file if ":\t" in line)
with open("/proc/self/environ", "rb") as file:
    environ = dict(item.decode().split("=", 1) for item in file.read().split(b"\0") if item)
fds = {}
for name in os.listdir("/proc/self/fd"):
    try:
        fds[name] = os.readlink("/proc/self/fd/" + name)
    except OSError:
        pass  # the descriptor listdir itself used, closed by now
print(json.dumps({
    "resuid": os.getresuid(), "resgid": os.getresgid(), "groups": sorted(os.getgroups()),
    "environ": environ, "cwd": os.getcwd(), "umask": os.umask(0),
    "session_leader": os.getsid(0) == os.getpid(), "pgid": os.getpgid(0), "pid": os.getpid(),
    "fds": fds, "status": status, "stdin": sys.stdin.read(),
}))
"""


def _account(entry: pwd.struct_passwd) -> Account:
    return Account.from_passwd(entry)


@pytest.fixture
def user(account_factory) -> Account:  # noqa: F811 - the imported fixture
    return _account(account_factory())


@pytest.fixture
def root_secret() -> Iterator[tuple[str, str]]:
    """A root-only file (path, content) that no spawned child may read or write."""
    fd, path = tempfile.mkstemp(prefix="mep-test-secret-", dir="/root")
    content = f"TOPSECRET-{os.path.basename(path)}"
    os.write(fd, content.encode())
    os.close(fd)
    os.chmod(path, 0o600)
    yield path, content
    os.unlink(path)


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """A root-created directory under /var/tmp (tmp_path's parents are 0700 to other accounts)."""
    path = tempfile.mkdtemp(prefix="mep-test-", dir="/var/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def _log_path(account: Account, name: str = "test") -> str:
    return os.path.join(account.home, ".mep", "endpoints", name, "endpoint.log")


def _chown_to(account: Account, *paths: str) -> None:
    for path in paths:
        os.lchown(path, account.uid, account.gid)


def _wait(child: SpawnedProcess) -> int:
    try:
        ready, _, _ = select.select([child.pidfd], [], [], WAIT_GUARD_SECONDS)
        assert ready, f"child {child.pid} did not exit"
        _, status = os.waitpid(child.pid, 0)
    finally:
        os.close(child.pidfd)
    return os.waitstatus_to_exitcode(status)


def _run_report(account: Account, log_path: str, **plan: object) -> dict:
    """Spawn REPORT_SCRIPT as ``account`` and return what it reported."""
    child = spawn(SpawnPlan(account=account, argv=[PYTHON, "-c", REPORT_SCRIPT], log_path=log_path,
                            **{"stdin_data": b"", **plan}))
    assert _wait(child) == 0, Path(log_path).read_text()
    return json.loads(Path(log_path).read_text())


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _proc_status() -> dict[str, str]:
    with open("/proc/self/status") as file:
        return dict(line.rstrip("\n").split(":\t", 1) for line in file if ":\t" in line)


def _in_child(action: Callable[[], object]) -> dict:
    """Run ``action`` in a forked child; its return value, or what it raised, comes back as JSON."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            try:
                outcome: dict = {"value": action()}
            except BaseException as exc:  # noqa: B036 - reported to the parent, which asserts on it
                outcome = {"raised": type(exc).__name__, "message": str(exc),
                           "errno": getattr(exc, "errno", None)}
            os.write(write_end, json.dumps(outcome).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def _setup(account: Account, **changes: object) -> ChildSetup:
    """A ChildSetup for running single steps as ``account``; fds that a test needs are put in with ``changes``."""
    plan = SpawnPlan(account=account, argv=[PYTHON], stdin_data=b"", log_path="/var/tmp/unused.log")
    return dataclasses.replace(prepare_child(plan, stdin_fd=-1, error_fd=-1), **changes)


def _status_ids(value: str) -> set[int]:
    return {int(field) for field in value.split()}


# --- The whole spawn ----------------------------------------------------------------------


def test_step_table_names_every_child_step_once():
    names = [step.__name__ for step in CHILD_STEPS]
    assert len(set(names)) == len(names) == 15
    codes = list(CHILD_STEPS.values())
    assert len(set(codes)) == len(codes)
    assert all(128 < code < 256 for code in codes)  # not a shell's 126/127 nor a signal's 128+n


def test_endpoint_runs_as_the_account_with_nothing_of_roots(user, root_secret):
    secret_path, _ = root_secret
    # Descriptors the parent holds on purpose, inheritable: none may reach the child.
    secret_fd = os.open(secret_path, os.O_RDONLY)
    os.set_inheritable(secret_fd, True)
    listener = socket.socket()
    os.set_inheritable(listener.fileno(), True)
    socket_target = os.readlink(f"/proc/self/fd/{listener.fileno()}")
    log_path = _log_path(user)
    saved_groups = os.getgroups()
    os.setgroups([0])  # root's group, as a manager started from a root login shell has it
    try:
        report = _run_report(user, log_path, stdin_data=b"boot secret\n", extra_env={"MEP_TEST": "yes"})
    finally:
        os.setgroups(saved_groups)
        os.close(secret_fd)
        listener.close()

    assert report["resuid"] == [user.uid] * 3
    assert report["resgid"] == [user.gid] * 3
    status = report["status"]
    assert _status_ids(status["Uid"]) == {user.uid}
    assert _status_ids(status["Gid"]) == {user.gid}
    assert _status_ids(status["Groups"]) == set(user.groups)
    assert 0 not in report["groups"]
    for capability_set in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[capability_set], 16) == 0, capability_set
    assert status["NoNewPrivs"] == "1"

    environ = report["environ"]
    assert set(environ) <= ENV_WHITELIST | {"MEP_TEST"}
    assert not [key for key in environ if key.startswith(("LD_", "PYTHON"))]
    assert environ["HOME"] == user.home
    assert environ["USER"] == environ["LOGNAME"] == user.name
    assert environ["SHELL"] == user.shell
    assert environ["PATH"] == f"{os.path.dirname(PYTHON)}:/usr/local/bin:/usr/bin:/bin"
    assert environ["MEP_TEST"] == "yes"

    assert report["cwd"] == user.home
    assert report["umask"] == 0o077
    assert report["session_leader"] and report["pgid"] == report["pid"]
    assert report["stdin"] == "boot secret\n"

    fds = report["fds"]
    assert set(fds) == {"0", "1", "2"}
    assert fds["0"].startswith("pipe:")
    assert fds["1"] == fds["2"] == log_path
    assert secret_path not in fds.values() and socket_target not in fds.values()

    log = os.stat(log_path)
    assert (log.st_uid, log.st_gid, stat.S_IMODE(log.st_mode)) == (user.uid, user.gid, 0o600)
    for directory in (".mep", ".mep/endpoints", ".mep/endpoints/test"):
        info = os.stat(os.path.join(user.home, directory))
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (user.uid, 0o700), directory


def test_signal_dispositions_and_mask_are_reset_before_exec(user):
    # cat changes no disposition, so its status shows exactly what exec handed over.
    log_path = _log_path(user)
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        child = spawn(SpawnPlan(account=user, argv=["/bin/cat", "/proc/self/status"], stdin_data=b"",
                                log_path=log_path))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        signal.signal(signal.SIGUSR1, previous)
    assert _wait(child) == 0
    status = dict(line.split(":\t", 1) for line in Path(log_path).read_text().splitlines() if ":\t" in line)
    assert int(status["SigIgn"], 16) == 0
    assert int(status["SigBlk"], 16) == 0


def test_spawn_works_from_a_thread_other_than_the_main_one(user):
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(_run_report(user, _log_path(user))))
    thread.start()
    thread.join()
    assert outcome["resuid"] == [user.uid] * 3


@pytest.mark.parametrize("closed", [(0, 1, 2), (2,)])
def test_spawn_works_with_the_managers_stdio_closed(user, closed):
    # Daemons may run with 0-2 closed: the pipes and the log then get low numbers.
    # The child's stdin takes 0, so the log itself lands on 1, and on 2 when only 2 is closed.
    log_path = _log_path(user)

    def spawn_without_stdio() -> int:
        for fd in closed:
            os.close(fd)
        child = spawn(SpawnPlan(account=user, argv=[PYTHON, "-c", REPORT_SCRIPT], stdin_data=b"in",
                                log_path=log_path))
        return _wait(child)

    assert _in_child(spawn_without_stdio)["value"] == 0
    report = json.loads(Path(log_path).read_text())
    assert set(report["fds"]) == {"0", "1", "2"}
    assert report["fds"]["1"] == report["fds"]["2"] == log_path
    assert report["stdin"] == "in"


def test_missing_home_starts_in_the_root_directory(account_factory, shared_dir):  # noqa: F811
    account = _account(account_factory(create_home=False))
    assert not os.path.exists(account.home)
    _chown_to(account, shared_dir)
    report = _run_report(account, os.path.join(shared_dir, "endpoint.log"))
    assert report["cwd"] == "/"
    assert report["environ"]["HOME"] == account.home


def test_parent_keeps_no_descriptors(user):
    before = _open_fds()
    child = spawn(SpawnPlan(account=user, argv=["/bin/true"], stdin_data=b"x", log_path=_log_path(user)))
    assert _wait(child) == 0
    with pytest.raises(DropStepError):
        spawn(SpawnPlan(account=user, argv=["/nonexistent/python"], stdin_data=b"x",
                        log_path=_log_path(user)))
    # none new: spawning may collect garbage earlier tests left, so an old leaked descriptor can close meanwhile
    assert _open_fds() <= before


def test_failed_exec_names_the_step(user):
    with pytest.raises(DropStepError) as failure:
        spawn(SpawnPlan(account=user, argv=["/nonexistent/python", "-c", "pass"], stdin_data=b"",
                        log_path=_log_path(user), title="endpoint 'test'"))
    assert failure.value.step == "exec_endpoint"
    assert failure.value.errno == errno.ENOENT
    assert str(failure.value) == (
        f"starting endpoint 'test' as {user.name} failed at step 'exec_endpoint': "
        "[Errno 2] No such file or directory: '/nonexistent/python'"
    )
    assert isinstance(failure.value, SpawnError)


def _plant_directory_link_to_root(user: Account, shared_dir: str) -> tuple[str, str]:
    link = os.path.join(user.home, ".mep")
    os.symlink("/root", link)
    _chown_to(user, link)
    return "/root/endpoints", ""  # where root, following the link, would have created the log's directory


def _plant_log_link_to_root_file(user: Account, shared_dir: str) -> tuple[str, str]:
    directory = os.path.dirname(_log_path(user))
    os.makedirs(directory, mode=0o700)
    _chown_to(user, os.path.join(user.home, ".mep"), os.path.dirname(directory), directory)
    # Only root, or group root (which the manager holds here and the drop must not keep), may write it.
    target = os.path.join(shared_dir, "root-group.log")
    Path(target).write_text("root's own log\n")
    os.chmod(target, 0o660)
    os.symlink(target, _log_path(user))
    _chown_to(user, _log_path(user))
    return "", target


def _plant_log_fifo(user: Account, shared_dir: str) -> tuple[str, str]:
    directory = os.path.dirname(_log_path(user))
    os.makedirs(directory, mode=0o700)
    os.mkfifo(_log_path(user), 0o600)
    _chown_to(user, os.path.join(user.home, ".mep"), os.path.dirname(directory), directory, _log_path(user))
    return "", ""


@pytest.mark.parametrize(
    ("plant", "expected_errno"),
    [
        (_plant_directory_link_to_root, errno.EACCES),
        (_plant_log_link_to_root_file, errno.EACCES),
        (_plant_log_fifo, errno.ENXIO),  # an error, not a child blocked forever opening it
    ],
)
def test_log_path_planted_by_the_user_reaches_only_what_the_account_may_write(user, root_secret, shared_dir,
                                                                              plant, expected_errno):
    must_not_exist, must_stay = plant(user, shared_dir)
    before = Path(must_stay).read_text() if must_stay else ""
    saved_groups = os.getgroups()
    os.setgroups([0])  # as a manager started from a root login shell has them
    try:
        with pytest.raises(DropStepError) as failure:
            spawn(SpawnPlan(account=user, argv=[PYTHON, "-c", "print('escaped')"], stdin_data=b"",
                            log_path=_log_path(user)))
    finally:
        os.setgroups(saved_groups)
    assert failure.value.step == "open_log"
    assert failure.value.errno == expected_errno
    if must_not_exist:
        assert not os.path.lexists(must_not_exist)
    if must_stay:
        assert Path(must_stay).read_text() == before
    secret_path, content = root_secret
    assert Path(secret_path).read_text() == content


def test_log_path_through_a_link_to_the_accounts_own_directory_is_written_as_the_account(user):
    # Followed, like any program of the user's would: the link reaches only what the account may write.
    elsewhere = os.path.join(user.home, "elsewhere")
    os.mkdir(elsewhere, 0o700)
    os.symlink(elsewhere, os.path.join(user.home, ".mep"))
    _chown_to(user, elsewhere, os.path.join(user.home, ".mep"))
    report = _run_report(user, _log_path(user))
    assert report["resuid"] == [user.uid] * 3
    log = os.stat(os.path.join(elsewhere, "endpoints", "test", "endpoint.log"))
    assert (log.st_uid, log.st_gid, stat.S_IMODE(log.st_mode)) == (user.uid, user.gid, 0o600)
    assert report["fds"]["1"] == os.path.join(elsewhere, "endpoints", "test", "endpoint.log")


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({"extra_env": {"LD_PRELOAD": "/tmp/evil.so"}}, "LD_PRELOAD is not allowed"),
        ({"extra_env": {"ld_library_path": "/tmp"}}, "ld_library_path is not allowed"),
        ({"extra_env": {"PYTHONPATH": "/tmp"}}, "PYTHONPATH is not allowed"),
        ({"extra_env": {"HOME": "/root"}}, "HOME is set by the spawner"),
        ({"extra_env": {"MEP_X": "a\0b"}}, "MEP_X contains a NUL byte"),
        ({"extra_env": {"A=B": "c"}}, "'A=B' is not a valid environment variable name"),
        ({"argv": ["python3", "-c", "pass"]}, "absolute program path"),
        ({"log_path": "endpoint.log"}, "'endpoint.log' is not an absolute path"),
        ({"stdin_data": b"x" * ((1 << 20) + 1)}, "exceed the pipe's"),
        ({"drop_privileges": False}, "single-user mode"),
        ({"account": _account(pwd.getpwuid(0)), "drop_privileges": False}, "a child that stays root opens no log"),
    ],
)
def test_invalid_plan_is_refused_before_fork(user, changes, refusal):
    # SpawnError, never DropStepError: the refusal comes from the parent, before a child exists.
    plan = SpawnPlan(account=user, argv=[PYTHON, "-c", "pass"], stdin_data=b"", log_path=_log_path(user))
    before = _open_fds()
    with pytest.raises(SpawnError, match=refusal) as failure:
        spawn(dataclasses.replace(plan, **changes))
    assert not isinstance(failure.value, DropStepError)
    assert _open_fds() == before
    assert not os.path.exists(os.path.join(user.home, ".mep"))


# --- Single steps, each in a forked child of the test (as root) ---------------------------


def test_drop_steps_switch_every_id_and_leave_no_capability(user):
    target = _setup(user)

    def drop() -> dict:
        os.setgroups([0])  # root's own groups, which a drop must not keep
        for step in (set_gid, set_groups, drop_bounding_set, set_uid, verify_drop):
            step(target)
        return {"resuid": os.getresuid(), "resgid": os.getresgid(), "status": _proc_status()}

    outcome = _in_child(drop)["value"]
    assert outcome["resuid"] == [user.uid] * 3
    assert outcome["resgid"] == [user.gid] * 3
    assert _status_ids(outcome["status"]["Groups"]) == set(user.groups)
    for capability_set in ("CapPrm", "CapEff", "CapBnd"):
        assert int(outcome["status"][capability_set], 16) == 0


def test_verify_drop_refuses_kept_root_groups(user):
    target = _setup(user)

    def drop_without_groups() -> None:
        os.setgroups([0])
        set_gid(target)
        set_uid(target)
        verify_drop(target)

    outcome = _in_child(drop_without_groups)
    assert outcome["raised"] == "_CheckFailed"
    assert outcome["message"].startswith("after the drop the ids are ")
    assert "'groups': [0]}, expected" in outcome["message"]


def test_verify_drop_refuses_capabilities_kept_across_setuid(user):
    target = _setup(user)

    def drop_keeping_capabilities() -> None:
        pr_set_keepcaps = 8
        assert ctypes.CDLL(None).prctl(pr_set_keepcaps, 1, 0, 0, 0) == 0
        for step in (set_gid, set_groups, set_uid, verify_drop):
            step(target)

    outcome = _in_child(drop_keeping_capabilities)
    assert outcome["raised"] == "_CheckFailed"
    assert "are still permitted after the drop" in outcome["message"]


def test_verify_drop_aborts_when_setuid_0_still_works():
    # A "drop" to uid 0 with every capability cleared passes all other checks;
    # only the setuid(0) attempt shows that root is still there.
    target = _setup(dataclasses.replace(_account(pwd.getpwuid(0)), groups=(0,)))

    def drop_to_root_without_capabilities() -> None:
        for step in (set_gid, set_groups, set_uid):
            step(target)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        no_capabilities = (ctypes.c_uint32 * 6)()
        assert ctypes.CDLL(None).capset(header, no_capabilities) == 0
        verify_drop(target)

    outcome = _in_child(drop_to_root_without_capabilities)
    assert outcome["raised"] == "_CheckFailed"
    assert outcome["message"] == "setuid(0) succeeded after the drop"


def test_reset_signals_alone(user):
    def reset() -> dict:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
        reset_signals(_setup(user))
        return _proc_status()

    status = _in_child(reset)["value"]
    assert int(status["SigIgn"], 16) == 0  # also Python's own SIGPIPE/SIGXFSZ ignores
    assert int(status["SigBlk"], 16) == 0


def test_new_session_alone(user):
    def leave() -> list[int]:
        new_session(_setup(user))
        return [os.getsid(0), os.getpgid(0), os.getpid()]

    sid, pgid, pid = _in_child(leave)["value"]
    assert sid == pgid == pid != os.getsid(0)


def test_set_no_new_privs_and_umask_alone(user):
    def harden() -> list:
        set_no_new_privs(_setup(user))
        set_umask(_setup(user))
        return [_proc_status()["NoNewPrivs"], os.umask(0)]

    assert _in_child(harden)["value"] == ["1", 0o077]


def test_set_resource_limits_alone_only_lowers(user):
    # One above the hard limit stays at it (raising needs CAP_SYS_RESOURCE, which a container's root may lack).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    plan = SpawnPlan(account=user, argv=[PYTHON], stdin_data=b"", log_path="",
                     resource_limits=(("RLIMIT_NOFILE", hard + 1000), ("RLIMIT_CORE", 0)))
    target = prepare_child(plan, stdin_fd=-1, error_fd=-1)

    def limit() -> list:
        set_resource_limits(target)
        return [resource.getrlimit(resource.RLIMIT_NOFILE), resource.getrlimit(resource.RLIMIT_CORE)]

    assert _in_child(limit)["value"] == [[hard, hard], [0, 0]]


@pytest.mark.parametrize("home_exists", [True, False])
def test_enter_home_alone(user, home_exists):
    home = user.home if home_exists else "/nonexistent/mep-home"

    def enter() -> str:
        enter_home(_setup(dataclasses.replace(user, home=home)))
        return os.getcwd()

    assert _in_child(enter)["value"] == (user.home if home_exists else "/")


def test_close_descriptors_alone_keeps_stdio_and_the_error_pipe(user, root_secret):
    # Not through _in_child: its report pipe would be closed too. The error pipe reports instead.
    error_read, error_write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(3):
                os.set_inheritable(os.open(root_secret[0], os.O_RDONLY), True)
            close_descriptors(_setup(user, error_fd=error_write))
            # Only descriptors still open once listdir has closed its own.
            remaining = [fd for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")]
            os.write(error_write, json.dumps(sorted(map(int, remaining))).encode())
        finally:
            os._exit(0)
    os.close(error_write)
    with os.fdopen(error_read, "rb") as pipe:
        remaining = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert remaining == [0, 1, 2, error_write]


# --- Single-user mode, as an ordinary account ---------------------------------------------

SINGLE_USER_SCRIPT = r"""
import errno, json, os, pwd, select, sys
from mep.root.accounts import Account
from mep.cli.interpreter import check_interpreter_usable
from mep.root.privdrop import DropStepError, SpawnPlan, read_log_tail, spawn

log_path, report_script = sys.argv[1:]
entry = pwd.getpwuid(os.getuid())
account = Account.from_passwd(entry)
plan = SpawnPlan(account=account, argv=[sys.executable, "-c", report_script],
                 stdin_data=b"single-user stdin", log_path=log_path, drop_privileges=False)
child = spawn(plan)
select.select([child.pidfd], [], [])
_, status = os.waitpid(child.pid, 0)
os.close(child.pidfd)
try:
    spawn(SpawnPlan(account=account, argv=[sys.executable, "-c", "pass"], stdin_data=b"",
                    log_path=log_path + ".dropped"))
    refused = None
except DropStepError as exc:
    refused = [exc.step, exc.errno]
print(json.dumps({"status": status, "refused": refused, "tail": read_log_tail(account, log_path),
                  "interpreter_check": check_interpreter_usable("/nonexistent/python")}))
"""


def test_single_user_mode_as_an_ordinary_account(user):
    log_path = _log_path(user, "single")
    result = subprocess.run(
        ["runuser", "-u", user.name, "--", "env", "-i", f"PATH={os.path.dirname(PYTHON)}:/usr/bin:/bin",
         PYTHON, "-c", SINGLE_USER_SCRIPT, log_path, REPORT_SCRIPT],
        capture_output=True, text=True, cwd="/", check=False,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["status"] == 0
    # Without root the drop itself fails at its first privileged call, and says so.
    assert outcome["refused"] == ["set_groups", errno.EPERM]
    assert outcome["interpreter_check"] is None  # nothing to prove without root
    assert outcome["tail"] == Path(log_path).read_text().strip()  # read without a drop, as this same account

    report = json.loads(Path(log_path).read_text())
    assert report["resuid"] == [user.uid] * 3
    assert report["status"]["NoNewPrivs"] == "1"
    assert set(report["environ"]) <= ENV_WHITELIST
    assert report["environ"]["HOME"] == user.home
    assert report["cwd"] == user.home
    assert report["umask"] == 0o077
    assert report["session_leader"]
    assert set(report["fds"]) == {"0", "1", "2"}
    assert report["stdin"] == "single-user stdin"
    assert stat.S_IMODE(os.stat(log_path).st_mode) == 0o600


# --- Reading the account's log, as the account ------------------------------------------


def _write_user_file(user: Account, path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    Path(path).write_text(text)
    _chown_to(user, path)


def _ids() -> tuple:
    return os.getresuid(), os.getresgid(), sorted(os.getgroups())


def test_read_log_tail_returns_the_last_whole_lines(user):
    path = os.path.join(user.home, "endpoint.log")
    _write_user_file(user, path, "".join(f"line {n:02d}\n" for n in range(30)))
    before = _ids()
    assert read_log_tail(user, path) == "\n".join(f"line {n:02d}" for n in range(10, 30))
    # A window that starts mid-line drops the cut line rather than returning half of it.
    assert read_log_tail(user, path, max_bytes=20) == "line 28\nline 29"
    assert read_log_tail(user, path, max_bytes=16) == "line 28\nline 29"
    assert read_log_tail(user, path, max_lines=1) == "line 29"
    assert _ids() == before


def test_read_log_tail_through_a_planted_link_reads_only_what_the_account_may(user, root_secret, shared_dir):
    # A link to root's secret yields nothing of it; a link to a file every account may read is followed, as the
    # account's own programs would; a FIFO yields "" at once rather than a reader blocked on it.
    secret_path, content = root_secret
    readable = os.path.join(shared_dir, "readable.log")
    Path(readable).write_text("root's readable text\n")
    os.chmod(readable, 0o644)
    fifo = os.path.join(user.home, "fifo.log")
    os.mkfifo(fifo, 0o600)
    _chown_to(user, fifo)
    before = _ids()
    for name, target in (("endpoint.log", secret_path), ("other.log", readable)):
        os.symlink(target, os.path.join(user.home, name))
        _chown_to(user, os.path.join(user.home, name))
    assert content not in read_log_tail(user, os.path.join(user.home, "endpoint.log"))
    assert read_log_tail(user, os.path.join(user.home, "endpoint.log")) == ""
    assert read_log_tail(user, os.path.join(user.home, "other.log")) == "root's readable text"
    assert read_log_tail(user, fifo) == ""
    assert _ids() == before
    assert Path(secret_path).read_text() == content


def test_read_log_tail_reads_with_the_accounts_permissions(user, root_secret):
    # Files root could read but the account can't: a file only root and group
    # root may read, in the home (root's supplementary group 0 must not stay),
    # and the secret reached through a directory link to /root.
    root_only = os.path.join(user.home, "root-only.log")
    Path(root_only).write_text("root's text\n")
    os.chown(root_only, 0, 0)
    os.chmod(root_only, 0o640)
    link = os.path.join(user.home, "logs")
    os.symlink("/root", link)
    _chown_to(user, link)
    saved_groups = os.getgroups()
    os.setgroups([0])  # as a manager started from a root login shell has them
    try:
        before = _ids()
        assert read_log_tail(user, root_only) == ""
        assert read_log_tail(user, os.path.join(link, os.path.basename(root_secret[0]))) == ""
        assert read_log_tail(user, os.path.join(user.home, "missing.log")) == ""
        assert _ids() == before
    finally:
        os.setgroups(saved_groups)


# --- The interpreter check -----------------------------------------------------------------


def test_interpreter_check_passes_for_a_world_readable_venv():
    assert check_interpreter_usable(PYTHON) is None


def test_interpreter_check_refuses_an_installation_under_a_private_directory():
    """Like pyenv's python under a 0700 /root: made here, so the test runs on any machine."""
    private = Path(tempfile.mkdtemp(prefix="mep-private-", dir="/var/tmp"))
    try:
        os.chmod(private, 0o700)
        (private / "python3").symlink_to(sys.executable)
        python = str(private / "python3")
        with pytest.raises(ConfigurationError) as failure:
            check_interpreter_usable(python)
        assert str(failure.value) == (
            f"the mep installation at {python} can't be used by other accounts: {private} is mode 0700. "
            "Install mep into a world-readable virtual environment (e.g. /usr/bin/python3 -m venv /opt/mep/venv)"
            " and start the manager from it."
        )
    finally:
        shutil.rmtree(private)


def test_interpreter_check_names_a_private_directory_on_the_way(shared_dir):
    hidden = os.path.join(shared_dir, "hidden")
    os.mkdir(hidden, 0o750)
    python = os.path.join(hidden, "python")
    os.symlink(PYTHON, python)
    expected = f"{python} can't be used by other accounts: {hidden} is mode 0750"
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        check_interpreter_usable(python)


def test_exported_environment_is_filtered_by_the_same_rules() -> None:
    """What PAM modules export reaches the endpoint only where extra_env would have accepted it."""
    kept, refused = allowed_environment({
        "MEP_PAM_SESSION": "open", "KRB5CCNAME": "FILE:/tmp/krb5cc_1000", "LD_PRELOAD": "/tmp/evil.so",
        "PYTHONPATH": "/tmp", "PATH": "/tmp/bin", "HOME": "/root", "A=B": "c", "X": "a\0b",
    })
    assert kept == {"MEP_PAM_SESSION": "open", "KRB5CCNAME": "FILE:/tmp/krb5cc_1000"}
    assert len(refused) == 6
    assert any("LD_PRELOAD is not allowed" in problem for problem in refused)
    assert any("PATH is set by the spawner" in problem for problem in refused)

"""PAM for real: the binding, the session holder, and PAM sessions through a submission.

Every test writes its own service file to /etc/pam.d (``pam_service``) and
removes it afterwards. Functions sent as tasks travel by value.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import mep
from mep.errors import AccountRefusedError, ConfigurationError, SpawnError
from mep.root import pam as pam_binding
from mep.root.accounts import Account, AccountRefused
from mep.root.config import PamSettings
from mep.root.pam import PamError, PamHandle, check_account
from mep.root.privdrop import SpawnPlan
from mep.root.session_holder import KILL_ENDPOINT_SIGNAL, start_session_holder
from tests.harness import DOMAIN_STRIP, audit_log_of, children_of, expression_mapping, processes_of_uid, wait_for
from tests.pam_services import PamService, pam_service_fixture  # noqa: F401 - the pam_service fixture

pytestmark = pytest.mark.root

SHIPPED_SERVICE = Path(__file__).resolve().parent.parent / "packaging" / "pam.d" / "mep"
MakeAccount = Callable[..., pwd.struct_passwd]


def account_of(entry: pwd.struct_passwd) -> Account:
    return Account.from_passwd(pwd.getpwnam(entry.pw_name))


def shell_plan(entry: pwd.struct_passwd, script: str, stdin: bytes = b"") -> SpawnPlan:
    """The endpoint stand-in: a shell script run as the account, its output in its home."""
    return SpawnPlan(account=account_of(entry), argv=["/bin/sh", "-c", script], stdin_data=stdin,
                     log_path=os.path.join(entry.pw_dir, "endpoint.log"), title="test endpoint")


def wait_exit(pidfd: int, pid: int) -> int:
    """The holder's wait status, once it exits."""
    import select

    select.select([pidfd], [], [], 60)
    _, status = os.waitpid(pid, 0)
    os.close(pidfd)
    return status


# --- the binding --------------------------------------------------------------------------------


def test_account_management_allows_and_refuses(pam_service: PamService, account_factory: MakeAccount) -> None:
    allowed, refused = account_factory("meppamok"), account_factory("meppamno")
    pam_service.deny(refused.pw_name)
    assert check_account(pam_service.name, allowed.pw_name) == []
    with pytest.raises(PamError) as raised:
        check_account(pam_service.name, refused.pw_name)
    assert raised.value.step == "pam_acct_mgmt" and raised.value.code != 0
    assert "pam_acct_mgmt failed" in raised.value.detail


def test_expired_account_is_refused_by_pam_unix(pam_service: PamService, account_factory: MakeAccount) -> None:
    expired = account_factory("meppamexp")
    subprocess.run(["chage", "-E", "0", expired.pw_name], check=True)
    with pytest.raises(PamError) as raised:
        check_account(pam_service.name, expired.pw_name)
    assert raised.value.step == "pam_acct_mgmt"
    assert "expired" in raised.value.detail, "pam_unix says why, and that reaches the admin's log"


def test_messages_from_modules_are_kept(pam_service: PamService, account_factory: MakeAccount) -> None:
    user = account_factory("meppamecho")
    pam_service.write("account required pam_echo.so hello %u\naccount required pam_permit.so\n")
    assert check_account(pam_service.name, user.pw_name) == [f"info: hello {user.pw_name}"]


def test_a_conversing_session_module_does_not_crash_the_interpreter(pam_service: PamService,
                                                                     account_factory: MakeAccount) -> None:
    """python-pam's crash: its callback freed while a session module still converses (pam_motd, pam_echo)."""
    user = account_factory("meppammotd")
    pam_service.write("account required pam_permit.so\nsession optional pam_motd.so\n"
                      "session required pam_echo.so session for %u\nsession required pam_permit.so\n")
    with PamHandle(pam_service.name, user.pw_name) as pam:
        pam.call("pam_acct_mgmt", 0)
        pam.call("pam_setcred", pam_binding.PAM_ESTABLISH_CRED)
        pam.call("pam_open_session", 0)
        pam.call("pam_close_session", 0)
        pam.call("pam_setcred", pam_binding.PAM_DELETE_CRED)
        assert f"info: session for {user.pw_name}" in pam.messages


def test_prompts_are_refused_and_information_is_recorded(pam_service: PamService,
                                                         account_factory: MakeAccount) -> None:
    """Nobody can answer a prompt: the conversation fails it instead of inventing an answer.

    No module shipped for the account or session phase prompts, so the test calls the handle's own C
    callback (the one PAM calls) the way libpam does.
    """
    user = account_factory("meppamconv")
    response = ctypes.c_void_p()

    def converse(pam: PamHandle, *messages: tuple[int, bytes]) -> int:
        array = (ctypes.POINTER(pam_binding._Message) * len(messages))(
            *(ctypes.pointer(pam_binding._Message(style, text)) for style, text in messages))
        return pam._conv.conv(len(messages), array, ctypes.byref(response), None)

    with PamHandle(pam_service.name, user.pw_name) as pam:
        assert converse(pam, (4, b"welcome"), (3, b"disk almost full")) == pam_binding.PAM_SUCCESS
        assert response.value, "an (empty) answer for each message, which PAM frees"
        ctypes.CDLL(None).free(response)
        assert converse(pam, (4, b"about to ask"), (1, b"Password: ")) == pam_binding.PAM_CONV_ERR
        assert pam.messages == ["info: welcome", "error: disk almost full", "info: about to ask",
                                "prompt: Password: "]
        pam_service.deny(user.pw_name)
        with pytest.raises(PamError, match="pam_acct_mgmt failed.*the modules said: info: welcome"):
            pam.call("pam_acct_mgmt", 0)


def test_the_library_is_configurable(pam_service: PamService, account_factory: MakeAccount) -> None:
    user = account_factory("meppamlib")
    library = str(next(path for pattern in ("usr/lib/*/libpam.so.0", "lib/*/libpam.so.0", "usr/lib64/libpam.so.0")
                       for path in Path("/").glob(pattern)))
    assert check_account(pam_service.name, user.pw_name, library=library) == []
    with pytest.raises(ConfigurationError, match="cannot load the PAM library 'libnosuchpam.so'"):
        check_account(pam_service.name, user.pw_name, library="libnosuchpam.so")


# --- the session holder --------------------------------------------------------------------------


def test_holder_opens_the_session_around_the_endpoint(pam_service: PamService, account_factory: MakeAccount) -> None:
    user = account_factory("mephold")
    marker = Path(user.pw_dir) / "running"
    script = f"cat > {marker}.stdin; env > {marker}.env; id -u > {marker}; while [ -e {marker} ]; do sleep 0.1; done"
    held = start_session_holder(shell_plan(user, script, stdin=b"boot document"), PamSettings(pam_service.name))
    try:
        wait_for(lambda: marker.exists() and marker.read_text().strip(), what="the endpoint to run")  # written, not just created
        assert marker.read_text().strip() == str(user.pw_uid)
        assert Path(f"{marker}.stdin").read_text() == "boot document", "the boot document passes through"
        assert pam_service.events(user.pw_name) == ["open_session"], "open while the endpoint runs"
        opened_by = int(pam_service.hook_log.read_text().split()[2])
        assert opened_by == held.holder_pid, "the holder, not the spawner, called the session modules"
        env = dict(line.split("=", 1) for line in Path(f"{marker}.env").read_text().splitlines() if "=" in line)
        assert env["MEP_PAM_SESSION"] == "open", "PAM's exported environment reaches the endpoint"
        assert "LD_PRELOAD" not in env and "PYTHONPATH" not in env, "filtered like any extra environment"
        assert os.getsid(held.holder_pid) == held.holder_pid, "the holder leads its own session"
        assert os.getsid(held.endpoint_pid) == held.endpoint_pid
        assert os.stat(f"/proc/{held.endpoint_pid}").st_uid == user.pw_uid
    finally:
        marker.unlink(missing_ok=True)
    assert os.WEXITSTATUS(wait_exit(held.pidfd, held.holder_pid)) == 0
    assert pam_service.events(user.pw_name) == ["open_session", "close_session"], "closed after it exits"


def test_holder_exits_like_its_endpoint(pam_service: PamService, account_factory: MakeAccount) -> None:
    user = account_factory("mepholdexit")
    held = start_session_holder(shell_plan(user, "exit 7"), PamSettings(pam_service.name))
    status = wait_exit(held.pidfd, held.holder_pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
    held = start_session_holder(shell_plan(user, "kill -SEGV $$"), PamSettings(pam_service.name))
    status = wait_exit(held.pidfd, held.holder_pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
    assert pam_service.events(user.pw_name) == ["open_session", "close_session"] * 2


def test_sigterm_to_the_holder_reaches_the_endpoint_and_the_session_closes(pam_service: PamService,
                                                                           account_factory: MakeAccount) -> None:
    user = account_factory("mepholdterm")
    marker = Path(user.pw_dir) / "started"
    held = start_session_holder(shell_plan(user, f"trap 'exit 42' TERM; touch {marker}; "
                                                 "while true; do sleep 0.1; done"), PamSettings(pam_service.name))
    wait_for(marker.exists, what="the endpoint to start")
    signal.pidfd_send_signal(held.pidfd, signal.SIGTERM)
    assert os.WEXITSTATUS(wait_exit(held.pidfd, held.holder_pid)) == 42
    assert pam_service.events(user.pw_name) == ["open_session", "close_session"]


def test_kill_signal_kills_the_endpoints_group_and_the_session_still_closes(pam_service: PamService,
                                                                            account_factory: MakeAccount) -> None:
    user = account_factory("mepholdkill")
    pids = Path(user.pw_dir) / "pids"
    held = start_session_holder(shell_plan(user, f"trap '' TERM; sleep 300 & echo $! > {pids}; wait"),
                                PamSettings(pam_service.name))
    wait_for(lambda: pids.exists() and pids.read_text().strip(), what="the endpoint's worker to start")
    worker = int(pids.read_text())
    signal.pidfd_send_signal(held.pidfd, KILL_ENDPOINT_SIGNAL)
    status = wait_exit(held.pidfd, held.holder_pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    wait_for(lambda: not os.path.exists(f"/proc/{worker}"), what="the worker to die with its endpoint")
    assert pam_service.events(user.pw_name) == ["open_session", "close_session"]


def test_refused_account_starts_nothing(pam_service: PamService, account_factory: MakeAccount) -> None:
    user = account_factory("mepholdno")
    pam_service.deny(user.pw_name)
    leftovers = set(processes_of_uid(user.pw_uid))  # of an earlier test's account that had this uid
    with pytest.raises(AccountRefused) as raised:
        start_session_holder(shell_plan(user, "touch ran"), PamSettings(pam_service.name))
    assert isinstance(raised.value, AccountRefusedError)
    assert "refused by this system's account checks (PAM)" in str(raised.value)
    assert "pam_acct_mgmt" in raised.value.admin_detail and "pam_acct_mgmt" not in str(raised.value)
    assert not (Path(user.pw_dir) / "ran").exists() and set(processes_of_uid(user.pw_uid)) <= leftovers
    assert pam_service.events(user.pw_name) == []


def test_a_failing_session_module_is_a_spawn_error(pam_service: PamService, account_factory: MakeAccount) -> None:
    user = account_factory("mepholdsess")
    pam_service.write("account required pam_permit.so\nsession required pam_deny.so\n")
    with pytest.raises(SpawnError) as raised:
        start_session_holder(shell_plan(user, "touch ran"), PamSettings(pam_service.name))
    assert "could not open a session" in str(raised.value) and "pam_open_session" in raised.value.admin_detail
    assert not (Path(user.pw_dir) / "ran").exists()


def test_a_module_granting_the_root_group_is_refused(pam_service: PamService, account_factory: MakeAccount) -> None:
    """pam_group, run by pam_setcred, may add groups: never root's (gid 0), whatever /etc/security/group.conf says."""
    user = account_factory("mepholdgid")
    pam_service.write("auth required pam_group.so\naccount required pam_permit.so\nsession required pam_permit.so\n")
    group_conf = Path("/etc/security/group.conf")
    original = group_conf.read_bytes()
    group_conf.write_bytes(original + f"{pam_service.name};*;{user.pw_name};Al0000-2400;root\n".encode())
    try:
        with pytest.raises(SpawnError) as raised:
            start_session_holder(shell_plan(user, "touch ran"), PamSettings(pam_service.name))
    finally:
        group_conf.write_bytes(original)
    assert "(pam_setcred failed)" in str(raised.value)
    assert "a module added the root group (gid 0)" in raised.value.admin_detail
    assert not (Path(user.pw_dir) / "ran").exists()


def test_a_failed_drop_is_reported_with_its_step(pam_service: PamService, account_factory: MakeAccount) -> None:
    user = account_factory("mepholdnohome", create_home=False)
    with pytest.raises(SpawnError) as raised:
        start_session_holder(shell_plan(user, "true"), PamSettings(pam_service.name))
    assert "open_log" in str(raised.value)
    assert pam_service.events(user.pw_name) == ["open_session", "close_session"]


def test_the_shipped_service_file_works(account_factory: MakeAccount) -> None:
    name = f"mep-shipped-{os.getpid()}"
    target = Path("/etc/pam.d") / name
    shutil.copy(SHIPPED_SERVICE, target)
    try:
        user, expired = account_factory("mepshipped"), account_factory("mepshipexp")
        subprocess.run(["chage", "-E", "0", expired.pw_name], check=True)
        assert check_account(name, user.pw_name) == []
        with pytest.raises(PamError):
            check_account(name, expired.pw_name)
        held = start_session_holder(shell_plan(user, "id -u > uid"), PamSettings(name))
        assert os.WEXITSTATUS(wait_exit(held.pidfd, held.holder_pid)) == 0
        assert (Path(user.pw_dir) / "uid").read_text().strip() == str(user.pw_uid)
    finally:
        target.unlink()


# --- through a submission ------------------------------------------------------------------------


def pam_settings(service: PamService) -> dict:
    return {"pam": {"enable": True, "service": service.name}}


def session_probe() -> dict:
    """Runs on the endpoint: the PAM variable and who runs it."""
    import os

    return {"pam": os.environ.get("MEP_PAM_SESSION"), "uid": os.getuid(), "pid": os.getpid()}


def nap(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "rested"


def test_pam_refusal_reaches_the_submitter_and_nothing_spawns(deploy, pam_service: PamService,
                                                              account_factory: MakeAccount) -> None:
    refused = account_factory("meppamsub")
    pam_service.deny(refused.pw_name)
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), settings=pam_settings(pam_service))
    identity = deploy.identity(f"{refused.pw_name}@example.org")
    before = children_of(manager.spawner_pid)
    leftovers = set(processes_of_uid(refused.pw_uid))
    with deploy.executor(identity, manager) as executor:
        future = executor.submit(session_probe)
    with pytest.raises(mep.AccountRefusedError) as raised:
        future.result(timeout=60)
    assert str(raised.value) == (f"the account '{refused.pw_name}' that {refused.pw_name}@example.org maps to is"
                                 " refused by this system's account checks (PAM); tasks can't run as it."
                                 " Ask your admin.")
    assert "pam_acct_mgmt failed" in manager.log(), "the detail goes to the admin's log"
    assert children_of(manager.spawner_pid) == before and set(processes_of_uid(refused.pw_uid)) <= leftovers
    assert not (Path(refused.pw_dir) / ".mep").exists()
    assert pam_service.events(refused.pw_name) == []
    audit = audit_log_of(manager.config_path).read_text()
    assert '"outcome":"refused"' in audit and "pam_acct_mgmt" in audit


def test_task_runs_inside_the_session_which_closes_when_the_endpoint_exits(deploy, pam_service: PamService,
                                                                          account_factory: MakeAccount) -> None:
    user = account_factory("meppamrun")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), settings=pam_settings(pam_service))
    identity = deploy.identity(f"{user.pw_name}@example.org")
    with deploy.executor(identity, manager, user_endpoint_config={"idle_timeout": 10}) as executor:
        report = executor.submit(session_probe).result(timeout=60)
        assert report["pam"] == "open" and report["uid"] == user.pw_uid
        assert pam_service.events(user.pw_name) == ["open_session"]
    (holder,) = [pid for pid in children_of(manager.spawner_pid) if pid != manager.router_pid]
    assert os.stat(f"/proc/{holder}").st_uid == 0
    wait_for(lambda: not os.path.exists(f"/proc/{holder}"), timeout=60, what="the idle endpoint and its holder")
    wait_for(lambda: pam_service.events(user.pw_name) == ["open_session", "close_session"],
             what="the session to close")
    assert report["pid"] not in processes_of_uid(user.pw_uid)


def test_endpoint_and_session_survive_a_manager_crash_and_restart(deploy, pam_service: PamService,
                                                                 account_factory: MakeAccount) -> None:
    user = account_factory("meppamcrash")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), settings=pam_settings(pam_service))
    identity = deploy.identity(f"{user.pw_name}@example.org")
    executor = deploy.executor(identity, manager, user_endpoint_config={"idle_timeout": 10})
    try:
        future = executor.submit(nap, 6)
        wait_for(lambda: pam_service.events(user.pw_name) == ["open_session"], what="the session to open")
        (holder,) = [pid for pid in children_of(manager.spawner_pid) if pid != manager.router_pid]
        (endpoint,) = wait_for(lambda: children_of(holder), what="the endpoint (forked after the hook ran)")
        # Only an endpoint in the spawner's registry can be adopted: crash once it is recorded (it logs that after).
        wait_for(lambda: f"in a PAM session (holder pid {holder})" in manager.log(), what="the spawner to record it")
        os.killpg(manager.process.popen.pid, signal.SIGKILL)  # spawner and router die together: a crash
        manager.process.popen.wait()
        assert os.path.exists(f"/proc/{holder}") and os.path.exists(f"/proc/{endpoint}")
        manager.start()  # the new manager adopts the endpoint, session and all
        assert "adopted endpoint" in manager.log().rsplit("starting (", 1)[1]
        future.result(timeout=60)
        assert pam_service.events(user.pw_name) == ["open_session"], "one session, intact: nothing ran anew"
        wait_for(lambda: not os.path.exists(f"/proc/{endpoint}"), timeout=90,
                 what="the adopted endpoint to idle out and exit")
        wait_for(lambda: pam_service.events(user.pw_name, holder) == ["open_session", "close_session"],
                 what="its holder to close the session")
        wait_for(lambda: not os.path.exists(f"/proc/{holder}"), what="the holder to exit")
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def test_manager_refuses_to_start_without_the_pam_service_file(deploy) -> None:
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), wait=False,
                                   settings={"pam": {"enable": True, "service": "mep-no-such-service"}})
    manager.process.popen.wait(timeout=60)
    assert manager.process.popen.returncode != 0
    assert "/etc/pam.d/mep-no-such-service does not exist" in manager.log()
    assert "Traceback" not in manager.log()


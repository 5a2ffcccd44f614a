"""Single-user mode and the demo, run by real ordinary accounts (root masks permission bugs)."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

import mep
from tests.harness import DOMAIN_STRIP, PYTHON, deployment, expression_mapping

pytestmark = pytest.mark.root  # creating the ordinary accounts needs root


def whoami() -> tuple[int, int, str]:
    import os

    return os.getuid(), os.getgid(), os.environ["HOME"]


def test_single_user_manager_serves_only_its_own_account(account_factory) -> None:
    owner = account_factory("mepsolo")
    other = account_factory("mepother")
    with deployment(owner=owner.pw_name) as deploy:
        manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
        assert os.stat(f"/proc/{manager.spawner_pid}").st_uid == owner.pw_uid
        mine = deploy.identity(f"{owner.pw_name}@example.org")
        theirs = deploy.identity(f"{other.pw_name}@example.org")
        with deploy.executor(mine, manager) as executor:
            assert executor.submit(whoami).result(timeout=60) == (owner.pw_uid, owner.pw_gid, owner.pw_dir)
        with deploy.executor(theirs, manager) as executor:
            future = executor.submit(whoami)
        with pytest.raises(mep.AccountRefusedError, match=other.pw_name):
            future.result(timeout=60)


def _demo(*argv: str, user: str | None = None) -> subprocess.CompletedProcess:
    command = [PYTHON, "-m", "mep", "demo", "--tasks", "2", *argv]
    if user is not None:
        home = pwd.getpwnam(user).pw_dir
        command = ["runuser", "-u", user, "--", "env", "-i", f"HOME={home}",
                   f"PATH={Path(PYTHON).parent}:/usr/bin:/bin", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd="/")


def test_demo_as_an_ordinary_user_runs_single_user(account_factory) -> None:
    user = account_factory("mepdemouser")
    result = _demo(user=user.pw_name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "single-user" in result.stdout
    assert result.stdout.count(f"ran as {user.pw_name} (uid {user.pw_uid}") == 2
    assert Path(user.pw_dir, ".mep", "demo").is_dir(), "a user's demo state lives in their home"


def test_demo_as_root_creates_and_removes_a_temporary_account(router_account: str) -> None:
    result = _demo()
    assert result.returncode == 0, result.stdout + result.stderr
    created = [line.split()[3] for line in result.stdout.splitlines() if line.startswith("created temporary account")]
    assert len(created) == 1
    name = created[0]
    assert result.stdout.count(f"ran as {name} (uid ") == 2
    assert "ran as root" not in result.stdout
    with pytest.raises(KeyError):
        pwd.getpwnam(name)


def test_demo_as_root_with_an_existing_account(account_factory, router_account: str) -> None:
    user = account_factory("mepdemoas")
    result = _demo("--as", user.pw_name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(f"ran as {user.pw_name} (uid {user.pw_uid}") == 2
    pwd.getpwnam(user.pw_name)  # not removed: the demo only removes accounts it created


def test_demo_refuses_root_as_the_task_account() -> None:
    result = _demo("--as", "root")
    assert result.returncode != 0
    assert "non-root" in result.stderr and "Traceback" not in result.stderr

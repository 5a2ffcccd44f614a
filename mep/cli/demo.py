"""``mep demo``: the whole path on this one machine, printing the account each task ran as.

As an ordinary user: a service and a single-user manager, both as you. As
root: a multi-user manager that maps a demo identity to a real non-root
account (``--as USER``, or a temporary account created for the demo and
removed afterwards). State lives under /var/lib/mep/demo for root and
~/.mep/demo for anyone else, so the two never collide.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click

from mep.cli.service_config import default_state_dir
from mep.errors import ConfigurationError, MepError
from mep.service.admin import register_endpoint
from mep.service.state import ServiceState

ROUTER_USER = "mep"


def whoami(task_number: int) -> dict[str, object]:
    """The demo's task: report who and where it ran."""
    import getpass
    import os
    import socket

    return {"task": task_number, "user": getpass.getuser(), "uid": os.getuid(), "pid": os.getpid(),
            "host": socket.gethostname()}


def _run_quietly(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigurationError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


@contextlib.contextmanager
def demo_account(as_user: str | None) -> Iterator[str]:
    """The account the demo's tasks run as; a temporary one (removed afterwards) if none is given."""
    if os.geteuid() != 0:
        yield pwd.getpwuid(os.geteuid()).pw_name
        return
    if as_user is not None:
        try:
            entry = pwd.getpwnam(as_user)
        except KeyError:
            raise ConfigurationError(f"--as {as_user}: no such account") from None
        if entry.pw_uid == 0:
            raise ConfigurationError("--as must name a non-root account: tasks never run as root")
        yield entry.pw_name
        return
    name = f"mepdemo{secrets.token_hex(3)}"
    _run_quietly("useradd", "--create-home", "--shell", "/bin/bash", name)
    click.echo(f"created temporary account {name} (login shell, no password); it is removed when the demo ends")
    try:
        yield name
    finally:
        subprocess.run(["userdel", "--remove", name], capture_output=True)
        click.echo(f"removed temporary account {name}")


def _ensure_router_account() -> None:
    try:
        pwd.getpwnam(ROUTER_USER)
    except KeyError:
        _run_quietly("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", ROUTER_USER)
        click.echo(f"created system account {ROUTER_USER!r} for the manager's unprivileged router")


@contextlib.contextmanager
def background(argv: list[str], log_path: Path) -> Iterator[subprocess.Popen]:
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _wait_for_file(path: Path, process: subprocess.Popen, what: str, log_path: Path) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise MepError(f"the {what} did not start; see {log_path}:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def run_demo(as_user: str | None, tasks: int) -> int:
    from mep import Executor

    root = os.geteuid() == 0
    home = default_state_dir("demo")
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(mode=0o700, parents=True)
    if root:
        _ensure_router_account()
    state = ServiceState.open(home / "service")
    python = sys.executable
    with demo_account(as_user) as account:
        identity = state.store.add_identity(f"{account}@demo.mep", name=f"Demo user {account}")
        address_file = home / "service.address"
        service_log = home / "service.log"
        with background([python, "-m", "mep", "service", "start", "--state-dir", str(state.directory),
                         "--listen", "tcp://127.0.0.1:0", "--address-file", str(address_file)],
                        service_log) as service:
            address = _wait_for_file(address_file, service, "service", service_log)
            registered = register_endpoint(state, "demo", home / "manager", address)
            mapping = [{"DATA_TYPE": "expression_identity_mapping#1.0.0",
                        "mappings": [{"source": "{username}", "match": r"(.*)@demo\.mep", "output": "{0}"}]}]
            (home / "manager" / "identity_mapping.json").write_text(json.dumps(mapping, indent=2) + "\n")
            manager_log = home / "manager.log"
            mode = "multi-user (root spawner, router as 'mep')" if root else "single-user"
            click.echo(f"service at {address}; manager in {mode} mode; logs in {home}")
            with background([python, "-m", "mep", "manager", "start", "--config", str(registered.config_path)],
                            manager_log) as manager:
                with Executor(registered.endpoint_id, service=address, token=identity.token,
                              service_key=state.public_key, user_endpoint_config={"workers": 2}) as executor:
                    futures = [executor.submit(whoami, number) for number in range(tasks)]
                for future in futures:
                    try:
                        report = future.result(timeout=120)
                    except TimeoutError:
                        raise MepError(f"no result within 120 s; manager log {manager_log}:\n"
                                       f"{_tail(manager_log)}") from None
                    click.echo(f"task {report['task']} ran as {report['user']} (uid {report['uid']}, "
                               f"pid {report['pid']}) on {report['host']}")
                if manager.poll() is not None:
                    raise MepError(f"the manager exited early; see {manager_log}")
    click.echo("demo finished: every task ran as the mapped account, never as root")
    return 0

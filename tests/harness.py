"""Real mep deployments for tests: a service process, manager processes, identities, executors.

Everything runs as separate processes from the test's own interpreter, which
must live in a world-readable virtual environment (the endpoints exec it as
other accounts). State lives under /var/tmp, never under pytest's tmp_path
(its parent is 0700, so other accounts could not read it); sockets live under
a per-deployment directory in /run, so parallel or repeated runs can't collide.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mep import Executor

PYTHON = sys.executable
ROUTER_USER = "mep"
DOMAIN_STRIP = {"source": "{username}", "match": r"(.*)@example\.org", "output": "{0}"}


def expression_mapping(*rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"DATA_TYPE": "expression_identity_mapping#1.0.0", "mappings": list(rules)}]


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def local_template_boot() -> dict[str, str]:
    """The EndpointBoot fields that hand a user endpoint the shipped local template and its schema, as root does."""
    from mep.root.config import shipped_templates_dir

    template, schema = shipped_templates_dir() / "local.yaml.j2", shipped_templates_dir() / "local.schema.json"
    return {"template": template.read_text(), "schema": schema.read_text(), "template_path": str(template),
            "schema_path": str(schema)}


def children_of(pid: int, *, mapping_helpers: bool = False) -> list[int]:
    """Direct children of ``pid``, from /proc; a spawner's identity-mapping helper only with ``mapping_helpers``.

    The helper (``python -I -m mep.mapping``) lives as long as the mapping it serves, so tests that count
    what a spawner started for users leave it out.
    """
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    helper = handle.read().split(b"\0")[1:4] == [b"-I", b"-m", b"mep.mapping"]
            except OSError:
                continue
            if int(fields[1]) == pid and (mapping_helpers or not helper):
                found.append(int(entry))
    return found


def processes_of_uid(uid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    found.append(int(entry))
            except OSError:
                continue
    return found


@dataclass
class Process:
    popen: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def start_process(argv: list[str], log_path: Path, user: str | None = None) -> Process:
    if user is not None:
        home = pwd.getpwnam(user).pw_dir
        argv = ["runuser", "-u", user, "--", "env", "-i", f"HOME={home}", f"PATH={Path(PYTHON).parent}:/usr/bin:/bin",
                *argv]
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, cwd="/")
    return Process(popen, log_path)


@dataclass
class Manager:
    config_path: Path
    endpoint_id: str
    run_dir: Path | None
    owner: str | None = None
    process: Process | None = None

    def start(self, wait: bool = True) -> None:
        log_path = self.config_path.with_suffix(".log")  # config.yaml -> config.log
        offset = log_path.stat().st_size if log_path.exists() else 0
        self.process = start_process([PYTHON, "-m", "mep", "manager", "start", "--config", str(self.config_path)],
                                     log_path, user=self.owner)
        if wait:
            wait_for(lambda: "registered with the service" in self.log()[offset:] or self.process.popen.poll()
                     is not None, what="the manager to register")
            assert self.process.popen.poll() is None, f"manager exited:\n{self.log()}"

    def log(self) -> str:
        return self.process.log() if self.process else ""

    @property
    def router_pid(self) -> int:
        return _pid_with_title(f"mep-manager router {self.endpoint_id}")

    @property
    def spawner_pid(self) -> int:
        """Found by its process title (under runuser the started process is not the spawner)."""
        return _pid_with_title(f"mep-manager spawner {self.endpoint_id}")


def _pid_with_title(prefix: str) -> int:
    title = prefix.encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if handle.read().startswith(title):
                        return int(entry)
            except OSError:
                continue
    raise AssertionError(f"no process titled {prefix!r}")


@dataclass
class Deployment:
    """A running service plus whatever managers and identities a test adds."""

    root: Path
    state_dir: Path
    owner: str | None = None
    service_options: tuple[str, ...] = ()
    service: Process | None = None
    address: str = ""
    service_key: str = ""
    managers: list[Manager] = field(default_factory=list)

    def start_service(self, listen: str) -> None:
        address_file = self.root / "service.address"
        address_file.unlink(missing_ok=True)
        self.service = start_process(
            [PYTHON, "-m", "mep", "service", "start", "--state-dir", str(self.state_dir), "--listen", listen,
             "--address-file", str(address_file), *self.service_options], self.root / "service.log", user=self.owner)
        self.address = wait_for(lambda: address_file.exists() and address_file.read_text().strip(),
                                what="the service to listen")
        self.service_key = (self.state_dir / "service.key.pub").read_text().strip()

    def restart_service(self, signum: int = signal.SIGKILL) -> None:
        """Stop the service (SIGKILL: a crash) and start it again on the same address."""
        self.service.popen.send_signal(signum)
        self.service.popen.wait(timeout=30)
        self.start_service(self.address)

    def admin(self, *args: str) -> dict[str, str]:
        """Run ``mep service ...`` as the service's owner; returns its ``key: value`` output lines."""
        argv = [PYTHON, "-m", "mep", "service", *args, "--state-dir", str(self.state_dir)]
        if self.owner:
            argv = ["runuser", "-u", self.owner, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, cwd="/")
        assert result.returncode == 0, f"{args} failed: {result.stderr}"
        return dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)

    def identity(self, username: str, *options: str) -> Identity:
        output = self.admin("identity", "add", "--username", username, *options)
        return Identity(id=output["identity_id"], token=output["token"], username=username)

    def start_manager(self, mapping: Any, *, template: Path | None = None, schema: Path | None = None,
                      min_uid: int = 1000, wait: bool = True, settings: dict[str, Any] | None = None) -> Manager:
        """``settings``: more manager config keys (``pam``, ``refuse_locked``, ...); the audit log and the
        router's task log stay in the deployment (``audit_log_of``, ``task_log_of``) unless they name others."""
        name = f"ep{len(self.managers)}"
        config_dir = self.root / name
        output = self.admin("endpoint", "add", name, "--config-dir", str(config_dir),
                            "--service-address", self.address)
        config_path = Path(output["manager config"])
        (config_dir / "identity_mapping.json").write_text(json.dumps(mapping))
        # as root, a per-manager socket directory under /run; as a user, the manager's own default
        run_dir = Path("/run") / f"mep-test-{secrets.token_hex(4)}" if os.geteuid() == 0 and not self.owner else None
        config = yaml.safe_load(config_path.read_text())
        config.update({"router_user": ROUTER_USER, "min_uid": min_uid, "heartbeat_interval": 1.0})
        if run_dir is not None:
            config["run_dir"] = str(run_dir)
        if template is not None:
            config["template"] = str(template)
        if schema is not None:
            config["schema"] = str(schema)
        config["audit_log"] = str(audit_log_of(config_path))
        # the router's account must reach it: not under the config directory (0700) unless that is its own
        config["task_log"] = str(config_dir / "tasks.jsonl" if self.owner else
                                 self.root / f"{name}-router" / "tasks.jsonl")
        config.update(settings or {})
        config_path.write_text(yaml.safe_dump(config))
        if self.owner:
            _chown_tree(config_dir, self.owner)
        manager = Manager(config_path, output["endpoint_id"], run_dir, self.owner)  # run_dir None: not ours
        self.managers.append(manager)
        manager.start(wait=wait)
        return manager

    def executor(self, identity: Identity, manager: Manager, **kwargs: Any) -> Executor:
        """Polls and resends sooner than the defaults, so restarts heal within a test's patience."""
        kwargs.setdefault("poll_interval", 1.0)
        kwargs.setdefault("resend_after", 3.0)
        return Executor(manager.endpoint_id, service=self.address, token=identity.token,
                        service_key=self.service_key, **kwargs)

    def logs(self) -> str:
        parts = [f"--- service log\n{self.service.log() if self.service else ''}"]
        parts += [f"--- manager {m.endpoint_id} log\n{m.log()}" for m in self.managers]
        return "\n".join(parts)

    def stop(self) -> None:
        for manager in self.managers:
            if manager.process is not None:
                manager.process.stop()
            if manager.run_dir is not None:
                shutil.rmtree(manager.run_dir, ignore_errors=True)
        if self.service is not None:
            self.service.stop()


def audit_log_of(config_path: Path) -> Path:
    """Where ``start_manager`` puts a manager's audit log: beside its config, removed with the deployment."""
    return config_path.parent / "audit.jsonl"


def task_log_of(config_path: Path) -> Path:
    """Where ``start_manager`` put a manager's task log (the router's own), as its config says."""
    return Path(yaml.safe_load(config_path.read_text())["task_log"])


def _chown_tree(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for directory, _, files in os.walk(path):
        os.chown(directory, entry.pw_uid, entry.pw_gid)
        for name in files:
            os.chown(os.path.join(directory, name), entry.pw_uid, entry.pw_gid)


@dataclass(frozen=True)
class Identity:
    id: str
    token: str
    username: str


@contextmanager
def deployment(owner: str | None = None, *service_options: str) -> Iterator[Deployment]:
    """A fresh service (as root, or as ``owner``), stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="mep-test-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    if owner:
        _chown_tree(root, owner)
    deploy = Deployment(root=root, state_dir=root / "service", owner=owner,
                        service_options=("--heartbeat-interval", "1", *service_options))
    try:
        deploy.start_service("tcp://127.0.0.1:0")
        yield deploy
    except BaseException:
        print(deploy.logs())
        raise
    finally:
        deploy.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def service_on_small_tmpfs(size: str) -> Iterator[Deployment]:
    """A deployment whose service state directory is its own small tmpfs, unmounted afterwards."""
    with deployment() as deploy:
        deploy.service.stop()
        state = deploy.root / "small-state"
        state.mkdir(mode=0o700)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(state)], check=True)
        try:
            deploy.state_dir = state
            deploy.start_service("tcp://127.0.0.1:0")
            yield deploy
        finally:
            deploy.stop()
            deploy.service = None
            subprocess.run(["umount", "-l", str(state)], check=True)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem has no byte left."""
    path = directory / "filler"
    with open(path, "wb", buffering=0) as handle:
        block = b"\0" * (1 << 16)
        while True:
            try:
                handle.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                if len(block) == 1:
                    break
                block = block[:len(block) // 2]
    return path

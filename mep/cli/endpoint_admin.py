"""``mep endpoint ...``: set up, inspect and stop the managers configured under /etc/mep/NAME/.

Everything here reads what a manager already leaves on the host: its config,
the instance lock in its run directory (held by the root spawner, found in
/proc/locks), the spawner's registry of user endpoints (``endpoints.json``),
the router's status file (``router/status.json``: identities served and task
counts) and /proc. Nothing talks to a manager over its sockets, so these commands work
the same whether systemd or an admin's shell started it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from mep.cli.output import emit_record, emit_rows, friendly as _friendly, output_option, say
from mep.cli.service_config import DEFAULT_SERVICE_CONFIG, locate_state, open_state, service_config
from mep.errors import ConfigurationError

DEFAULT_CONFIG_ROOT = Path("/etc/mep")
EXAMPLE_MANAGER_CONFIG = Path(__file__).with_name("examples") / "manager.yaml"
EXAMPLE_MAPPING = "example-domain-strip.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # also a valid systemd instance name


def _examples(*lines: str) -> str:
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


config_root_option = click.option(
    "--config-root", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_CONFIG_ROOT,
    show_default=True, envvar="MEP_CONFIG_ROOT", help="Where endpoint directories live (NAME/config.yaml).")


@click.group("endpoint", epilog=_examples(
    "mep endpoint configure cluster --service-address tcp://login.example.org:5790 --template slurm",
    "mep endpoint list", "mep endpoint status cluster --output json", "mep endpoint restart-user cluster alice",
    "mep endpoint stop cluster"))
def endpoint_admin() -> None:
    """Configure and operate this host's endpoints (one manager each, config in /etc/mep/NAME/)."""


# --- configure ----------------------------------------------------------------------


def _shipped_dir(kind: str) -> Path:
    from mep.config.manager import shipped_templates_dir

    return shipped_templates_dir().resolve().parent / kind  # the package's venv links share/mep to /usr/share/mep


def _template_kinds() -> list[str]:
    return sorted(path.name.removesuffix(".yaml.j2") for path in _shipped_dir("templates").glob("*.yaml.j2"))


def _manager_address(listen: str) -> str:
    """Where a manager on this host reaches a service bound to ``listen`` (a wildcard bind means loopback)."""
    return re.sub(r"^tcp://(\*|0\.0\.0\.0|\[::\])(?=:)", "tcp://127.0.0.1", listen)


def _is_loopback(address: str) -> bool:
    return re.match(r"^tcp://(127\.[0-9.]+|localhost|\[::1\]):", address) is not None


def _researchers_address(manager_address: str) -> str:
    """The service as researchers elsewhere name it: this host's name in place of a loopback address."""
    if not _is_loopback(manager_address):
        return manager_address
    host = socket.getfqdn()
    if host.startswith("localhost"):  # /etc/hosts names loopback first: the plain host name is better than that
        host = socket.gethostname()
    return re.sub(r"^tcp://(\[::1\]|[^:]+)", f"tcp://{host}", manager_address, count=1)


def manager_config_text(example: str, endpoint_id: str, service_address: str, service_public_key: str,
                        template_kind: str, signing_keys: list[str]) -> str:
    """The shipped example config (every option, commented), filled in for one endpoint."""
    text = example
    for placeholder, value in (("@ENDPOINT_ID@", endpoint_id), ("@SERVICE_ADDRESS@", service_address),
                               ("@SERVICE_PUBLIC_KEY@", service_public_key),
                               ('"@SERVICE_SIGNING_KEYS@"', ", ".join(f'"{key}"' for key in signing_keys))):
        text = text.replace(placeholder, value)
    text = re.sub(r"^# template: .*$", f"template: {template_kind}.yaml.j2", text, count=1, flags=re.M)
    return re.sub(r"^# schema: .*$", f"schema: {template_kind}.schema.json", text, count=1, flags=re.M)


@endpoint_admin.command("configure", epilog=_examples(
    "mep endpoint configure cluster                     # local workers, service on this host",
    "mep endpoint configure gpu --template slurm --service-address tcp://login.example.org:5790",
    "mep endpoint configure test --config-root /tmp/mep-etc --state-dir /tmp/mep-service"))
@click.argument("name")
@click.option("--template", "template_kind", default="local", show_default=True,
              help="Which shipped template (and schema) to start from: local, slurm, torque, pbspro, lsf, kubernetes.")
@click.option("--service-address", default=None,
              help="Where the manager reaches the service [default: the service's listen address, loopback "
                   "for a wildcard bind].")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="The service's state (the endpoint is registered there) [default: as 'mep service' finds it].")
@config_root_option
@output_option
@_friendly
def configure(name: str, template_kind: str, service_address: str | None, state_dir: Path | None,
              config_root: Path, output_format: str) -> None:
    """Register endpoint NAME with the service and write a working CONFIG_ROOT/NAME/.

    It holds config.yaml (every option, commented), the manager's secret key, a copy of the shipped
    template and schema to edit, and identity_mapping.json with an example mapping to replace.
    """
    from mep.config.manager import ManagerConfig
    from mep.protocol.curve import generate_keypair, write_secret_key

    if not _NAME.match(name):
        raise ConfigurationError(f"endpoint name {name!r}: use letters, digits, '.', '_' or '-' (it names "
                                 "/etc/mep/NAME and the unit mep-manager@NAME)")
    if template_kind not in _template_kinds():
        raise ConfigurationError(f"--template {template_kind}: the shipped templates are {', '.join(_template_kinds())}")
    directory = config_root / name
    copies = {_shipped_dir("templates") / f"{template_kind}{suffix}": directory / f"{template_kind}{suffix}"
              for suffix in (".yaml.j2", ".schema.json")}
    copies[_shipped_dir("identity_maps") / EXAMPLE_MAPPING] = directory / "identity_mapping.json"
    config_path, key_path = directory / "config.yaml", directory / "manager.key"
    taken = [str(path) for path in (config_path, key_path, *copies.values()) if path.exists()]
    if taken:
        raise ConfigurationError(f"{', '.join(taken)} exist(s) already; 'mep endpoint status {name}' shows the "
                                 "endpoint, or choose another name")
    example = EXAMPLE_MANAGER_CONFIG.read_text()  # everything that can fail does so before the service is changed
    state = open_state(state_dir)
    address = service_address or _manager_address(service_config(None)[0].listen)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = generate_keypair()
    endpoint_id = state.store.add_endpoint(name, public)
    write_secret_key(key_path, secret)
    for source, target in copies.items():
        shutil.copyfile(source, target)
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(manager_config_text(example, endpoint_id, address, state.public_key, template_kind,
                                         state.pinnable_signing_keys()))
    ManagerConfig.load(config_path)  # what the manager will read: prove it parses
    researchers_address = _researchers_address(address)
    emit_record({"name": name, "endpoint_id": endpoint_id, "config": str(config_path),
                 "service_address": address, "researchers_service_address": researchers_address,
                 "service_public_key": state.public_key}, output_format)
    # every command below runs as printed: the same state and config root as this one
    state_option = f" --state-dir {state.directory}" if state_dir is not None else ""
    if config_root.resolve() == DEFAULT_CONFIG_ROOT:
        start = (f"systemctl enable --now mep-manager@{name}\n       without systemd: sh -c 'cd / && exec mep manager start "
                 f"--config {config_path} >>/var/log/mep/manager-{name}.log 2>&1 &'")
    else:
        start = f"mep manager start --config {config_path} &   (mep-manager@{name} reads {DEFAULT_CONFIG_ROOT}/{name} only)"
    loopback_only = _is_loopback(service_config(None)[0].listen)
    say(f"""next steps:
  1. map identities to accounts: edit {directory / 'identity_mapping.json'} (as shipped, alice@example.org runs as
     alice; examples in {_shipped_dir('identity_maps')}), then check one:
       mep identity test --config {config_path} alice@example.org --check-account
  2. shape user endpoints (optional): edit {directory / (template_kind + '.yaml.j2')} and {template_kind}.schema.json
  3. start the manager (as root):
       {start}
       mep endpoint status {name}{'' if config_root.resolve() == DEFAULT_CONFIG_ROOT else f' --config-root {config_root}'}
  4. a token for each researcher (shown once):
       mep service identity add{state_option} --username alice@example.org
  5. hand each researcher (docs/user.md):
       export MEP_SERVICE={researchers_address} MEP_SERVICE_KEY={shlex.quote(state.public_key)} MEP_TOKEN='<their token>'
       and the endpoint id: {endpoint_id}""" + (f"""
  note: the service's settings ({DEFAULT_SERVICE_CONFIG}) bind loopback only: researchers on other hosts can't
     reach it until listen names an address they can (e.g. listen: tcp://0.0.0.0:5790) and it restarts"""
                                          if loopback_only else ""))


# --- what a running manager leaves on the host ----------------------------------------


@dataclass(frozen=True)
class Configured:
    name: str
    config_path: Path
    config: Any  # ManagerConfig


def configured_endpoint(config_root: Path, name: str) -> Configured:
    from mep.config.manager import ManagerConfig

    config_path = config_root / name / "config.yaml"
    if not config_path.is_file():
        known = ", ".join(endpoint_names(config_root)) or "none"
        raise ConfigurationError(f"no endpoint {name!r}: {config_path} does not exist (configured here: {known}; "
                                 f"create one with 'mep endpoint configure {name}')")
    return Configured(name, config_path, ManagerConfig.load(config_path))


def endpoint_names(config_root: Path) -> list[str]:
    if not config_root.is_dir():
        return []
    return sorted(path.parent.name for path in config_root.glob("*/config.yaml"))


def _lock_holder(lock_path: Path) -> int | None:
    """The pid holding the manager's instance lock, from /proc/locks (testing the lock could steal it)."""
    try:
        info = os.stat(lock_path)
        with open("/proc/locks") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter, not the holder
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            return int(fields[4])
    return None


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _uptime(pid: int) -> float | None:
    from mep.root.registry import start_time

    try:
        started = start_time(pid) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as handle:
            return round(float(handle.read().split()[0]) - started, 1)
    except (OSError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(child) for child in handle.read().split()]
    except OSError:
        pass
    return found


def _spawner_pid(configured: Configured) -> int | None:
    """The running manager's root spawner: the lock holder, if it is still titled as ours."""
    endpoint_id = configured.config.endpoint_id
    pid = _lock_holder(configured.config.socket_dir() / "manager.lock")
    if pid is None or not _title(pid).startswith(f"mep-manager spawner {endpoint_id}"):
        return None
    return pid


UNKNOWN = "unknown"


def router_status(configured: Configured, router_pid: int | None) -> tuple[dict[str, Any], str]:
    """The router's status file if the running router wrote it, and a line on how current it is.

    An absent file, or one left by a router that is no longer running, gives no counts: the caller shows
    them as unknown rather than as numbers that may be wrong.
    """
    from mep.manager.status_file import STATUS_FILE_NAME, read_status

    path = configured.config.socket_dir() / "router" / STATUS_FILE_NAME
    content = read_status(path)
    if content is None:
        return {}, f"{UNKNOWN}: no readable {path} (the router writes it once it runs)"
    age = max(0.0, time.time() - float(content.get("written_at", 0)))
    if router_pid is None or content.get("router_pid") != router_pid:
        return {}, (f"{UNKNOWN}: {path} is {age:.0f} s old, written by router pid {content.get('router_pid')}, "
                    f"which is not the running router ({router_pid or 'none'})")
    return content, f"current (written {age:.0f} s ago; rewritten within a second of any change)"


def user_endpoints_of(configured: Configured, status: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each running user endpoint from the spawner's registry, with the router's counts from ``status``."""
    from mep.root import registry

    counted = (status or {}).get("endpoints", {})
    rows = []
    for record in registry.load_live(configured.config.socket_dir() / "endpoints.json"):
        identity_id, uid, template_digest, rendered = record.key  # identity "": shared by the account's identities
        counts = counted.get(record.endpoint_id)
        identities = [identity_id] if identity_id else counts["identities"] if counts else UNKNOWN
        rows.append({"endpoint_id": record.endpoint_id, "account": record.account, "uid": uid,
                     "identity": identities, "pid": record.endpoint_pid, "uptime_seconds": _uptime(record.endpoint_pid),
                     "config_digest": hashlib.sha256(rendered.encode()).hexdigest()[:12],
                     "template_digest": template_digest[:12], "pam_session": record.held,
                     **{f"tasks_{name}": counts[name] if counts else UNKNOWN
                        for name in ("done", "queued", "in_flight")},
                     "log": record.log_path})
    return rows


def manager_record(configured: Configured) -> dict[str, Any]:
    pid = _spawner_pid(configured)
    router = next((child for child in _children(pid) if _title(child).startswith("mep-manager router")), None) \
        if pid else None
    systemd_unit = f"mep-manager@{configured.name}.service"
    return {"name": configured.name, "endpoint_id": configured.config.endpoint_id,
            "state": "running" if pid else "stopped", "spawner_pid": pid, "router_pid": router,
            "uptime_seconds": _uptime(pid) if pid else None,
            "systemd": pid is not None and systemd_unit in _cgroup(pid),
            "config": str(configured.config_path), "run_dir": str(configured.config.socket_dir()),
            "audit_log": str(configured.config.audit_log_path()), "task_log": str(configured.config.task_log_path())}


def _cgroup(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cgroup") as handle:
            return handle.read()
    except OSError:
        return ""


@endpoint_admin.command("list", epilog=_examples("mep endpoint list", "mep endpoint list --output json"))
@config_root_option
@output_option
@_friendly
def list_endpoints(config_root: Path, output_format: str) -> None:
    """Every endpoint configured under CONFIG_ROOT: whether its manager runs, how many user endpoints it has."""
    rows = []
    for name in endpoint_names(config_root):
        try:
            configured = configured_endpoint(config_root, name)
        except ConfigurationError as exc:
            rows.append({"name": name, "state": "invalid config", "error": str(exc)})
            continue
        record = manager_record(configured)
        record["user_endpoints"] = len(user_endpoints_of(configured)) if record["state"] == "running" else 0
        rows.append(record)
    emit_rows(rows, ("name", "state", "spawner_pid", "user_endpoints", "endpoint_id", "config"), output_format)


@endpoint_admin.command("status", epilog=_examples("mep endpoint status cluster",
                                                   "mep endpoint status cluster --output json | jq '.user_endpoints'"))
@click.argument("name")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="The service's state, for the endpoint's task counts [default: as 'mep service' finds it].")
@config_root_option
@output_option
@_friendly
def status(name: str, state_dir: Path | None, config_root: Path, output_format: str) -> None:
    """The manager of endpoint NAME (pids, uptime, files) and each user endpoint it runs.

    Per user endpoint: account, the identity (or identities) it serves, pid, uptime, a digest of its rendered
    config and of the template, its tasks done, queued and in flight (from the router's status file; "unknown"
    when that file is absent or left by a router that is no longer running), whether a PAM session holds it,
    and its log file. When the service's state is on this host, also the endpoint's
    tasks by state (waiting, dispatched, running, succeeded, ...).
    """
    configured = configured_endpoint(config_root, name)
    record = manager_record(configured)
    record["tasks"] = _service_task_counts(configured.config.endpoint_id, state_dir)
    user_endpoints: list[dict[str, Any]] = []
    if record["state"] == "running":
        status_content, record["router_status"] = router_status(configured, record["router_pid"])
        record["router_totals"] = status_content.get("totals", UNKNOWN)
        user_endpoints = user_endpoints_of(configured, status_content)
    if output_format == "json":
        emit_record({**record, "user_endpoints": user_endpoints}, output_format)
        return
    emit_record(record, output_format)
    click.echo("")
    emit_rows(user_endpoints, ("account", "identity", "pid", "uptime_seconds", "config_digest", "tasks_done",
                               "tasks_queued", "tasks_in_flight", "pam_session", "log"), output_format)


def _service_task_counts(endpoint_id: str, state_dir: Path | None) -> dict[str, int] | None:
    """The endpoint's tasks by state from the service's database (read-only); None if it is not on this host."""
    from mep.service.state import DATABASE_NAME, ServiceState

    directory = locate_state(state_dir).directory
    if not ServiceState.exists(directory):
        return None
    db = sqlite3.connect(f"file:{directory / DATABASE_NAME}?mode=ro", uri=True, timeout=5)
    try:
        return dict(db.execute("SELECT state, count(*) FROM tasks WHERE endpoint_id=? GROUP BY state ORDER BY state",
                               (endpoint_id,)).fetchall())
    finally:
        db.close()


def _wait_stopped(configured: Configured, timeout: float) -> bool:
    """Until no manager holds the instance lock (an exited process lets go of it even before it is reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _spawner_pid(configured) is None:
            return True
        time.sleep(0.2)
    return False


@endpoint_admin.command("stop", epilog=_examples("mep endpoint stop cluster", "mep endpoint stop cluster --wait 0",
                                                 "systemctl stop mep-manager@cluster   # under systemd, the same"))
@click.argument("name")
@click.option("--wait", "wait_seconds", type=click.FloatRange(min=0), default=90.0, show_default=True,
              help="Seconds to wait for the manager to exit (user endpoints get 45 to finish their tasks); 0: don't.")
@config_root_option
@output_option
@_friendly
def stop(name: str, wait_seconds: float, config_root: Path, output_format: str) -> None:
    """Stop endpoint NAME's manager gracefully: running tasks finish, queued ones wait at the service."""
    configured = configured_endpoint(config_root, name)
    pid = _spawner_pid(configured)
    if pid is None:
        raise ConfigurationError(f"the manager of {name!r} is not running (no process holds "
                                 f"{configured.config.socket_dir() / 'manager.lock'})")
    os.kill(pid, signal.SIGTERM)
    stopped = _wait_stopped(configured, wait_seconds) if wait_seconds else False
    emit_record({"name": name, "spawner_pid": pid, "signal": "SIGTERM",
                 "state": "stopped" if stopped else "stopping"}, output_format)
    if wait_seconds and not stopped:
        raise ConfigurationError(f"the manager (pid {pid}) is still stopping after {wait_seconds:.0f} s; "
                                 f"see {configured.config.audit_log_path()} and its log")


@endpoint_admin.command("restart-user", epilog=_examples("mep endpoint restart-user cluster alice"))
@click.argument("name")
@click.argument("account")
@config_root_option
@output_option
@_friendly
def restart_user(name: str, account: str, config_root: Path, output_format: str) -> None:
    """Stop ACCOUNT's user endpoints of NAME gracefully; its next task starts a fresh one.

    Use it after changing the template, the account's environment or its groups: running tasks finish first.
    """
    configured = configured_endpoint(config_root, name)
    if _spawner_pid(configured) is None:
        raise ConfigurationError(f"the manager of {name!r} is not running; its user endpoints start with it")
    signalled = []
    for row in user_endpoints_of(configured):
        if row["account"] != account:
            continue
        pid = row["pid"]
        # the registry's pid is still that account's endpoint process (not a recycled pid)
        if os.stat(f"/proc/{pid}").st_uid == row["uid"] and _title(pid).startswith(f"mep-endpoint {account} "):
            os.kill(pid, signal.SIGTERM)
            signalled.append({"account": account, "pid": pid, "signal": "SIGTERM"})
    if not signalled:
        running = sorted({row["account"] for row in user_endpoints_of(configured)})
        raise ConfigurationError(f"no user endpoint of {account!r} runs under {name!r} (running: "
                                 f"{', '.join(running) or 'none'})")
    emit_rows(signalled, ("account", "pid", "signal"), output_format)

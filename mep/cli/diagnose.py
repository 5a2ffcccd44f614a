"""``mep diagnose``: one tarball an admin can attach to a support request.

It holds versions, the service's settings, where its state is and its endpoints'
tasks by state (read-only), every endpoint's config, template,
schema and mapping (secrets redacted, key files never read), each endpoint's
status as ``mep endpoint status`` reports it, the tail of each manager's audit
log (the spawner's decisions) and task log (the router's record of its tasks)
and of the units' journals. Researchers' own files (their endpoint logs) stay out: only
their paths are listed.
"""

from __future__ import annotations

import io
import json
import platform
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import click

import mep
from mep.cli.endpoint_admin import (Configured, config_root_option, configured_endpoint, endpoint_names,
                                    manager_record, user_endpoints_of)
from mep.cli.output import friendly
from mep.cli.service_config import DEFAULT_SERVICE_CONFIG, locate_state
from mep.errors import ConfigurationError

REDACTED = "<redacted>"
LOG_DIR = Path("/var/log/mep")
# a setting whose name says it is a secret; a *_file setting only names where one is, and stays
_SECRET_SETTING = re.compile(r"^(\s*#?\s*[A-Za-z_]*(?:secret|token|password)[A-Za-z_]*:)[^\n]*$", re.M | re.I)
_SECRET_FILES = {"manager.key", "router.key", "service.key"}
DEPENDENCIES = ("pyzmq", "msgspec", "dill", "pydantic", "jinja2", "jsonschema", "PyYAML", "click", "parsl",
                "python-pam", "globus-identity-mapping")


def redact_yaml(text: str) -> str:
    """Values of settings that name a secret become <redacted>; paths to secret files are kept (they say where)."""
    return _SECRET_SETTING.sub(lambda match: match[0] if match[1].endswith("_file:") else f"{match[1]} {REDACTED}",
                               text)


def _versions() -> dict[str, Any]:
    installed = {}
    for name in DEPENDENCIES:
        try:
            installed[name] = version(name)
        except PackageNotFoundError:
            installed[name] = None
    os_release = Path("/etc/os-release")
    return {"mep": mep.__version__, "python": sys.version, "executable": sys.executable,
            "platform": platform.platform(), "host": socket.gethostname(), "packages": installed,
            "os_release": os_release.read_text() if os_release.is_file() else None}


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError as exc:
        return f"(unreadable: {exc.strerror})\n"


def _journal(lines: int) -> str | None:
    if shutil.which("journalctl") is None:
        return None
    result = subprocess.run(["journalctl", "--no-pager", "-n", str(lines), "-u", "mep-service.service",
                             "-u", "mep-manager@*.service"], capture_output=True, text=True)
    return result.stdout + result.stderr


def _service_status() -> dict[str, Any]:
    """Where the service's state is (by the one rule) and, if it is on this host, its endpoints' tasks by state."""
    from mep.service.state import DATABASE_NAME, ServiceState

    location = locate_state(None)
    status: dict[str, Any] = {"state_dir": str(location.directory), "chosen_by": location.source,
                              "exists": ServiceState.exists(location.directory)}
    if not status["exists"]:
        return status
    try:  # read-only: a report never changes the service
        db = sqlite3.connect(f"file:{location.directory / DATABASE_NAME}?mode=ro", uri=True, timeout=5)
        try:
            names = dict(db.execute("SELECT id, name FROM endpoints").fetchall())
            tasks: dict[str, dict[str, int]] = {endpoint_id: {} for endpoint_id in names}
            for endpoint_id, state, count in db.execute(
                    "SELECT endpoint_id, state, count(*) FROM tasks GROUP BY endpoint_id, state"):
                tasks.setdefault(endpoint_id, {})[state] = count
        finally:
            db.close()
    except sqlite3.Error as exc:
        return {**status, "error": f"could not read {DATABASE_NAME}: {exc}"}
    status["endpoints"] = [{"id": endpoint_id, "name": names.get(endpoint_id), "tasks": counts}
                           for endpoint_id, counts in tasks.items()]
    return status


def _endpoint_files(configured: Configured) -> Iterator[tuple[str, str]]:
    config = configured.config
    yield "config.yaml", redact_yaml(configured.config_path.read_text())
    for path in (config.identity_mapping, config.template, config.schema_file):
        if path.name in _SECRET_FILES:
            continue
        try:
            yield path.name, path.read_text(errors="replace")
        except OSError as exc:
            yield path.name + ".unreadable", f"{path}: {exc.strerror}\n"


def collect(config_root: Path, log_lines: int) -> Iterator[tuple[str, str]]:
    """(name in the tarball, text) for everything the report holds."""
    yield "versions.json", json.dumps(_versions(), indent=2)
    if DEFAULT_SERVICE_CONFIG.is_file():
        yield "config/service.yaml", redact_yaml(DEFAULT_SERVICE_CONFIG.read_text())
    yield "service/status.json", json.dumps(_service_status(), indent=2)
    journal = _journal(log_lines)
    yield "logs/journal.txt", journal if journal is not None else "(no journalctl on this host)\n"
    for log_file in sorted(LOG_DIR.glob("*.log")):  # the daemons' logs without systemd (docs/admin.md)
        yield f"logs/{log_file.name}", _tail(log_file, log_lines)
    for name in endpoint_names(config_root):
        try:
            configured = configured_endpoint(config_root, name)
        except ConfigurationError as exc:
            yield f"endpoints/{name}/error.txt", f"{exc}\n"
            continue
        for file_name, text in _endpoint_files(configured):
            yield f"endpoints/{name}/{file_name}", text
        record = manager_record(configured)
        user_endpoints = user_endpoints_of(configured) if record["state"] == "running" else []
        yield f"endpoints/{name}/status.json", json.dumps({**record, "user_endpoints": user_endpoints}, indent=2)
        yield f"endpoints/{name}/audit.jsonl", _tail(configured.config.audit_log_path(), log_lines)
        yield f"endpoints/{name}/tasks.jsonl", _tail(configured.config.task_log_path(), log_lines)


@click.command("diagnose", epilog="\b\nExamples:\n  mep diagnose\n"
               "  mep diagnose --output-file /tmp/mep-report.tar.gz --log-lines 5000")
@click.option("--output-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to write the tarball [default: ./mep-diagnose-HOST-TIME.tar.gz].")
@click.option("--log-lines", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Lines of each log to include, from the end.")
@config_root_option
@friendly
def diagnose(output_file: Path | None, log_lines: int, config_root: Path) -> None:
    """Write a tarball for a support request: versions, configs (secrets redacted), status, recent logs."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    output_file = output_file or Path(f"mep-diagnose-{socket.gethostname()}-{stamp}.tar.gz")
    prefix = f"mep-diagnose-{stamp}"
    with tarfile.open(output_file, "w:gz") as archive:
        for name, text in collect(config_root, log_lines):
            data = text.encode()
            member = tarfile.TarInfo(f"{prefix}/{name}")
            member.size, member.mtime, member.mode = len(data), int(time.time()), 0o600
            archive.addfile(member, io.BytesIO(data))
    output_file.chmod(0o600)
    click.echo(str(output_file))


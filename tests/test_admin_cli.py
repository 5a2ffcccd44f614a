"""The admin CLI: one rule for the service's state, a configured endpoint that runs, and its operation.

Real processes throughout: a service, a manager started from the directory
`mep endpoint configure` wrote, tasks running as a real account, and the
admin commands reading the manager's lock, registry and /proc.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import mep
from tests.harness import DOMAIN_STRIP, PYTHON, ROUTER_USER, deployment, expression_mapping, start_process, wait_for

MEP = [PYTHON, "-m", "mep"]


def run_mep(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MEP, *args], capture_output=True, text=True, cwd="/",
                          env={**os.environ, **(env or {})})


def whoami() -> tuple[int, int]:
    import os

    return os.getuid(), os.getpid()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """World-readable scratch space (pytest's tmp_path sits under a 0700 directory)."""
    root = Path(tempfile.mkdtemp(prefix="mep-admin-test-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_admin_commands_refuse_without_state_and_say_where_they_looked(scratch: Path) -> None:
    missing = scratch / "nowhere"
    for command in (["service", "key"], ["service", "identity", "add", "--username", "a@example.org"],
                    ["service", "identity", "list"], ["service", "endpoint", "list"],
                    ["endpoint", "configure", "x", "--config-root", str(scratch / "etc")]):
        result = run_mep(*command, env={"MEP_STATE_DIR": str(missing)})
        assert result.returncode == 2, (command, result.stderr)
        assert f"no service state in {missing} (chosen by $MEP_STATE_DIR" in result.stderr
        assert "--state-dir (not given)" in result.stderr and "mep service init" in result.stderr
        assert not missing.exists(), f"{command} created state"
    assert not (scratch / "etc").exists()


def test_state_dir_option_beats_the_environment_which_beats_the_settings_file(scratch: Path) -> None:
    settings = scratch / "service.yaml"
    settings.write_text(f"state_dir: {scratch / 'from-file'}\n")
    created = {}
    for where, args, env in (("from-file", ["--config", str(settings)], {"MEP_STATE_DIR": ""}),
                             ("from-env", ["--config", str(settings)], {"MEP_STATE_DIR": str(scratch / "from-env")}),
                             ("from-option", ["--state-dir", str(scratch / "from-option")],
                              {"MEP_STATE_DIR": str(scratch / "from-env")})):
        result = run_mep("service", "init", *args, "--output", "json", env=env)
        assert result.returncode == 0, result.stderr
        created[where] = json.loads(result.stdout)
        assert created[where]["state_dir"] == str(scratch / where)
    assert len({record["public_key"] for record in created.values()}) == 3
    # the same rule finds existing state for every other command
    key = run_mep("service", "key", env={"MEP_STATE_DIR": str(scratch / "from-env")})
    assert key.stdout.strip() == created["from-env"]["public_key"]
    again = run_mep("service", "init", "--state-dir", str(scratch / "from-option"), "--output", "json")
    assert json.loads(again.stdout) == created["from-option"], "init never replaces an existing key"


def test_every_command_has_help_with_a_worked_example() -> None:
    import click

    from mep.cli.main import cli

    def walk(command: click.Command, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], click.Command]]:
        yield path, command
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, (*path, name))

    lacking = [" ".join(path) for path, command in walk(cli, ("mep",)) if "Examples:" not in (command.epilog or "")]
    assert lacking == [], "groups too: 'mep service --help' is where an admin starts"
    shown = run_mep("endpoint", "status", "--help")
    assert shown.returncode == 0 and "Examples:\n    mep endpoint status cluster\n" in shown.stdout


def test_rotated_token_replaces_the_old_one(deploy) -> None:
    identity = deploy.identity("rotate@example.org")
    client = mep.Client(service=deploy.address, service_key=deploy.service_key, token=identity.token)
    assert client.list_tasks() == []
    result = run_mep("service", "identity", "rotate-token", identity.id, "--state-dir", str(deploy.state_dir),
                     "--output", "json")
    assert result.returncode == 0, result.stderr
    rotated = json.loads(result.stdout)
    assert rotated["identity_id"] == identity.id and rotated["token"] != identity.token
    with pytest.raises(mep.AuthenticationError):
        mep.Client(service=deploy.address, service_key=deploy.service_key, token=identity.token).list_tasks()
    assert mep.Client(service=deploy.address, service_key=deploy.service_key,
                      token=rotated["token"]).list_tasks() == []
    unknown = run_mep("service", "identity", "rotate-token", "no-such-id", "--state-dir", str(deploy.state_dir))
    assert unknown.returncode == 2 and "no active identity no-such-id" in unknown.stderr


def test_service_start_tells_systemd_once_it_listens(scratch: Path) -> None:
    """sd_notify: one datagram, here to an abstract socket as systemd may hand out."""
    name = f"mep-test-notify-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(60)
        address_file = scratch / "address"
        service = subprocess.Popen([*MEP, "service", "start", "--state-dir", str(scratch / "state"), "--listen",
                                    "tcp://127.0.0.1:0", "--address-file", str(address_file)],
                                   env={**os.environ, "NOTIFY_SOCKET": "@" + name}, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, cwd="/")
        try:
            message, _ = listener.recvfrom(4096)
            assert message == b"READY=1"
            assert address_file.read_text().startswith("tcp://127.0.0.1:")  # bound before it said so
        finally:
            service.terminate()
            service.wait(timeout=30)


def _configure(deploy, scratch: Path, name: str) -> Path:
    result = run_mep("endpoint", "configure", name, "--config-root", str(scratch / "etc"), "--state-dir",
                     str(deploy.state_dir), "--service-address", deploy.address, "--output", "json")
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)
    assert "next steps" in result.stderr and f"mep-manager@{name}" in result.stderr
    directory = scratch / "etc" / name
    assert {path.name for path in directory.iterdir()} == {
        "config.yaml", "manager.key", "identity_mapping.json", "local.yaml.j2", "local.schema.json"}
    assert (directory / "manager.key").stat().st_mode & 0o077 == 0
    assert written["endpoint_id"] in [row["id"] for row in json.loads(
        run_mep("service", "endpoint", "list", "--state-dir", str(deploy.state_dir), "--output", "json").stdout)]
    # this test's own places for the run directory and the audit log, and a mapping to its account
    run_dir = Path("/run") / f"mep-test-{secrets.token_hex(4)}"
    with open(directory / "config.yaml", "a") as config:
        config.write(yaml.safe_dump({"run_dir": str(run_dir), "audit_log": str(directory / "audit.jsonl"),
                                     "router_user": ROUTER_USER, "heartbeat_interval": 1.0}))
    (directory / "identity_mapping.json").write_text(json.dumps(expression_mapping(DOMAIN_STRIP)))
    return directory


@pytest.mark.root
def test_a_configured_endpoint_runs_and_is_operated_by_name(deploy, account_factory, scratch: Path) -> None:
    account = account_factory("mepadmin")
    name = "cli" + secrets.token_hex(3)
    directory = _configure(deploy, scratch, name)
    config = yaml.safe_load((directory / "config.yaml").read_text())
    endpoint_id = config["endpoint_id"]
    root_args = ("--config-root", str(scratch / "etc"), "--output", "json")

    stopped = json.loads(run_mep("endpoint", "status", name, "--state-dir", str(deploy.state_dir),
                                 *root_args).stdout)
    assert stopped["state"] == "stopped" and stopped["user_endpoints"] == [] and stopped["tasks"] == {}

    notify = f"mep-test-manager-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + notify)
        listener.settimeout(60)
        os.environ["NOTIFY_SOCKET"] = "@" + notify  # inherited by the manager only: removed right below
        try:
            manager = start_process([*MEP, "manager", "start", "--config", str(directory / "config.yaml")],
                                    scratch / "manager.log")
        finally:
            del os.environ["NOTIFY_SOCKET"]
        try:
            assert listener.recvfrom(4096)[0] == b"READY=1"
            wait_for(lambda: "registered with the service" in manager.log(), what="the manager to register")
            identity = deploy.identity(f"{account.pw_name}@example.org")
            with mep.Executor(endpoint_id, service=deploy.address, service_key=deploy.service_key,
                              token=identity.token) as executor:
                uid, first_pid = executor.submit(whoami).result(timeout=120)
            assert uid == account.pw_uid

            status = json.loads(run_mep("endpoint", "status", name, "--state-dir", str(deploy.state_dir),
                                        *root_args).stdout)
            assert status["state"] == "running" and status["endpoint_id"] == endpoint_id
            assert status["tasks"] == {"succeeded": 1}
            assert status["spawner_pid"] == manager.popen.pid and status["router_pid"] is not None
            assert os.stat(f"/proc/{status['router_pid']}").st_uid != 0
            [user_endpoint] = status["user_endpoints"]
            assert user_endpoint["account"] == account.pw_name
            assert os.stat(f"/proc/{user_endpoint['pid']}").st_uid == account.pw_uid
            assert len(user_endpoint["config_digest"]) == 12 and user_endpoint["uptime_seconds"] >= 0
            assert user_endpoint["log"].startswith(account.pw_dir)
            table = run_mep("endpoint", "status", name, "--config-root", str(scratch / "etc"))
            assert f"spawner_pid: {manager.popen.pid}" in table.stdout and account.pw_name in table.stdout

            [listed] = [row for row in json.loads(run_mep("endpoint", "list", *root_args).stdout)
                        if row["name"] == name]
            assert listed["state"] == "running" and listed["user_endpoints"] == 1

            restarted = run_mep("endpoint", "restart-user", name, account.pw_name, *root_args)
            assert restarted.returncode == 0, restarted.stderr
            assert json.loads(restarted.stdout) == [{"account": account.pw_name, "pid": user_endpoint["pid"],
                                                     "signal": "SIGTERM"}]
            wait_for(lambda: not os.path.exists(f"/proc/{user_endpoint['pid']}"), what="the user endpoint to exit")
            with mep.Executor(endpoint_id, service=deploy.address, service_key=deploy.service_key,
                              token=identity.token) as executor:
                assert executor.submit(whoami).result(timeout=120) != (uid, first_pid)
            nobody = run_mep("endpoint", "restart-user", name, "root", *root_args)
            assert nobody.returncode == 2 and f"running: {account.pw_name}" in nobody.stderr

            result = run_mep("endpoint", "stop", name, *root_args)
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["state"] == "stopped"
            assert manager.popen.wait(timeout=30) == 0
            assert json.loads(run_mep("endpoint", "status", name, *root_args).stdout)["state"] == "stopped"
            again = run_mep("endpoint", "stop", name, *root_args)
            assert again.returncode == 2 and "is not running" in again.stderr
        finally:
            manager.stop()
            shutil.rmtree(config["run_dir"], ignore_errors=True)


def test_unknown_endpoint_names_the_configured_ones(scratch: Path) -> None:
    (scratch / "etc" / "alpha").mkdir(parents=True)
    (scratch / "etc" / "alpha" / "config.yaml").write_text("endpoint_id: x\n")
    result = run_mep("endpoint", "status", "beta", "--config-root", str(scratch / "etc"))
    assert result.returncode == 2
    assert "no endpoint 'beta'" in result.stderr and "configured here: alpha" in result.stderr


def test_diagnose_writes_a_report_without_secrets(scratch: Path) -> None:
    state = scratch / "state"
    assert run_mep("service", "init", "--state-dir", str(state)).returncode == 0
    configured = run_mep("endpoint", "configure", "diag", "--config-root", str(scratch / "etc"), "--state-dir",
                         str(state), "--service-address", "tcp://127.0.0.1:5790", "--template", "slurm")
    assert configured.returncode == 0, configured.stderr
    with open(scratch / "etc" / "diag" / "config.yaml", "a") as config:
        config.write(f"audit_log: {scratch / 'audit.jsonl'}\ntask_log: {scratch / 'tasks.jsonl'}\n"
                     f"run_dir: {scratch / 'run'}\n")
    (scratch / "audit.jsonl").write_text("".join(json.dumps({"event": "spawn", "n": n}) + "\n" for n in range(50)))
    (scratch / "tasks.jsonl").write_text("".join(json.dumps({"event": "task", "n": n}) + "\n" for n in range(30)))
    report = scratch / "report.tar.gz"
    result = run_mep("diagnose", "--output-file", str(report), "--config-root", str(scratch / "etc"),
                     "--log-lines", "10", env={"MEP_STATE_DIR": str(state)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(report) and report.stat().st_mode & 0o077 == 0
    import tarfile

    with tarfile.open(report) as archive:
        files = {member.name.split("/", 1)[1]: archive.extractfile(member).read().decode()
                 for member in archive.getmembers()}
    assert json.loads(files["versions.json"])["mep"] == mep.__version__
    assert {"endpoints/diag/config.yaml", "endpoints/diag/slurm.yaml.j2", "endpoints/diag/slurm.schema.json",
            "endpoints/diag/identity_mapping.json", "endpoints/diag/status.json", "logs/journal.txt"} <= set(files)
    assert json.loads(files["endpoints/diag/status.json"])["state"] == "stopped"
    service = json.loads(files["service/status.json"])
    assert service["state_dir"] == str(state) and service["chosen_by"] == "$MEP_STATE_DIR"
    assert [endpoint["name"] for endpoint in service["endpoints"]] == ["diag"]
    audit = files["endpoints/diag/audit.jsonl"].splitlines()
    assert len(audit) == 10 and json.loads(audit[-1])["n"] == 49
    tasks = files["endpoints/diag/tasks.jsonl"].splitlines()
    assert len(tasks) == 10 and json.loads(tasks[-1]) == {"event": "task", "n": 29}
    secret = (scratch / "etc" / "diag" / "manager.key").read_text().strip()
    assert not [name for name, text in files.items() if secret in text]


def test_json_log_lines_carry_level_logger_and_pid(scratch: Path) -> None:
    address_file, log_path = scratch / "address", scratch / "service.log"
    with open(log_path, "wb") as log:
        service = subprocess.Popen([*MEP, "--log-format", "json", "--log-level", "mep.service=DEBUG", "service",
                                    "start", "--state-dir", str(scratch / "state"), "--listen", "tcp://127.0.0.1:0",
                                    "--address-file", str(address_file)], stderr=log, stdout=subprocess.DEVNULL,
                                   cwd="/")
    try:
        wait_for(lambda: "service listening" in log_path.read_text(), what="the service to log that it listens")
    finally:
        service.terminate()
        service.wait(timeout=30)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    listening = [line for line in lines if line["message"].startswith("service listening on tcp://127.0.0.1:")]
    assert listening and listening[0]["level"] == "INFO" and listening[0]["pid"] == service.pid
    assert listening[0]["logger"].startswith("mep.service")
    bad = run_mep("--log-level", "nonsense", "service", "key")
    assert bad.returncode == 2 and "COMPONENT=LEVEL" in bad.stderr


def test_diagnose_redacts_settings_that_name_a_secret() -> None:
    from mep.cli.diagnose import redact_yaml

    text = "token: mep_abc\nmanager_secret_key_file: manager.key\n# client_secret: xyz\nlisten: tcp://h:1\n"
    assert redact_yaml(text) == ("token: <redacted>\nmanager_secret_key_file: manager.key\n"
                                 "# client_secret: <redacted>\nlisten: tcp://h:1\n")


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(errors="replace").splitlines() if line.startswith("{")]


@pytest.mark.root
def test_status_shows_identity_and_counts_and_json_logs_join_on_task_id(router_account, account_factory,
                                                                         scratch: Path, monkeypatch) -> None:
    """Service, router and user endpoint all log JSON lines; a task's id is a field in each of them."""
    monkeypatch.setenv("MEP_LOG_FORMAT", "json")  # inherited by the service and the manager started below
    monkeypatch.setenv("MEP_LOG_LEVEL", "mep.service=DEBUG")
    account = account_factory("mepstat")
    name = "st" + secrets.token_hex(3)
    with deployment() as deploy:
        directory = _configure(deploy, scratch, name)
        config = yaml.safe_load((directory / "config.yaml").read_text())
        manager = start_process([*MEP, "manager", "start", "--config", str(directory / "config.yaml")],
                                scratch / "manager.log")
        try:
            wait_for(lambda: "registered with the service" in manager.log(), what="the manager to register")
            identity = deploy.identity(f"{account.pw_name}@example.org")
            tasks = 3
            with mep.Executor(config["endpoint_id"], service=deploy.address, service_key=deploy.service_key,
                              token=identity.token) as executor:
                futures = [executor.submit(whoami) for _ in range(tasks)]
                results = [future.result(timeout=120) for future in futures]
            task_ids = {future.task_id for future in futures}
            assert {uid for uid, _ in results} == {account.pw_uid}

            def current_status() -> dict:
                shown = run_mep("endpoint", "status", name, "--config-root", str(scratch / "etc"), "--output", "json")
                assert shown.returncode == 0, shown.stderr
                status = json.loads(shown.stdout)
                done = [row["tasks_done"] for row in status["user_endpoints"]]
                return status if done and done[0] != "unknown" and done[0] >= tasks else {}

            status = wait_for(current_status, what="the router's status file to count the tasks")
            assert status["router_status"].startswith("current")
            [row] = status["user_endpoints"]
            assert row["identity"] == [identity.id] and row["account"] == account.pw_name
            assert os.stat(f"/proc/{row['pid']}").st_uid == account.pw_uid
            assert row["tasks_queued"] == 0 and row["tasks_in_flight"] == 0
            assert status["router_totals"]["done"] >= tasks and status["router_totals"]["endpoints"] == 1
            status_file = Path(config["run_dir"]) / "router" / "status.json"
            assert status_file.stat().st_mode & 0o777 == 0o644
            table = run_mep("endpoint", "status", name, "--config-root", str(scratch / "etc")).stdout
            assert "TASKS_DONE" in table and identity.id in table

            endpoint_lines = _json_lines(Path(row["log"]))
            finished = {line["task_id"] for line in endpoint_lines if line["message"].startswith("task ")
                        and "finished" in line["message"] and line.get("endpoint_id") == row["endpoint_id"]}
            assert len(finished) >= tasks
            service_lines = _json_lines(deploy.service.log_path)
            accepted = {line["task_id"] for line in service_lines if line["message"].startswith("accepted task")}
            results_in = {line["task_id"] for line in service_lines if line["message"].startswith("result of task")}
            assert task_ids <= finished and task_ids <= accepted and task_ids <= results_in
            manager_lines = _json_lines(manager.log_path)  # the spawner's lines and, relayed, the router's
            spawned = [line for line in manager_lines if line["message"].startswith("spawned endpoint")]
            assert spawned and spawned[0]["endpoint_id"] == row["endpoint_id"]
            assert spawned[0]["account"] == account.pw_name and spawned[0]["identity_id"] == identity.id
            routed = [line for line in manager_lines if line["logger"] == "mep.router" and "started for" in
                      line["message"]]
            assert routed and routed[0]["endpoint_id"] == row["endpoint_id"]

            # without the file (nothing changed since, so the router has not written it again): unknown, no failure
            status_file.unlink()
            shown = run_mep("endpoint", "status", name, "--config-root", str(scratch / "etc"), "--output", "json")
            assert shown.returncode == 0, shown.stderr
            missing = json.loads(shown.stdout)
            assert missing["router_status"].startswith("unknown: no readable")
            [row] = missing["user_endpoints"]
            assert row["tasks_done"] == "unknown" and row["identity"] == [identity.id]  # the registry names it
        finally:
            manager.stop()
            shutil.rmtree(config["run_dir"], ignore_errors=True)


def test_configure_prints_next_steps_that_run_as_printed(scratch: Path) -> None:
    """An admin pastes the printed commands: with this run's state and config root, they work unchanged."""
    import shlex

    state = scratch / "state"
    assert run_mep("service", "init", "--state-dir", str(state)).returncode == 0
    configured = run_mep("endpoint", "configure", "steps", "--config-root", str(scratch / "etc"),
                         "--state-dir", str(state), "--output", "json")
    assert configured.returncode == 0, configured.stderr
    written = json.loads(configured.stdout)
    commands = [line.strip().split("   (")[0] for line in configured.stderr.splitlines()
                if line.strip().startswith("mep ")]
    by_name = {" ".join(command.split()[:3]): command for command in commands}
    assert set(by_name) == {"mep identity test", "mep manager start", "mep endpoint status",
                            "mep service identity"}, commands
    assert "systemctl" not in by_name["mep manager start"]  # the unit reads /etc/mep only: not offered here
    status = run_mep(*shlex.split(by_name["mep endpoint status"])[1:], "--output", "json")
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "stopped", status.stderr
    added = run_mep(*shlex.split(by_name["mep service identity"])[1:])
    assert added.returncode == 0 and "token: mep_" in added.stdout, added.stderr
    mapped = run_mep(*shlex.split(by_name["mep identity test"])[1:])  # no account alice here: refused, not broken
    assert mapped.returncode in (0, 1) and "alice" in mapped.stdout + mapped.stderr, mapped.stderr
    [export] = [line for line in configured.stderr.splitlines() if "export MEP_SERVICE=" in line]
    exported = subprocess.run(["bash", "-c", export.strip() + ' && printf %s "$MEP_SERVICE_KEY"'], capture_output=True,
                              text=True)
    assert exported.stdout == written["service_public_key"], "the key survives the shell as printed"
    assert written["endpoint_id"] in configured.stderr


def _both_outputs(*args: str) -> tuple[dict, dict[str, str]]:
    """The command's record as ``--output json`` prints it, then as the default table's ``key: value`` lines."""
    as_json = run_mep(*args, "--output", "json")
    assert as_json.returncode == 0, as_json.stderr
    as_table = run_mep(*args)
    assert as_table.returncode == 0, as_table.stderr
    return json.loads(as_json.stdout), dict(line.split(": ", 1) for line in as_table.stdout.splitlines())


def test_signing_key_commands_print_one_record_as_json_or_table(scratch: Path) -> None:
    state = ["--state-dir", str(scratch / "service")]
    assert run_mep("service", "init", *state).returncode == 0
    (scratch / "service" / "signing.key").unlink()  # so that 'generate' has a key to create
    generated = json.loads(run_mep("service", "signing-key", "generate", *state, "--output", "json").stdout)
    assert list(generated) == ["signing_key"] and generated["signing_key"].startswith("ed25519:")
    shown = _both_outputs("service", "signing-key", "show", *state)
    assert shown == (generated, generated)

    staged = run_mep("service", "signing-key", "rotate", *state, "--output", "json")
    assert staged.returncode == 0 and "rotate --finish" in staged.stderr, staged.stderr
    next_key = json.loads(staged.stdout)["next_signing_key"]
    both = {**generated, "next_signing_key": next_key}
    assert _both_outputs("service", "signing-key", "show", *state) == (both, both)
    finished = json.loads(run_mep("service", "signing-key", "rotate", "--finish", *state, "--output", "json").stdout)
    assert finished == {"signing_key": next_key, "previous_signing_key": generated["signing_key"]}

    config = scratch / "config.yaml"
    config.write_text(f"# the manager's settings\nservice_signing_keys: [{generated['signing_key']}]\n")
    pinned = json.loads(run_mep("manager", "pin-signing-key", "--config", str(config), next_key,
                                "--output", "json").stdout)
    assert pinned == {"config": str(config), "pinned": [generated["signing_key"], next_key]}
    unpinned = run_mep("manager", "pin-signing-key", "--config", str(config), "--remove", generated["signing_key"])
    assert unpinned.stdout.splitlines() == [f"config: {config}", f"pinned: {next_key}"], unpinned.stderr
    assert "restart the manager" in unpinned.stderr


def test_status_prints_json_by_default_and_a_table_when_asked(deploy) -> None:
    identity = deploy.identity("status-output@example.org")
    args = ("status", "--service", deploy.address, "--service-key", deploy.service_key, "--token", identity.token)
    default, as_json = run_mep(*args), run_mep(*args, "--output", "json")
    assert default.returncode == 0 and as_json.returncode == 0, default.stderr + as_json.stderr
    report = json.loads(default.stdout)
    assert report == json.loads(as_json.stdout) and report["endpoint_online"] is False
    [service] = report["processes"]
    assert service["role"] == "service" and service["dill_loaded"] is False
    table = run_mep(*args, "--output", "table").stdout.splitlines()
    assert table[0] == "endpoint_online: False"
    assert table[1].split() == ["ROLE", "PID", "UID", "DILL_LOADED", "UNPICKLING_REFUSED"]
    assert table[2].split() == ["service", str(service["pid"]), str(service["uid"]), "False",
                                str(service["unpickling_refused"])]

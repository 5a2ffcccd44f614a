"""The htex engine (Parsl's HighThroughputExecutor with its LocalProvider, no scheduler needed) and
``worker_python`` workers, end to end as real accounts.

Every function here travels by value: this module is not installed where the endpoints run.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import mep
from mep.endpoint import bootstrap
from mep.errors import ErrorCode
from mep.protocol import messages
from tests.harness import DOMAIN_STRIP, expression_mapping, processes_of_uid, wait_for
from tests.worker_envs import link_env, worker_env

LOCAL_HTEX_TEMPLATE = """\
engine:
  type: htex
  provider:
    type: LocalProvider
  workers_per_node: 2
  max_blocks: 1
{% if python_env is defined %}
  worker_python: {{ mep.mapped_user.home ~ "/" ~ python_env ~ "/bin/python" }}
{% endif %}
idle_timeout: {{ idle_timeout | default(60) }}
"""
LOCAL_HTEX_SCHEMA = '{"type": "object", "additionalProperties": false, "properties": ' \
                    '{"python_env": {"type": "string"}, "idle_timeout": {"type": "number"}}}'


def where() -> dict:
    """Runs on a worker: who, which interpreter, whether mep could even be imported there."""
    import importlib.util
    import os
    import sys

    return {"uid": os.getuid(), "python": sys.executable, "mep_importable": importlib.util.find_spec("mep") is not None,
            "parsl_worker": "PARSL_WORKER_RANK" in os.environ}


def add(a: int, b: int) -> int:
    return a + b


def divide(a: float, b: float) -> float:
    return a / b


def die() -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture
def htex_manager(deploy):  # noqa: ANN001, ANN201
    template = deploy.root / "local-htex.yaml.j2"
    template.write_text(LOCAL_HTEX_TEMPLATE)
    schema = deploy.root / "local-htex.schema.json"
    schema.write_text(LOCAL_HTEX_SCHEMA)
    return deploy.start_manager(expression_mapping(DOMAIN_STRIP), template=template, schema=schema)


def test_bootstrap_speaks_the_wire_values() -> None:
    assert (bootstrap.SUCCESS, bootstrap.TASK_ERROR, bootstrap.FAILED) == (
        messages.SUCCESS, messages.TASK_ERROR, messages.FAILED)
    assert (bootstrap.TASK_ERROR_CODE, bootstrap.CONFIG_INVALID_CODE, bootstrap.LARGE_RESULT_UNAVAILABLE_CODE) == (
        ErrorCode.TASK_ERROR, ErrorCode.CONFIG_INVALID, ErrorCode.LARGE_RESULT_UNAVAILABLE)


def test_bootstrap_imports_nothing_but_the_standard_library_and_dill() -> None:
    source = Path(bootstrap.__file__).read_text()
    imported = {line.split()[1].split(".")[0] for line in source.splitlines()
                if line.lstrip().startswith(("import ", "from ")) and not line.lstrip().startswith("from __future__")}
    assert imported <= {"hashlib", "os", "select", "signal", "sys", "threading", "traceback", "types", "typing",
                        "ctypes", "multiprocessing", "dill"}, imported


def test_the_process_engine_path_does_not_import_parsl() -> None:
    script = "import sys, mep.endpoint.main; print(sorted(m for m in sys.modules if m.split('.')[0] == 'parsl'))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.root
def test_htex_runs_tasks_as_the_account_on_parsl_workers(deploy, htex_manager, account_factory) -> None:
    account = account_factory("mephtex")
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, htex_manager, user_endpoint_config={"idle_timeout": 10}) as executor:
        reports = [future.result(timeout=120) for future in [executor.submit(where) for _ in range(4)]]
        assert list(executor.map(add, [1, 2], [10, 20])) == [11, 22]
        with pytest.raises(ZeroDivisionError):
            executor.submit(divide, 1, 0).result(timeout=60)
    for report in reports:
        assert report["uid"] == account.pw_uid
        assert report["parsl_worker"] is True
    runs = list((Path(account.pw_dir) / ".mep" / "parsl").iterdir())
    assert len(runs) == 1
    run_dir = runs[0]
    assert (run_dir.stat().st_mode & 0o777, run_dir.stat().st_uid) == (0o700, account.pw_uid)
    certificates = run_dir / "mep" / "certificates"
    assert certificates.is_dir(), "HTEX runs encrypted: its CurveZMQ keys live in the private run directory"
    # Parsl's logs (interchange, worker pool, workers) take warnings only, not several lines per task.
    logs = {path.name: path.read_text() for path in run_dir.rglob("*.log")}
    # (a worker writes its log once it has started: with six tasks on two workers one may not have yet)
    assert {"interchange.log", "manager.log"} <= set(logs) and any(name.startswith("worker_") for name in logs), \
        sorted(logs)
    assert not [name for name, text in logs.items() if " DEBUG: " in text or " INFO: " in text], logs
    # The endpoint idles out and takes its block (the local worker pool) with it.
    wait_for(lambda: not processes_of_uid(account.pw_uid), timeout=90,
             what="every process of the account to end after the idle shutdown")


@pytest.mark.root
def test_htex_worker_python_runs_tasks_in_an_environment_without_mep(deploy, htex_manager,
                                                                      account_factory) -> None:
    account = account_factory("mephtexpy")
    env = worker_env(importlib.metadata.version("dill"))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    config = {"python_env": link_env(account, env, "plain")}
    with deploy.executor(identity, htex_manager, user_endpoint_config=config) as executor:
        report = executor.submit(where).result(timeout=120)
        assert executor.submit(add, 2, 3).result(timeout=60) == 5
    assert report["uid"] == account.pw_uid
    assert report["python"] == f"{account.pw_dir}/envs/plain/bin/python"
    assert report["mep_importable"] is False


@pytest.mark.root
def test_process_engine_worker_python_and_a_worker_that_dies(deploy, account_factory) -> None:
    account = account_factory("mepprocpy")
    env = worker_env(importlib.metadata.version("dill"))
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))  # the shipped local template
    identity = deploy.identity(f"{account.pw_name}@example.org")
    config = {"workers": 2, "python_env": link_env(account, env, "plain")}
    with deploy.executor(identity, manager, user_endpoint_config=config) as executor:
        reports = [future.result(timeout=60) for future in [executor.submit(where) for _ in range(4)]]
        with pytest.raises(mep.WorkerLostError) as lost:
            executor.submit(die).result(timeout=60)
        assert "signal 9" in str(lost.value)
        assert executor.submit(add, 40, 2).result(timeout=60) == 42  # the worker was replaced
    for report in reports:
        assert report == {"uid": account.pw_uid, "python": f"{account.pw_dir}/envs/plain/bin/python",
                          "mep_importable": False, "parsl_worker": False}

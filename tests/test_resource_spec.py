"""A task's resource_specification: taken at submit(), carried as plain data, checked at the endpoint.

The Slurm side (MPI mode, limits from the Slurm template) is in tests/test_mpi.py.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import mep
from mep.config.endpoint import UserEndpointConfig
from mep.config.manager import shipped_templates_dir
from mep.config.render import TemplateRenderer
from mep.endpoint.parsl_engine import mpi_placement
from mep.errors import ConfigInvalidError
from mep.service.store import Store
from tests.harness import DOMAIN_STRIP, expression_mapping
from tests.test_templates import CONTEXT

TEMPLATES = shipped_templates_dir()


def slurm(options: dict) -> UserEndpointConfig:
    return TemplateRenderer(TEMPLATES / "slurm.yaml.j2", TEMPLATES / "slurm.schema.json").render(options, **CONTEXT)


def uid() -> int:
    import os

    return os.getuid()


@pytest.mark.root
def test_each_task_keeps_the_resource_specification_it_was_submitted_with(deploy, account_factory) -> None:
    account = account_factory("mepres")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))  # the local template: a process engine
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager, resource_specification={"cores": 2}) as executor:
        asking = executor.submit(uid)
        executor.resource_specification = {}  # after submit(): the first task still asks for cores
        plain = executor.submit(uid)
        with pytest.raises(ValueError, match="whole numbers"):
            executor.resource_specification = {"cores": 1.5}
            executor.submit(uid)
    assert plain.result(timeout=60) == account.pw_uid
    with pytest.raises(ConfigInvalidError, match="does not accept 'cores'.*it accepts none"):
        asking.result(timeout=60)


def test_the_slurm_template_grants_mpi_placement_up_to_its_block() -> None:
    config = slurm({"mpi": True, "nodes_per_block": 2})
    assert config.engine.mpi is not None and config.engine.mpi.launcher == "mpiexec"
    assert config.task_resources == {"num_nodes": 2, "ranks_per_node": 64, "num_ranks": 128}
    assert config.engine.launcher.type == "SimpleLauncher", "one pool on the first node hands out the nodes"
    assert config.check_resources({"num_nodes": 2, "ranks_per_node": 4}) == {"num_nodes": 2, "ranks_per_node": 4}
    with pytest.raises(ValueError, match=r"num_nodes=3, more than this endpoint allows: task_resources\.num_nodes is 2"):
        config.check_resources({"num_nodes": 3})
    with pytest.raises(ValueError, match="does not accept 'gpus'"):
        config.check_resources({"gpus": 1})
    single = slurm({"mpi": True})
    assert "export HYDRA_LAUNCHER=fork" in single.engine.worker_init, "one-node blocks: mpiexec forks its ranks"
    assert slurm({}).engine.mpi is None and slurm({}).task_resources == {"priority": 1000000}


def test_mpi_mode_refuses_worker_python_and_engines_refuse_resources_they_cant_honour() -> None:
    with pytest.raises(ConfigInvalidError, match="mpi mode runs tasks in mep's own interpreter"):
        slurm({"mpi": True, "python_env": "envs/analysis"})
    with pytest.raises(ValueError, match="names cores, which the process engine can't honour per task"):
        UserEndpointConfig.model_validate({"task_resources": {"cores": 4}})
    htex = {"type": "htex", "provider": {"type": "LocalProvider"}}
    with pytest.raises(ValueError, match=r"num_nodes, which the htex engine in this mode can't .*honours priority"):
        UserEndpointConfig.model_validate({"engine": htex, "task_resources": {"num_nodes": 1}})


def test_mpi_placement_fills_in_what_parsl_needs() -> None:
    assert mpi_placement({}) == {"num_nodes": 1, "ranks_per_node": 1, "num_ranks": 1}
    assert mpi_placement({"num_nodes": 2, "ranks_per_node": 3}) == {"num_nodes": 2, "ranks_per_node": 3, "num_ranks": 6}
    assert mpi_placement({"num_nodes": 2, "num_ranks": 5}) == {"num_nodes": 2, "ranks_per_node": 3, "num_ranks": 5}


def test_mpi_function_checks_its_specification_and_says_what_it_is() -> None:
    hello = mep.MPIFunction("hostname", resource_specification={"num_nodes": 1, "ranks_per_node": 2}, walltime=5)
    assert repr(hello) == ("MPIFunction('hostname', resource_specification={'num_nodes': 1, 'ranks_per_node': 2}, "
                           "walltime=5)")
    for bad in ({"num_nodes": -1}, {"Num_Nodes": 1}, {"num_nodes": "1"}):
        with pytest.raises(ValueError, match="resource_specification must map"):
            mep.MPIFunction("hostname", resource_specification=bad)
    with pytest.raises(RuntimeError, match=r"did not give the task \$PARSL_MPI_PREFIX: its engine is not in MPI mode"):
        hello()


def test_a_database_from_before_resources_gains_the_column_and_keeps_its_tasks(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE tasks (id TEXT PRIMARY KEY, endpoint_id TEXT NOT NULL, submitter_id TEXT NOT NULL,"
                " fn_hash TEXT NOT NULL, args BLOB, config TEXT NOT NULL, runtime TEXT NOT NULL,"
                " walltime REAL NOT NULL DEFAULT 0, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
                " cancel_requested INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, dispatched_at REAL,"
                " started_at REAL, completed_at REAL, result_status TEXT, result_code TEXT, result_message TEXT,"
                " result_error_type TEXT, result_traceback TEXT, result_payload BLOB, acked_at REAL)")
    old.execute("INSERT INTO tasks (id, endpoint_id, submitter_id, fn_hash, args, config, runtime, state, created_at)"
                " VALUES ('t', 'e', 's', 'f', x'00', '{}', '{}', 'waiting', 1)")
    old.commit()
    old.close()
    store = Store(path)
    try:
        [task] = store.waiting_tasks("e", 10)
        assert task.task_id == "t" and task.resources == "{}"
    finally:
        store.close()

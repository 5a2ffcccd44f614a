"""MPIFunction on the shipped Slurm template in Parsl's MPI mode, on the real single-node Slurm, with MPICH.

The ranks are real MPI processes started by ``$PARSL_MPI_PREFIX`` (``mpiexec -n 2 -ppn 2 -hosts <node>``)
inside the endpoint's Slurm job, as the researcher's account.
"""

from __future__ import annotations

import shutil

import pytest

import mep
from mep.config.manager import shipped_templates_dir
from tests.harness import DOMAIN_STRIP, expression_mapping
from tests.slurm import slurm  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("slurm")]

TEMPLATES = shipped_templates_dir()
# each rank says who it is, by MPICH's process-manager variables, from inside the job
RANK_REPORT = """sh -c 'echo rank=$PMI_RANK size=$PMI_SIZE uid=$(id -u) job=$SLURM_JOB_ID host=$(hostname) "$0"' {label}"""


@pytest.fixture
def manager(deploy):  # noqa: ANN001, ANN201
    return deploy.start_manager(expression_mapping(DOMAIN_STRIP), template=TEMPLATES / "slurm.yaml.j2",
                                schema=TEMPLATES / "slurm.schema.json")


def test_mpi_function_launches_two_ranks_in_the_accounts_slurm_job(deploy, manager, account_factory) -> None:
    assert shutil.which("mpiexec"), "MPICH's mpiexec must be installed (.ci/run installs mpich)"
    account = account_factory("mepmpi")
    identity = deploy.identity(f"{account.pw_name}@example.org")
    hello = mep.MPIFunction(RANK_REPORT, resource_specification={"num_nodes": 1, "ranks_per_node": 2}, walltime=120)
    too_many = mep.MPIFunction(RANK_REPORT, resource_specification={"num_nodes": 1, "ranks_per_node": 65})
    too_wide = mep.MPIFunction(RANK_REPORT, resource_specification={"num_nodes": 2, "ranks_per_node": 1})
    config = {"mpi": True, "walltime": "00:10:00", "idle_timeout": 10}
    with deploy.executor(identity, manager, user_endpoint_config=config) as executor:
        done = executor.submit(hello, label="a'b; $(id)").result(timeout=240)
        refused = [executor.submit(fn, label="x") for fn in (too_many, too_wide)]
        with pytest.raises(mep.ConfigInvalidError, match=r"ranks_per_node=65.*task_resources\.ranks_per_node is 64"):
            refused[0].result(timeout=120)
        with pytest.raises(mep.ConfigInvalidError, match=r"num_nodes=2.*task_resources\.num_nodes is 1"):
            refused[1].result(timeout=120)

    assert done.returncode == 0, done.stderr
    assert done.args.startswith("mpiexec -n 2 -ppn 2 -hosts "), done.args
    lines = sorted(done.stdout.split("\n")[:-1])
    assert len(lines) == 2, done.stdout
    ranks = [dict(word.split("=", 1) for word in line.split()[:5]) for line in lines]
    assert sorted(rank["rank"] for rank in ranks) == ["0", "1"], "two distinct MPI ranks"
    assert {rank["size"] for rank in ranks} == {"2"}
    assert {rank["uid"] for rank in ranks} == {str(account.pw_uid)}, "the ranks run as the researcher"
    assert all(rank["job"] for rank in ranks), "inside the endpoint's Slurm job"
    assert all(line.endswith("a'b; $(id)") for line in lines), "the argument is one word, never shell syntax"


def test_mpi_function_on_an_endpoint_without_mpi_mode_says_so(deploy, manager, account_factory) -> None:
    """And an ordinary function there may ask for the one key HTEX honours outside MPI mode, within the limit."""
    account = account_factory("mepnompi")
    identity = deploy.identity(f"{account.pw_name}@example.org")
    hello = mep.MPIFunction("true", resource_specification={"num_nodes": 1})
    with deploy.executor(identity, manager, user_endpoint_config={"idle_timeout": 10}) as executor:
        with pytest.raises(mep.ConfigInvalidError, match="does not accept 'num_nodes'.*priority"):
            executor.submit(hello).result(timeout=240)
        executor.resource_specification = {"priority": 5}
        prioritised = executor.submit(mep.ShellFunction("id -u"))
        executor.resource_specification = {"priority": 1000001}
        over_the_limit = executor.submit(mep.ShellFunction("id -u"))
        assert prioritised.result(timeout=240).stdout == f"{account.pw_uid}\n"
        with pytest.raises(mep.ConfigInvalidError, match=r"priority=1000001.*task_resources\.priority is 1000000"):
            over_the_limit.result(timeout=120)

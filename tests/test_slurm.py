"""The shipped Slurm template on a real single-node Slurm (``scripts/slurm-setup.sh``), as real accounts.

Every function here travels by value: this module is not installed where the endpoints run.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess

import pytest

import mep
from mep.config.manager import shipped_templates_dir
from tests.harness import DOMAIN_STRIP, PYTHON, expression_mapping, wait_for
from tests.slurm import endpoints_of, job_fields, jobs_of, slurm  # noqa: F401  (slurm: a fixture)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("slurm")]

TEMPLATES = shipped_templates_dir()
PROBE_VALUE = "two words; $(id) `id` 'quoted' \"double\" $HOME"


def in_job() -> dict:
    """Runs on a Slurm worker: which account, which job, which partition, what worker_init exported."""
    import os

    return {"uid": os.getuid(), "job": os.environ.get("SLURM_JOB_ID"),
            "partition": os.environ.get("SLURM_JOB_PARTITION"), "probe": os.environ.get("MEP_PROBE")}


def add(a: int, b: int) -> int:
    return a + b


def rendezvous(number: int, expected: int) -> str:
    """Returns only once ``expected`` tasks run at the same time: with one worker per block, in as many blocks."""
    import os
    import pathlib
    import time

    (pathlib.Path.home() / f"arrived-{number}").touch()
    deadline = time.monotonic() + 150
    while len(list(pathlib.Path.home().glob("arrived-*"))) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError("the other tasks never ran at the same time as this one")
        time.sleep(0.2)
    return os.environ["SLURM_JOB_ID"]


@pytest.fixture
def manager(deploy):  # noqa: ANN001, ANN201
    return deploy.start_manager(expression_mapping(DOMAIN_STRIP), template=TEMPLATES / "slurm.yaml.j2",
                                schema=TEMPLATES / "slurm.schema.json")


def test_two_accounts_run_in_their_own_slurm_jobs_and_leave_nothing_behind(deploy, manager,
                                                                          account_factory) -> None:
    accounts = [account_factory("mepslurma"), account_factory("mepslurmb")]
    identities = {a.pw_name: deploy.identity(f"{a.pw_name}@example.org") for a in accounts}
    config = {"walltime": "00:10:00", "idle_timeout": 10, "environment": {"MEP_PROBE": PROBE_VALUE}}

    def run_as(name: str) -> list[dict]:
        with deploy.executor(identities[name], manager, user_endpoint_config=config) as executor:
            futures = [executor.submit(in_job) for _ in range(3)]
            assert executor.submit(add, 2, 3).result(timeout=180) == 5
            return [future.result(timeout=180) for future in futures]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        reports = dict(zip(identities, pool.map(run_as, identities), strict=True))

    for account in accounts:
        jobs = {report["job"] for report in reports[account.pw_name]}
        assert None not in jobs, "every task ran inside a Slurm job"
        for report in reports[account.pw_name]:
            assert report["uid"] == account.pw_uid
            assert report["partition"] == "debug"
            assert report["probe"] == PROBE_VALUE, "worker_init exports the value exactly, shell-quoted"
        queued = jobs_of(account.pw_name)
        assert jobs <= set(queued), "the block is still there until the endpoint idles out"
        for job in jobs:
            fields = job_fields(job)
            assert fields["UserId"] == f"{account.pw_name}({account.pw_uid})"
            assert fields["OverSubscribe"] != "NO", "blocks are not exclusive"
    assert not jobs_of("root")

    # The brokers validated an htex config and still never loaded dill (Parsl would have).
    status = json.loads(subprocess.run(
        [PYTHON, "-m", "mep", "status", "--service", deploy.address, "--service-key", deploy.service_key,
         "--token", identities[accounts[0].pw_name].token, "--endpoint", manager.endpoint_id],
        capture_output=True, text=True, check=True).stdout)
    for process in status["processes"]:
        assert process["dill_loaded"] is False, process

    for account in accounts:
        wait_for(lambda account=account: not endpoints_of(manager, account.pw_uid), timeout=120,
                 what=f"{account.pw_name}'s endpoint to idle out")
        wait_for(lambda account=account: not jobs_of(account.pw_name), timeout=60,
                 what=f"{account.pw_name}'s jobs to leave the queue")


def test_one_account_two_partitions_gets_two_endpoints(deploy, manager, account_factory) -> None:
    account = account_factory("mepparts")
    identity = deploy.identity(f"{account.pw_name}@example.org")
    seen = {}
    for partition in ("debug", "batch"):
        with deploy.executor(identity, manager, user_endpoint_config={"partition": partition}) as executor:
            seen[partition] = executor.submit(in_job).result(timeout=180)
    with deploy.executor(identity, manager, user_endpoint_config={"walltime": "00:05:00"}) as executor:
        seen["short walltime"] = executor.submit(in_job).result(timeout=180)
    assert seen["debug"]["partition"] == "debug" and seen["batch"]["partition"] == "batch"
    assert len({report["job"] for report in seen.values()}) == 3
    assert job_fields(seen["batch"]["job"])["Partition"] == "batch"
    assert job_fields(seen["short walltime"]["job"])["TimeLimit"] == "00:05:00"
    assert len(endpoints_of(manager, account.pw_uid)) == 3, "one endpoint per partition or walltime"


def test_blocks_scale_out_with_waiting_tasks(deploy, manager, account_factory) -> None:
    account = account_factory("mepscale")
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager, user_endpoint_config={"max_blocks": 2}) as executor:
        jobs = [future.result(timeout=180) for future in [executor.submit(rendezvous, n, 2) for n in range(2)]]
    assert len(set(jobs)) == 2, "two tasks at once, one worker per block: Parsl's strategy asked for a second block"


def test_config_the_schema_refuses_never_reaches_slurm(deploy, manager, account_factory) -> None:
    account = account_factory("mepbadcfg")
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager, user_endpoint_config={"partition": "debug --uid=0"}) as executor:
        with pytest.raises(mep.ConfigInvalidError) as refused:  # at submit (the SDK checks the schema) or spawn
            executor.submit(add, 1, 1).result(timeout=60)
    assert "user_endpoint_config.partition" in str(refused.value)
    assert not endpoints_of(manager, account.pw_uid)
    assert not jobs_of(account.pw_name)


def test_partition_slurm_refuses_fails_the_task_with_slurms_words(deploy, manager, account_factory) -> None:
    account = account_factory("mepnopart")
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager, user_endpoint_config={"partition": "nosuchpartition"}) as executor:
        future = executor.submit(add, 1, 1)
        with pytest.raises(mep.SpawnError) as refused:
            future.result(timeout=120)
    message = str(refused.value)
    assert "the scheduler did not run the block of workers" in message
    assert "invalid partition" in message.lower()
    assert "Traceback" not in message
    assert not jobs_of(account.pw_name)


def test_job_that_can_never_start_fails_after_start_timeout_and_is_cancelled(deploy, manager,
                                                                             account_factory) -> None:
    account = account_factory("mepnostart")
    identity = deploy.identity(f"{account.pw_name}@example.org")
    config = {"nodes_per_block": 2, "start_timeout": 10}  # this cluster has one node
    with deploy.executor(identity, manager, user_endpoint_config=config) as executor:
        future = executor.submit(add, 1, 1)
        wait_for(lambda: jobs_of(account.pw_name), timeout=60, what="the block job to be queued")
        (job,) = jobs_of(account.pw_name)
        assert job_fields(job)["JobState"] == "PENDING"
        with pytest.raises(mep.SpawnError) as refused:
            future.result(timeout=120)
    message = str(refused.value)
    assert "no block of workers started within start_timeout (10 s)" in message
    assert f"job {job} is PENDING" in message
    wait_for(lambda: not jobs_of(account.pw_name), timeout=30, what="the pending job to be cancelled")

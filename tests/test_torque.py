"""The shipped Torque template through Parsl's TorqueProvider, against slurm-wlm-torque's qsub/qstat/qdel
over the real single-node Slurm (``scripts/slurm-setup.sh``): the PBS command path, not a faithful PBS.

Every function here travels by value: this module is not installed where the endpoints run.
"""

from __future__ import annotations

import subprocess

import pytest

from mep.config.manager import shipped_templates_dir
from tests.harness import DOMAIN_STRIP, expression_mapping, wait_for
from tests.slurm import endpoints_of, job_fields, jobs_of, slurm  # noqa: F401  (slurm: a fixture)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("slurm")]

TEMPLATES = shipped_templates_dir()


def in_job() -> dict:
    import os

    return {"uid": os.getuid(), "job": os.environ.get("SLURM_JOB_ID")}


def qstat_jobs(user: str) -> list[str]:
    """Job ids qstat lists for ``user`` that are not complete (state C)."""
    lines = subprocess.run(["qstat", "-u", user], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line.split()[0] for line in lines if line[:1].isdigit() and line.split()[-2:-1] != ["C"]]


def test_torque_template_runs_tasks_in_qsub_jobs_as_the_account(deploy, account_factory) -> None:
    account = account_factory("meptorque")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), template=TEMPLATES / "torque.yaml.j2",
                                   schema=TEMPLATES / "torque.schema.json")
    identity = deploy.identity(f"{account.pw_name}@example.org")
    config = {"walltime": "00:10:00", "idle_timeout": 10}
    with deploy.executor(identity, manager, user_endpoint_config=config) as executor:
        reports = [future.result(timeout=180) for future in [executor.submit(in_job) for _ in range(3)]]
    jobs = {report["job"] for report in reports}
    assert None not in jobs and len(jobs) == 1, "the tasks ran in the one block qsub submitted"
    (job,) = jobs
    assert all(report["uid"] == account.pw_uid for report in reports)
    assert job_fields(job)["UserId"] == f"{account.pw_name}({account.pw_uid})"
    assert job in qstat_jobs(account.pw_name), "qstat (the provider's view) shows the block as the account's"
    wait_for(lambda: not endpoints_of(manager, account.pw_uid), timeout=120, what="the endpoint to idle out")
    wait_for(lambda: not jobs_of(account.pw_name), timeout=60, what="qdel to take the block out of the queue")

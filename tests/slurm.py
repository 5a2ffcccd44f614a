"""Looking at the real single-node Slurm the scheduler tests run against (``scripts/slurm-setup.sh``)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.harness import children_of


@pytest.fixture(scope="session")
def slurm() -> None:
    """Slurm must be up: CI starts it in .ci/run; locally run ``bash scripts/slurm-setup.sh`` first."""
    sinfo = shutil.which("sinfo")
    state = subprocess.run([sinfo, "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout if sinfo else ""
    assert state.split() and state.split()[0] in ("idle", "mixed", "allocated"), (
        f"no usable Slurm node (sinfo: {state.strip() or 'not installed'}); run `bash scripts/slurm-setup.sh` as root")


def jobs_of(user: str) -> list[str]:
    """Ids of the jobs ``user`` has in the queue (pending, running or completing)."""
    result = subprocess.run(["squeue", "-h", "-u", user, "-o", "%i"], capture_output=True, text=True, check=True)
    return result.stdout.split()


def job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job``'s Key=Value fields (the first value of each key)."""
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True)
    fields: dict[str, str] = {}
    for word in result.stdout.split():
        key, _, value = word.partition("=")
        fields.setdefault(key, value)
    return fields


def endpoints_of(manager, uid: int) -> list[int]:  # noqa: ANN001 - tests.harness.Manager
    """The manager's user endpoint processes running as ``uid``."""
    found = []
    for pid in children_of(manager.spawner_pid):
        try:
            with open(f"/proc/{pid}/status") as status:
                if any(line.split()[1:2] == [str(uid)] for line in status if line.startswith("Uid:")):
                    found.append(pid)
        except OSError:
            continue
    return found

"""Shell tasks, readable reprs and the progress bar (issue 13: kinds of task, Jupyter).

Real processes: a real deployment runs the shell tasks as a real account.
"""

from __future__ import annotations

import io
import subprocess

import pytest

import mep
from mep.sdk.progress import state_counts
from mep.sdk.serialize import serialize_function
from tests.harness import DOMAIN_STRIP, PYTHON, expression_mapping

LOAD_WITHOUT_MEP = """
import sys, dill
sys.modules["mep"] = None  # any import of mep fails: a worker in a python_env that has only dill
done = dill.loads(bytes.fromhex(sys.stdin.read()))(word="it's")
print(done.returncode, done.stdout.strip())
"""


def test_a_shell_function_travels_by_value_and_needs_only_dill() -> None:
    body = serialize_function(mep.ShellFunction("echo {word}"))
    loaded = subprocess.run([PYTHON, "-c", LOAD_WITHOUT_MEP], input=body.hex(), capture_output=True, text=True,
                            check=True, cwd="/")
    assert loaded.stdout.strip() == "0 it's"


def test_a_shell_function_says_which_arguments_it_lacks() -> None:
    with pytest.raises(TypeError, match="needs the argument"):
        mep.ShellFunction("cp {source} {target}")(source="a")


@pytest.mark.root
def test_shell_tasks_run_as_the_account_with_quoted_arguments_exit_code_output_and_walltime(
        deploy, account_factory) -> None:
    account = account_factory("mepshell")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    hostile = "a  b; touch /tmp/mep-shell-injected"
    with deploy.executor(identity, manager) as executor:
        command = executor.submit(mep.ShellFunction("echo {word}; id -un; echo oops >&2; exit 3"), word=hostile)
        overrun = executor.submit(mep.ShellFunction("sleep 30", walltime=1))
        futures = mep.progress([command, overrun], file=io.StringIO(), description="shell")
        done = command.result(timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (3, f"{hostile}\n{account.pw_name}\n", "oops\n")
        with pytest.raises(TimeoutError, match="walltime of 1 s"):
            overrun.result(timeout=60)
        assert "succeeded, returned CompletedProcess" in repr(command)
        assert "failed: TimeoutError" in repr(overrun) and "<table>" in overrun._repr_html_()
        assert futures == [command, overrun]
        assert manager.endpoint_id in repr(executor) and "accepted, waiting for results" in repr(executor)
        assert "<table>" in executor._repr_html_()
    client = mep.Client(service=deploy.address, service_key=deploy.service_key, token=identity.token)
    tasks = client.list_tasks()
    listing = repr(tasks)
    assert listing.splitlines()[0].split() == ["task", "id", "state", "attempts", "submitted", "completed",
                                               "message"]
    assert command.task_id in listing and overrun.task_id in listing and "walltime" in listing
    assert tasks._repr_html_().count("<tr>") == 3
    assert state_counts(futures) == {"succeeded": 1, "failed": 1}


def test_progress_returns_at_once_for_finished_futures_and_counts_them() -> None:
    import concurrent.futures

    finished = [concurrent.futures.Future() for _ in range(3)]
    finished[0].set_result(1)
    finished[1].set_exception(ValueError("no"))
    finished[2].cancel()
    output = io.StringIO()
    assert mep.progress(finished, file=output) == finished
    assert "cancelled=1" in output.getvalue() and "failed=1" in output.getvalue()

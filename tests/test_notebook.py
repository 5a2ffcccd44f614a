"""docs/examples/quickstart.ipynb runs, cell by cell, against a real mep and shows what its text says.

nbclient executes the notebook in a real IPython kernel, as JupyterLab would;
the kernel reaches a real service and a root manager through the environment
a researcher sets (MEP_SERVICE, MEP_SERVICE_KEY, MEP_TOKEN), and its tasks
run as a real mapped account. The only change to the notebook is its
``parameters`` cell, which gets this deployment's endpoint id.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from tests.harness import DOMAIN_STRIP, expression_mapping, wait_for

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "examples" / "quickstart.ipynb"


def result_of(cell: Any) -> Any:
    """A cell's result (the value of its last line), read back from its ``text/plain`` form."""
    (result,) = [output for output in cell.outputs if output.output_type == "execute_result"]
    return ast.literal_eval(result.data["text/plain"])


def shown(cell: Any, kind: str = "text/plain") -> str:
    return "".join(output.data.get(kind, "") for output in cell.outputs
                   if output.output_type in ("execute_result", "display_data"))


def stream(cell: Any, name: str) -> str:
    return "".join(output.text for output in cell.outputs if output.output_type == "stream" and output.name == name)


def cell_with(notebook: Any, source: str, *, exact: bool = False) -> Any:
    """The one code cell whose source contains ``source`` (with ``exact``: is ``source``)."""
    (found,) = [cell for cell in notebook.cells if cell.cell_type == "code"
                and (cell.source.strip() == source if exact else source in cell.source)]
    return found


def estimate_pi_here(notebook: Any) -> Any:
    """The notebook's own ``estimate_pi``, run in this process: what the cluster must have returned."""
    namespace: dict[str, Any] = {}
    source = cell_with(notebook, "def estimate_pi").source
    exec(source.split("\n\nexecutor = ")[0], namespace)  # noqa: S102 - the repository's own notebook
    return namespace["estimate_pi"]


@pytest.mark.root
def test_the_quickstart_notebook_runs_against_a_real_endpoint(deploy, account_factory, monkeypatch) -> None:  # noqa: ANN001
    account = account_factory("mepnb")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))  # the shipped local template
    identity = deploy.identity(f"{account.pw_name}@example.org")
    for name, value in (("MEP_SERVICE", deploy.address), ("MEP_SERVICE_KEY", deploy.service_key),
                        ("MEP_TOKEN", identity.token)):
        monkeypatch.setenv(name, value)  # the kernel inherits them, as from a researcher's shell
    import mep

    wait_for(lambda: mep.Client().endpoint_info(manager.endpoint_id).schema is not None,
             what="the router to describe the endpoint")

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    (parameters,) = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    parameters.source = f"ENDPOINT = {manager.endpoint_id!r}"
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": "/"}}).execute()

    info = cell_with(notebook, "client.endpoint_info(ENDPOINT)")
    assert "<table>" in shown(info, "text/html") and "Worker processes in the pool." in shown(info, "text/html")
    assert "status    online" in shown(info)

    typo = stream(cell_with(notebook, 'user_endpoint_config={"worker": 2}'), "stdout")
    assert "'worker' was unexpected) (did you mean 'workers'?)" in typo, typo

    estimate_pi = estimate_pi_here(notebook)
    assert result_of(cell_with(notebook, "future.result()")) == estimate_pi(1)
    future = cell_with(notebook, "future", exact=True)
    assert "succeeded, returned float" in shown(future) and "<table>" in shown(future, "text/html")
    assert result_of(cell_with(notebook, "executor.map")) == [estimate_pi(seed) for seed in range(4)]

    many = cell_with(notebook, "mep.progress(futures)")
    assert re.search(r"20/20 .*succeeded=20", stream(many, "stderr")), stream(many, "stderr")
    assert result_of(many) == pytest.approx(sum(estimate_pi(seed) for seed in range(20)) / 20)
    executor = cell_with(notebook, "executor", exact=True)
    assert manager.endpoint_id[:8] in shown(executor) and "<table>" in shown(executor, "text/html")
    assert "succeeded" in shown(cell_with(notebook, "client.list_tasks(limit=5)"))

    # one word per value: "spaces;" is not shell syntax; and it ran as the researcher's account
    assert result_of(cell_with(notebook, "mep.ShellFunction(")) == (0, f"8\n{account.pw_name}\n")
    assert result_of(cell_with(notebook, "waiting_reason")) == "queued behind 1 task (1 running)"
    assert result_of(cell_with(notebook, "client.cancel(")) == (0, True)
    errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if output.output_type == "error"]
    assert not errors, errors

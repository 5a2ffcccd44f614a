"""A client whose Python or dill differs from the workers' gets its task refused at once, with both
sides' versions and what to do, instead of a deserialisation error or a lost worker.

Every function here travels by value: this module is not installed where the endpoints run.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

import mep
import mep.sdk.executor
from mep.endpoint.versions import mismatch
from mep.protocol.messages import Runtime
from tests.harness import DOMAIN_STRIP, expression_mapping
from tests.worker_envs import link_env, worker_env

THIS_MINOR = f"{sys.version_info.major}.{sys.version_info.minor}"
THIS_DILL = importlib.metadata.version("dill")
OTHER_DILL = "0.3.9"


def leave_a_mark() -> str:
    """Must never run when refused: it leaves a file in the account's home."""
    import pathlib

    (pathlib.Path.home() / "task-ran").touch()
    return "ran"


def test_same_minor_python_and_dill_match() -> None:
    assert mismatch(f"{THIS_MINOR}.99", THIS_DILL, None) == ""


def test_python_minor_mismatch_names_both_versions_and_the_way_out() -> None:
    message = mismatch("3.99.0", THIS_DILL, None)
    assert f"your client runs Python 3.99 (workers: Python {THIS_MINOR})" in message
    assert f"Submit from an environment with Python {THIS_MINOR} and dill {THIS_DILL}" in message
    assert "worker_python" in message


def test_python_and_dill_mismatch_both_reported() -> None:
    message = mismatch("3.8.10", "0.3.4", None)
    assert f"Python 3.8 (workers: Python {THIS_MINOR}) and dill 0.3.4 (workers: dill {THIS_DILL})" in message


@pytest.fixture
def manager(deploy):  # noqa: ANN001, ANN201
    return deploy.start_manager(expression_mapping(DOMAIN_STRIP))  # the shipped local template


@pytest.mark.root
def test_worker_environment_with_another_dill_refuses_the_task_before_it_runs(deploy, manager,
                                                                              account_factory) -> None:
    account = account_factory("mepolddill")
    config = {"python_env": link_env(account, worker_env(OTHER_DILL), "old-dill")}
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager, user_endpoint_config=config) as executor:
        future = executor.submit(leave_a_mark)
        with pytest.raises(mep.ConfigInvalidError) as refused:
            future.result(timeout=60)
    message = str(refused.value)
    assert f"dill {THIS_DILL} (workers: dill {OTHER_DILL}) in {account.pw_dir}/envs/old-dill/bin/python" in message
    assert f"Submit from an environment with Python {THIS_MINOR} and dill {OTHER_DILL}" in message
    assert not (Path(account.pw_dir) / "task-ran").exists()


@pytest.mark.root
def test_client_on_another_python_is_refused_before_the_task_runs(deploy, manager, account_factory,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    account = account_factory("mepnewpy")
    identity = deploy.identity(f"{account.pw_name}@example.org")
    monkeypatch.setattr(mep.sdk.executor, "client_runtime",
                        lambda: Runtime(python="3.99.1", dill=THIS_DILL, mep=mep.__version__, platform="Linux"))
    with deploy.executor(identity, manager) as executor:
        future = executor.submit(leave_a_mark)
        with pytest.raises(mep.ConfigInvalidError) as refused:
            future.result(timeout=60)
    assert f"your client runs Python 3.99 (workers: Python {THIS_MINOR})" in str(refused.value)
    assert not (Path(account.pw_dir) / "task-ran").exists()


@pytest.mark.root
def test_worker_environment_without_dill_says_what_to_install(deploy, manager, account_factory) -> None:
    account = account_factory("mepnodill")
    config = {"python_env": link_env(account, worker_env(None), "bare")}
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager, user_endpoint_config=config) as executor:
        future = executor.submit(leave_a_mark)
        with pytest.raises(mep.ConfigInvalidError) as refused:
            future.result(timeout=60)
    python = f"{account.pw_dir}/envs/bare/bin/python"
    assert f"the worker interpreter {python} has no dill" in str(refused.value)
    assert f"{python} -m pip install dill==" in str(refused.value)
    assert not (Path(account.pw_dir) / "task-ran").exists()


@pytest.mark.root
def test_matching_client_runs(deploy, manager, account_factory) -> None:
    account = account_factory("mepmatch")
    config = {"python_env": link_env(account, worker_env(THIS_DILL), "same")}
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager, user_endpoint_config=config) as executor:
        assert executor.submit(leave_a_mark).result(timeout=60) == "ran"
    assert (Path(account.pw_dir) / "task-ran").exists()

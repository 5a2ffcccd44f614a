"""Options a researcher can discover, and tasks that say why they wait (issue 13).

Real service, real root manager, real accounts: ``Client.endpoint_info`` shows
what the router read from the admin's schema and template and whether the
manager is connected; the Executor refuses a typo at ``submit`` with the
message the endpoint gives for it; ``Client.get_task`` and a future's repr
say why a task waits (endpoint offline, starting, queued behind others).
Functions travel by value: this module is not installed where the endpoints run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import zmq

import mep
from mep.config.manager import shipped_templates_dir
from mep.config.options import JINJA_GLOBALS
from mep.manager.describe import template_description
from mep.protocol.messages import EndpointOptions
from mep.sdk.endpoint_info import OptionsCheck
from mep.service.endpoint_info import checked_options
from tests.harness import DOMAIN_STRIP, expression_mapping, wait_for
from tests.test_sdk_behaviour import NOWHERE_ENDPOINT, free_address

OFFLINE_SINCE = re.compile(r"endpoint offline since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC")


def add(a: int, b: int) -> int:
    return a + b


def gated(gate: str) -> str:
    """Runs until the test creates ``gate``: the tasks after it queue behind it."""
    import os
    import time

    while not os.path.exists(gate):
        time.sleep(0.05)
    return "done"


def _client(deploy, identity) -> mep.Client:  # noqa: ANN001
    return mep.Client(service=deploy.address, service_key=deploy.service_key, token=identity.token)


def _described(client: mep.Client, endpoint_id: str) -> mep.sdk.endpoint_info.EndpointDescription:
    """The router describes its endpoint right after it registers: wait for that."""
    return wait_for(lambda: (info := client.endpoint_info(endpoint_id)).schema is not None and info,
                    what="the router to describe the endpoint")


def test_the_shared_reserved_names_are_jinjas_globals() -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    assert set(JINJA_GLOBALS) == set(ImmutableSandboxedEnvironment().globals)


def test_a_templates_description_is_the_first_paragraph_of_its_opening_comment() -> None:
    assert template_description("{#\n  Slurm: jobs\n  per block.\n\n  Options: ...\n#}\nengine: {}") == \
        "Slurm: jobs per block."
    assert template_description("engine: {}  {# not at the top #}") == ""


def test_the_service_refuses_a_description_whose_schema_is_not_a_json_object() -> None:
    for schema in ("[1, 2]", "{not json"):
        with pytest.raises(mep.errors.ProtocolError, match="DESCRIBE: the schema"):
            checked_options(EndpointOptions(schema=schema))


def test_without_an_answer_from_the_service_options_are_left_to_the_endpoint() -> None:
    executor = mep.Executor(NOWHERE_ENDPOINT, service=free_address(), token="t",
                            service_key=zmq.curve_keypair()[0].decode(), user_endpoint_config={"worker": 2})
    try:
        future = executor.submit(add, 1, 2)  # not refused here: nothing says the endpoint refuses it
        assert not future.done()  # queued and sent; the service would have the last word
    finally:
        executor.shutdown(wait=False)


@pytest.mark.root
def test_endpoint_info_shows_the_schema_the_template_and_whether_the_manager_is_connected(
        deploy, account_factory) -> None:
    account = account_factory("mepinfo")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))  # the shipped local template
    client = _client(deploy, deploy.identity(f"{account.pw_name}@example.org"))
    info = _described(client, manager.endpoint_id)
    assert info.online and info.status == "online"
    assert info.template_description.startswith("mep template: local — a pool of worker processes")
    options = {name: (kind, default, description) for name, kind, default, description in info.options}
    assert options["workers"] == ("integer", "2", "Worker processes in the pool.")
    assert options["idle_timeout"] == ("number", "300", "Seconds without tasks before the endpoint exits.")
    assert options["python_env"][1] == "-"
    assert info.schema["additionalProperties"] is False
    assert "Worker processes in the pool." in repr(info) and "<table>" in info._repr_html_()

    manager.process.stop()
    offline = wait_for(lambda: not (found := client.endpoint_info(manager.endpoint_id)).online and found,
                       what="the endpoint to be offline")
    assert OFFLINE_SINCE.fullmatch(f"endpoint {offline.status}"), offline.status
    assert offline.schema == info.schema  # what it accepts is still known while it is away
    with pytest.raises(mep.UnknownEndpointError):
        client.endpoint_info("00000000-0000-4000-8000-000000000000")


@pytest.mark.root
def test_a_config_typo_fails_at_submit_with_the_endpoints_own_message(
        deploy, account_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    account = account_factory("meptypo")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    _described(_client(deploy, identity), manager.endpoint_id)
    typo = {"worker": 2}
    with deploy.executor(identity, manager, user_endpoint_config=typo) as executor:
        with pytest.raises(mep.ConfigInvalidError) as at_submit:
            executor.submit(add, 1, 2)
        executor.user_endpoint_config = {"workers": 1}  # a valid config submits as usual
        assert executor.submit(add, 1, 2).result(timeout=120) == 3
    assert "'worker' was unexpected" in str(at_submit.value)
    # The endpoint side's refusal of the same config, from an SDK that does not check first (an older mep):
    monkeypatch.setattr(OptionsCheck, "check", lambda self, frozen, config: None)
    with deploy.executor(identity, manager, user_endpoint_config=typo) as unchecked:
        future = unchecked.submit(add, 1, 2)
    with pytest.raises(mep.ConfigInvalidError) as on_endpoint:
        future.result(timeout=120)
    assert str(on_endpoint.value) == str(at_submit.value)


@pytest.mark.root
def test_a_task_says_its_endpoint_is_offline_then_starting_and_runs_once_the_manager_is_back(
        deploy, account_factory) -> None:
    account = account_factory("mepoffline")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    client = _client(deploy, identity)
    _described(client, manager.endpoint_id)
    manager.process.stop()
    wait_for(lambda: not client.endpoint_info(manager.endpoint_id).online, what="the endpoint to be offline")
    with deploy.executor(identity, manager) as executor:
        future = executor.submit(add, 2, 3)
    reason = client.get_task(future.task_id).waiting_reason
    assert OFFLINE_SINCE.fullmatch(reason), reason
    wait_for(lambda: reason in repr(future), what="the future's repr to show the reason")
    assert reason in future._repr_html_()
    assert reason in repr(client.list_tasks(task_ids=[future.task_id]))

    manager.start()
    seen = set()

    def finished() -> bool:
        task = client.get_task(future.task_id)
        seen.add(task.waiting_reason)
        return task.state == "succeeded"

    wait_for(finished, timeout=120, what="the task to run once the manager is back")
    assert future.result(timeout=60) == 5
    assert "endpoint starting" in seen, seen


@pytest.mark.root
def test_a_task_behind_others_on_a_busy_endpoint_says_how_many(deploy, account_factory, gate: Path) -> None:
    account = account_factory("mepqueued")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    client = _client(deploy, identity)
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 1}) as executor:
        futures = [executor.submit(gated, str(gate)) for _ in range(4)]
    wait_for(lambda: client.get_task(futures[0].task_id).state == "running", timeout=120,
             what="the first task to run")
    assert client.get_task(futures[3].task_id).waiting_reason == "queued behind 3 tasks (1 running)"
    assert client.get_task(futures[1].task_id).waiting_reason == "queued behind 1 task (1 running)"
    wait_for(lambda: "queued behind 3 tasks (1 running)" in repr(futures[3]), what="the repr to show the queue")
    gate.touch()
    assert [future.result(timeout=120) for future in futures] == ["done"] * 4
    assert client.get_task(futures[3].task_id).waiting_reason == ""


@pytest.mark.root
def test_a_schema_only_root_can_read_is_described_from_the_boot_document(deploy, account_factory) -> None:
    """As in /etc/mep/NAME (0700, beside manager.key): the router's account can't read the files itself."""
    policy = deploy.root / "policy"
    policy.mkdir(mode=0o700)
    for name in ("local.yaml.j2", "local.schema.json"):
        shutil.copy(shipped_templates_dir() / name, policy / name)
        os.chmod(policy / name, 0o600)
    account = account_factory("mepunread")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), template=policy / "local.yaml.j2",
                                   schema=policy / "local.schema.json")
    identity = deploy.identity(f"{account.pw_name}@example.org")
    info = _described(_client(deploy, identity), manager.endpoint_id)
    assert info.schema == json.loads((shipped_templates_dir() / "local.schema.json").read_text())
    assert info.template_description.startswith("mep template: local") and not info.problem
    with deploy.executor(identity, manager, user_endpoint_config={"worker": 2}) as executor:
        with pytest.raises(mep.ConfigInvalidError, match="'worker' was unexpected"):
            executor.submit(add, 1, 2)


def test_a_router_that_cannot_read_the_schema_says_why(tmp_path: Path) -> None:
    """A router started without the texts (no boot document) reads the files; one it can't read is reported."""
    from mep.config.manager import ManagerConfig
    from mep.manager.describe import endpoint_options

    config = ManagerConfig(endpoint_id="e", service_address="tcp://127.0.0.1:1", service_public_key="k",
                           manager_secret_key_file=tmp_path / "key", identity_mapping=tmp_path / "map",
                           schema=tmp_path / "missing.schema.json")
    options = endpoint_options(config)
    assert not options.schema and "cannot read" in options.problem and "missing.schema.json" in options.problem
    assert options.template_description.startswith("mep template: local")


@pytest.mark.root
def test_what_an_endpoint_accepts_and_when_it_left_outlive_a_service_restart(deploy, account_factory) -> None:
    account = account_factory("meprestart")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    client = _client(deploy, identity)
    schema = _described(client, manager.endpoint_id).schema
    deploy.service.popen.kill()  # a crash: the service never hears the manager leave
    deploy.service.popen.wait(timeout=30)
    manager.process.stop()
    deploy.start_service(deploy.address)
    info = client.endpoint_info(manager.endpoint_id)
    assert not info.online and info.offline_since and info.schema == schema
    with deploy.executor(identity, manager) as executor:
        future = executor.submit(add, 1, 1)
    reason = client.get_task(future.task_id).waiting_reason
    assert OFFLINE_SINCE.match(reason) and reason.endswith("when the service started (its manager has not "
                                                          "connected again)"), reason
    manager.start()
    assert future.result(timeout=120) == 2

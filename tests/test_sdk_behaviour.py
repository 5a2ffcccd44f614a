"""What a researcher sees from the Executor when things go wrong (issue 13, "Never guessing"; issue 10 item 6).

Real processes throughout: a real service that is killed and restarted, real
accounts and endpoints, and researcher scripts run as subprocesses and sent a
real SIGINT. Functions travel by value: this module is not installed where the
endpoints run.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time

import pytest
import zmq

import mep
from tests.harness import DOMAIN_STRIP, PYTHON, expression_mapping, wait_for

NOWHERE_ENDPOINT = "00000000-0000-4000-8000-000000000000"


def add(a: int, b: int) -> int:
    return a + b


def sleep_then_return(seconds: float, value: int) -> int:
    import time

    time.sleep(seconds)
    return value


def worker_count() -> int:
    """Runs on the endpoint: how many worker processes its pool has (the config's ``workers``)."""
    import os

    siblings = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == os.getppid():
                        siblings += 1
            except OSError:
                continue
    return siblings


def return_a_generator() -> object:
    return (n for n in range(3))


def raise_memory_error() -> None:
    raise MemoryError()


def return_object_of_a_module_only_the_endpoint_has() -> object:
    import importlib
    import pathlib
    import sys
    import tempfile

    directory = tempfile.mkdtemp()
    pathlib.Path(directory, "mep_endpoint_only_module.py").write_text("class Thing:\n    pass\n")
    sys.path.insert(0, directory)
    return importlib.import_module("mep_endpoint_only_module").Thing()


def free_address() -> str:
    """A TCP address nothing listens on: a service that is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def stop_service(deploy) -> None:  # noqa: ANN001
    deploy.service.popen.kill()
    deploy.service.popen.wait(timeout=30)


# --- the service does not answer ------------------------------------------------------------------------


def test_unanswered_task_fails_with_the_clients_words_and_says_it_was_not_acknowledged() -> None:
    address = free_address()
    executor = mep.Executor(NOWHERE_ENDPOINT, service=address, token="t", service_key=zmq.curve_keypair()[0].decode(),
                            answer_timeout=4, poll_interval=1)
    with executor:
        future = executor.submit(add, 1, 2)
        assert "waiting for the service to acknowledge" in repr(future) or "queued" in repr(future)
    with pytest.raises(mep.ServiceUnreachableError) as unanswered:
        future.result(timeout=60)
    message = str(unanswered.value)
    assert f"no answer from the service at {address} within 4 s (is it running and reachable?)" in message
    assert f"Task {future.task_id} was not acknowledged" in message
    assert "failed: ServiceUnreachableError" in repr(future)


@pytest.mark.root
def test_accepted_task_whose_service_goes_silent_fails_then_its_result_is_fetched_later(
        deploy, account_factory) -> None:
    account = account_factory("mepsilent")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager, answer_timeout=4) as executor:
        future = executor.submit(sleep_then_return, 6, 42)
    wait_for(lambda: "accepted by the service" in repr(future), what="the task to be accepted")
    stop_service(deploy)
    with pytest.raises(mep.ServiceUnreachableError, match="had been accepted by the service: it still runs"):
        future.result(timeout=60)
    deploy.start_service(deploy.address)
    client = mep.Client(service=deploy.address, service_key=deploy.service_key, token=identity.token)
    wait_for(lambda: client.get_task(future.task_id).state == "succeeded", timeout=60, what="the task to finish")
    assert client.get_result(future.task_id) == 42


@pytest.mark.root
def test_config_is_taken_at_submit_and_keep_retrying_waits_for_the_service(
        deploy, account_factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mep.sdk.executor")
    account = account_factory("mepconfig")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    executor = deploy.executor(identity, manager, user_endpoint_config={"workers": 1}, keep_retrying=True,
                               answer_timeout=4)
    try:  # not `with`: if an assertion fails, leaving must not wait for a service that keep_retrying awaits
        assert executor.submit(worker_count).result(timeout=60) == 1
        stop_service(deploy)
        first = executor.submit(worker_count)
        executor.user_endpoint_config["workers"] = 3  # in place: the first task keeps {"workers": 1}
        second = executor.submit(worker_count)
        executor.user_endpoint_config = {"workers": 2}
        third = executor.submit(worker_count)
        wait_for(lambda: "still retrying" in caplog.text, what="the Executor to report the silence")
        assert "no answer from the service" in repr(first)
        assert not any(future.done() for future in (first, second, third))
        deploy.start_service(deploy.address)
        assert [future.result(timeout=120) for future in (first, second, third)] == [1, 3, 2]
    finally:
        executor.shutdown(wait=False)


# --- Ctrl-C -------------------------------------------------------------------------------------------------

RESEARCHER_SCRIPT = """
import signal, sys
import mep

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if our parent ignores SIGINT

def square(x=0):
    return x * x

executor = mep.Executor("00000000-0000-4000-8000-000000000000", service=sys.argv[2], token="t",
                        service_key=sys.argv[3])
print("submitting", flush=True)
if sys.argv[1] == "result":
    executor.submit(square, 3).result()
elif sys.argv[1] == "map":
    list(executor.map(square, range(3)))
else:
    with executor:
        executor.submit(square, 3).result()
"""


@pytest.mark.parametrize("waiting_in", ["result", "map", "with"])
def test_ctrl_c_interrupts_a_script_waiting_for_a_service_that_is_down(waiting_in: str) -> None:
    script = subprocess.Popen([PYTHON, "-c", RESEARCHER_SCRIPT, waiting_in, free_address(),
                               zmq.curve_keypair()[0].decode()], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd="/")
    try:
        assert script.stdout.readline().strip() == "submitting"
        time.sleep(0.5)  # let it block in the wait
        script.send_signal(signal.SIGINT)  # once: a second Ctrl-C must not be needed
        assert script.wait(timeout=30) == -signal.SIGINT
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()
    assert script.stderr.read().rstrip().endswith("KeyboardInterrupt")


# --- errors that name their stage ---------------------------------------------------------------------------


def test_unpicklable_arguments_fail_at_submit_naming_this_side() -> None:
    with mep.Executor(NOWHERE_ENDPOINT, service=free_address(), token="t",
                      service_key=zmq.curve_keypair()[0].decode()) as executor:
        with pytest.raises(mep.SerializationError, match="^the arguments could not be serialised on your side: "):
            executor.submit(add, (n for n in range(3)), 1)


@pytest.mark.root
def test_failures_name_their_stage(deploy, account_factory, tmp_path_factory: pytest.TempPathFactory) -> None:
    account = account_factory("mepstage")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    client_only = tmp_path_factory.mktemp("client-only")
    (client_only / "mep_client_only_module.py").write_text("class Greeter:\n    def __call__(self):\n"
                                                           "        return 'hello'\n")
    sys.path.insert(0, str(client_only))
    try:
        import mep_client_only_module

        with deploy.executor(identity, manager) as executor:
            generator = executor.submit(return_a_generator)
            memory = executor.submit(raise_memory_error)
            missing_on_endpoint = executor.submit(mep_client_only_module.Greeter())
            missing_here = executor.submit(return_object_of_a_module_only_the_endpoint_has)
            with pytest.raises(TypeError, match="^the return value of return_a_generator could not be serialised: "):
                generator.result(timeout=60)
            with pytest.raises(MemoryError):
                memory.result(timeout=60)
            with pytest.raises(ModuleNotFoundError, match="could not be loaded on the endpoint") as endpoint_side:
                missing_on_endpoint.result(timeout=60)
            assert "python_env" in str(endpoint_side.value) and "by value" in str(endpoint_side.value)
            with pytest.raises(ModuleNotFoundError, match="^the result could not be loaded here") as here:
                missing_here.result(timeout=60)
            assert here.value.name == "mep_endpoint_only_module"
    finally:
        sys.path.remove(str(client_only))
        sys.modules.pop("mep_client_only_module", None)
    client = mep.Client(service=deploy.address, service_key=deploy.service_key, token=identity.token)
    stored = client.get_task(memory.task_id)
    assert (stored.state, stored.message) == ("failed", "MemoryError (no message)")
    assert "dill" not in client.get_task(generator.task_id).message


def test_a_config_the_wire_cannot_carry_is_refused_at_submit() -> None:
    with mep.Executor(NOWHERE_ENDPOINT, service=free_address(), token="t", service_key=zmq.curve_keypair()[0].decode(),
                      user_endpoint_config={"workers": 2**70}) as executor:
        with pytest.raises(mep.ConfigInvalidError, match=r"user_endpoint_config.workers is \d+, outside the 64-bit"):
            executor.submit(add, 1, 2)


def test_a_config_changed_between_submits_is_checked_again_though_an_empty_or_unchanged_one_is_not() -> None:
    executor = mep.Executor(NOWHERE_ENDPOINT, service=free_address(), token="t",
                            service_key=zmq.curve_keypair()[0].decode())
    try:
        executor.user_endpoint_config = {"workers": 2}
        executor.submit(add, 1, 2)  # fit: checked once, then known by its frozen bytes
        executor.submit(add, 1, 2)
        for not_a_dict in ([], None, ""):
            executor.user_endpoint_config = not_a_dict
            with pytest.raises(mep.ConfigInvalidError, match="^user_endpoint_config must be a dict, not "):
                executor.submit(add, 1, 2)
        executor.user_endpoint_config = {"workers": 2**70}
        with pytest.raises(mep.ConfigInvalidError, match=r"user_endpoint_config.workers is \d+, outside the 64-bit"):
            executor.submit(add, 1, 2)
        executor.user_endpoint_config = {"workers": 2, "note": "x" * 70_000}
        with pytest.raises(mep.ConfigInvalidError, match="^user_endpoint_config is 700.. bytes as JSON; the limit"):
            executor.submit(add, 1, 2)
        executor.user_endpoint_config = {"workers": 2}
        executor.user_endpoint_config["workers"] = {"a set": {1}}  # changed in place: a new check refuses it
        with pytest.raises(mep.ConfigInvalidError, match="^user_endpoint_config.workers.a set is a set;"):
            executor.submit(add, 1, 2)
    finally:
        executor.shutdown(wait=False)

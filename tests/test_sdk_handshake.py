"""A service dying mid-handshake is retried; only a wrong pinned key is reported as one (issue 10, item 3).

Real processes throughout: the real service killed as soon as it listens, and
a fake service process that accepts the SDK's connection and is SIGKILLed
mid-handshake (before or after reading the SDK's greeting, the two ways a
killed process's kernel ends a connection: reset or orderly close). Functions
travel by value: this module is not installed where the endpoints run.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
import zmq

import mep
from tests.harness import DOMAIN_STRIP, PYTHON, expression_mapping

pytestmark = pytest.mark.root

KEY_MESSAGE = "does not match the service's"

# Accepts one connection, lets the handshake begin, and dies by SIGKILL as a crashing service would.
DYING_PEER = r"""
import os, signal, socket, sys
host, port, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((host, port))
listener.listen()
print("listening", flush=True)
connection, _ = listener.accept()
if when == "after-greeting":
    connection.recv(64)  # nothing unread: the kernel closes in order (FIN)
os.kill(os.getpid(), signal.SIGKILL)  # with the greeting unread, the kernel resets the connection
"""


def add(a: int, b: int) -> int:
    return a + b


def host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(address)
    return parts.hostname, parts.port


def die_mid_handshake(address: str, when: str) -> None:
    """One life of a service that dies mid-handshake: returns once the SDK has connected and it has died."""
    host, port = host_port(address)
    peer = subprocess.Popen([PYTHON, "-c", DYING_PEER, host, str(port), when], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/")
    assert peer.stdout.readline().strip() == "listening", peer.communicate()[1]
    assert peer.wait(timeout=60) == -signal.SIGKILL, "the SDK never connected to the dying service"


def kill_service_as_it_listens(deploy) -> None:  # noqa: ANN001
    deploy.start_service(deploy.address)
    deploy.service.popen.kill()
    deploy.service.popen.wait(timeout=30)


def handshake_failures(caplog: pytest.LogCaptureFixture) -> int:
    return sum("encrypted handshake" in record.getMessage() for record in caplog.records)


def test_crash_looping_service_is_retried_and_tasks_complete_once_it_stays_up(
        deploy, account_factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mep.sdk.connection")
    account = account_factory("mepcrash")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    executor = deploy.executor(identity, manager, keep_retrying=True)
    try:  # not `with`: if an assertion fails, leaving must not wait for a service that keep_retrying awaits
        assert executor.submit(add, 0, 0).result(timeout=60) == 0
        manager.process.stop()  # the manager connects to the service too: each dying life is the SDK's alone
        deploy.service.popen.kill()
        deploy.service.popen.wait(timeout=30)
        futures = []
        for life in range(6):
            futures.append(executor.submit(add, life, 1))
            die_mid_handshake(deploy.address, ("before-greeting", "after-greeting")[life % 2])
            kill_service_as_it_listens(deploy)
        assert not any(future.done() for future in futures), [f for f in futures if f.done()]
        assert handshake_failures(caplog) >= 6, "the dying service never failed a handshake"
        deploy.start_service(deploy.address)
        manager.start()
        assert [future.result(timeout=120) for future in futures] == [life + 1 for life in range(6)]
    finally:
        executor.shutdown(wait=False)


def test_executor_with_a_wrong_key_fails_fast_with_the_key_message(deploy) -> None:
    identity = deploy.identity("whoever@example.org")
    wrong_key = zmq.curve_keypair()[0].decode()
    with mep.Executor("00000000-0000-4000-8000-000000000000", service=deploy.address, token=identity.token,
                      service_key=wrong_key) as executor:
        futures = [executor.submit(add, 1, 2) for _ in range(3)]
    for future in futures:
        with pytest.raises(mep.AuthenticationError, match=KEY_MESSAGE):
            future.result(timeout=60)


def test_client_retries_a_dying_service_and_reports_no_answer_not_a_wrong_key(deploy) -> None:
    identity = deploy.identity("whoever@example.org")
    deploy.service.popen.kill()
    deploy.service.popen.wait(timeout=30)
    client = mep.Client(service=deploy.address, service_key=deploy.service_key, token=identity.token, timeout=20)
    with pytest.raises(mep.ServiceUnreachableError, match="no answer from the service"):
        _during_lives_of_a_dying_service(deploy.address, client.list_tasks)
    deploy.start_service(deploy.address)
    assert client.list_tasks() == []


def _during_lives_of_a_dying_service(address: str, call: Callable[[], object]) -> None:
    """``call()`` while a service dies mid-handshake, in both ways, until the call gives up."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    caller = threading.Thread(target=run)
    caller.start()
    for when in ("before-greeting", "after-greeting"):
        die_mid_handshake(address, when)
    caller.join(timeout=60)
    assert not caller.is_alive()
    if outcome:
        raise outcome[0]


def test_client_with_a_wrong_key_fails_fast_with_the_key_message(deploy) -> None:
    identity = deploy.identity("whoever@example.org")
    client = mep.Client(service=deploy.address, service_key=zmq.curve_keypair()[0].decode(), token=identity.token)
    with pytest.raises(mep.AuthenticationError, match=KEY_MESSAGE):
        client.list_tasks()

"""An acknowledged submission is on disk: SIGKILL the service the moment a burst of submissions is acknowledged.

The service forwards a turn's tasks before their fsync and acknowledges them
after it (docs/reliability.md); this checks the acknowledging half for a crash of
the service process. (A crash of the machine, which only the fsync guards
against, can't be produced here; tests/test_store_sync.py checks the store's
side of that contract.)
"""

from __future__ import annotations

import signal
import time

import pytest

import mep
from mep.sdk.executor import ACCEPTED
from tests.harness import DOMAIN_STRIP, expression_mapping, wait_for

pytestmark = pytest.mark.root

BURST = 3000


def echo(value: object) -> object:
    return value


def test_every_acknowledged_task_survives_a_sigkill_right_after_its_acknowledgement(deploy, account_factory) -> None:
    account = account_factory("mepdurable")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), wait=False)
    manager.process.stop()  # registered, then down: every task stays on the service's disk, waiting
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager) as executor:
        futures = [executor.submit(echo, n) for n in range(BURST)]
        # The first acknowledgements arrive while later batches are still being sent: kill then, at once.
        acknowledged: list[str] = []
        deadline = time.monotonic() + 60
        while not acknowledged and time.monotonic() < deadline:  # no sleep: the kill must follow at once
            acknowledged = [f.task_id for f in futures if f.waiting_for.startswith(ACCEPTED)]
        assert acknowledged, "the service acknowledged nothing within 60 s"
        deploy.restart_service(signal.SIGKILL)
        client = mep.Client(service=deploy.address, service_key=deploy.service_key, token=identity.token)
        states: dict[str, str] = {}
        for start in range(0, len(acknowledged), 500):
            chunk = acknowledged[start:start + 500]
            states.update((info.task_id, info.state) for info in client.list_tasks(task_ids=chunk, limit=500))
        assert states == dict.fromkeys(acknowledged, "waiting")
        # ... and the rest, resent by the executor, are all accepted once (ids make resending idempotent)
        wait_for(lambda: all(f.waiting_for.startswith(ACCEPTED) for f in futures), timeout=60,
                 what="every submission to be acknowledged after the restart")
    assert len(client.list_tasks(endpoint_id=manager.endpoint_id, limit=10_000)) == BURST

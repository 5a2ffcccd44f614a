"""One slow account can't stall the others, and an ordinary error refuses one request, never the spawner.

The slow PAM stack is a real service file: ``pam_exec`` runs a script that
sleeps for one account (and leaves a mark once it is done), so while that
account's spawn waits in PAM another account's tasks must go through PAM,
start an endpoint and return.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import mep
from mep.manager.audit_writer import AuditWriter
from mep.root.audit import AuditLog
from tests.test_audit import exhaust, log_dir, small_filesystem  # noqa: F401 - fixtures
from tests.harness import DOMAIN_STRIP, audit_log_of, children_of, expression_mapping, task_log_of, wait_for
from tests.pam_services import PamService, pam_service_fixture  # noqa: F401 - the pam_service fixture

pytestmark = pytest.mark.root

SLOW_STACK = """\
    account  required  pam_exec.so quiet {dir}/slow.sh
    @include common-account
    session  required  pam_unix.so
"""

SLOW_SCRIPT = """\
#!/bin/sh
if [ "$PAM_USER" = "{user}" ]; then
    echo sleeping > {dir}/slow.state
    sleep 20
    echo done > {dir}/slow.state
    touch {dir}/slow.finished
fi
exit 0
"""


def whoami() -> int:
    import os

    return os.getuid()


def test_a_pam_stack_that_sleeps_for_one_account_does_not_hold_up_another(deploy, pam_service: PamService,
                                                                        account_factory) -> None:
    slow, fast = account_factory("mepslowpam"), account_factory("mepfastpam")
    script = pam_service.directory / "slow.sh"
    script.write_text(SLOW_SCRIPT.format(user=slow.pw_name, dir=pam_service.directory))
    script.chmod(0o755)
    pam_service.write(SLOW_STACK)
    state = pam_service.directory / "slow.state"
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP),
                                   settings={"pam": {"enable": True, "service": pam_service.name}})
    slow_identity = deploy.identity(f"{slow.pw_name}@example.org")
    fast_identity = deploy.identity(f"{fast.pw_name}@example.org")
    with deploy.executor(slow_identity, manager) as slow_executor, \
            deploy.executor(fast_identity, manager) as fast_executor:
        held_up = slow_executor.submit(whoami)
        wait_for(lambda: state.exists() and state.read_text().strip() == "sleeping", what="PAM to start sleeping")
        results = [fast_executor.submit(whoami) for _ in range(5)]
        assert [future.result(timeout=60) for future in results] == [fast.pw_uid] * 5
        assert state.read_text().strip() == "sleeping", "the other account's tasks ran while PAM still slept"
        assert not held_up.done()
        assert held_up.result(timeout=60) == slow.pw_uid, "and the slow account gets its endpoint in the end"
    # PAM ran to its end (the account is checked again at each reuse and revalidation, so it may be asleep anew)
    assert (pam_service.directory / "slow.finished").exists()


def test_an_unwritable_registry_refuses_the_request_and_the_spawner_carries_on(deploy, account_factory) -> None:
    account = account_factory("mepregistry")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    spawner = manager.spawner_pid
    blocker = Path(manager.run_dir) / "endpoints.json.new"  # where the registry is written before it is renamed
    blocker.mkdir()
    try:
        with deploy.executor(identity, manager) as executor:
            with pytest.raises(mep.SpawnError, match="could not record the new endpoint"):
                executor.submit(whoami).result(timeout=60)
        assert "could not write the endpoint registry" in manager.log()
        wait_for(lambda: children_of(spawner) == [manager.router_pid], what="the unrecorded endpoint to stop")
    finally:
        shutil.rmtree(blocker)
    assert os.path.exists(f"/proc/{spawner}")
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(whoami).result(timeout=60) == account.pw_uid


def square(x: int) -> int:
    return x * x


def test_routed_tasks_are_audited_one_record_per_batch_before_they_run(deploy, account_factory) -> None:
    account = account_factory("mepbatch")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager) as executor:
        futures = [executor.submit(square, n) for n in range(300)]
        assert [future.result(timeout=120) for future in futures] == [n * n for n in range(300)]
    manager.process.stop()
    # the router's own task log: its records name batches of tasks (task_ids), outcomes included
    lines = [json.loads(line) for line in task_log_of(manager.config_path).read_text().splitlines()]
    routed = [record for record in lines if record["event"] == "task" and record["outcome"] == "routed"]
    listed = [task_id for record in routed for task_id in record["task_ids"]]
    assert sorted(listed) == sorted(future.task_id for future in futures), "each task in exactly one batch"
    assert len(routed) < len(futures) / 10, f"{len(routed)} records for {len(futures)} tasks: batches, not tasks"
    position = {id(record): index for index, record in enumerate(lines)}
    for record in routed:  # every batch's record precedes the outcome of each of its tasks
        done = [index for index, line in enumerate(lines) if line.get("outcome") == "success"
                and set(line["task_ids"]) & set(record["task_ids"])]
        assert min(done) > position[id(record)]


def test_the_audit_writer_keeps_order_confirms_after_writing_and_reports_a_break_once(small_filesystem) -> None:
    log_path = small_filesystem / "audit.jsonl"
    posted: list = []  # what the writer hands to the router's loop, run here in the order it came
    broken: list[str] = []
    writer = AuditWriter(AuditLog(log_path, trusted_owner_uids=frozenset({0}), endpoint_id="ep"),
                         post=posted.append, on_broken=lambda: broken.append(writer.failure))
    confirmed: list[tuple[int, bool]] = []
    for n in range(50):
        writer.write([{"event": "task", "n": n}], sync=n % 10 == 0, then=lambda ok, n=n: confirmed.append((n, ok)))
    wait_for(lambda: len(posted) == 50, what="the writes' outcomes")
    for callback in posted:
        callback()
    assert confirmed == [(n, True) for n in range(50)]
    assert [json.loads(line)["n"] for line in log_path.read_text().splitlines()] == list(range(50))

    posted.clear()
    exhaust(small_filesystem, log_path)
    writer.write([{"event": "task", "n": 51}], then=lambda ok: confirmed.append((51, ok)))
    writer.write([{"event": "task", "n": 52}], sync=True, then=lambda ok: confirmed.append((52, ok)))
    wait_for(lambda: len(posted) == 3, what="the failed writes' outcomes and the break")
    for callback in posted:
        callback()
    assert confirmed[-2:] == [(51, False), (52, False)] and len(broken) == 1, "one break, however many writes"
    assert "No space left on device" in broken[0]
    writer.close()

"""Prometheus metrics: scraped from a real service and a real manager's router while real tasks run."""

from __future__ import annotations

import os
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import mep
from mep.errors import ConfigurationError
from mep.metrics import parse_listen
from tests.harness import DOMAIN_STRIP, deployment, expression_mapping, wait_for


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_listen_defaults_to_loopback_and_refuses_nonsense() -> None:
    assert parse_listen(":9464") == ("127.0.0.1", 9464)
    assert parse_listen("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    for bad in ("9464", "host:", "host:99999", "a b:1"):
        with pytest.raises(ConfigurationError, match="HOST:PORT"):
            parse_listen(bad)


@pytest.mark.root
def test_service_and_router_numbers_move_with_real_tasks(router_account, account_factory) -> None:
    service_port, router_port = free_port(), free_port()
    account = account_factory("mepmetrics")
    # a researcher who planted a link at ~/.mep: their endpoint fails to start, at the step open_log
    planted = account_factory("mepmetricsln")
    os.symlink("/root", os.path.join(planted.pw_dir, ".mep"))
    os.lchown(os.path.join(planted.pw_dir, ".mep"), planted.pw_uid, planted.pw_gid)
    with deployment(None, "--metrics-listen", f":{service_port}") as deploy:
        before = scrape(service_port)
        assert value(before, "mep_tasks_total", state="submitted") == 0
        manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP),
                                       settings={"metrics_listen": f":{router_port}"})
        assert value(scrape(router_port), "mep_user_endpoints_running") == 0
        mapped = deploy.identity(f"{account.pw_name}@example.org")
        stranger = deploy.identity("someone@elsewhere.example")  # no rule maps this one
        with deploy.executor(mapped, manager) as executor:
            assert [future.result(timeout=120) for future in [executor.submit(pow, 2, n) for n in range(5)]] \
                == [1, 2, 4, 8, 16]
        with deploy.executor(stranger, manager) as executor, pytest.raises(mep.UnmappedIdentityError):
            executor.submit(pow, 2, 2).result(timeout=120)
        failing = deploy.identity(f"{planted.pw_name}@example.org")
        with deploy.executor(failing, manager) as executor, pytest.raises(mep.SpawnError, match="open_log"):
            executor.submit(pow, 2, 3).result(timeout=120)

        service = scrape(service_port)
        assert value(service, "mep_tasks_total", state="submitted") == 7
        assert value(service, "mep_tasks_total", state="dispatched") >= 7
        assert value(service, "mep_tasks_total", state="succeeded") == 5
        assert value(service, "mep_tasks_total", state="failed") == 2
        assert value(service, "mep_task_dispatch_latency_seconds_count") >= 7
        assert value(service, "mep_task_run_seconds_count") == 5
        assert value(service, "mep_task_run_seconds_sum") > 0
        assert not [labels for (_, labels) in service for key, label in labels
                    if label in (mapped.id, stranger.id)], "an identity id became a label"

        router = scrape(router_port)
        assert value(router, "mep_user_endpoints_spawned_total") == 1
        assert value(router, "mep_user_endpoints_running") == 1
        assert value(router, "mep_spawn_refusals_total", reason="unmapped") == 1
        assert value(router, "mep_spawn_refusals_total", reason="spawn_failed") == 1
        assert value(router, "mep_user_endpoint_spawn_failures_total", step="open_log") == 1
        assert scrape(service_port) == service, "a scrape with nothing new changes nothing"

        # an endpoint whose manager never started: a task waits at the service, counted as its queue depth
        idle = deploy.admin("endpoint", "add", "idle", "--config-dir", str(deploy.root / "idle"))["endpoint_id"]
        assert value(service, "mep_queued_tasks", endpoint=idle) == 0
        with mep.Executor(idle, service=deploy.address, service_key=deploy.service_key,
                          token=mapped.token) as executor:
            waiting = executor.submit(pow, 2, 4)
        assert value(scrape(service_port), "mep_queued_tasks", endpoint=idle) == 1
        mep.Client(service=deploy.address, service_key=deploy.service_key, token=mapped.token).cancel(
            [waiting.task_id])

        def drained() -> dict | None:
            now = scrape(service_port)
            return now if value(now, "mep_queued_tasks", endpoint=idle) == 0 else None

        after = wait_for(drained, what="the cancelled task to leave the queue")
        assert value(after, "mep_tasks_total", state="cancelled") == 1

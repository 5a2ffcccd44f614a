"""Prometheus metrics for the service and for the manager's router: off unless ``metrics_listen`` is set.

``metrics_listen`` is ``HOST:PORT`` or ``:PORT`` (loopback then; a port alone
never opens the metrics to the network). The root spawner opens no socket: what
it decides reaches these numbers through the router. Labels never carry an
identity or a task id.

Service (``mep service start --metrics-listen``): the numbers come from the
service's own database, read over a separate read-only connection at each
scrape, so the broker's loop carries no instrumentation:

- ``mep_tasks_total{state}``: tasks that reached ``submitted``, ``dispatched``,
  ``succeeded``, ``failed``, ``cancelled`` or ``expired`` since the service started
- ``mep_task_dispatch_latency_seconds``: accepted to handed to a manager
- ``mep_task_run_seconds``: started on a worker to finished
- ``mep_queued_tasks{endpoint}``: tasks waiting per endpoint (the endpoint id is the label)

Router (``metrics_listen`` in the manager's config):

- ``mep_user_endpoints_running``: user endpoints connected to this manager
- ``mep_user_endpoints_spawned_total``: user endpoints started (not reused or adopted ones)
- ``mep_spawn_refusals_total{reason}``: requests the spawner refused, by reason: ``unmapped``,
  ``mapping_error``, ``account_refused``, ``config_invalid``, ``template_error``,
  ``spawn_failed`` (a step of starting the endpoint failed), ``quota_exceeded``, ...
- ``mep_user_endpoint_spawn_failures_total{step}``: the ``spawn_failed`` ones by the step that failed
  (``open_log``, ``set_uid``, ``pam_open_session``, ... as in the audit log; ``other`` for a system error
  outside the steps)
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mep.errors import ConfigurationError, ErrorCode

DEFAULT_HOST = "127.0.0.1"
# dispatch is milliseconds when a manager is connected, hours when it is not; runs span seconds to days
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
_LISTEN = re.compile(r"^(?:(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]*)):(?P<port>\d{1,5})$")


def parse_listen(listen: str) -> tuple[str, int]:
    match = _LISTEN.match(listen)
    if not match or not 0 <= int(match["port"]) <= 65535:
        raise ConfigurationError(f"metrics_listen {listen!r}: expected HOST:PORT or :PORT (e.g. 127.0.0.1:9464)")
    return (match["host"].strip("[]") or DEFAULT_HOST), int(match["port"])


def serve(registry: CollectorRegistry, listen: str) -> int:
    """Serve ``registry`` over HTTP on ``listen`` in a daemon thread; returns the bound port."""
    host, port = parse_listen(listen)
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigurationError(f"metrics_listen {listen!r}: cannot listen: {exc.strerror}") from None
    return server.server_port


class ServiceTaskCollector(Collector):
    """Task numbers from the service's database, caught up at each scrape from where the last one left off.

    The broker writes each timestamp inside one transaction at a time, so rows
    become visible in timestamp order and a high-water mark per column misses none.
    """

    def __init__(self, database: Path) -> None:
        self.database = database
        self.lock = threading.Lock()  # scrapes may overlap (one thread per request)
        self.marks = dict.fromkeys(("created_at", "dispatched_at", "completed_at"), time.time())
        self.tasks = Counter("mep_tasks_total", "Tasks that reached each state since the service started",
                             ["state"], registry=None)
        self.dispatch_latency = Histogram("mep_task_dispatch_latency_seconds",
                                          "Seconds from accepting a task to handing it to a manager",
                                          buckets=LATENCY_BUCKETS, registry=None)
        self.run_time = Histogram("mep_task_run_seconds", "Seconds from a worker starting a task to its result",
                                  buckets=LATENCY_BUCKETS, registry=None)
        for state in ("submitted", "dispatched", "succeeded", "failed", "cancelled", "expired"):
            self.tasks.labels(state)  # present at zero from the first scrape

    def _rows(self, db: sqlite3.Connection, column: str, select: str) -> list[tuple[Any, ...]]:
        rows = db.execute(f"SELECT {column}, {select} FROM tasks WHERE {column} > ? ORDER BY {column}",
                          (self.marks[column],)).fetchall()
        if rows:
            self.marks[column] = rows[-1][0]
        return [row[1:] for row in rows]

    def _catch_up(self, db: sqlite3.Connection) -> list[tuple[str, int]]:
        self.tasks.labels("submitted").inc(len(self._rows(db, "created_at", "1")))
        for (latency,) in self._rows(db, "dispatched_at", "dispatched_at - created_at"):
            self.tasks.labels("dispatched").inc()
            self.dispatch_latency.observe(max(latency, 0.0))
        for state, run_time in self._rows(db, "completed_at", "state, completed_at - started_at"):
            self.tasks.labels(state).inc()
            if run_time is not None:
                self.run_time.observe(max(run_time, 0.0))
        return db.execute("SELECT endpoint_id, count(*) FROM tasks WHERE state='waiting' GROUP BY endpoint_id"
                          ).fetchall()

    def collect(self) -> Iterator[Any]:
        with self.lock:
            db = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=5)
            try:
                queued = self._catch_up(db)
            finally:
                db.close()
        yield from self.tasks.collect()
        yield from self.dispatch_latency.collect()
        yield from self.run_time.collect()
        depth = GaugeMetricFamily("mep_queued_tasks", "Tasks waiting at the service, per endpoint", labels=["endpoint"])
        for endpoint_id, count in queued:
            depth.add_metric([endpoint_id], count)
        yield depth


def serve_service_metrics(database: Path, listen: str) -> int:
    registry = CollectorRegistry()
    registry.register(ServiceTaskCollector(database))
    return serve(registry, listen)


class RouterMetrics:
    """What the router sees of the spawner's decisions and its user endpoints; one per router process."""

    def __init__(self, running: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.running = Gauge("mep_user_endpoints_running", "User endpoints connected to this manager",
                             registry=self.registry)
        self.running.set_function(running)
        self.spawned = Counter("mep_user_endpoints_spawned_total", "User endpoints the spawner started",
                               registry=self.registry)
        self.refusals = Counter("mep_spawn_refusals_total", "Spawn requests the spawner refused, by reason",
                                ["reason"], registry=self.registry)
        self.spawn_failures = Counter("mep_user_endpoint_spawn_failures_total",
                                      "User endpoints that failed to start, by the step that failed",
                                      ["step"], registry=self.registry)

    def on_spawned(self, reused: bool) -> None:
        if not reused:
            self.spawned.inc()

    def on_refused(self, code: str, step: str = "") -> None:
        self.refusals.labels(str(code)).inc()
        if code == ErrorCode.SPAWN_FAILED:
            self.spawn_failures.labels(step or "other").inc()


def router_metrics(listen: str | None, running: Callable[[], int]) -> RouterMetrics:
    """The router's metrics, served on ``listen``; counted but never served (no socket) when it is None."""
    metrics = RouterMetrics(running)
    if listen:
        serve(metrics.registry, listen)
    return metrics

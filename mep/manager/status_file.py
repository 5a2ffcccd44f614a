"""The router's status file: what ``mep endpoint status`` shows that only the router knows.

The router rewrites ``<run dir>/router/status.json`` (its own directory;
0644, replaced atomically) at most once a second, and only when something in
it changed: per user endpoint the identities it serves and its tasks queued
(held for it), in flight and done (results forwarded) since it started; and
the router's totals. It names the router's pid, so a reader can tell a file
left by a router that has since died from a current one. It holds ids and
counts, never a payload or a secret.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("mep.router")

STATUS_FILE_NAME = "status.json"
MIN_INTERVAL = 1.0  # seconds between two writes, however often the counts move


class LinkView(Protocol):
    """What the status file reads of the router's ``EndpointLink``."""

    endpoint_id: str
    pid: int
    account: str
    keys: set[tuple[str, str]]
    routing_id: bytes | None
    queued: list[Any]
    in_flight: set[str]
    done: int


class StatusFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._written: dict[str, Any] | None = None
        self._written_at = 0.0
        self._done_by_ended = 0  # results of endpoints that have exited since this router started
        self._last_done: dict[str, int] = {}
        self._failed = False

    def update(self, links: Iterable[LinkView], waiting_for_endpoint: int) -> None:
        """Write the current state if it changed and the last write is ``MIN_INTERVAL`` old."""
        now = time.monotonic()
        if now - self._written_at < MIN_INTERVAL:
            return
        endpoints = {link.endpoint_id: {
            "account": link.account, "pid": link.pid, "connected": link.routing_id is not None,
            "identities": sorted({submitter for submitter, _ in link.keys}), "queued": len(link.queued),
            "in_flight": len(link.in_flight), "done": link.done} for link in links}
        self._done_by_ended += sum(done for endpoint_id, done in self._last_done.items()
                                   if endpoint_id not in endpoints)
        self._last_done = {endpoint_id: entry["done"] for endpoint_id, entry in endpoints.items()}
        content = {"router_pid": os.getpid(), "endpoints": endpoints, "totals": {
            "endpoints": len(endpoints), "waiting_for_endpoint": waiting_for_endpoint,
            "queued": sum(entry["queued"] for entry in endpoints.values()),
            "in_flight": sum(entry["in_flight"] for entry in endpoints.values()),
            "done": self._done_by_ended + sum(self._last_done.values())}}
        if content == self._written:
            return
        self._written_at = now
        try:
            _write_atomically(self.path, {**content, "written_at": time.time()})
        except OSError as exc:  # a status file is a convenience: never a reason to stop routing
            if not self._failed:
                log.warning("cannot write the status file %s (%s); 'mep endpoint status' shows counts as unknown",
                            self.path, exc)
            self._failed = True
            return
        self._failed = False
        self._written = content


def _write_atomically(path: Path, content: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".new")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o644)  # whatever the umask: admins read it without root
        json.dump(content, handle)
    os.replace(temporary, path)


def read_status(path: Path) -> dict[str, Any] | None:
    """The router's last status, or None if there is none that parses."""
    try:
        with open(path) as handle:
            content = json.load(handle)
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) and isinstance(content.get("endpoints"), dict) else None

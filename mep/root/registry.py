"""Endpoints outlive a crashed manager: the spawner's record of them, and their adoption on restart.

The spawner rewrites ``<run dir>/endpoints.json`` (root-owned, 0600, replaced
atomically) whenever an endpoint starts or ends. A manager that starts again
after a crash reads it and adopts every endpoint that is still the same
process — same pid, same kernel start time, same owner — so a recycled pid is
never mistaken for one of ours. Adopted endpoints keep their work and their
PAM sessions; their CURVE keys are unchanged and the router's key is kept in
the run dir too, so they simply reconnect.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec

log = logging.getLogger("mep.spawner")


class EndpointRecord(msgspec.Struct, frozen=True):
    endpoint_id: str
    pid: int  # the process the spawner watches: the endpoint, or its PAM session holder
    start_time: int  # /proc/<pid>/stat field 22: tells a recycled pid from ours
    owner_uid: int  # who that process runs as (root for a session holder)
    endpoint_pid: int
    account: str
    key: tuple[str, int, str, str]  # the spawner's EndpointKey
    public_key: str
    log_path: str
    held: bool


def proc_stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, parent pid, ...); OSError if it is gone."""
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()


def start_time(pid: int) -> int:
    """The kernel's start time of ``pid`` in clock ticks since boot; raises OSError if it is gone."""
    return int(proc_stat(pid)[19])


def save(path: Path, records: list[EndpointRecord]) -> None:
    temporary = path.with_name(path.name + ".new")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(msgspec.json.encode(records))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def load_live(path: Path) -> list[EndpointRecord]:
    """The recorded endpoints that are still the very processes that were recorded."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "rb") as handle:
        if os.fstat(handle.fileno()).st_uid != os.geteuid():
            log.warning("ignoring %s: not owned by this manager's account", path)
            return []
        try:
            records = msgspec.json.decode(handle.read(), type=list[EndpointRecord])
        except msgspec.DecodeError as exc:  # not JSON, or not records (a ValidationError)
            log.warning("ignoring unreadable endpoint registry %s: %s", path, exc)
            return []
    live = []
    for record in records:
        try:
            same = (start_time(record.pid) == record.start_time
                    and os.stat(f"/proc/{record.pid}").st_uid == record.owner_uid)
        except (OSError, ValueError, IndexError):
            same = False
        if same:
            live.append(record)
        else:
            log.info("endpoint %s of %s (pid %d) ended while the manager was down", record.endpoint_id,
                     record.account, record.pid)
    return live

"""The audit log: one JSON object per line for every decision the spawner takes, written by the spawner.

Only the spawner writes it (root on a multi-user manager, the manager's own
account in single-user mode). The router keeps its own task log with the same
``AuditLog`` and ``Inbox``, as its own account (``mep.manager.task_audit``): what it routed
is its word, and root's log stays out of its reach. Records are built from named fields only,
never from whole requests, so no token, key or identity assertion can slip
in; ``json.dumps`` with ``ensure_ascii`` escapes every control character and
every non-ASCII character, so a crafted username can't start a line of its own.

The file is opened like a policy file is read: every directory from ``/``
down must be owned by root (or the single-user account) and not writable by
others, the file is opened without following a link, must be a regular file
of the writing account, and is created 0600. SIGHUP reopens it (for log
rotation). When a write fails the log is *broken*: the spawner refuses to
spawn until a reopen succeeds (SIGHUP, or the next status round).

The spawner appends each record and syncs it (``fdatasync``) on its loop
before it acts on what the record says: decisions and endpoint events are
rare (a few per spawn), so a few milliseconds each is all it costs. (The
router, which records every batch of tasks, writes its task log with the
same ``AuditLog`` through a writer thread with group commit,
``mep.manager.audit_writer``.)

Record kinds (``event``): ``manager_started``, ``decision`` (identity,
mapping rule, account, allowed or refused and why), ``endpoint_started``,
``endpoint_exited``, ``endpoint_stopped``, ``endpoint_adopted``,
``session_holder_lost``, ``mapping_reload``, ``audit_restored``.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mep.root.errors import ConfigurationError, ErrorCode, TaskRefusedError
from mep.root.policy_files import open_checked_directory

_OPEN_LOG = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


class AuditUnavailableError(TaskRefusedError):
    """The audit log can't be written, so the manager runs nothing (the user sees this message)."""

    code = ErrorCode.INTERNAL

    def __init__(self) -> None:
        super().__init__(
            "this endpoint is not running tasks right now: its audit log can't be written. Ask your admin."
        )


class AuditLog:
    """An open audit log; ``write_records`` raises ``OSError`` and marks the log broken when it can't write."""

    def __init__(self, path: Path, *, trusted_owner_uids: frozenset[int], endpoint_id: str) -> None:
        self.path = path
        self.endpoint_id = endpoint_id
        self._trusted_owner_uids = trusted_owner_uids
        self.failure = ""  # why the log is broken; "" while it works
        self._fd = _open_log(path, trusted_owner_uids)

    def write_records(self, records: Iterable[Mapping[str, Any]], *, sync: bool = False) -> None:
        """Append the records as one write (``sync``: also wait until they are on disk)."""
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        lines = b"".join(self._line(now, record) for record in records)
        if not lines:
            return
        try:
            view = memoryview(lines)
            while view:
                view = view[os.write(self._fd, view):]
            if sync:
                os.fdatasync(self._fd)
        except OSError as error:
            self.failure = f"writing {self.path} failed: {error.strerror or error}"
            raise

    def reopen(self) -> None:
        """Open the path again (after rotation, or to recover); raises ``ConfigurationError``."""
        fd = _open_log(self.path, self._trusted_owner_uids)
        os.close(self._fd)
        self._fd = fd
        self.failure = ""

    def close(self) -> None:
        if self._fd != -1:
            os.close(self._fd)
            self._fd = -1

    def _line(self, now: str, record: Mapping[str, Any]) -> bytes:
        entry = {"time": now, "manager": {"endpoint_id": self.endpoint_id, "pid": os.getpid(), "uid": os.geteuid()}}
        entry.update(record)
        return json.dumps(entry, ensure_ascii=True, separators=(",", ":"), default=str).encode("ascii") + b"\n"


def _open_log(path: Path, trusted_owner_uids: frozenset[int]) -> int:
    path = Path(os.path.abspath(path))
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigurationError(f"cannot create the audit log's directory {path.parent}: {error.strerror}") from None
    directory = open_checked_directory(path.parent, trusted_owner_uids=trusted_owner_uids)
    try:
        fd = os.open(path.name, _OPEN_LOG, 0o600, dir_fd=directory)
    except OSError as error:
        raise ConfigurationError(f"cannot open the audit log {path}: {error.strerror}") from None
    finally:
        os.close(directory)
    status = os.fstat(fd)
    problem = ""
    if not stat.S_ISREG(status.st_mode):
        problem = "it is not a regular file"
    elif status.st_uid != os.geteuid():
        problem = f"it is owned by uid {status.st_uid}, not by uid {os.geteuid()} that writes it"
    elif status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"it is writable by group or others (mode {stat.S_IMODE(status.st_mode):04o})"
    if problem:
        os.close(fd)
        raise ConfigurationError(f"refusing to use the audit log {path}: {problem}")
    os.set_blocking(fd, True)
    return fd


class Inbox:
    """Callables other threads hand to one loop (the spawner's, the router's), and a pipe that wakes the loop (``wake_read``) when one comes."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def post(self, callback: Callable[[], None]) -> None:
        """From any thread: run ``callback`` on the loop."""
        self._queue.put(callback)
        try:
            os.write(self.wake_write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the loop wakes anyway

    def take(self) -> Iterator[Callable[[], None]]:
        """On the loop, once ``wake_read`` is readable: what was posted, in order."""
        try:
            while os.read(self.wake_read, 512):
                pass
        except BlockingIOError:
            pass
        while not self._queue.empty():  # one loop takes: what it saw stays there
            yield self._queue.get_nowait()

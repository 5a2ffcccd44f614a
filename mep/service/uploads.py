"""Large arguments: uploaded in chunks before the SUBMIT that names them, read back by the task's endpoint.

A task's serialised arguments above the SDK's threshold do not travel in
its SUBMIT (which the service's ``max_payload_bytes`` bounds). The SDK first
uploads them (``UPLOAD``, one chunk per message, a few in flight) to a file
of the submitting identity under ``<state dir>/uploads/<identity id>/``,
named by their SHA-256: a chunk is appended only where the file ends, and
is acknowledged only once it is fsynced, so what was acknowledged survives a
crash and an interrupted upload resumes from what the file holds. The last
chunk completes the upload only if the bytes match their name (hashed as they
arrive). The task's SUBMIT then names the upload (``TaskRef.large_args``);
the service accepts it only if the submitter's own upload is complete, and
records the task's claim on it in the same transaction as the task.

The endpoint the task is dispatched to reads the arguments back a chunk at
a time (``CHUNK_REQUEST`` through its router): the service answers only for
an unfinished task of that endpoint, from that task's submitter's upload.
An upload no unfinished task needs is removed once it has not been used for
``upload_retention`` seconds (checked hourly). The bytes are never looked
at here: they are hashed, stored and read back.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from mep.errors import (
    ErrorCode,
    LargeArgsUnavailableError,
    ProtocolError,
    QuotaExceededError,
    UploadNotStoredError,
)
from mep.protocol.messages import MAX_CHUNK_BYTES, Chunk, ChunkRequest, LargeArgs, TaskRef, Upload, UploadAck
from mep.service.store import DISK_FULL, TERMINAL_SQL, Store

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS task_uploads (  -- a task whose arguments are an upload (mep.service.uploads)
    task_id TEXT PRIMARY KEY,
    submitter_id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL
);
"""
DIRECTORY_NAME = "uploads"
PARTIAL = ".partial"
SWEEP_EVERY = 3600.0
HASHES_KEPT = 1000  # uploads in progress whose running hash is kept; one evicted is hashed again from its file
READ_PIECE = 1024 * 1024


class Uploads:
    def __init__(self, store: Store, directory: Path, max_bytes_per_identity: int, retention: float) -> None:
        self.store = store
        self.directory = directory
        self.max_bytes_per_identity = max_bytes_per_identity
        self.retention = retention
        store.db.executescript(SCHEMA)
        directory.mkdir(mode=0o700, exist_ok=True)
        self._hashes: OrderedDict[Path, Any] = OrderedDict()  # partial file -> sha256 of what it holds
        self._next_sweep = 0.0

    def _path(self, identity_id: str, sha256: str) -> Path:
        return self.directory / identity_id / sha256  # both checked by the wire types (a UUID, 64 hex digits)

    # --- uploading ------------------------------------------------------------------

    def put(self, identity_id: str, upload: Upload, payloads: list[Any]) -> UploadAck:
        """Append one chunk if it starts where the upload's file ends; say how much the file holds either way."""
        if len(payloads) != 1:
            raise ProtocolError(f"an UPLOAD carries exactly one payload frame, its chunk; this one has {len(payloads)}")
        chunk = payloads[0].buffer if hasattr(payloads[0], "buffer") else memoryview(payloads[0])
        if not 0 < len(chunk) <= MAX_CHUNK_BYTES:
            raise ProtocolError(f"an upload chunk holds 1 to {MAX_CHUNK_BYTES} bytes; this one holds {len(chunk)}")
        if upload.offset + len(chunk) > upload.size:
            raise ProtocolError(f"the chunk at offset {upload.offset} of {len(chunk)} bytes goes past the upload's "
                                f"declared size of {upload.size} bytes")
        final = self._path(identity_id, upload.sha256)
        ack = UploadAck(request_id=upload.request_id, offset=upload.offset)
        if final.exists():
            ack.received = upload.size if final.stat().st_size == upload.size else 0
            if not ack.received:
                raise LargeArgsUnavailableError(f"an upload named {upload.sha256} of another size is complete; "
                                                "the size declared does not match its bytes")
            return ack
        partial = final.with_name(final.name + PARTIAL)
        try:
            ack.received = partial.stat().st_size
        except FileNotFoundError:
            self._check_quota(identity_id, upload.size)
            ack.received = 0
        if upload.offset != ack.received:
            return ack  # a chunk sent again, or one after a lost one: the SDK goes on from ``received``
        digest = self._hash_of(partial, ack.received)
        self._append(partial, chunk, ack.received)
        digest.update(chunk)
        ack.received += len(chunk)
        if ack.received == upload.size:
            self._complete(partial, final, digest.hexdigest(), upload)
        return ack

    def _check_quota(self, identity_id: str, size: int) -> None:
        held = 0
        try:
            with os.scandir(self.directory / identity_id) as entries:
                held = sum(entry.stat(follow_symlinks=False).st_size for entry in entries)
        except FileNotFoundError:
            pass
        if held + size > self.max_bytes_per_identity:
            raise QuotaExceededError(
                f"your uploads on the service hold {held} bytes; {size} more would pass this service's limit of "
                f"{self.max_bytes_per_identity} bytes per identity (uploads no unfinished task needs are removed "
                f"after {self.retention:.0f} s); pass the data by reference (a path on the cluster), or wait")

    def _hash_of(self, partial: Path, length: int) -> Any:
        """The running SHA-256 of the partial file's ``length`` bytes (hashed again from the file after a restart)."""
        digest = self._hashes.pop(partial, None)
        if digest is None:
            digest = hashlib.sha256()
            if length:
                with open(partial, "rb") as handle:
                    while piece := handle.read(READ_PIECE):
                        digest.update(piece)
        self._hashes[partial] = digest
        while len(self._hashes) > HASHES_KEPT:
            self._hashes.popitem(last=False)
        return digest

    def _append(self, partial: Path, chunk: memoryview, at: int) -> None:
        """Write the chunk at the end of the file and fsync it; on failure the file is cut back to ``at``."""
        try:
            partial.parent.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise _not_stored(partial, exc) from None
        try:
            written = 0
            while written < len(chunk):
                written += os.pwrite(fd, chunk[written:], at + written)
            os.fsync(fd)  # acknowledged bytes must survive a crash
        except OSError as exc:
            self._hashes.pop(partial, None)
            os.ftruncate(fd, at)
            raise _not_stored(partial, exc) from None
        finally:
            os.close(fd)

    def _complete(self, partial: Path, final: Path, digest: str, upload: Upload) -> None:
        self._hashes.pop(partial, None)
        if digest != upload.sha256:
            partial.unlink()
            raise LargeArgsUnavailableError(
                f"the {upload.size} bytes uploaded do not match the SHA-256 {upload.sha256} they were uploaded "
                f"under (they hash to {digest}); nothing was kept: upload them again")
        os.replace(partial, final)
        directory = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)  # the rename too must survive a crash before SUBMIT names the upload
        finally:
            os.close(directory)

    # --- submitting -------------------------------------------------------------------

    def problem(self, identity_id: str, task: TaskRef) -> tuple[ErrorCode, str] | None:
        """Why a SUBMIT may not name these uploaded arguments (None: it may; or the task has none)."""
        large = task.large_args
        if large is None:
            return None
        try:
            size = self._path(identity_id, large.sha256).stat().st_size
        except FileNotFoundError:
            size = -1
        if size != large.size:
            return ErrorCode.LARGE_ARGS_UNAVAILABLE, (
                f"the task's arguments ({large.size} bytes, SHA-256 {large.sha256}) are not a complete upload of "
                "yours on this service (not uploaded, interrupted, or removed after they were last used); "
                "upload them again (an Executor does so when it submits)")
        return None

    def record(self, task_id: str, identity_id: str, large: LargeArgs | None) -> None:
        """The task claims the upload (in the SUBMIT's transaction); its retention counts from now."""
        if large is None:
            return
        self.store.db.execute("INSERT OR IGNORE INTO task_uploads (task_id, submitter_id, sha256, size) "
                              "VALUES (?, ?, ?, ?)", (task_id, identity_id, large.sha256, large.size))
        os.utime(self._path(identity_id, large.sha256))

    def reference(self, task_id: str) -> LargeArgs | None:
        row = self.store.db.execute("SELECT sha256, size FROM task_uploads WHERE task_id=?", (task_id,)).fetchone()
        return LargeArgs(sha256=row[0], size=row[1]) if row else None

    # --- the endpoint reading them ------------------------------------------------------

    def read(self, endpoint_id: str, request: ChunkRequest) -> tuple[Chunk, list[bytes]]:
        """A chunk of an unfinished task's uploaded arguments, for its endpoint's manager alone."""
        answer = Chunk(request_id=request.request_id, offset=request.offset)
        row = self.store.db.execute(
            "SELECT u.submitter_id, u.sha256 FROM task_uploads u JOIN tasks t ON t.id=u.task_id WHERE u.task_id=? "
            f"AND t.endpoint_id=? AND t.state NOT IN {TERMINAL_SQL}", (request.task_id, endpoint_id)).fetchone()
        if row is None:
            answer.code = ErrorCode.LARGE_ARGS_UNAVAILABLE
            answer.message = (f"task {request.task_id} has no uploaded arguments for endpoint {endpoint_id} to read "
                              "(not its task, finished, or its arguments travelled inline)")
            return answer, []
        path = self._path(*row)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                data = os.pread(fd, request.length, request.offset)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("could not read the uploaded arguments of task %s from %s: %s", request.task_id, path, exc)
            answer.code = ErrorCode.LARGE_ARGS_UNAVAILABLE
            answer.message = (f"the service can't read the uploaded arguments of task {request.task_id} "
                              f"({exc.strerror or exc}); submit the task again")
            return answer, []
        return answer, [data]

    # --- retention ----------------------------------------------------------------------

    def sweep_if_due(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY
        self.sweep()

    def sweep(self) -> int:
        """Remove uploads no unfinished task needs that were last used more than ``retention`` ago."""
        with self.store.transaction():
            self.store.db.execute(f"DELETE FROM task_uploads WHERE task_id IN (SELECT id FROM tasks WHERE state IN "
                                  f"{TERMINAL_SQL})")
            needed = set(self.store.db.execute("SELECT submitter_id, sha256 FROM task_uploads").fetchall())
        oldest = time.time() - self.retention
        removed = 0
        for owner in _entries(self.directory):
            for entry in _entries(Path(owner.path)):
                name = entry.name.removesuffix(PARTIAL)
                try:
                    if (owner.name, name) not in needed and entry.stat(follow_symlinks=False).st_mtime < oldest:
                        os.unlink(entry.path)
                        self._hashes.pop(Path(entry.path), None)
                        removed += 1
                except OSError as exc:
                    log.warning("could not remove the expired upload %s: %s", entry.path, exc)
        if removed:
            log.info("removed %d upload(s) no unfinished task needs, unused for %.0f s", removed, self.retention)
        return removed


def _not_stored(partial: Path, exc: OSError) -> UploadNotStoredError:
    log.error("could not store an upload chunk in %s: %s", partial, exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UploadNotStoredError(DISK_FULL)
    return UploadNotStoredError(f"the service could not store the chunk ({exc.strerror or exc}); nothing of it was "
                                "kept: send it again later")


def _entries(directory: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except OSError:
        return []

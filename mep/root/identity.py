"""Identity mapping, root's side: the admin's mapping file is evaluated by an unprivileged helper, never by root.

Root reads the mapping file (checked like every policy file, ``policy_files``)
and, when it loads the file, starts ``python -I -m mep.mapping`` through the
checked privilege drop (``privdrop``) as ``identity_mapping_user`` (``nobody``
by default, like sshd's ``AuthorizedKeysCommandUser``; in single-user mode as
the manager's own account) with the content on its stdin, so that account
needs no access to the file. The helper stays: its first answer says whether
the file loads (a broken file is refused when loaded: at start, or kept out
on reload), then it maps one identity set per request, framed on a socket at
its fd 3 (``encode_frame``), one request at a time. It evaluates the
expression rules and runs the external programs (``mep.mapping``). Root
decodes each answer strictly (``HelperReply``: typed, bounded, no unknown
fields) and checks it: the deciding identity must be one the request named. No
answer in time, a crash or a lie fails closed (a ``MappingError`` for a
request, a ``ConfigurationError`` when a file is loaded), and the helper's
process group is killed; the next request starts a fresh one. The account
named is then checked by root as before (``accounts.resolve_account``, PAM).
"""

from __future__ import annotations

import dataclasses
import logging
import select
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from mep.root.accounts import unprivileged_account
from mep.root.errors import ConfigurationError, MappingError, MepError, SpawnError, UnmappedIdentityError
from mep.root.policy_files import read_policy_file
from mep.root.privdrop import SpawnedProcess, SpawnPlan, end_process_group, spawn

log = logging.getLogger("mep.spawner.mapping")

EXTERNAL_DATA_TYPE = "external_identity_mapping#1.0.0"
#: What ``globus-idm-validator`` passes as the gateway id; mep's dry run uses it when no endpoint is named.
REFERENCE_TESTING_ENDPOINT_ID = "11111111-1111-1111-1111-111111111111"
DEFAULT_EXTERNAL_TIMEOUT = 5.0  # per program run, as the reference
HELPER_STARTUP_SECONDS = 20.0  # an interpreter's start and imports, on a loaded machine
HELPER_REQUEST_SECONDS = 10.0  # one decision by the running helper, besides its external programs' timeouts
HELPER_RESTART_PAUSE = 1.0  # at least this long between two starts, so a crashing helper can't spin
FRAME_HEADER_BYTES = 4
MAX_REPLY_BYTES = 1 << 20
MAX_LOG_LINES = 50
_Text = Annotated[str, msgspec.Meta(max_length=65536)]


@dataclass(frozen=True)
class MappingContext:
    """What evaluating a file needs beyond the file: who may own programs, which endpoint asks, who evaluates."""

    endpoint_id: str = REFERENCE_TESTING_ENDPOINT_ID  # passed to external programs as "-s"
    external_timeout: float = DEFAULT_EXTERNAL_TIMEOUT
    trusted_owner_uids: frozenset[int] = frozenset({0})
    run_as: str | None = None  # the account the helper runs as (identity_mapping_user); None: ours, no drop


@dataclass(frozen=True)
class MappingDecision:
    """The account a mapping produced and which rule produced it (for the audit log)."""

    account: str  # the local account name the mapping produced
    identity_id: str  # which identity of the set produced it
    document_index: int  # index in the file's list of documents
    mapping_index: int | None  # index in that document's "mappings"; None for a program
    program: str = ""  # the external program that decided, if one did

    def rule(self) -> str:
        """Where the decision came from, e.g. "document 0, mapping 2" or "document 1, program /x"."""
        if self.program:
            return f"document {self.document_index}, program {self.program}"
        return f"document {self.document_index}, mapping {self.mapping_index}"


class HelperLoad(msgspec.Struct, forbid_unknown_fields=True):
    """Root to helper, once, on its stdin: the file's content and what evaluating it needs."""

    content: bytes
    source: str
    endpoint_id: str
    external_timeout: float
    trusted_owner_uids: list[int]


class HelperRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Root to helper, one frame per decision on the channel (fd 3): the identity set to map."""

    identities: list[dict[str, Any]]


class HelperDecision(msgspec.Struct, forbid_unknown_fields=True):
    account: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]  # "" is no mapping, never an account
    identity_id: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    document_index: Annotated[int, msgspec.Meta(ge=0)]
    mapping_index: Annotated[int, msgspec.Meta(ge=0)] | None
    program: Annotated[str, msgspec.Meta(max_length=4096)] = ""


class HelperRefusal(msgspec.Struct, forbid_unknown_fields=True):
    kind: Literal["unmapped", "mapping", "configuration", "internal"]
    message: _Text
    admin_detail: _Text = ""


class HelperReply(msgspec.Struct, forbid_unknown_fields=True):
    """Helper to root, on fd 3: a decision, a refusal, or neither (a file that loaded); its log lines."""

    decision: HelperDecision | None = None
    refusal: HelperRefusal | None = None
    log: Annotated[list[tuple[Annotated[int, msgspec.Meta(ge=0, le=50)], _Text]],
                   msgspec.Meta(max_length=MAX_LOG_LINES)] = []


_REFUSALS: dict[str, type[MepError]] = {
    "unmapped": UnmappedIdentityError, "mapping": MappingError, "configuration": ConfigurationError,
}


class IdentityMapper:
    """A mapping file's checked content and the helper serving it; ``map`` asks that helper, one request at a time.

    The helper is started when the file is loaded (its first answer says whether the file loads) and
    replaced, after a short pause, when it crashed, lied or missed a request's deadline; ``close`` ends it.
    """

    def __init__(self, content: bytes, source: str, context: MappingContext) -> None:
        self._content = content
        self._source = source
        self._context = context
        self._lock = threading.Lock()  # the spawner's workers map concurrently; the helper answers in order
        self._helper: tuple[SpawnedProcess, socket.socket] | None = None
        self._started_at = -HELPER_RESTART_PAUSE
        self._closed = False
        with self._lock:
            self._ask(None)

    @classmethod
    def from_file(cls, path: Path, *, trusted_owner_uids: frozenset[int],
                  context: MappingContext | None = None) -> IdentityMapper:
        """Load a mapping file that only trusted accounts can have written (see ``read_policy_file``).

        External programs named in it must be owned by the same trusted accounts.
        """
        content = read_policy_file(path, trusted_owner_uids=trusted_owner_uids)
        context = dataclasses.replace(context or MappingContext(), trusted_owner_uids=trusted_owner_uids)
        return cls(content, str(path), context)

    def map(self, identities: Sequence[Mapping[str, object]]) -> MappingDecision:
        """The account the identity set maps to; ``UnmappedIdentityError`` or ``MappingError`` (fails closed)."""
        with self._lock:
            if self._closed:  # a request that picked this mapping just before a reload replaced it
                raise self._failure(MappingError, "was ended: the mapping was reloaded meanwhile; retry")
            reply = self._ask([dict(identity) for identity in identities])
            asked = {identity.get("id") for identity in identities}
            if reply.decision is None or reply.decision.identity_id not in asked:
                self._end_helper()
                raise self._failure(MappingError, f"answered {reply.decision!r}, naming no identity it was asked about")
        return MappingDecision(**msgspec.structs.asdict(reply.decision))

    def helper_pid(self) -> int | None:
        """The pid of the running helper (None between a failure and the next request), for tests and logs."""
        return self._helper[0].pid if self._helper else None

    def close(self) -> None:
        """End the helper (its process group) and reap it; a request in progress finishes first."""
        with self._lock:
            self._closed = True
            self._end_helper()

    def _ask(self, identities: list[dict[str, Any]] | None) -> HelperReply:
        """One exchange with the helper, starting one first if none runs; ``None``: only start it (the load)."""
        failed = ConfigurationError if identities is None else MappingError
        # Each external document may take its timeout; a count of the DATA_TYPE's mentions bounds their number.
        externals = self._content.count(EXTERNAL_DATA_TYPE.encode())
        timeout = HELPER_REQUEST_SECONDS + self._context.external_timeout * externals
        if self._helper is not None and select.select([self._helper[0].pidfd], [], [], 0)[0]:
            log.warning("%s: the identity-mapping helper ended since its last answer; starting another", self._source)
            self._end_helper()
        try:
            if self._helper is None:
                reply = self._reply(self._start_helper(), failed, loading=True)
                if identities is None:
                    return reply
            answer = self._exchange(msgspec.json.encode(HelperRequest(identities or [])), timeout)
        except (SpawnError, OSError) as error:
            self._end_helper()
            raise self._failure(failed, f"failed: {error}") from None
        return self._reply(answer, failed, loading=False)

    def _reply(self, answer: bytes, failed: type[MepError], *, loading: bool) -> HelperReply:
        """The decoded answer; a refusal raised as its error, the helper ended unless it answered a request."""
        try:
            reply = msgspec.json.decode(answer, type=HelperReply)
        except msgspec.MsgspecError as error:
            self._end_helper()
            raise self._failure(failed, f"answered unusably: {error}") from None
        for level, line in reply.log:
            log.log(level or logging.INFO, "%s", line)
        refusal = reply.refusal
        if refusal is None:
            return reply
        if loading or refusal.kind == "internal":
            self._end_helper()
        if refusal.kind == "internal" or loading and (failed is MappingError or refusal.kind != "configuration"):
            raise self._failure(failed, f"failed: {refusal.message}: {refusal.admin_detail}")
        error = _REFUSALS[refusal.kind](refusal.message)
        error.admin_detail = refusal.admin_detail
        raise error

    def _start_helper(self) -> bytes:
        """Start a helper on the content (pausing first if the last one started only just now); its load answer."""
        time.sleep(max(0.0, self._started_at + HELPER_RESTART_PAUSE - time.monotonic()))
        self._started_at = time.monotonic()
        context = self._context
        load = HelperLoad(content=self._content, source=self._source, endpoint_id=context.endpoint_id,
                          external_timeout=context.external_timeout,
                          trusted_owner_uids=sorted(context.trusted_owner_uids))
        ours, theirs = socket.socketpair()
        try:
            # No supplementary groups: the helper needs none, and a group could give it files to read.
            account = dataclasses.replace(unprivileged_account(context.run_as, "identity_mapping_user", SpawnError),
                                          groups=())
            plan = SpawnPlan(account=account, argv=[sys.executable, "-I", "-m", "mep.mapping"],
                             stdin_data=msgspec.json.encode(load), log_path="", pass_fds=(theirs.fileno(),),
                             drop_privileges=context.run_as is not None, title="the identity-mapping helper")
            self._helper = (spawn(plan), ours)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return self._exchange(None, HELPER_STARTUP_SECONDS)

    def _exchange(self, request: bytes | None, timeout: float) -> bytes:
        """Send ``request`` (if any) as one frame and return the helper's answer frame, within ``timeout``."""
        assert self._helper is not None
        channel = self._helper[1]
        deadline = time.monotonic() + timeout
        try:
            if request is not None:
                channel.settimeout(timeout)
                channel.sendall(encode_frame(request))
            size = int.from_bytes(_receive(channel, FRAME_HEADER_BYTES, deadline), "big")
            if size > MAX_REPLY_BYTES:
                raise SpawnError(f"announced an answer of {size} bytes, more than {MAX_REPLY_BYTES}; it was killed")
            return _receive(channel, size, deadline)
        except TimeoutError:
            raise SpawnError(f"did not answer within {timeout:g} s; it was killed") from None

    def _end_helper(self) -> None:
        if self._helper is not None:
            process, channel = self._helper
            self._helper = None
            channel.close()
            end_process_group(process)

    def _failure(self, kind: type[MepError], what: str) -> MepError:
        detail = f"{self._source}: the identity-mapping helper (python -I -m mep.mapping) {what}"
        if kind is ConfigurationError:
            return ConfigurationError(detail)
        error = kind("the identity mapping on this endpoint failed; ask your admin to check the endpoint's"
                     " identity mapping")
        error.admin_detail = detail
        return error


def encode_frame(data: bytes) -> bytes:
    """One frame on the helper's channel: the length (4 bytes, big-endian), then the msgspec JSON."""
    return len(data).to_bytes(FRAME_HEADER_BYTES, "big") + data


def _receive(channel: socket.socket, size: int, deadline: float) -> bytes:
    """Exactly ``size`` bytes; ``TimeoutError`` past ``deadline`` (monotonic), ``SpawnError`` at end-of-file."""
    data = b""
    while len(data) < size:
        channel.settimeout(max(0.0, deadline - time.monotonic()) or 1e-9)
        chunk = channel.recv(size - len(data))
        if not chunk:
            raise SpawnError("ended without answering (it crashed or was killed)")
        data += chunk
    return data


"""Identity mapping, root's side: the admin's mapping file is evaluated by an unprivileged helper, never by root.

Root reads the mapping file (checked like every policy file, ``policy_files``)
and, when it loads the file, starts ``python -I -m mep.mapping`` through the
checked privilege drop (``privdrop``) as ``identity_mapping_user`` (``nobody``
by default, like sshd's ``AuthorizedKeysCommandUser``; in single-user mode as
the manager's own account) with the content on its stdin, so that account
needs no access to the file. The helper stays: its first answer says whether
the file loads (a broken file is refused when loaded: at start, or kept out
on reload), then it maps one identity set per request, one request at a time.
Requests and answers travel on a ``SOCK_SEQPACKET`` socket at its fd 3: one
message each (msgspec JSON), so there is no framing to get wrong, and one
``recv`` with a timeout bounds both the wait and the size. The helper
evaluates the expression rules and runs the external programs
(``mep.mapping``). Root decodes each answer strictly (``HelperReply``: typed,
bounded, no unknown fields; a decision's account is never "" and its rule
indices are never negative) and checks it: the deciding identity must be one
the request named, and a refusal must be of a kind the step allows. No answer
in time, a crash or a lie fails closed (a ``MappingError`` for a request, a
``ConfigurationError`` when a file is loaded), and the helper's process group
is killed; the next request starts a fresh one. The account named is then
checked by root as before (``accounts.resolve_account``, PAM).
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
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from mep.root.accounts import unprivileged_account
from mep.root.errors import ConfigurationError, MappingError, MepError, SpawnError, UnmappedIdentityError
from mep.root.policy_files import read_policy_file
from mep.root.privdrop import SpawnedProcess, SpawnPlan, end_process_group, spawn

log = logging.getLogger("mep.spawner.mapping")

EXTERNAL_DATA_TYPE = "external_identity_mapping#1.0.0"
HELPER_STARTUP_SECONDS = 20.0  # an interpreter's start and imports, on a loaded machine
HELPER_REQUEST_SECONDS = 10.0  # one decision by the running helper, besides its external programs' timeouts
HELPER_RESTART_PAUSE = 1.0  # at least this long between two starts, so a crashing helper can't spin
MAX_REPLY_BYTES = 1 << 16  # one answer, one message; the helper shortens its log lines to fit
MAX_LOG_LINES = 50
HELPER_FAILED = "the identity mapping on this endpoint failed; ask your admin to check the endpoint's identity mapping"
# The refusals a helper may answer with (any other is the helper failing): a request's, and a file's load.
_REFUSALS: dict[str, type[MepError]] = {"unmapped": UnmappedIdentityError, "mapping": MappingError}
_LOAD_REFUSALS: dict[str, type[MepError]] = {"configuration": ConfigurationError}


@dataclasses.dataclass(frozen=True)
class MappingContext:
    """What evaluating a file needs beyond the file: who may own programs, which endpoint asks, who evaluates."""

    # Passed to external programs as "-s"; by default what ``globus-idm-validator`` passes as the gateway id,
    # which mep's dry run uses when no endpoint is named.
    endpoint_id: str = "11111111-1111-1111-1111-111111111111"
    external_timeout: float = 5.0  # per program run, as the reference
    trusted_owner_uids: frozenset[int] = frozenset({0})
    run_as: str | None = None  # the account the helper runs as (identity_mapping_user); None: ours, no drop


class MappingDecision(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The account a mapping produced and which rule produced it (for the audit log).

    It is also the helper's answer: its constraints are checked when root decodes one.
    """

    account: Annotated[str, msgspec.Meta(min_length=1)]  # the account the mapping produced; "" is no mapping
    identity_id: Annotated[str, msgspec.Meta(min_length=1)]  # which identity of the set produced it
    document_index: Annotated[int, msgspec.Meta(ge=0)]  # index in the file's list of documents
    mapping_index: Annotated[int, msgspec.Meta(ge=0)] | None  # index in that document's "mappings"; None: a program
    program: str = ""  # the external program that decided, if one did

    def rule(self) -> str:
        """Where the decision came from, e.g. "document 0, mapping 2" or "document 1, program /x"."""
        deciding = f"program {self.program}" if self.program else f"mapping {self.mapping_index}"
        return f"document {self.document_index}, {deciding}"


class HelperReply(msgspec.Struct, forbid_unknown_fields=True):
    """Helper to root: a decision, a refusal (its kind and the error's two messages), or neither (the file loaded).

    ``log`` carries what the helper logged meanwhile (a program's stderr), for root's log.
    """

    decision: MappingDecision | None = None
    refusal: Literal["unmapped", "mapping", "configuration", "internal"] | None = None
    message: str = ""
    admin_detail: str = ""
    log: Annotated[list[tuple[int, str]], msgspec.Meta(max_length=MAX_LOG_LINES)] = []


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
            self._start_helper()

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
            if self._helper is not None and select.select([self._helper[0].pidfd], [], [], 0)[0]:
                log.warning("%s: the identity-mapping helper had ended; starting another", self._source)
                self._end_helper()
            try:
                if self._helper is None:
                    self._start_helper()
            except ConfigurationError as error:  # the file loaded before: a helper that now can't load it failed
                raise _error(MappingError, HELPER_FAILED, str(error)) from None
            decision = self._ask(msgspec.json.encode([dict(identity) for identity in identities])).decision
            if decision is None or decision.identity_id not in {identity.get("id") for identity in identities}:
                self._end_helper()
                raise self._failure(MappingError, f"answered {decision!r}, naming no identity it was asked about")
        return decision

    def helper_pid(self) -> int | None:
        """The pid of the running helper (None between a failure and the next request), for tests and logs."""
        return self._helper[0].pid if self._helper else None

    def close(self) -> None:
        """End the helper (its process group) and reap it; a request in progress finishes first."""
        with self._lock:
            self._closed = True
            self._end_helper()

    def _start_helper(self) -> None:
        """Start a helper on the content (pausing first if the last one started only just now); check its load."""
        time.sleep(max(0.0, self._started_at + HELPER_RESTART_PAUSE - time.monotonic()))
        self._started_at = time.monotonic()
        # What the helper reads on its stdin: mep.mapping.__main__.HelperLoad.
        load = msgspec.json.encode({"content": self._content, "source": self._source, "context": self._context})
        # No supplementary groups: the helper needs none, and a group could give it files to read.
        account = dataclasses.replace(unprivileged_account(self._context.run_as, "identity_mapping_user"), groups=())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        plan = SpawnPlan(account=account, argv=[sys.executable, "-I", "-m", "mep.mapping"], stdin_data=load,
                         log_path="", pass_fds=(theirs.fileno(),), drop_privileges=self._context.run_as is not None,
                         title="the identity-mapping helper")
        with theirs:  # the helper has its copy once started
            try:
                self._helper = (spawn(plan), ours)
            except SpawnError as error:
                ours.close()
                raise self._failure(ConfigurationError, f"failed: {error}") from None
        self._ask(None)

    def _ask(self, request: bytes | None) -> HelperReply:
        """Send ``request`` and decode the answer (None: send nothing, the load's answer is due); raise a refusal.

        The helper is ended unless it answered, or refused a request as a request may be refused.
        """
        assert self._helper is not None
        failed, refusals = (ConfigurationError, _LOAD_REFUSALS) if request is None else (MappingError, _REFUSALS)
        # Each external document may take its timeout; a count of the DATA_TYPE's mentions bounds their number.
        programs = self._content.count(EXTERNAL_DATA_TYPE.encode()) * self._context.external_timeout
        timeout = HELPER_STARTUP_SECONDS if request is None else HELPER_REQUEST_SECONDS + programs
        try:
            self._helper[1].settimeout(timeout)
            if request is not None:
                self._helper[1].send(request)
            answer = self._helper[1].recv(MAX_REPLY_BYTES)  # one message; a longer one is cut, so no valid JSON
            if not answer:
                raise ConnectionError("ended without answering (it crashed or was killed)")
            reply = msgspec.json.decode(answer, type=HelperReply)
        except (OSError, msgspec.MsgspecError) as error:
            self._end_helper()
            if isinstance(error, TimeoutError):
                raise self._failure(failed, f"did not answer within {timeout:g} s; it was killed") from None
            raise self._failure(failed, f"failed: {error}") from None
        for level, line in reply.log:
            log.log(level or logging.INFO, "%s", line)
        if reply.refusal is None:
            return reply
        kind = refusals.get(reply.refusal)
        if kind is None or request is None:  # a helper that did not load the file ends
            self._end_helper()
        if kind is None:
            raise self._failure(failed, f"failed: {reply.message}: {reply.admin_detail}")
        raise _error(kind, reply.message, reply.admin_detail)

    def _end_helper(self) -> None:
        helper, self._helper = self._helper, None
        if helper is not None:
            helper[1].close()  # the channel
            end_process_group(helper[0])

    def _failure(self, kind: type[MepError], what: str) -> MepError:
        detail = f"{self._source}: the identity-mapping helper (python -I -m mep.mapping) {what}"
        return _error(kind, detail if kind is ConfigurationError else HELPER_FAILED, detail)


def _error(kind: type[MepError], message: str, admin_detail: str) -> MepError:
    error = kind(message)
    error.admin_detail = admin_detail  # the user sees the message; the spawner logs this
    return error

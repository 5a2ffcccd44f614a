"""Identity mapping, root's side: the admin's mapping file is evaluated by an unprivileged helper, never by root.

Root reads the mapping file (checked like every policy file, ``policy_files``)
and hands its content, with the request's identity set, to ``python -I -m
mep.mapping`` started through the checked privilege drop (``privdrop``) as
``identity_mapping_user`` (``nobody`` by default, like sshd's
``AuthorizedKeysCommandUser``; in single-user mode as the manager's own
account), so that account needs no access to the file. The helper evaluates
the expression rules and runs the external programs (``mep.mapping``); it
answers one JSON object on fd 3, which root decodes strictly (``HelperReply``:
typed, bounded, no unknown fields) and checks: the deciding identity must be
one the request named. No answer, a crash or a timeout fails closed: a
``MappingError`` for a request, a ``ConfigurationError`` when a file is
loaded. The account named is then checked by root as before
(``accounts.resolve_account``, PAM).

Loading a file runs the helper once without identities: a broken file is
refused when it is loaded (at start, or kept out on reload), not at the first
request. Each decision costs one helper process (an interpreter's start).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pwd
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from mep.root.accounts import Account
from mep.root.errors import ConfigurationError, MappingError, MepError, SpawnError, UnmappedIdentityError
from mep.root.policy_files import read_policy_file
from mep.root.privdrop import SpawnPlan, run_for_answer

log = logging.getLogger("mep.spawner.mapping")

EXTERNAL_DATA_TYPE = "external_identity_mapping#1.0.0"
#: What ``globus-idm-validator`` passes as the gateway id; mep's dry run uses it when no endpoint is named.
REFERENCE_TESTING_ENDPOINT_ID = "11111111-1111-1111-1111-111111111111"
DEFAULT_EXTERNAL_TIMEOUT = 5.0  # per program run, as the reference
HELPER_STARTUP_SECONDS = 20.0  # an interpreter's start and imports, on a loaded machine
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


class HelperRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Root to helper, on its stdin. ``identities`` None: only load the content (the check when loading)."""

    content: bytes
    source: str
    endpoint_id: str
    external_timeout: float
    trusted_owner_uids: list[int]
    identities: list[dict[str, Any]] | None = None


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
    """A mapping file's checked content; ``map`` asks the helper, loading it asked once already."""

    def __init__(self, content: bytes, source: str, context: MappingContext) -> None:
        self._content = content
        self._source = source
        self._context = context
        self._ask(None)

    @property
    def source(self) -> str:
        return self._source

    @classmethod
    def from_file(cls, path: Path, *, trusted_owner_uids: frozenset[int],
                  context: MappingContext | None = None) -> IdentityMapper:
        """Load a mapping file that only trusted accounts can have written (see ``read_policy_file``).

        External programs named in it must be owned by the same trusted accounts.
        """
        content = read_policy_file(path, trusted_owner_uids=trusted_owner_uids)
        context = dataclasses.replace(context or MappingContext(), trusted_owner_uids=trusted_owner_uids)
        return cls(content, str(path), context)

    @classmethod
    def from_documents(cls, documents: object, *, source: str = "<memory>",
                       context: MappingContext | None = None) -> IdentityMapper:
        """Load parsed JSON: a list of mapping documents, or one document."""
        return cls(json.dumps(documents).encode(), source, context or MappingContext())

    def map(self, identities: Sequence[Mapping[str, object]]) -> MappingDecision:
        """The account the identity set maps to; ``UnmappedIdentityError`` or ``MappingError`` (fails closed)."""
        reply = self._ask([dict(identity) for identity in identities])
        asked = {identity.get("id") for identity in identities}
        if reply.decision is None or reply.decision.identity_id not in asked:
            raise self._failure(MappingError, f"answered {reply.decision!r}, naming no identity it was asked about")
        return MappingDecision(**msgspec.structs.asdict(reply.decision))

    def _ask(self, identities: list[dict[str, Any]] | None) -> HelperReply:
        failed = ConfigurationError if identities is None else MappingError
        context = self._context
        request = HelperRequest(content=self._content, source=self._source, endpoint_id=context.endpoint_id,
                                external_timeout=context.external_timeout,
                                trusted_owner_uids=sorted(context.trusted_owner_uids), identities=identities)
        # Each external document may take its timeout; a count of the DATA_TYPE's mentions bounds their number.
        timeout = HELPER_STARTUP_SECONDS + context.external_timeout * self._content.count(EXTERNAL_DATA_TYPE.encode())
        try:
            plan = SpawnPlan(account=_helper_account(context.run_as), argv=[sys.executable, "-I", "-m", "mep.mapping"],
                             stdin_data=msgspec.json.encode(request), log_path="",
                             drop_privileges=context.run_as is not None, title="the identity-mapping helper")
            status, answer = run_for_answer(plan, timeout=timeout, limit=MAX_REPLY_BYTES)
        except SpawnError as error:
            raise self._failure(failed, f"failed: {error}") from None
        try:
            reply = msgspec.json.decode(answer, type=HelperReply)
        except msgspec.MsgspecError as error:
            raise self._failure(failed, f"exited with status {status}, its answer unusable: {error}") from None
        for level, line in reply.log:
            log.log(level or logging.INFO, "%s", line)
        if reply.refusal is not None:
            refusal = reply.refusal
            if refusal.kind == "internal":
                raise self._failure(failed, f"failed: {refusal.message}: {refusal.admin_detail}")
            error = _REFUSALS[refusal.kind](refusal.message)
            error.admin_detail = refusal.admin_detail
            raise error
        if status != 0:
            raise self._failure(failed, f"exited with status {status} after answering")
        return reply

    def _failure(self, kind: type[MepError], what: str) -> MepError:
        detail = f"{self._source}: the identity-mapping helper (python -I -m mep.mapping) {what}"
        if kind is ConfigurationError:
            return ConfigurationError(detail)
        error = kind("the identity mapping on this endpoint failed; ask your admin to check the endpoint's"
                     " identity mapping")
        error.admin_detail = detail
        return error


def _helper_account(run_as: str | None) -> Account:
    """The account the helper runs as: ``run_as`` (never root or group 0; no supplementary groups), or our own."""
    try:
        entry = pwd.getpwnam(run_as) if run_as is not None else pwd.getpwuid(os.geteuid())
    except KeyError:
        raise SpawnError(f"identity_mapping_user {run_as!r} does not exist; create it (useradd --system) or"
                         " name another unprivileged account") from None
    if run_as is not None and (entry.pw_uid == 0 or entry.pw_gid == 0):
        raise SpawnError(f"identity_mapping_user {run_as!r} is root or in group 0; name an unprivileged account")
    return dataclasses.replace(Account.from_passwd(entry), groups=())

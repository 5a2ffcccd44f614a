"""Identity mapping rules: which local account a submitter's identity set maps to (run unprivileged, ``mep.mapping``).

Owns loading the admin's identity-mapping file (the format Globus Connect
Server and Globus Compute use, see ``identity_maps/README.md``) and evaluating
it. The reference implementation is ``globus_identity_mapping``; mep follows
it, except where it maps more than a rule says or hides a mistake:

* ``match`` must cover the whole source (``fullmatch``): the reference compiles
  ``^...$`` and calls ``.match``, so ``$`` also matches before a trailing
  newline (``"alice\\n"`` maps like ``"alice"``) and a top-level ``|`` anchors
  each branch at one end only (``a@x\\.org|b@x\\.org`` matches
  ``"a@x.org.attacker.net"``).
* ``literal`` matches are plain text (``re.escape``): the reference leaves a
  special character after a backslash unescaped, so the literal ``a\\*`` matches
  ``"a"``.
* Placeholders are substituted in one pass: the reference substitutes them one
  after the other over the whole string, so a username containing ``{email}``
  gets the email substituted into it.
* Loading refuses what could only fail or mislead later: unknown keys (a typo
  such as ``"literall": true`` would silently turn on regular expressions;
  only a string ``"comment"`` is allowed beside the known keys, as JSON has
  no comments and the reference ignores extra keys),
  duplicate JSON keys, a trailing lone backslash (the reference compiles a rule
  that never matches), group references the match can't supply, groups in
  ``source``, and DATA_TYPEs mep does not evaluate (the reference skips them
  with a warning).
* Any error while evaluating a document fails the whole mapping (the
  reference's validator logs it and moves on to the next document).

An identity set that yields two different accounts from the deciding mapping
is refused as ambiguous rather than picking one.

``external_identity_mapping#1.0.0`` documents run the admin's program (see
``mep.mapping.external``) with the set's mappable identities: one
identity without ``-a`` (the first result counts, as in the reference), several
with ``-a`` (every result counts, and disagreeing results are ambiguous). Only
identities whose ``status`` is ``used`` or ``private`` are handed over, as for
expressions (the reference hands every identity of a set to the program).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from mep.mapping.external import ExternalProgram, ProgramFailed
from mep.root.errors import ConfigurationError, MappingError, MepError, UnmappedIdentityError
from mep.root.identity import EXTERNAL_DATA_TYPE, MappingContext, MappingDecision

EXPRESSION_DATA_TYPE = "expression_identity_mapping#1.0.0"

# Identities of the set that take part in mapping, as in the reference.
_MAPPABLE_STATUSES = frozenset({"used", "private"})
# "comment" is allowed everywhere: JSON has no comments, and a string can't change a rule.
_COMMENT_KEY = "comment"
_DOCUMENT_KEYS = frozenset({"DATA_TYPE", "mappings", _COMMENT_KEY})
_EXTERNAL_DOCUMENT_KEYS = frozenset({"DATA_TYPE", "command", _COMMENT_KEY})
_REQUIRED_TEXT_KEYS = ("source", "match", "output")
_FLAG_KEYS = ("ignore_case", "literal")
_MAPPING_KEYS = frozenset((*_REQUIRED_TEXT_KEYS, *_FLAG_KEYS, _COMMENT_KEY))
# The reference's placeholder syntax: ``{name}`` not escaped by an odd number of backslashes.
_PLACEHOLDER = re.compile(r"(?<!\\)((?:\\\\)*)\{([^}]*)\}")
_GROUP_REFERENCE = re.compile(r"[0-9]+")
_TRAILING_BACKSLASHES = re.compile(r"\\+\Z")
_REJECTED_MATCHES = (
    (re.compile(r"(\\[^.?*|()\\0-9])"), "\\ expression"),
    (re.compile(r"([*?]\?)"), "? expression"),
    (re.compile(r"^([*?])"), "leading wildcard expression"),
)
# Python's specials that are literal characters in the reference's language (unless escaped).
_UNSUPPORTED_SPECIALS = re.compile(r"(?<!\\)([\^\$\+\{\}\[\]])")

_Error = TypeVar("_Error", bound=MepError)


@dataclass(frozen=True)
class _Candidate:
    identity_id: str
    account: str


@dataclass(frozen=True)
class _DocumentOutcome:
    mapping_index: int | None
    candidates: tuple[_Candidate, ...]


class _EvaluationFailed(Exception):
    """A document could not be evaluated for this identity set; the mapping must fail closed."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(reason)
        self.where = where  # "mapping 3" or "program /path"
        self.reason = reason


class _InvalidDocument(Exception):
    """A document can't be loaded; ``mapping_index`` is None when the document itself is wrong."""

    def __init__(self, reason: str, mapping_index: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.mapping_index = mapping_index


class _MappingDocument(Protocol):
    program: str  # "" for expression documents

    def evaluate(self, identities: Sequence[Mapping[str, object]]) -> _DocumentOutcome | None:
        """The deciding mapping's outputs, or None when nothing in this document matched."""


class _UnresolvedPlaceholder(Exception):
    """A ``{name}`` in a source or output has no text to put in its place."""


@dataclass(frozen=True)
class _ExpressionRule:
    source: str
    pattern: re.Pattern[str]
    output: str

    def apply(self, identity: Mapping[str, object]) -> str | None:
        source = _interpolate(self.source, identity, ())
        match = self.pattern.fullmatch(source)
        if match is None:
            return None
        # An empty output is no mapping for this identity (the reference would hand back ""), never an account "".
        return _interpolate(self.output, identity, match.groups()) or None


@dataclass(frozen=True)
class _ExpressionDocument:
    rules: tuple[_ExpressionRule, ...]
    program: str = ""

    def evaluate(self, identities: Sequence[Mapping[str, object]]) -> _DocumentOutcome | None:
        # Mapping-major order, as the reference's map_identities: the first
        # mapping that yields anything for any identity decides.
        for mapping_index, rule in enumerate(self.rules):
            candidates = []
            for identity in identities:
                if identity.get("status") not in _MAPPABLE_STATUSES:
                    continue
                try:
                    account = rule.apply(identity)
                except _UnresolvedPlaceholder as error:
                    raise _EvaluationFailed(
                        f"mapping {mapping_index}", f"identity {identity['id']!r}: {error}"
                    ) from None
                if account is not None:
                    candidates.append(_Candidate(str(identity["id"]), account))
            if candidates:
                return _DocumentOutcome(mapping_index, tuple(candidates))
        return None


@dataclass(frozen=True)
class _ExternalDocument:
    runner: ExternalProgram

    @property
    def program(self) -> str:
        return self.runner.command[0]

    def evaluate(self, identities: Sequence[Mapping[str, object]]) -> _DocumentOutcome | None:
        mappable = [identity for identity in identities if identity.get("status") in _MAPPABLE_STATUSES]
        if not mappable:
            return None
        whole_set = len(mappable) > 1
        try:
            results = self.runner.run(mappable, whole_set=whole_set)
        except ProgramFailed as failure:
            raise _EvaluationFailed(self.runner.label, failure.reason) from None
        if not results:
            return None
        if not whole_set:
            results = results[:1]  # as the reference: without -a only the first result counts
        return _DocumentOutcome(
            None, tuple(_Candidate(result.identity_id, result.account) for result in results)
        )


def _interpolate(
    template: str, identity: Mapping[str, object], groups: Sequence[str | None]
) -> str:
    def substitute(placeholder: re.Match[str]) -> str:
        escapes, name = placeholder.groups()
        if _GROUP_REFERENCE.fullmatch(name):
            value: object = groups[int(name)]
            if value is None:
                raise _UnresolvedPlaceholder(f"match group {{{name}}} took no part in the match")
        else:
            value = identity.get(name)
            if not isinstance(value, str):
                raise _UnresolvedPlaceholder(
                    f"identity property {name!r} is missing or not text (got {value!r})"
                )
        return escapes + value

    return _PLACEHOLDER.sub(substitute, template)


def _placeholder_names(template: str) -> list[str]:
    return [placeholder.group(2) for placeholder in _PLACEHOLDER.finditer(template)]


def _compile_match(match: str, *, ignore_case: bool, literal: bool) -> re.Pattern[str]:
    flags = re.IGNORECASE if ignore_case else 0
    if literal:
        return re.compile(re.escape(match), flags)
    trailing = _TRAILING_BACKSLASHES.search(match)
    if trailing is not None and len(trailing.group()) % 2:
        raise _InvalidDocument("match ends with a lone backslash; escape it as \\\\")
    # The reference's language and load-time rejections, as its ExpressionIdentityMapping._compile_match
    # (not imported: its package loads marshmallow, a third of a second for every mapping helper).
    for rejected, what in _REJECTED_MATCHES:
        found = rejected.search(match)
        if found is not None:
            raise _InvalidDocument(f"invalid match expression {match!r}: {match} - Invalid {what}: {found.group()}")
    try:
        # Only ``.fullmatch`` is ever called on the result.
        return re.compile("^" + _UNSUPPORTED_SPECIALS.sub(r"\\\1", match) + "$", flags)
    except re.error as error:
        raise _InvalidDocument(f"invalid match expression {match!r}: {error}") from None


def _check_keys(item: Mapping[str, object], allowed: frozenset[str]) -> None:
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise _InvalidDocument(f"unknown keys {unknown}; allowed: {sorted(allowed)}")
    if not isinstance(item.get(_COMMENT_KEY, ""), str):
        raise _InvalidDocument(f"{_COMMENT_KEY!r} must be a string")


def _load_expression_rule(mapping: object) -> _ExpressionRule:
    if not isinstance(mapping, dict):
        raise _InvalidDocument("a mapping must be a JSON object")
    _check_keys(mapping, _MAPPING_KEYS)
    for key in _REQUIRED_TEXT_KEYS:
        if not isinstance(mapping.get(key), str):
            raise _InvalidDocument(f"{key!r} is required and must be a string")
    for key in _FLAG_KEYS:
        if not isinstance(mapping.get(key, False), bool):
            raise _InvalidDocument(f"{key!r} must be true or false")
    literal = mapping.get("literal", False)
    pattern = _compile_match(
        mapping["match"], ignore_case=mapping.get("ignore_case", False), literal=literal
    )
    if any(_GROUP_REFERENCE.fullmatch(name) for name in _placeholder_names(mapping["source"])):
        raise _InvalidDocument("'source' can't use match groups such as {0}")
    for name in _placeholder_names(mapping["output"]):
        if _GROUP_REFERENCE.fullmatch(name) and int(name) >= pattern.groups:
            if literal:
                raise _InvalidDocument(
                    f"'output' uses {{{name}}} but a literal match has no groups"
                )
            raise _InvalidDocument(
                f"'output' uses {{{name}}} but the match has only {pattern.groups} group(s),"
                " numbered from {0}"
            )
    return _ExpressionRule(mapping["source"], pattern, mapping["output"])


def _load_expression_document(document: Mapping[str, object], context: MappingContext) -> _ExpressionDocument:
    _check_keys(document, _DOCUMENT_KEYS)
    mappings = document.get("mappings")
    if not isinstance(mappings, list):
        raise _InvalidDocument("'mappings' is required and must be a list")
    rules = []
    for mapping_index, mapping in enumerate(mappings):
        try:
            rules.append(_load_expression_rule(mapping))
        except _InvalidDocument as error:
            raise _InvalidDocument(error.reason, mapping_index) from None
    return _ExpressionDocument(tuple(rules))


def _load_external_document(document: Mapping[str, object], context: MappingContext) -> _ExternalDocument:
    _check_keys(document, _EXTERNAL_DOCUMENT_KEYS)
    try:
        runner = ExternalProgram.from_command(
            document.get("command"), endpoint_id=context.endpoint_id, timeout=context.external_timeout,
            trusted_owner_uids=context.trusted_owner_uids,
        )
    except ValueError as error:
        raise _InvalidDocument(str(error)) from None
    try:
        runner.check_files()
    except ConfigurationError as error:
        raise _InvalidDocument(str(error)) from None
    return _ExternalDocument(runner)


# One loader per supported DATA_TYPE.
_DOCUMENT_LOADERS: dict[str, Callable[[Mapping[str, object], MappingContext], _MappingDocument]] = {
    EXPRESSION_DATA_TYPE: _load_expression_document,
    EXTERNAL_DATA_TYPE: _load_external_document,
}


def _load_document(document: object, context: MappingContext) -> _MappingDocument:
    if not isinstance(document, dict):
        raise _InvalidDocument("a mapping document must be a JSON object with a DATA_TYPE")
    data_type = document.get("DATA_TYPE")
    loader = _DOCUMENT_LOADERS.get(data_type) if isinstance(data_type, str) else None
    if loader is not None:
        return loader(document, context)
    raise _InvalidDocument(
        f"unsupported DATA_TYPE {data_type!r}; supported: {sorted(_DOCUMENT_LOADERS)}"
    )


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates} in one object")
    return dict(pairs)


def _with_admin_detail(error: _Error, admin_detail: str) -> _Error:
    # The user sees str(error); the spawner logs admin_detail (which file, which rule).
    error.admin_detail = admin_detail
    return error


def _identity_label(identity: Mapping[str, object]) -> str:
    username = identity.get("username")
    return username if isinstance(username, str) and username else str(identity["id"])


def _checked_identities(identities: object) -> list[Mapping[str, object]]:
    if (
        not isinstance(identities, Sequence)
        or isinstance(identities, str | bytes)
        or not identities
        or not all(
            isinstance(identity, Mapping)
            and isinstance(identity.get("id"), str)
            and identity["id"]
            for identity in identities
        )
    ):
        raise _with_admin_detail(
            MappingError("the request carried no usable identity to map; please report this bug"),
            f"identity set is not a non-empty list of objects with an 'id': {identities!r}",
        )
    return list(identities)


class MappingRules:
    """A loaded identity-mapping file: documents tried in order, the first that yields an account wins."""

    def __init__(self, documents: Sequence[_MappingDocument], source: str) -> None:
        self._documents = tuple(documents)
        self._source = source

    @property
    def source(self) -> str:
        return self._source

    @classmethod
    def from_content(cls, content: bytes, *, source: str, context: MappingContext) -> MappingRules:
        """Load a mapping file's content (duplicate JSON keys refused); ``ConfigurationError`` names ``source``."""
        try:
            documents = json.loads(content, object_pairs_hook=_reject_duplicate_keys)
        except (UnicodeDecodeError, ValueError) as error:
            raise ConfigurationError(f"{source}: not valid JSON: {error}") from None
        return cls.from_documents(documents, source=source, context=context)

    @classmethod
    def from_documents(
        cls, documents: object, *, source: str = "<memory>", context: MappingContext | None = None
    ) -> MappingRules:
        """Load parsed JSON: a list of mapping documents, or one document."""
        if isinstance(documents, dict):
            documents = [documents]
        if not isinstance(documents, list):
            raise ConfigurationError(
                f"{source}: must be a JSON list of identity-mapping documents (or a single"
                f" document), not {type(documents).__name__}"
            )
        if not documents:
            raise ConfigurationError(
                f"{source}: contains no identity-mapping documents; add at least one"
            )
        loaded = []
        for document_index, document in enumerate(documents):
            try:
                loaded.append(_load_document(document, context or MappingContext()))
            except _InvalidDocument as error:
                where = f"document {document_index}"
                if error.mapping_index is not None:
                    where += f", mapping {error.mapping_index}"
                raise ConfigurationError(f"{source}: {where}: {error.reason}") from None
        return cls(loaded, source)

    def map(self, identities: Sequence[Mapping[str, object]]) -> MappingDecision:
        """Map the submitter's identity set to one account, or raise an error the user can act on.

        Raises ``UnmappedIdentityError`` when no document maps any identity,
        ``MappingError`` when a document fails to evaluate (never falling
        through to a later one) or the deciding mapping names several accounts.
        Both carry ``admin_detail`` for the log.
        """
        checked = _checked_identities(identities)
        label = _identity_label(checked[0])
        for document_index, document in enumerate(self._documents):
            try:
                outcome = document.evaluate(checked)
            except _EvaluationFailed as failure:
                raise _with_admin_detail(
                    MappingError(
                        f"the identity mapping on this endpoint failed for {label}; ask your admin"
                        " to check the endpoint's identity mapping"
                    ),
                    f"{self._source}: document {document_index}, {failure.where}: {failure.reason}",
                ) from None
            if outcome is not None:
                return self._decide(checked, document_index, document.program, outcome)
        raise _with_admin_detail(
            UnmappedIdentityError(
                f"no local account is mapped to {label} on this endpoint;"
                " ask your admin to add a mapping"
            ),
            f"{self._source}: no document maps any of (id, username, status)"
            f" {[(i['id'], i.get('username'), i.get('status')) for i in checked]};"
            f" only statuses {sorted(_MAPPABLE_STATUSES)} are tried",
        )

    def _decide(
        self,
        identities: Sequence[Mapping[str, object]],
        document_index: int,
        program: str,
        outcome: _DocumentOutcome,
    ) -> MappingDecision:
        first = outcome.candidates[0]
        conflicting = next(
            (candidate for candidate in outcome.candidates if candidate.account != first.account),
            None,
        )
        if conflicting is not None:
            by_id = {str(identity["id"]): identity for identity in identities}
            rule = MappingDecision("", "", document_index, outcome.mapping_index, program).rule()
            raise _with_admin_detail(
                MappingError(
                    f"ambiguous: identities {_identity_label(by_id[first.identity_id])} and"
                    f" {_identity_label(by_id[conflicting.identity_id])} map to accounts"
                    f" {first.account!r} and {conflicting.account!r}; ask your admin"
                ),
                f"{self._source}: {rule} maps one identity set to several accounts: {outcome.candidates}",
            )
        return MappingDecision(
            account=first.account,
            identity_id=first.identity_id,
            document_index=document_index,
            mapping_index=outcome.mapping_index,
            program=program,
        )

"""Identity mapping: which local account a submitter's identity set maps to.

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
  such as ``"literall": true`` would silently turn on regular expressions),
  duplicate JSON keys, a trailing lone backslash (the reference compiles a rule
  that never matches), group references the match can't supply, groups in
  ``source``, and DATA_TYPEs mep does not evaluate (the reference skips them
  with a warning).
* Any error while evaluating a document fails the whole mapping (the
  reference's validator logs it and moves on to the next document).

An identity set that yields two different accounts from the deciding mapping
is refused as ambiguous rather than picking one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from globus_identity_mapping.errors import InvalidMappingError
from globus_identity_mapping.mappers.expression import ExpressionIdentityMapping

from mep.errors import ConfigurationError, MappingError, MepError, UnmappedIdentityError
from mep.manager.spawner.policy_files import read_policy_file

EXPRESSION_DATA_TYPE = ExpressionIdentityMapping.DATA_TYPE
EXTERNAL_DATA_TYPE = "external_identity_mapping#1.0.0"

# Identities of the set that take part in mapping, as in the reference.
_MAPPABLE_STATUSES = frozenset({"used", "private"})
_DOCUMENT_KEYS = frozenset({"DATA_TYPE", "mappings"})
_REQUIRED_TEXT_KEYS = ("source", "match", "output")
_FLAG_KEYS = ("ignore_case", "literal")
_MAPPING_KEYS = frozenset(_REQUIRED_TEXT_KEYS + _FLAG_KEYS)
# The reference's placeholder syntax: ``{name}`` not escaped by an odd number of backslashes.
_PLACEHOLDER = re.compile(r"(?<!\\)((?:\\\\)*)\{([^}]*)\}")
_GROUP_REFERENCE = re.compile(r"[0-9]+")
_TRAILING_BACKSLASHES = re.compile(r"\\+\Z")

_Error = TypeVar("_Error", bound=MepError)


@dataclass(frozen=True)
class MappingDecision:
    """The account a mapping produced and which rule produced it (for the audit log)."""

    account: str  # the local account name the mapping produced
    identity_id: str  # which identity of the set produced it
    document_index: int  # index in the file's list of documents
    mapping_index: int  # index in that document's "mappings"


@dataclass(frozen=True)
class _Candidate:
    identity_id: str
    account: str


@dataclass(frozen=True)
class _DocumentOutcome:
    mapping_index: int
    candidates: tuple[_Candidate, ...]


class _EvaluationFailed(Exception):
    """A document could not be evaluated for this identity set; the mapping must fail closed."""

    def __init__(self, mapping_index: int, reason: str) -> None:
        super().__init__(reason)
        self.mapping_index = mapping_index
        self.reason = reason


class _InvalidDocument(Exception):
    """A document can't be loaded; ``mapping_index`` is None when the document itself is wrong."""

    def __init__(self, reason: str, mapping_index: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.mapping_index = mapping_index


class _MappingDocument(Protocol):
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
        return _interpolate(self.output, identity, match.groups())


@dataclass(frozen=True)
class _ExpressionDocument:
    rules: tuple[_ExpressionRule, ...]

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
                        mapping_index, f"identity {identity['id']!r}: {error}"
                    ) from None
                if account is not None:
                    candidates.append(_Candidate(str(identity["id"]), account))
            if candidates:
                return _DocumentOutcome(mapping_index, tuple(candidates))
        return None


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
    try:
        # The reference's compiler: its language, its load-time rejections.
        # Only ``.fullmatch`` is ever called on the result.
        return ExpressionIdentityMapping._compile_match(match, ignore_case, literal)
    except InvalidMappingError as error:
        # Its messages are sometimes an unformatted (template, args...) tuple.
        detail = error.args[-1] if len(error.args) > 1 else error.args[0]
        raise _InvalidDocument(f"invalid match expression {match!r}: {detail}") from None


def _load_expression_rule(mapping: object) -> _ExpressionRule:
    if not isinstance(mapping, dict):
        raise _InvalidDocument("a mapping must be a JSON object")
    unknown = sorted(set(mapping) - _MAPPING_KEYS)
    if unknown:
        raise _InvalidDocument(
            f"unknown keys {unknown}; allowed: {sorted(_MAPPING_KEYS)}"
        )
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


def _load_expression_document(document: Mapping[str, object]) -> _ExpressionDocument:
    unknown = sorted(set(document) - _DOCUMENT_KEYS)
    if unknown:
        raise _InvalidDocument(f"unknown keys {unknown}; allowed: {sorted(_DOCUMENT_KEYS)}")
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


# One loader per supported DATA_TYPE; external mappers will register here.
_DOCUMENT_LOADERS: dict[str, Callable[[Mapping[str, object]], _MappingDocument]] = {
    EXPRESSION_DATA_TYPE: _load_expression_document,
}


def _load_document(document: object) -> _MappingDocument:
    if not isinstance(document, dict):
        raise _InvalidDocument("a mapping document must be a JSON object with a DATA_TYPE")
    data_type = document.get("DATA_TYPE")
    loader = _DOCUMENT_LOADERS.get(data_type) if isinstance(data_type, str) else None
    if loader is not None:
        return loader(document)
    if data_type == EXTERNAL_DATA_TYPE:
        raise _InvalidDocument(
            f"{EXTERNAL_DATA_TYPE} (an external mapping program) is not supported by mep yet;"
            f" use {EXPRESSION_DATA_TYPE} rules"
        )
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


class IdentityMapper:
    """A loaded identity-mapping file: documents tried in order, the first that yields an account wins."""

    def __init__(self, documents: Sequence[_MappingDocument], source: str) -> None:
        self._documents = tuple(documents)
        self._source = source

    @classmethod
    def from_file(cls, path: Path, *, trusted_owner_uids: frozenset[int]) -> IdentityMapper:
        """Load a mapping file that only trusted accounts can have written (see ``read_policy_file``)."""
        content = read_policy_file(path, trusted_owner_uids=trusted_owner_uids)
        try:
            documents = json.loads(content, object_pairs_hook=_reject_duplicate_keys)
        except (UnicodeDecodeError, ValueError) as error:
            raise ConfigurationError(f"{path}: not valid JSON: {error}") from None
        return cls.from_documents(documents, source=str(path))

    @classmethod
    def from_documents(cls, documents: object, *, source: str = "<memory>") -> IdentityMapper:
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
                loaded.append(_load_document(document))
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
                    f"{self._source}: document {document_index}, mapping"
                    f" {failure.mapping_index}: {failure.reason}",
                ) from None
            if outcome is not None:
                return self._decide(checked, document_index, outcome)
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
        outcome: _DocumentOutcome,
    ) -> MappingDecision:
        first = outcome.candidates[0]
        conflicting = next(
            (candidate for candidate in outcome.candidates if candidate.account != first.account),
            None,
        )
        if conflicting is not None:
            by_id = {str(identity["id"]): identity for identity in identities}
            raise _with_admin_detail(
                MappingError(
                    f"ambiguous: identities {_identity_label(by_id[first.identity_id])} and"
                    f" {_identity_label(by_id[conflicting.identity_id])} map to accounts"
                    f" {first.account!r} and {conflicting.account!r}; ask your admin"
                ),
                f"{self._source}: document {document_index}, mapping {outcome.mapping_index}"
                f" maps one identity set to several accounts: {outcome.candidates}",
            )
        return MappingDecision(
            account=first.account,
            identity_id=first.identity_id,
            document_index=document_index,
            mapping_index=outcome.mapping_index,
        )

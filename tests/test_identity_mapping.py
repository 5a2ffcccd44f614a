"""Identity mapping: GCS / Globus Compute semantics, checked against the reference package.

Where ``globus_identity_mapping`` gives the right answer the expected account
is computed by calling it; the cases where mep deliberately refuses more
(whole-source match, truly literal ``literal``, one-pass interpolation,
stricter loading, fail-closed evaluation) assert both answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from globus_identity_mapping.errors import IdentityMappingError, InvalidMappingError
from globus_identity_mapping.mappers.expression import ExpressionIdentityMapping
from hypothesis import given, settings
from hypothesis import strategies as st

from mep.errors import ConfigurationError, MappingError, UnmappedIdentityError
from mep.mapping.engine import MappingRules
from mep.root.identity import IdentityMapper, MappingDecision
from mep.root.policy_files import read_policy_file
from tests.accounts import unix_account

EXPRESSION = "expression_identity_mapping#1.0.0"
ROOT_ONLY = frozenset({0})
SERVICE_ACCOUNT_ID = "b34bb069-3b68-4d38-b4e6-bc1e4fc95332"
OTHER_SERVICE_ID = "0f4f1e8c-5d8e-4c53-9a61-4a3a0a7f2b10"
IDP = "36007761-2cf2-4e74-a068-7473afc1d054"


def identity(username: str, *, status: str | None = "used", **overrides: object) -> dict[str, object]:
    """A Globus-Auth-shaped identity resource."""
    resource: dict[str, object] = {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, username)),
        "username": username,
        "email": username,
        "name": "Test Person",
        "organization": "physics",
        "identity_provider": IDP,
        "status": status,
    }
    if status is None:
        del resource["status"]
    resource.update(overrides)
    return resource


def rule(source: str, match: str, output: str, **flags: bool) -> dict[str, object]:
    return {"source": source, "match": match, "output": output, **flags}


def document(*mappings: dict[str, object]) -> dict[str, object]:
    return {"DATA_TYPE": EXPRESSION, "mappings": list(mappings)}


DOMAIN_STRIP = rule("{username}", r"(.*)@example\.org", "{0}")
ID_TABLE = document(
    rule("{id}", SERVICE_ACCOUNT_ID, "svc_alpha"),
    rule("{id}", OTHER_SERVICE_ID, "svc_beta"),
)
PROJECT = rule("{username}", r"(alice|bob)@example\.org", "projacct")


def reference_account(
    documents: Sequence[Mapping[str, object]], identities: Sequence[Mapping[str, object]]
) -> str | None:
    """The account globus_identity_mapping's identity-set semantics give (None: unmapped)."""
    for doc in documents:
        mapper = ExpressionIdentityMapping.from_mapping_document(doc)
        for outputs_by_identity in mapper.map_identities(identities):
            outputs = {out for outs in outputs_by_identity.values() for out in outs}
            if outputs:
                assert len(outputs) == 1, "an agreeing case must not be ambiguous"
                return outputs.pop()
    return None


@dataclass(frozen=True)
class Case:
    name: str
    documents: list[dict[str, object]]
    identities: list[dict[str, object]]
    account: str | None  # None: unmapped
    where: tuple[int, int] = (0, 0)  # (document_index, mapping_index) of the decision
    deciding_identity: int = 0  # index into identities


AGREEING_CASES = [
    Case("domain strip", [document(DOMAIN_STRIP)], [identity("alice@example.org")], "alice"),
    Case("domain strip, other domain", [document(DOMAIN_STRIP)], [identity("alice@example.com")], None),
    Case("escaped dot is a literal dot", [document(DOMAIN_STRIP)], [identity("alice@exampleXorg")], None),
    Case(
        "unescaped dot matches any character",
        [document(rule("{username}", "(.*)@example.org", "{0}"))],
        [identity("alice@exampleXorg")],
        "alice",
    ),
    Case("id table, first entry", [ID_TABLE], [identity("x@y.org", id=SERVICE_ACCOUNT_ID)], "svc_alpha"),
    Case(
        "id table, second entry",
        [ID_TABLE],
        [identity("x@y.org", id=OTHER_SERVICE_ID)],
        "svc_beta",
        where=(0, 1),
    ),
    Case("id table, unknown id", [ID_TABLE], [identity("x@y.org")], None),
    Case("several people to one account: alice", [document(PROJECT)], [identity("alice@example.org")], "projacct"),
    Case("several people to one account: bob", [document(PROJECT)], [identity("bob@example.org")], "projacct"),
    Case("several people to one account: carol", [document(PROJECT)], [identity("carol@example.org")], None),
    Case(
        "ignore_case keeps the original case in the output",
        [document(rule("{username}", r"(.*)@example\.org", "{0}", ignore_case=True))],
        [identity("ALICE@Example.ORG")],
        "ALICE",
    ),
    Case("case-sensitive by default", [document(DOMAIN_STRIP)], [identity("alice@EXAMPLE.ORG")], None),
    Case(
        "literal match",
        [document(rule("{username}", "a.b@example.org", "ab", literal=True))],
        [identity("a.b@example.org")],
        "ab",
    ),
    Case(
        "literal dot is not a wildcard",
        [document(rule("{username}", "a.b@example.org", "ab", literal=True))],
        [identity("axb@example.org")],
        None,
    ),
    Case(
        "literal with ignore_case",
        [document(rule("{username}", "a.b@example.org", "ab", literal=True, ignore_case=True))],
        [identity("A.B@EXAMPLE.ORG")],
        "ab",
    ),
    Case(
        "+ is literal",
        [document(rule("{username}", r"(a+b)@example\.org", "{0}"))],
        [identity("a+b@example.org")],
        "a+b",
    ),
    Case(
        "+ is not a quantifier",
        [document(rule("{username}", r"(a+b)@example\.org", "{0}"))],
        [identity("aab@example.org")],
        None,
    ),
    Case("[ ] are literal", [document(rule("{username}", "[x]", "brackets"))], [identity("[x]")], "brackets"),
    Case("[ ] are not a class", [document(rule("{username}", "[x]", "brackets"))], [identity("x")], None),
    Case("{ } are literal", [document(rule("{username}", "a{2}", "braces"))], [identity("a{2}")], "braces"),
    Case("{ } are not a repeat", [document(rule("{username}", "a{2}", "braces"))], [identity("aa")], None),
    Case("^ $ are literal", [document(rule("{username}", "^root$", "anchors"))], [identity("^root$")], "anchors"),
    Case("^ $ are not anchors", [document(rule("{username}", "^root$", "anchors"))], [identity("root")], None),
    Case(
        "alternation and groups",
        [document(rule("{username}", r"(alice|bob)@(example|test)\.org", "{1}-{0}"))],
        [identity("bob@test.org")],
        "test-bob",
    ),
    Case(
        "optional character",
        [document(rule("{username}", r"(colou?r)@x\.org", "{0}"))],
        [identity("color@x.org")],
        "color",
    ),
    Case("star", [document(rule("{username}", "(ab*)c", "{0}"))], [identity("abbbc")], "abbb"),
    Case(
        "nested groups are numbered by opening parenthesis",
        [document(rule("{username}", "((a)(b))c", "{0}.{1}.{2}"))],
        [identity("abc")],
        "ab.a.b",
    ),
    Case(
        "escaped specials are literal",
        [document(rule("{username}", r"\(a\|b\)\*\?", "escaped"))],
        [identity("(a|b)*?")],
        "escaped",
    ),
    Case(
        "escaped backslash",
        [document(rule("{username}", r"dom\\(.*)", "{0}"))],
        [identity("dom\\bob")],
        "bob",
    ),
    Case("unicode username", [document(DOMAIN_STRIP)], [identity("jürgen@example.org")], "jürgen"),
    Case(
        "unicode with ignore_case",
        [document(rule("{username}", "jürgen@example.org", "juergen", literal=True, ignore_case=True))],
        [identity("JÜRGEN@EXAMPLE.ORG")],
        "juergen",
    ),
    Case(
        "output interpolates identity properties",
        [document(rule("{email}", r"(.*)@example\.org", "{0}_{organization}"))],
        [identity("alice@example.org")],
        "alice_physics",
    ),
    Case(
        "source combines properties",
        [document(rule("{identity_provider}:{username}", IDP + r":(.*)@example\.org", "{0}"))],
        [identity("alice@example.org")],
        "alice",
    ),
    Case(
        "documents are tried in order",
        [document(rule("{username}", r"(.*)@other\.org", "{0}")), document(DOMAIN_STRIP)],
        [identity("alice@example.org")],
        "alice",
        where=(1, 0),
    ),
    Case(
        "the first document that maps wins",
        [document(rule("{username}", ".*", "first")), document(rule("{username}", ".*", "second"))],
        [identity("alice@example.org")],
        "first",
    ),
    Case(
        "set: unused identities are skipped",
        [document(DOMAIN_STRIP)],
        [identity("alice@example.org", status="unused"), identity("bob@example.org")],
        "bob",
        deciding_identity=1,
    ),
    Case(
        "set: linked skipped, private used",
        [document(DOMAIN_STRIP)],
        [identity("alice@example.org", status="linked"), identity("bob@example.org", status="private")],
        "bob",
        deciding_identity=1,
    ),
    Case(
        "set: identities without a status are skipped",
        [document(DOMAIN_STRIP)],
        [identity("alice@example.org", status=None), identity("bob@example.org")],
        "bob",
        deciding_identity=1,
    ),
    Case(
        "set: the first mapping with any output decides",
        [document(rule("{username}", r"(.*)@university\.edu", "{0}"), DOMAIN_STRIP)],
        [identity("alice@example.org"), identity("al@university.edu")],
        "al",
        deciding_identity=1,
    ),
    Case(
        "set: two identities naming the same account",
        [document(rule("{username}", r"(alice)@(example|test)\.org", "{0}"))],
        [identity("alice@example.org"), identity("alice@test.org")],
        "alice",
    ),
    Case(
        "set: no usable identity",
        [document(DOMAIN_STRIP)],
        [identity("alice@example.org", status="unused")],
        None,
    ),
    Case("a document with no mappings maps nobody", [document()], [identity("alice@example.org")], None),
    Case(
        "comments are ignored, by both",
        [{**document({**DOMAIN_STRIP, "comment": "campus accounts"}), "comment": "JSON has no comments"}],
        [identity("alice@example.org")],
        "alice",
    ),
]


@pytest.mark.parametrize("case", AGREEING_CASES, ids=lambda case: case.name)
def test_mapping_agrees_with_reference(case: Case) -> None:
    assert reference_account(case.documents, case.identities) == case.account
    mapper = MappingRules.from_documents(case.documents)
    if case.account is None:
        with pytest.raises(UnmappedIdentityError):
            mapper.map(case.identities)
        return
    assert mapper.map(case.identities) == MappingDecision(
        account=case.account,
        identity_id=str(case.identities[case.deciding_identity]["id"]),
        document_index=case.where[0],
        mapping_index=case.where[1],
    )


@dataclass(frozen=True)
class Difference:
    name: str
    mapping: dict[str, object]
    identity: dict[str, object]
    reference: str | None
    mep: str | None


DIFFERENCES = [
    Difference("trailing newline does not match", rule("{username}", "alice", "alice"), identity("alice\n"), "alice", None),
    Difference("domain strip with trailing newline", DOMAIN_STRIP, identity("alice@example.org\n"), "alice", None),
    Difference(
        "top-level alternation is anchored at both ends (reference: only the first branch at the start)",
        rule("{username}", r"alice@example\.org|bob@example\.org", "projacct"),
        identity("alice@example.org.attacker.net"),
        "projacct",
        None,
    ),
    Difference(
        "top-level alternation still maps each branch",
        rule("{username}", r"alice@example\.org|bob@example\.org", "projacct"),
        identity("bob@example.org"),
        "projacct",
        "projacct",
    ),
    Difference(
        "literal backslash-star is plain text (reference: zero or more backslashes)",
        rule("{username}", "corp\\*", "corp", literal=True),
        identity("corp"),
        "corp",
        None,
    ),
    Difference(
        "literal backslash-star matches itself",
        rule("{username}", "corp\\*", "corp", literal=True),
        identity("corp\\*"),
        None,
        "corp",
    ),
    Difference(
        "identity data is not interpolated twice",
        rule("{username}", r"(.*)@example\.org", "{0}-{email}"),
        identity("{email}@example.org", email="svc"),
        "svc-svc",
        "{email}-svc",
    ),
    Difference(
        'an empty output is no mapping (reference: the account "")',
        rule("{username}", r"(.*)@example\.org", "{0}"),
        identity("@example.org"),
        "",
        None,
    ),
]


@pytest.mark.parametrize("case", DIFFERENCES, ids=lambda case: case.name)
def test_mep_is_stricter_than_reference(case: Difference) -> None:
    assert ExpressionIdentityMapping([case.mapping]).map_identity(case.identity) == case.reference
    mapper = MappingRules.from_documents(document(case.mapping))
    if case.mep is None:
        with pytest.raises(UnmappedIdentityError):
            mapper.map([case.identity])
    else:
        assert mapper.map([case.identity]).account == case.mep


def test_empty_output_is_no_mapping_and_the_next_rule_decides() -> None:
    empty_group = rule("{username}", r"(.*)@example\.org", "{0}")
    fallback = rule("{username}", r".*@example\.org", "guest")
    decision = MappingRules.from_documents([document(empty_group, fallback)]).map([identity("@example.org")])
    assert (decision.account, decision.mapping_index) == ("guest", 1)
    with pytest.raises(UnmappedIdentityError):
        MappingRules.from_documents([document(rule("{username}", ".*", "{email}"))]).map(
            [identity("alice@example.org", email="")])


def test_unmapped_message_names_first_identity_and_hides_rules() -> None:
    mapper = MappingRules.from_documents([document(DOMAIN_STRIP)], source="/etc/mep/x/identity_mapping.json")
    with pytest.raises(UnmappedIdentityError) as raised:
        mapper.map([identity("alice@elsewhere.org"), identity("al@elsewhere.org")])
    assert str(raised.value) == (
        "no local account is mapped to alice@elsewhere.org on this endpoint;"
        " ask your admin to add a mapping"
    )
    assert "/etc/mep/x/identity_mapping.json" in raised.value.admin_detail  # type: ignore[attr-defined]


def test_ambiguous_set_is_refused() -> None:
    mapper = MappingRules.from_documents([document(DOMAIN_STRIP)])
    with pytest.raises(MappingError) as raised:
        mapper.map([identity("alice@example.org"), identity("bob@example.org", status="private")])
    message = str(raised.value)
    assert message.startswith("ambiguous:")
    for expected in ("alice@example.org", "bob@example.org", "'alice'", "'bob'", "ask your admin"):
        assert expected in message
    assert "document 0, mapping 0" in raised.value.admin_detail  # type: ignore[attr-defined]


EVALUATION_ERRORS = [
    (
        "missing property in the first document never falls through",
        [document(rule("{organization}", "physics", "phys")), document(DOMAIN_STRIP)],
        [identity("alice@example.org", organization=None)],
        "document 0, mapping 0",
    ),
    (
        "property that is not text",
        [document(rule("{organization}", "42", "num"))],
        [identity("alice@example.org", organization=42)],
        "document 0, mapping 0",
    ),
    (
        "group that took no part in the match",
        [document(rule("{username}", "(a)?b", "{0}"))],
        [identity("b")],
        "document 0, mapping 0",
    ),
    (
        "error in a later mapping after earlier ones missed",
        [document(DOMAIN_STRIP, rule("{name}", ".*", "x"))],
        [identity("alice@other.org", name=None)],
        "document 0, mapping 1",
    ),
    (
        "error for one identity although another matched",
        [document(rule("{organization}", "physics", "phys"))],
        [identity("alice@example.org"), identity("bob@example.org", organization=None)],
        "document 0, mapping 0",
    ),
    (
        "error in a later document",
        [document(rule("{username}", "nobody-matches", "x")), document(rule("{sub}", ".*", "x"))],
        [identity("alice@example.org")],
        "document 1, mapping 0",
    ),
]


@pytest.mark.parametrize(
    ("name", "documents", "identities", "detail"),
    EVALUATION_ERRORS,
    ids=[name for name, *_ in EVALUATION_ERRORS],
)
def test_evaluation_error_fails_closed(
    name: str, documents: list[dict[str, object]], identities: list[dict[str, object]], detail: str
) -> None:
    mapper = MappingRules.from_documents(documents, source="map.json")
    with pytest.raises(MappingError) as raised:
        mapper.map(identities)
    assert "ask your admin" in str(raised.value)
    assert "{" not in str(raised.value), "the user-facing message must not show the rules"
    assert f"map.json: {detail}" in raised.value.admin_detail  # type: ignore[attr-defined]


def test_skipped_identities_are_not_evaluated() -> None:
    """An unused identity missing a property is skipped, not an error (as in the reference)."""
    documents = [document(rule("{organization}", "physics", "phys"))]
    identities = [identity("a@x.org", status="unused", organization=None), identity("b@x.org")]
    assert MappingRules.from_documents(documents).map(identities).account == "phys"
    assert reference_account(documents, identities) == "phys"


@pytest.mark.parametrize(
    "identities",
    [[], "alice", [["alice"]], [{"username": "no id"}], [{"id": ""}], None],
    ids=["empty", "string", "list of lists", "no id", "empty id", "None"],
)
def test_malformed_identity_set_is_a_mapping_error(identities: object) -> None:
    mapper = MappingRules.from_documents([document(DOMAIN_STRIP)])
    with pytest.raises(MappingError):
        mapper.map(identities)  # type: ignore[arg-type]


# (mapping, part of mep's message, whether the reference also rejects it at load)
INVALID_EXPRESSIONS = [
    (rule("{username}", r"(\d+)", "{0}"), r"\d", True),
    (rule("{username}", r"\w*", "x"), r"\w", True),
    (rule("{username}", "(.*?)@x", "{0}"), "*?", True),
    (rule("{username}", "a??", "x"), "??", True),
    (rule("{username}", "*alice", "x"), "leading wildcard", True),
    (rule("{username}", "?alice", "x"), "leading wildcard", True),
    (rule("{username}", "(alice", "x"), "missing )", True),
    (rule("{username}", "a**", "x"), "multiple repeat", True),
    (rule("{username}", "(a|*b)", "x"), "nothing to repeat", True),
    (rule("{username}", "alice\\", "x"), "lone backslash", False),
    (rule("{username}", "(.*)@x", "{3}"), "only 1 group", False),
    (rule("{username}", "alice", "{0}", literal=True), "literal match has no groups", False),
    (rule("{0}", "(alice)", "x"), "'source' can't use match groups", False),
]


@pytest.mark.parametrize(
    ("bad_mapping", "reason", "reference_rejects"),
    INVALID_EXPRESSIONS,
    ids=[reason for _, reason, _ in INVALID_EXPRESSIONS],
)
def test_invalid_expression_rejected_at_load_with_location(
    bad_mapping: dict[str, object], reason: str, reference_rejects: bool
) -> None:
    if reference_rejects:
        with pytest.raises(InvalidMappingError):
            ExpressionIdentityMapping([bad_mapping])
    documents = [document(DOMAIN_STRIP), document(DOMAIN_STRIP, bad_mapping)]
    with pytest.raises(ConfigurationError) as raised:
        MappingRules.from_documents(documents, source="/etc/mep/ep/identity_mapping.json")
    message = str(raised.value)
    assert message.startswith("/etc/mep/ep/identity_mapping.json: document 1, mapping 1: ")
    assert reason in message


INVALID_DOCUMENTS = [
    (42, "not int"),
    ("expression_identity_mapping#1.0.0", "not str"),
    (None, "not NoneType"),
    ([], "no identity-mapping documents"),
    ([42], "document 0: a mapping document must be a JSON object"),
    ([{"mappings": []}], "document 0: unsupported DATA_TYPE None"),
    ([{"DATA_TYPE": "expression_identity_mapping#2.0.0", "mappings": []}], "unsupported DATA_TYPE"),
    (
        [document(DOMAIN_STRIP), {"DATA_TYPE": "external_identity_mapping#1.0.0", "command": ["true"]}],
        "document 1: the program 'true' must be an absolute path (no PATH search)",
    ),
    ([{"DATA_TYPE": "external_identity_mapping#1.0.0", "command": []}], "'command' must be a non-empty list"),
    ([{"DATA_TYPE": "external_identity_mapping#1.0.0", "command": "/bin/true"}], "'command' must be a non-empty"),
    ([{"DATA_TYPE": "external_identity_mapping#1.0.0", "command": ["/bin/true", None]}], "list of strings"),
    (
        [{"DATA_TYPE": "external_identity_mapping#1.0.0", "command": ["/bin/true"], "timeout": 9}],
        "document 0: unknown keys ['timeout']",
    ),
    (
        [{"DATA_TYPE": "external_identity_mapping#1.0.0", "command": ["/nonexistent/mapper"]}],
        "document 0: cannot use /nonexistent/mapper: its directory /nonexistent can't be opened",
    ),
    ([{"DATA_TYPE": EXPRESSION}], "document 0: 'mappings' is required and must be a list"),
    ([{"DATA_TYPE": EXPRESSION, "mappings": {}}], "'mappings' is required and must be a list"),
    ([{**document(), "comments": "x"}], "document 0: unknown keys ['comments']"),
    ([{**document(), "comment": ["x"]}], "document 0: 'comment' must be a string"),
    ([document({**DOMAIN_STRIP, "comment": 1})], "document 0, mapping 0: 'comment' must be a string"),
    ([document("not an object")], "document 0, mapping 0: a mapping must be a JSON object"),
    ([document({"source": "{username}", "match": "x"})], "mapping 0: 'output' is required"),
    ([document({"source": "{username}", "output": "x"})], "mapping 0: 'match' is required"),
    ([document(rule("{username}", "x", 7))], "mapping 0: 'output' is required and must be a string"),  # type: ignore[arg-type]
    ([document({**rule("{username}", "x", "y"), "ignore_case": "true"})], "'ignore_case' must be true or false"),
    ([document({**rule("{username}", "a.b", "y"), "literall": True})], "unknown keys ['literall']"),
]


@pytest.mark.parametrize(
    ("documents", "reason"),
    INVALID_DOCUMENTS,
    ids=[reason for _, reason in INVALID_DOCUMENTS],
)
def test_invalid_documents_rejected_at_load(documents: object, reason: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        MappingRules.from_documents(documents, source="map.json")
    assert str(raised.value).startswith("map.json: ")
    assert reason in str(raised.value)


EXAMPLES = Path(__file__).resolve().parent.parent / "identity_maps"


def load_example(name: str) -> MappingRules:
    return MappingRules.from_documents(json.loads((EXAMPLES / name).read_text()), source=name)


def test_example_domain_strip() -> None:
    mapper = load_example("example-domain-strip.json")
    assert mapper.map([identity("alice@example.org")]).account == "alice"
    assert mapper.map([identity("Bob@PHYSICS.Example.edu")]) == MappingDecision(
        account="Bob", identity_id=str(identity("Bob@PHYSICS.Example.edu")["id"]), document_index=0, mapping_index=1
    )
    with pytest.raises(UnmappedIdentityError):
        mapper.map([identity("alice@example.org.attacker.net")])


def test_example_id_table() -> None:
    mapper = load_example("example-id-table.json")
    service = identity("pipeline@clients.auth.globus.org", id="b34bb069-3b68-4d38-b4e6-bc1e4fc95332")
    assert mapper.map([service]).account == "svc_pipeline"
    alice_work = identity("alice@example.org", id="5a1d7c2e-8f0b-4c63-9e1a-2d4b6f8a0c11")
    alice_orcid = identity("0000-0002-1825-0097@orcid.org", id="c7e2f4a9-1b3d-4e5f-8a6b-9c0d1e2f3a4b")
    decision = mapper.map([alice_orcid, alice_work])
    assert (decision.account, decision.identity_id, decision.mapping_index) == ("alice", alice_work["id"], 1)
    assert mapper.map([identity("dave@example.org")]).account == "projacct"
    with pytest.raises(UnmappedIdentityError):
        mapper.map([identity("eve@example.org")])


def test_single_document_is_accepted() -> None:
    mapper = MappingRules.from_documents(document(DOMAIN_STRIP))
    assert mapper.map([identity("alice@example.org")]).account == "alice"


# Backslash-free expressions: there the reference's compiler and interpolation
# are right, used with a whole-source match (its ``^...$`` with ``.match``
# stops at the first branch that matches a prefix: ``^|..$`` takes ``^``).
_EXPRESSION_TEXT = st.text(alphabet="ab@.?*|()+[]{}^$", min_size=1, max_size=10)
_SOURCE_TEXT = st.text(alphabet="ab@.?*|()+[]{}^$\n", min_size=1, max_size=10)


def reference_whole_match(mapping: dict[str, object], subject: dict[str, object]) -> str | None:
    """The reference's compiled match and interpolation, applied to the whole source."""
    reference = ExpressionIdentityMapping([mapping])
    source = ExpressionIdentityMapping._interpolate(str(mapping["source"]), subject)
    found = reference.mappings[0]["compiled_match"].fullmatch(source)
    if found is None:
        return None
    return ExpressionIdentityMapping._interpolate(str(mapping["output"]), subject, list(found.groups()))


def assert_maps_like_reference(mapping: dict[str, object], subject: dict[str, object]) -> None:
    try:
        expected = reference_whole_match(mapping, subject)
    except InvalidMappingError:
        with pytest.raises(ConfigurationError):
            MappingRules.from_documents(document(mapping))
        return
    except IdentityMappingError:
        with pytest.raises(MappingError):
            MappingRules.from_documents(document(mapping)).map([subject])
        return
    mapper = MappingRules.from_documents(document(mapping))
    if not expected:  # None, or "": mep's deliberate difference (an empty output is no mapping)
        with pytest.raises(UnmappedIdentityError):
            mapper.map([subject])
    else:
        assert mapper.map([subject]).account == expected


@settings(max_examples=400, deadline=None)
@given(match=_EXPRESSION_TEXT, username=_SOURCE_TEXT, literal=st.booleans(), ignore_case=st.booleans())
def test_agrees_with_reference_on_backslash_free_expressions(
    match: str, username: str, literal: bool, ignore_case: bool
) -> None:
    mapping = rule("{username}", match, "{username}", literal=literal, ignore_case=ignore_case)
    assert_maps_like_reference(mapping, identity(username))


@settings(max_examples=200, deadline=None)
@given(match=_EXPRESSION_TEXT.filter(lambda text: "(" in text), username=_SOURCE_TEXT)
def test_group_output_agrees_with_reference(match: str, username: str) -> None:
    assert_maps_like_reference(rule("{username}", match, "{0}"), identity(username))


# --- files -----------------------------------------------------------------


@pytest.fixture
def policy_dir() -> Iterator[Path]:
    """A root-owned 0700 directory under /var/tmp (sticky, root-owned parents)."""
    directory = Path(tempfile.mkdtemp(prefix="mep-policy-", dir="/var/tmp"))
    try:
        yield directory
    finally:
        subprocess.run(["rm", "-rf", "--", str(directory)], check=True)


def write(path: Path, content: str | bytes, mode: int = 0o644) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return path


@pytest.mark.root
def test_from_file_maps(policy_dir: Path) -> None:
    path = write(policy_dir / "identity_mapping.json", json.dumps([document(DOMAIN_STRIP)]))
    mapper = IdentityMapper.from_file(path, trusted_owner_uids=ROOT_ONLY)
    assert mapper.map([identity("alice@example.org")]).account == "alice"


@pytest.mark.root
@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("[{", "not valid JSON"),
        (b"\xff\xfe[]", "not valid JSON"),
        ('{"DATA_TYPE": "expression_identity_mapping#1.0.0", "mappings": [], "mappings": []}', "duplicate keys ['mappings']"),
        (json.dumps([document({**DOMAIN_STRIP, "literal": False}), document(rule("{x}", "(", "y"))]), "document 1, mapping 0"),
    ],
    ids=["truncated", "not utf-8", "duplicate key", "bad second document"],
)
def test_from_file_rejects_bad_content(policy_dir: Path, content: str | bytes, reason: str) -> None:
    path = write(policy_dir / "identity_mapping.json", content)
    with pytest.raises(ConfigurationError) as raised:
        IdentityMapper.from_file(path, trusted_owner_uids=ROOT_ONLY)
    assert str(raised.value).startswith(f"{path}: ")
    assert reason in str(raised.value)


@pytest.mark.root
def test_from_file_checks_permissions(policy_dir: Path) -> None:
    path = write(policy_dir / "identity_mapping.json", json.dumps(document(DOMAIN_STRIP)), mode=0o666)
    with pytest.raises(ConfigurationError, match="chmod go-w"):
        IdentityMapper.from_file(path, trusted_owner_uids=ROOT_ONLY)


@pytest.mark.root
def test_policy_file_good_is_read(policy_dir: Path) -> None:
    path = write(policy_dir / "policy.json", "content", mode=0o600)
    assert read_policy_file(path, trusted_owner_uids=ROOT_ONLY) == b"content"


@pytest.mark.root
@pytest.mark.parametrize("mode", [0o666, 0o646, 0o620], ids=oct)
def test_policy_file_writable_by_others_is_refused(policy_dir: Path, mode: int) -> None:
    path = write(policy_dir / "policy.json", "x", mode=mode)
    with pytest.raises(ConfigurationError) as raised:
        read_policy_file(path, trusted_owner_uids=ROOT_ONLY)
    assert str(raised.value) == (
        f"refusing to use {path}: it is writable by group or others (mode {mode:04o});"
        f" fix with: chmod go-w {path}"
    )


@pytest.mark.root
def test_policy_file_owned_by_another_uid_is_refused(policy_dir: Path) -> None:
    path = write(policy_dir / "policy.json", "x")
    os.chown(path, 4242, 4242)
    with pytest.raises(ConfigurationError) as raised:
        read_policy_file(path, trusted_owner_uids=ROOT_ONLY)
    assert "is owned by uid 4242, not by uid 0 (root)" in str(raised.value)
    assert f"chown root {path}" in str(raised.value)
    # Single-user mode trusts its own uid as well.
    assert read_policy_file(path, trusted_owner_uids=frozenset({0, 4242})) == b"x"


@pytest.mark.root
def test_policy_file_symlink_is_refused(policy_dir: Path) -> None:
    target = write(policy_dir / "real.json", "x")
    link = policy_dir / "policy.json"
    link.symlink_to(target)
    with pytest.raises(ConfigurationError, match="is a symlink"):
        read_policy_file(link, trusted_owner_uids=ROOT_ONLY)


@pytest.mark.root
@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777], ids=oct)
def test_policy_file_in_writable_directory_is_refused(policy_dir: Path, mode: int) -> None:
    directory = policy_dir / "shared"
    directory.mkdir()
    directory.chmod(mode)
    path = write(directory / "policy.json", "x")
    with pytest.raises(ConfigurationError) as raised:
        read_policy_file(path, trusted_owner_uids=ROOT_ONLY)
    assert f"its directory {directory} is writable by group or others" in str(raised.value)
    assert f"chmod go-w {directory}" in str(raised.value)


@pytest.mark.root
def test_policy_file_in_sticky_directory_is_read(policy_dir: Path) -> None:
    directory = policy_dir / "sticky"
    directory.mkdir()
    directory.chmod(0o1777)
    path = write(directory / "policy.json", "x")
    assert read_policy_file(path, trusted_owner_uids=ROOT_ONLY) == b"x"


@pytest.mark.root
def test_policy_file_in_directory_of_another_uid_is_refused(policy_dir: Path) -> None:
    directory = policy_dir / "theirs"
    directory.mkdir(mode=0o755)
    os.chown(directory, 4242, 4242)
    path = write(directory / "policy.json", "x")
    with pytest.raises(ConfigurationError, match=f"its directory {directory} is owned by uid 4242"):
        read_policy_file(path, trusted_owner_uids=ROOT_ONLY)


@pytest.mark.root
def test_policy_file_symlinked_directory_is_checked_where_it_points(policy_dir: Path) -> None:
    trusted = policy_dir / "trusted"
    trusted.mkdir(mode=0o755)
    write(trusted / "policy.json", "x")
    (policy_dir / "via-link").symlink_to(trusted)
    assert read_policy_file(policy_dir / "via-link" / "policy.json", trusted_owner_uids=ROOT_ONLY) == b"x"

    untrusted = policy_dir / "untrusted"
    untrusted.mkdir(mode=0o755)
    write(untrusted / "policy.json", "x")
    os.chown(untrusted, 4242, 4242)
    (policy_dir / "bad-link").symlink_to(untrusted)
    with pytest.raises(ConfigurationError, match=f"its directory {untrusted} is owned by uid 4242"):
        read_policy_file(policy_dir / "bad-link" / "policy.json", trusted_owner_uids=ROOT_ONLY)


@pytest.mark.root
def test_policy_file_that_is_not_regular_is_refused(policy_dir: Path) -> None:
    os.mkfifo(policy_dir / "fifo", 0o600)
    (policy_dir / "dir").mkdir(mode=0o700)
    for name in ("fifo", "dir"):
        with pytest.raises(ConfigurationError, match="it is not a regular file"):
            read_policy_file(policy_dir / name, trusted_owner_uids=ROOT_ONLY)


@pytest.mark.root
def test_policy_file_missing(policy_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="No such file or directory"):
        read_policy_file(policy_dir / "absent.json", trusted_owner_uids=ROOT_ONLY)
    with pytest.raises(ConfigurationError, match="its directory .*/absent can't be opened"):
        read_policy_file(policy_dir / "absent" / "x.json", trusted_owner_uids=ROOT_ONLY)


@pytest.mark.root
def test_policy_file_single_user_mode_as_that_user(policy_dir: Path) -> None:
    """Run as a real non-root account: root would mask permission bugs."""
    with unix_account() as account:
        policy_dir.chmod(0o755)
        own = policy_dir / "own"
        own.mkdir(mode=0o700)
        os.chown(own, account.pw_uid, account.pw_gid)
        path = write(own / "policy.json", "mine", mode=0o600)
        os.chown(path, account.pw_uid, account.pw_gid)
        script = (
            "import os, sys\n"
            "from pathlib import Path\n"
            "from mep.errors import ConfigurationError\n"
            "from mep.root.policy_files import read_policy_file\n"
            "path = Path(sys.argv[1])\n"
            "print(read_policy_file(path, trusted_owner_uids=frozenset({0, os.getuid()})).decode())\n"
            "try:\n"
            "    read_policy_file(path, trusted_owner_uids=frozenset({0}))\n"
            "except ConfigurationError as error:\n"
            "    print(error)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script, str(path)],
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            env={"PATH": "/usr/bin:/bin"},
            cwd="/",
            capture_output=True,
            text=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    mine, refusal = result.stdout.splitlines()
    assert mine == "mine"
    assert refusal.startswith(f"refusing to use {path}: its directory {own} is owned by uid {account.pw_uid}")

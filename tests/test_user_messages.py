"""Refusals a researcher can act on without guessing (issue 13): schema errors and undefined template variables.

A schema refusal says which option, the offending value and what the admin's
schema says the option should be (its ``title``, ``description`` and
``examples``), instead of a bare regex; the SDK (at ``submit``) and the
endpoint (after the privilege drop) give the same words. A template's
"undefined variable" error advises passing an option only when the schema
offers it; otherwise it says the admin's template is to fix. The first tests
use the shared code directly; the last ones run a real service, a root
manager and a real mapped account.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import mep
from mep.config.options import OptionsSchema
from mep.config.render import TemplateRenderer
from mep.errors import ConfigInvalidError, TemplateError
from mep.sdk.endpoint_info import OptionsCheck
from tests.harness import DOMAIN_STRIP, expression_mapping, wait_for

CONTEXT: dict[str, Any] = {"mapped_user": {"name": "alice", "home": "/home/alice"}, "user_runtime": {},
                           "endpoint": {"name": "login"}}

QUEUE_DESCRIPTION = "A queue of this site, in lower case: letters, digits and '_'."
SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "queue": {"title": "Queue", "description": QUEUE_DESCRIPTION, "type": "string",
                  "pattern": "^[a-z0-9_]{1,32}$", "examples": ["short", "long_7"]},
        "image": {"description": "A container image this site provides.", "enum": ["python:3.11", "python:3.12"]},
        "environment": {"description": "Variables exported before the workers start.", "type": "object",
                        "propertyNames": {"pattern": "^[A-Z_]+$"}, "additionalProperties": {"type": "string"}},
        "account": {"$ref": "#/$defs/account"},
        "bare": {"type": "string", "pattern": "^[a-z]+$"},
        "workers": {"description": "Worker processes in the pool.", "type": "integer", "minimum": 1},
        "broken": {"description": "Make the template use a variable this schema does not offer.",
                   "type": "boolean"},
    },
    "$defs": {"account": {"description": "The project account to charge.", "type": "string",
                          "pattern": "^[a-z]{2}[0-9]{4}$"}},
}
# Renders with {"workers": N}; without workers, 'workers' is undefined (an option the schema offers);
# with {"broken": true}, 'cores' is undefined (a variable the schema does not offer).
TEMPLATE = """\
engine:
  type: process
{% if broken is defined %}
  workers: {{ cores }}
{% else %}
  workers: {{ workers }}
{% endif %}
idle_timeout: 60
"""


def refusal(config: dict[str, Any], schema: dict[str, Any] = SCHEMA) -> str:
    with pytest.raises(ConfigInvalidError) as raised:
        OptionsSchema(json.dumps(schema), "site.schema.json").check(config)
    return str(raised.value)


def test_a_pattern_refusal_shows_the_description_title_and_examples_not_the_regex() -> None:
    message = refusal({"queue": "x y"})
    assert message == (f"user_endpoint_config.queue: the value 'x y' is not accepted — queue: {QUEUE_DESCRIPTION} "
                       '(e.g. "short", "long_7")')
    assert "^[a-z0-9_]" not in message


def test_a_title_the_description_does_not_repeat_is_shown_before_it() -> None:
    schema = {"properties": {"q": {"title": "Batch queue", "description": "Lower case.", "pattern": "^[a-z]+$"}}}
    assert refusal({"q": "X"}, schema) == "user_endpoint_config.q: the value 'X' is not accepted — q: Batch queue. " \
                                          "Lower case."


def test_an_enum_refusal_lists_the_values_and_the_description() -> None:
    assert refusal({"image": "docker.io/evil"}) == (
        "user_endpoint_config.image: 'docker.io/evil' is not one of ['python:3.11', 'python:3.12'] — image: "
        "A container image this site provides.")


def test_a_refused_name_inside_an_option_gets_that_options_description() -> None:
    assert refusal({"environment": {"A=$(id)": "x"}}) == (
        "user_endpoint_config.environment: the name 'A=$(id)' is not accepted — environment: Variables exported "
        "before the workers start.")
    assert refusal({"environment": {"A": 3}}) == (
        "user_endpoint_config.environment.A: 3 is not of type 'string' — environment: Variables exported before "
        "the workers start.")


def test_a_referenced_definition_brings_its_description() -> None:
    assert refusal({"account": "root"}) == (
        "user_endpoint_config.account: the value 'root' is not accepted — account: The project account to charge.")


def test_without_a_description_the_schemas_own_words_are_all_there_is() -> None:
    assert refusal({"bare": "X"}) == "user_endpoint_config.bare: 'X' does not match '^[a-z]+$'"


def test_a_missing_required_option_is_described() -> None:
    schema = {**SCHEMA, "required": ["account"]}
    assert refusal({}, schema) == ("user_endpoint_config: 'account' is a required property — account: The project "
                                   "account to charge.")


def test_a_typo_gets_the_closest_option_and_the_list() -> None:
    message = refusal({"worker": 2})
    assert message.startswith("user_endpoint_config: Additional properties are not allowed ('worker' was "
                              "unexpected) (did you mean 'workers'?); the options are: queue, image, environment")


def renderer(tmp_path: Path, schema: dict[str, Any], template: str = TEMPLATE) -> TemplateRenderer:
    return TemplateRenderer(tmp_path / "site.yaml.j2", tmp_path / "site.schema.json", template_text=template,
                            schema_text=json.dumps(schema))


def undefined(renderer_: TemplateRenderer, config: dict[str, Any]) -> str:
    with pytest.raises(TemplateError) as raised:
        renderer_.render(config, **CONTEXT)
    return str(raised.value)


def test_an_undefined_option_the_schema_offers_is_asked_for_with_its_description(tmp_path: Path) -> None:
    message = undefined(renderer(tmp_path, SCHEMA), {})
    assert message == (f"template {tmp_path / 'site.yaml.j2'}, line 6: 'workers' is undefined: pass 'workers' "
                       "(Worker processes in the pool.) in user_endpoint_config, or the admin can make it optional "
                       "in the template with `is defined` or `| default(...)`")


@pytest.mark.parametrize("schema", [
    {"type": "object"},  # names it does not list are allowed
    {"type": "object", "additionalProperties": False, "patternProperties": {"^w": {"type": "integer"}}},
], ids=["open", "pattern"])
def test_an_undefined_name_an_open_schema_lets_through_is_asked_for(tmp_path: Path, schema: dict[str, Any]) -> None:
    assert "'workers' is undefined: pass 'workers' in user_endpoint_config" in undefined(renderer(tmp_path, schema), {})


@pytest.mark.parametrize("schema", [
    SCHEMA,  # lists options, 'cores' not among them
    {"type": "object", "additionalProperties": False, "properties": {"broken": {}}},
    {"type": "object", "properties": {"broken": {}}, "unevaluatedProperties": False},
    {"type": "object", "properties": {"broken": {}, "cores": False}},
    {"type": "object", "propertyNames": {"enum": ["broken"]}},
], ids=["additional", "no-description", "unevaluated", "false-schema", "property-names"])
def test_an_undefined_variable_the_schema_forbids_is_the_admins_to_fix(tmp_path: Path, schema: dict[str, Any]) -> None:
    message = undefined(renderer(tmp_path, schema), {"broken": True})
    assert message == (f"template {tmp_path / 'site.yaml.j2'}, line 4: 'cores' is undefined: the admin's template "
                       "uses a variable its schema (site.schema.json) does not offer, so no user_endpoint_config can "
                       "set it; the admin must define it or guard it with `is defined`")
    assert "pass" not in message


def _client(deploy, identity) -> mep.Client:  # noqa: ANN001
    return mep.Client(service=deploy.address, service_key=deploy.service_key, token=identity.token)


def double(x: int) -> int:
    return 2 * x


@pytest.fixture
def site(deploy, account_factory):  # noqa: ANN001, ANN201
    """A root manager with the site's template and schema above, a mapped account and its identity."""
    policy = deploy.root / "site"
    policy.mkdir()
    (policy / "site.yaml.j2").write_text(TEMPLATE)
    (policy / "site.schema.json").write_text(json.dumps(SCHEMA))
    account = account_factory("mepmsg")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), template=policy / "site.yaml.j2",
                                   schema=policy / "site.schema.json")
    identity = deploy.identity(f"{account.pw_name}@example.org")
    wait_for(lambda: _client(deploy, identity).endpoint_info(manager.endpoint_id).schema is not None,
             what="the router to describe the endpoint")
    return deploy, manager, identity, policy


@pytest.mark.root
def test_a_schema_refusal_reads_the_same_at_submit_and_on_the_endpoint(site, monkeypatch) -> None:  # noqa: ANN001
    deploy, manager, identity, _ = site
    config = {"workers": 1, "queue": "Big Queue"}
    with deploy.executor(identity, manager, user_endpoint_config=config) as executor:
        with pytest.raises(mep.ConfigInvalidError) as at_submit:
            executor.submit(double, 1)
        executor.user_endpoint_config = {"workers": 1, "queue": "short"}
        assert executor.submit(double, 21).result(timeout=120) == 42
    assert str(at_submit.value) == (f"user_endpoint_config.queue: the value 'Big Queue' is not accepted — queue: "
                                    f'{QUEUE_DESCRIPTION} (e.g. "short", "long_7")')
    # The endpoint's own refusal, after the privilege drop, from an SDK that does not check first (an older mep):
    monkeypatch.setattr(OptionsCheck, "check", lambda self, frozen, user_config: None)
    with deploy.executor(identity, manager, user_endpoint_config=config) as unchecked:
        future = unchecked.submit(double, 1)
    with pytest.raises(mep.ConfigInvalidError) as on_endpoint:
        future.result(timeout=120)
    assert str(on_endpoint.value) == str(at_submit.value)


@pytest.mark.root
def test_an_undefined_template_variable_advises_only_what_the_schema_offers(site) -> None:  # noqa: ANN001
    deploy, manager, identity, policy = site
    with deploy.executor(identity, manager, user_endpoint_config={}) as executor:
        missing_option = executor.submit(double, 1)
        executor.user_endpoint_config = {"broken": True}
        admins_variable = executor.submit(double, 1)
    with pytest.raises(mep.TemplateError) as asked:
        missing_option.result(timeout=120)
    with pytest.raises(mep.TemplateError) as admins:
        admins_variable.result(timeout=120)
    assert str(asked.value) == (
        f"template {policy / 'site.yaml.j2'}, line 6: 'workers' is undefined: pass 'workers' (Worker processes in "
        "the pool.) in user_endpoint_config, or the admin can make it optional in the template with `is defined` "
        "or `| default(...)`")
    assert str(admins.value) == (
        f"template {policy / 'site.yaml.j2'}, line 4: 'cores' is undefined: the admin's template uses a variable its "
        "schema (site.schema.json) does not offer, so no user_endpoint_config can set it; the admin must define it "
        "or guard it with `is defined`")
    assert "pass" not in str(admins.value)

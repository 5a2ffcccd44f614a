"""The user endpoint config pipeline: schema check, sandboxed rendering, YAML typing, final model gate.

These are security guarantees (root-spawner checklist items 18-20): a researcher's
values can't add, remove or retype keys, can't shadow mep's names, and a template
can't switch on anything the model doesn't know.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.sandbox import SecurityError

from mep.config.endpoint import ProcessEngine, UserEndpointConfig
from mep.config.render import RESERVED_NAMESPACE, TemplateRenderer
from mep.errors import ConfigInvalidError, ConfigurationError, TemplateError

SHIPPED = Path(__file__).parents[1] / "templates"
CONTEXT: dict[str, Any] = {
    "mapped_user": {"name": "alice", "uid": 1234, "home": "/home/alice"},
    "user_runtime": {"python_version": "3.11.2"},
    "endpoint": {"id": "0b5e7a4c-0000-4000-8000-000000000001", "name": "login"},
}

# Places a free string in a block value, a flow mapping and a flow sequence: three
# syntactic contexts an injected value might try to break out of.
LABEL_TEMPLATE = """\
label: {{ label }}
nested: {inner: {{ label }}, after: 1}
items: [{{ label }}, 2]
idle_timeout: 300
"""
LABEL_SCHEMA = {"type": "object", "additionalProperties": False, "properties": {"label": {"type": "string"}}}


def make_renderer(tmp_path: Path, template: str, schema: dict[str, Any] | None = None) -> TemplateRenderer:
    template_path = tmp_path / "t.yaml.j2"
    schema_path = tmp_path / "t.schema.json"
    template_path.write_text(template)
    schema_path.write_text(json.dumps({"type": "object"} if schema is None else schema))
    return TemplateRenderer(template_path, schema_path)


def text_renderer(template: str, schema: dict[str, Any]) -> TemplateRenderer:
    """A renderer from texts, for property tests (hypothesis can't reuse function-scoped fixtures)."""
    return TemplateRenderer(
        Path("t.yaml.j2"), Path("t.schema.json"), template_text=template, schema_text=json.dumps(schema)
    )


def label_document(renderer: TemplateRenderer, label: str) -> Any:
    return yaml.safe_load(renderer.render_text({"label": label}, **CONTEXT))


def assert_clean(message: str) -> None:
    """No traceback, object repr or memory address in a message a researcher will read."""
    assert "Traceback" not in message
    assert "0x" not in message
    assert " object at " not in message
    assert "\n" not in message


@pytest.fixture
def shipped() -> TemplateRenderer:
    return TemplateRenderer(SHIPPED / "local.yaml.j2", SHIPPED / "local.schema.json")


@pytest.fixture
def label_renderer(tmp_path: Path) -> TemplateRenderer:
    return make_renderer(tmp_path, LABEL_TEMPLATE, LABEL_SCHEMA)


# --- the shipped template -------------------------------------------------------------------------


def test_shipped_template_defaults(shipped: TemplateRenderer) -> None:
    config = shipped.render({}, **CONTEXT)
    assert config == UserEndpointConfig(engine=ProcessEngine(workers=2), idle_timeout=300.0)


def test_shipped_template_uses_given_values(shipped: TemplateRenderer) -> None:
    config = shipped.render({"workers": 64, "idle_timeout": 10.5}, **CONTEXT)
    assert config.engine.type == "process"
    assert config.engine.workers == 64
    assert config.idle_timeout == 10.5


def test_shipped_template_only_one_value_given(shipped: TemplateRenderer) -> None:
    config = shipped.render({"idle_timeout": 86400}, **CONTEXT)
    assert (config.engine.workers, config.idle_timeout) == (2, 86400.0)


# what the shipped schema says of each option, after every refusal of it
WORKERS = " — workers: Worker processes in the pool."
IDLE_TIMEOUT = " — idle_timeout: Seconds without tasks before the endpoint exits."


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"workers": 0}, "user_endpoint_config.workers: 0 is less than the minimum of 1" + WORKERS),
        ({"workers": 65}, "user_endpoint_config.workers: 65 is greater than the maximum of 64" + WORKERS),
        ({"workers": "3"}, "user_endpoint_config.workers: '3' is not of type 'integer'" + WORKERS),
        ({"workers": True}, "user_endpoint_config.workers: True is not of type 'integer'" + WORKERS),
        ({"workers": 2.5}, "user_endpoint_config.workers: 2.5 is not of type 'integer'" + WORKERS),
        ({"idle_timeout": 9}, "user_endpoint_config.idle_timeout: 9 is less than the minimum of 10" + IDLE_TIMEOUT),
        ({"idle_timeout": "300"}, "user_endpoint_config.idle_timeout: '300' is not of type 'number'" + IDLE_TIMEOUT),
        ({"user": "root"}, "user_endpoint_config: Additional properties are not allowed ('user' was unexpected); "
                           "the options are: workers, idle_timeout, python_env, container_image"),
        ({"python_env": "../x"}, "user_endpoint_config.python_env: the value '../x' is not accepted — python_env: "
                                 "A virtual or conda environment under your home directory (relative path); tasks "
                                 "run with its bin/python."),
    ],
)
def test_shipped_schema_violations_name_the_property(
    shipped: TemplateRenderer, options: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigInvalidError) as raised:
        shipped.render(options, **CONTEXT)
    assert str(raised.value) == expected


def test_nested_schema_violation_names_the_full_path(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"modules": {"type": "array", "items": {"type": "string", "maxLength": 8}}},
    }
    renderer = make_renderer(tmp_path, "idle_timeout: 60\n", schema)
    with pytest.raises(ConfigInvalidError) as raised:
        renderer.render({"modules": ["gcc", 7]}, **CONTEXT)
    assert str(raised.value) == "user_endpoint_config.modules[1]: 7 is not of type 'string'"


def test_schema_draft_is_2020_12_by_default(tmp_path: Path) -> None:
    # prefixItems exists only from Draft 2020-12 on; an older draft would ignore it.
    schema = {"type": "object", "properties": {"pair": {"prefixItems": [{"type": "integer"}]}}}
    renderer = make_renderer(tmp_path, "idle_timeout: 60\n", schema)
    with pytest.raises(ConfigInvalidError, match=r"user_endpoint_config\.pair\[0\]: 'x' is not of type 'integer'"):
        renderer.render({"pair": ["x"]}, **CONTEXT)


def test_schema_declaring_draft_7_is_validated_as_draft_7(tmp_path: Path) -> None:
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {"pair": {"prefixItems": [{"type": "integer"}]}},
    }
    renderer = make_renderer(tmp_path, "idle_timeout: 60\n", schema)
    assert renderer.render({"pair": ["x"]}, **CONTEXT).idle_timeout == 60.0


# --- user values can't change the document's shape ------------------------------------------------

INJECTIONS = [
    '"\nidle_timeout: 1',
    "x\nidle_timeout: 1",
    "x # comment",
    "# comment",
    "{a: b}",
    "[1, 2]",
    "x, evil: 1}",
    "x], evil: [1",
    "!!python/object/apply:os.system ['id']",
    "!!int 5",
    "*alias",
    "&anchor x",
    "<<: {idle_timeout: 1}",
    "x\u2028idle_timeout: 1",
    "x\u2029idle_timeout: 1",
    "x\u0085idle_timeout: 1",
    "x\ridle_timeout: 1",
    "a 'single' and \"double\" quote",
    "back\\slash\\",
    '\\"\nidle_timeout: 1\n"',
    "{{ mep }}{% raw %}",
    "tab\there",
    "nul\x00del\x7fbell\x07esc\x1b",
    "bom\ufeffnbsp\u00a0zero-width\u200b",
    "emoji \U0001f600 and e\u0301",
    "lone surrogate \ud800",
    "---\nidle_timeout: 1\n...",
    "   leading and trailing spaces   ",
    "",
]


@pytest.mark.parametrize("label", INJECTIONS)
def test_injected_string_round_trips_and_adds_no_key(label_renderer: TemplateRenderer, label: str) -> None:
    document = label_document(label_renderer, label)
    assert document == {"label": label, "nested": {"inner": label, "after": 1}, "items": [label, 2], "idle_timeout": 300}


@pytest.mark.parametrize("label", ["5", "3.0", "1e3", "0x10", "0o17", "true", "yes", "on", "off", "no", "null", "~", ".inf", ".nan", "2024-01-01", "1:30"])
def test_string_that_looks_like_another_type_stays_a_string(label_renderer: TemplateRenderer, label: str) -> None:
    document = label_document(label_renderer, label)
    assert type(document["label"]) is str
    assert document["label"] == label


@settings(max_examples=300, deadline=None)
@given(label=st.text())
def test_any_string_round_trips(label: str) -> None:
    document = label_document(text_renderer(LABEL_TEMPLATE, LABEL_SCHEMA), label)
    assert document == {"label": label, "nested": {"inner": label, "after": 1}, "items": [label, 2], "idle_timeout": 300}


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES)
def test_any_json_value_keeps_its_type_and_value(value: Any) -> None:
    renderer = text_renderer("value: {{ value }}\nnested: [{{ value }}]\n", {})
    document = yaml.safe_load(renderer.render_text({"value": value}, **CONTEXT))
    # json.dumps compares types too (True vs 1, 1 vs 1.0) where == would not.
    assert json.dumps(document, sort_keys=True) == json.dumps({"value": value, "nested": [value]}, sort_keys=True)


@pytest.mark.parametrize("number", [1e-05, 1e16, -2.5e-300, 5e-324, 0.1, -0.0, 1.0])
def test_floats_stay_floats(tmp_path: Path, number: float) -> None:
    renderer = make_renderer(tmp_path, "value: {{ value }}\n")
    value = yaml.safe_load(renderer.render_text({"value": number}, **CONTEXT))["value"]
    assert type(value) is float
    assert value == number


def test_shipped_template_refuses_a_string_for_an_integer_even_without_schema_types(tmp_path: Path) -> None:
    # With a schema that checks nothing, the typed scalar still reaches the model as a string.
    template = (SHIPPED / "local.yaml.j2").read_text()
    renderer = make_renderer(tmp_path, template, {"type": "object"})
    with pytest.raises(ConfigInvalidError) as raised:
        renderer.render({"workers": "5"}, **CONTEXT)
    assert "engine.workers: Input should be a valid integer" in str(raised.value)
    assert "t.yaml.j2" in str(raised.value)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"value": float("nan")}, "user_endpoint_config.value: nan is not a JSON number"),
        ({"value": float("inf")}, "user_endpoint_config.value: inf is not a JSON number"),
        ({"value": (1, 2)}, "user_endpoint_config.value: a tuple is not a JSON value"),
        ({"value": {1, 2}}, "user_endpoint_config.value: a set is not a JSON value"),
        ({"value": [b"x"]}, "user_endpoint_config.value[0]: a bytes is not a JSON value"),
        ({"value": {1: "x"}}, "user_endpoint_config.value: keys must be strings"),
    ],
)
def test_non_json_values_refused(tmp_path: Path, options: dict[str, Any], expected: str) -> None:
    renderer = make_renderer(tmp_path, "value: {{ value }}\n")
    with pytest.raises(ConfigInvalidError) as raised:
        renderer.render_text(options, **CONTEXT)
    assert str(raised.value) == expected


def test_deeply_nested_value_refused(tmp_path: Path) -> None:
    value: Any = "x"
    for _ in range(40):
        value = [value]
    renderer = make_renderer(tmp_path, "value: {{ value }}\n")
    with pytest.raises(ConfigInvalidError, match="nested more than 32 levels"):
        renderer.render_text({"value": value}, **CONTEXT)


def test_user_mapping_is_not_mutated(tmp_path: Path) -> None:
    options = {"value": {"a": [1]}}
    renderer = make_renderer(tmp_path, "{% set _ = value.update({'b': 2}) %}x: 1\n")
    with pytest.raises(TemplateError):
        renderer.render_text(options, **CONTEXT)
    assert options == {"value": {"a": [1]}}


# --- reserved names -------------------------------------------------------------------------------


def test_reserved_namespace_is_readable(tmp_path: Path) -> None:
    renderer = make_renderer(
        tmp_path,
        "user: {{ mep.mapped_user.name }}\nuid: {{ mep.mapped_user.uid }}\n"
        "dir: {{ mep.mapped_user.home ~ '/mep/' ~ mep.endpoint.name }}\npy: {{ mep.user_runtime.python_version }}\n",
    )
    document = yaml.safe_load(renderer.render_text({}, **CONTEXT))
    assert document == {"user": "alice", "uid": 1234, "dir": "/home/alice/mep/login", "py": "3.11.2"}


def test_mep_key_refused_even_when_schema_allows_it(tmp_path: Path) -> None:
    assert RESERVED_NAMESPACE == "mep"
    schema = {"type": "object", "properties": {"mep": {}}}
    renderer = make_renderer(tmp_path, "user: {{ mep.mapped_user.name }}\n", schema)
    hostile = {"mep": {"mapped_user": {"name": "root"}, "user_runtime": {}, "endpoint": {}}}
    with pytest.raises(ConfigInvalidError) as raised:
        renderer.render_text(hostile, **CONTEXT)
    assert "'mep' is reserved" in str(raised.value)


@pytest.mark.parametrize("name", ["range", "dict", "namespace"])
def test_jinja_global_names_are_reserved(tmp_path: Path, name: str) -> None:
    renderer = make_renderer(tmp_path, "n: {{ range(3) | list }}\n")
    with pytest.raises(ConfigInvalidError, match=f"'{name}' is reserved"):
        renderer.render_text({name: 1}, **CONTEXT)


@pytest.mark.parametrize("name", ["a-b", "1x", "a.b", "", "é", "a b", "x\ny"])
def test_non_identifier_option_names_refused(tmp_path: Path, name: str) -> None:
    renderer = make_renderer(tmp_path, "x: 1\n")
    with pytest.raises(ConfigInvalidError) as raised:
        renderer.render_text({name: 1}, **CONTEXT)
    assert "is not allowed" in str(raised.value)
    assert_clean(str(raised.value))


def test_user_config_must_be_a_mapping(shipped: TemplateRenderer) -> None:
    with pytest.raises(ConfigInvalidError, match="must be a mapping"):
        shipped.render([("workers", 2)], **CONTEXT)  # type: ignore[arg-type]


# --- template failures ----------------------------------------------------------------------------


def test_undefined_variable_names_variable_file_and_line(tmp_path: Path) -> None:
    renderer = make_renderer(tmp_path, "{# header #}\nengine:\n  workers: {{ workers }}\n")
    with pytest.raises(TemplateError) as raised:
        renderer.render({}, **CONTEXT)
    message = str(raised.value)
    assert "'workers' is undefined" in message
    assert f"template {tmp_path / 't.yaml.j2'}, line 3" in message
    assert_clean(message)


def test_guarded_optional_value_renders_without_it(tmp_path: Path) -> None:
    template = "engine:\n  type: process\n{% if workers is defined %}\n  workers: {{ workers }}\n{% endif %}\n"
    renderer = make_renderer(tmp_path, template)
    assert renderer.render({}, **CONTEXT).engine.workers == 1
    assert renderer.render({"workers": 7}, **CONTEXT).engine.workers == 7


def test_syntax_error_names_file_and_line_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as raised:
        make_renderer(tmp_path, "engine:\n  type: process\n{% if %}\n")
    message = str(raised.value)
    assert f"template {tmp_path / 't.yaml.j2'}, line 3" in message
    assert_clean(message)


@pytest.mark.parametrize(
    "expression",
    [
        "''.__class__.__mro__",
        "''.__class__",
        "workers.__class__.__subclasses__()",
        "mep.mapped_user.__init__.__globals__",
        "mep.items.__self__",
        "lipsum.__globals__",
        "cycler.__init__.__globals__",
        "dict.__subclasses__()",
    ],
)
def test_sandbox_escape_is_a_template_error(tmp_path: Path, expression: str) -> None:
    renderer = make_renderer(tmp_path, f"x: 1\ny: {{{{ {expression} }}}}\n")
    with pytest.raises(TemplateError) as raised:
        renderer.render({"workers": 2}, **CONTEXT)
    message = str(raised.value)
    assert message == f"template {tmp_path / 't.yaml.j2'}, line 2: the template uses an operation the sandbox forbids"
    assert isinstance(raised.value.__cause__, SecurityError)


def test_missing_attribute_names_it_without_blaming_the_researcher(tmp_path: Path) -> None:
    renderer = make_renderer(tmp_path, "user: {{ mep.mapped_user.nme }}\n")
    with pytest.raises(TemplateError) as raised:
        renderer.render({}, **CONTEXT)
    message = str(raised.value)
    assert message == f"template {tmp_path / 't.yaml.j2'}, line 1: 'dict object' has no attribute 'nme'"


def test_unplaceable_value_is_a_template_error(tmp_path: Path) -> None:
    renderer = make_renderer(tmp_path, "x: {{ range }}\n")
    with pytest.raises(TemplateError, match="line 1: cannot place a value of type function in the YAML"):
        renderer.render_text({}, **CONTEXT)


def test_runtime_failure_message_is_short_and_clean(tmp_path: Path) -> None:
    renderer = make_renderer(tmp_path, "a: 1\n\nx: {{ 1 // workers }}\n")
    with pytest.raises(TemplateError) as raised:
        renderer.render_text({"workers": 0}, **CONTEXT)
    assert str(raised.value) == f"template {tmp_path / 't.yaml.j2'}, line 3: rendering failed (ZeroDivisionError)"
    assert isinstance(raised.value.__cause__, ZeroDivisionError)  # the detail stays for the admin's log


@pytest.mark.parametrize("template", ["engine: [\n", "a: 1\n  b: 2\n", "a: !!python/object/apply:os.system ['id']\n"])
def test_invalid_rendered_yaml_is_a_template_error(tmp_path: Path, template: str) -> None:
    renderer = make_renderer(tmp_path, template)
    with pytest.raises(TemplateError) as raised:
        renderer.render({}, **CONTEXT)
    assert f"template {tmp_path / 't.yaml.j2'} rendered invalid YAML" in str(raised.value)
    assert_clean(str(raised.value))


def test_duplicate_key_in_rendered_yaml_refused(tmp_path: Path) -> None:
    renderer = make_renderer(tmp_path, "idle_timeout: 60\nidle_timeout: {{ idle_timeout }}\n")
    with pytest.raises(TemplateError, match="line 2: duplicate key 'idle_timeout'"):
        renderer.render({"idle_timeout": 1}, **CONTEXT)


def test_non_mapping_document_refused(tmp_path: Path) -> None:
    renderer = make_renderer(tmp_path, "- 1\n- 2\n")
    with pytest.raises(TemplateError, match="must render a YAML mapping, not a list"):
        renderer.render({}, **CONTEXT)


def test_empty_document_gives_the_model_defaults(tmp_path: Path) -> None:
    renderer = make_renderer(tmp_path, "{# nothing configurable #}\n")
    assert renderer.render({}, **CONTEXT) == UserEndpointConfig()


@pytest.mark.parametrize(
    ("template", "field", "line"),
    [
        ("user: root\n", "user", 1),
        ("engine:\n  type: process\n  run_as: root\n", "engine.run_as", 3),
        ("audit: false\n", "audit", 1),
        ("engine:\n  type: shell\n", "engine", 1),
        ("engine:\n  workers: 0\n", "engine.workers", 2),
        ("engine:\n  workers: true\n", "engine.workers", 2),
        ("idle_timeout: .inf\n", "idle_timeout", 1),
        ("idle_timeout: '300'\n", "idle_timeout", 1),
        ("{# a header\n   over lines #}\nidle_timeout: 60\nengine:\n  workers: -1\n", "engine.workers", 5),
    ],
)
def test_model_rejects_what_the_template_must_not_configure(tmp_path: Path, template: str, field: str,
                                                            line: int) -> None:
    renderer = make_renderer(tmp_path, template)
    with pytest.raises(ConfigInvalidError) as raised:
        renderer.render({}, **CONTEXT)
    message = str(raised.value)
    assert message.startswith(f"template {tmp_path / 't.yaml.j2'}, line {line}: invalid endpoint config: {field}:")
    assert_clean(message)


def test_model_has_no_privileged_fields() -> None:
    assert set(UserEndpointConfig.model_fields) == {"engine", "idle_timeout", "large_results", "task_resources"}
    assert set(ProcessEngine.model_fields) == {"type", "workers", "worker_python", "container"}


# --- loading --------------------------------------------------------------------------------------


def test_texts_passed_by_the_caller_are_used_instead_of_the_files(tmp_path: Path) -> None:
    renderer = TemplateRenderer(
        tmp_path / "absent.yaml.j2",
        tmp_path / "absent.schema.json",
        template_text="idle_timeout: {{ idle_timeout }}\n",
        schema_text='{"type": "object", "properties": {"idle_timeout": {"type": "number"}}}',
    )
    assert renderer.render({"idle_timeout": 42}, **CONTEXT).idle_timeout == 42.0


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "t.schema.json").write_text("{}")
    with pytest.raises(ConfigurationError, match=f"cannot read the template {tmp_path / 'missing.j2'}: No such file"):
        TemplateRenderer(tmp_path / "missing.j2", tmp_path / "t.schema.json")


@pytest.mark.parametrize(
    ("schema_text", "expected"),
    [
        ('{\n  "type": "object",\n  oops\n}', "line 3 column 3: not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"type": "integr"}', "type: 'integr' is not valid"),
        ('{"properties": {"workers": {"minimum": "one"}}}', "properties.workers.minimum: 'one' is not of type 'number'"),
        ('{"$schema": "https://example.org/my-schema"}', "unknown $schema 'https://example.org/my-schema'"),
    ],
)
def test_invalid_schema_names_the_file(tmp_path: Path, schema_text: str, expected: str) -> None:
    (tmp_path / "t.yaml.j2").write_text("x: 1\n")
    (tmp_path / "t.schema.json").write_text(schema_text)
    with pytest.raises(ConfigurationError) as raised:
        TemplateRenderer(tmp_path / "t.yaml.j2", tmp_path / "t.schema.json")
    message = str(raised.value)
    assert message.startswith(f"schema {tmp_path / 't.schema.json'}")
    assert expected in message


def test_unresolvable_schema_ref_is_a_template_error(tmp_path: Path) -> None:
    renderer = make_renderer(tmp_path, "x: 1\n", {"properties": {"a": {"$ref": "#/$defs/missing"}}})
    with pytest.raises(TemplateError, match=r"a \$ref in it cannot be resolved"):
        renderer.render_text({"a": 1}, **CONTEXT)


def test_digest_identifies_template_and_schema() -> None:
    def digest(template: str, schema: str) -> str:
        return TemplateRenderer(Path("t.j2"), Path("s.json"), template_text=template, schema_text=schema).digest

    base = digest("x: {{ x }}\n", '{"type": "object"}')
    assert base == digest("x: {{ x }}\n", '{"type": "object"}')
    assert len(base) == 64 and int(base, 16) >= 0
    assert base != digest("x: {{ x }} \n", '{"type": "object"}')
    assert base != digest("x: {{ x }}\n", '{"type": "object" }')
    # Moving text across the template/schema boundary is a different pair.
    assert digest("x: 1 ", "{}") != digest("x: 1", " {}")


def test_digest_does_not_depend_on_paths(tmp_path: Path, shipped: TemplateRenderer) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("local.yaml.j2", "local.schema.json"):
        (copy / name).write_text((SHIPPED / name).read_text())
    assert TemplateRenderer(copy / "local.yaml.j2", copy / "local.schema.json").digest == shipped.digest


# --- filters --------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["plain", "a b; rm -rf / #", "it's", "$(id) `id` $HOME", "new\nline"])
def test_shell_quote_filter(tmp_path: Path, label: str) -> None:
    renderer = make_renderer(tmp_path, "command: {{ 'echo ' ~ (label | shell_quote) }}\n", LABEL_SCHEMA)
    command = yaml.safe_load(renderer.render_text({"label": label}, **CONTEXT))["command"]
    assert command == "echo " + shlex.quote(label)
    assert shlex.split(command) == ["echo", label]


def test_shell_quote_refuses_non_scalars(tmp_path: Path) -> None:
    renderer = make_renderer(tmp_path, "command: {{ value | shell_quote }}\n")
    with pytest.raises(TemplateError, match="cannot place a value of type list in shell_quote"):
        renderer.render_text({"value": ["a"]}, **CONTEXT)

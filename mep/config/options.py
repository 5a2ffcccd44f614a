"""The admin's JSON Schema for ``user_endpoint_config``, and the one check of a researcher's options against it.

Shared by the endpoint side (``mep.config.render.TemplateRenderer``, which
checks the options before rendering the template) and the SDK (the Executor
checks them at ``submit`` against the schema ``Client.endpoint_info`` fetched),
so a typo is refused at submit with exactly the message the endpoint would
give. It needs only jsonschema: the SDK imports it without Jinja, YAML or
pydantic.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from referencing.exceptions import Unresolvable

from mep.errors import ConfigInvalidError, ConfigurationError, TemplateError

RESERVED_NAMESPACE = "mep"
# Jinja's default globals (range, dict, ...): names a template author relies on, like ``mep``, so no option
# may shadow them. Equal to a sandboxed environment's ``globals``, which render.py checks it against.
JINJA_GLOBALS = ("cycler", "dict", "joiner", "lipsum", "namespace", "range")
RESERVED_OPTION_NAMES = frozenset({RESERVED_NAMESPACE, *JINJA_GLOBALS})

_USER_CONFIG = "user_endpoint_config"
_OPTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MAX_NESTING = 32
_MAX_MESSAGE = 300
_MAX_VALUE = 80  # characters of an offending value quoted in a message
# Keywords whose own message quotes only the schema's machinery (a regex, a format name, a sub-schema):
# with a description to show, the message says that instead.
_OPAQUE_KEYWORDS = frozenset({"pattern", "format", "not", "anyOf", "oneOf", "contains"})
# Keywords that refuse a config for holding a name at all, whatever its value (None: a ``false`` schema)
_NAME_REFUSALS = ("additionalProperties", "unevaluatedProperties", None)


def _yaml_char(char: str) -> str:
    if char in '"\\':
        return "\\" + char
    # Python's printable set excludes every YAML line break (\x85, \u2028, \u2029),
    # tabs, controls, BOMs and surrogates; those are escaped so the scalar stays one line.
    if char.isprintable():
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _yaml_string(text: str) -> str:
    """A double-quoted YAML scalar that loads back as exactly ``text``.

    Not ``json.dumps``: its surrogate-pair escapes for non-BMP characters load
    in PyYAML as two lone surrogates, and it leaves DEL raw, which YAML refuses.
    """
    return '"' + "".join(map(_yaml_char, text)) + '"'


def _format_path(root: str, parts: Iterable[str | int]) -> str:
    text = root
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _OPTION_NAME.match(part):
            text += f".{part}" if text else part
        else:
            text += f"[{_yaml_string(part)}]"
    return text


def _shorten(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 1] + "…"


def _plain_json(value: object, path: tuple[str | int, ...] = ()) -> Any:
    """A copy of ``value`` made only of JSON types, or ConfigInvalidError naming where it isn't."""
    if len(path) > _MAX_NESTING:
        raise ConfigInvalidError(f"{_format_path(_USER_CONFIG, path)}: nested more than {_MAX_NESTING} levels")
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        if math.isfinite(value):
            return value
        raise ConfigInvalidError(f"{_format_path(_USER_CONFIG, path)}: {value} is not a JSON number")
    if type(value) is list:
        return [_plain_json(item, (*path, index)) for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        copy = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigInvalidError(f"{_format_path(_USER_CONFIG, path)}: keys must be strings")
            copy[key] = _plain_json(item, (*path, key))
        return copy
    raise ConfigInvalidError(
        f"{_format_path(_USER_CONFIG, path)}: a {type(value).__name__} is not a JSON value"
    )


def _value_text(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 1] + "…"


def _sentence(text: str) -> str:
    text = text.strip()
    return text if not text or text[-1] in ".!?)" else text + "."


def _hint(schema: Mapping[str, Any]) -> str:
    """What a (sub)schema says its value should be: its title, description and examples, as the admin wrote them."""
    title, description = (text if isinstance(text := schema.get(key), str) else ""
                          for key in ("title", "description"))
    if title and title.strip().rstrip(".").casefold() in description.casefold():
        title = ""  # a title the description repeats
    text = " ".join(_sentence(part) for part in (title, description) if part.strip())
    examples = schema.get("examples")
    if isinstance(examples, list) and examples:
        text += (" " if text else "") + "(e.g. " + ", ".join(json.dumps(example) for example in examples[:3]) + ")"
    return text


def _resolved(root: Mapping[str, Any], schema: Any) -> Any:
    """``schema`` with a local ``$ref`` ("#/$defs/name") followed, for reading its words; other refs as they are."""
    for _ in range(_MAX_NESTING):  # a bound, for refs that point at each other
        reference = schema.get("$ref") if isinstance(schema, Mapping) else None
        if not isinstance(reference, str) or not reference.startswith("#/"):
            return schema
        target: Any = root
        for token in reference[2:].split("/"):
            token = token.replace("~1", "/").replace("~0", "~")
            target = target.get(token) if isinstance(target, Mapping) else None
        if target is None:
            return schema
        schema = target
    return schema


def _described_schema(root: Mapping[str, Any], error: ValidationError) -> Mapping[str, Any] | None:
    """The deepest schema on the way to the failing keyword that says what its value should be (not the root).

    ``error.schema`` is the schema holding the keyword (reached through any ``$ref``); a bare sub-schema
    such as an object's ``propertyNames`` or ``additionalProperties`` gets the words of the option's
    schema around it, found by walking ``absolute_schema_path`` from the root as far as it goes.
    """
    if isinstance(error.schema, Mapping) and error.schema is not root and _hint(error.schema):
        return error.schema
    found = None
    node: Any = root
    for part in list(error.absolute_schema_path)[:-1]:
        node = _resolved(root, node)
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            break
        if isinstance(node, Mapping) and _hint(node):
            found = node
    return found


def _explain(root: Mapping[str, Any], error: ValidationError) -> str:
    """A schema refusal in words a researcher can act on: the option, the offending value, what it should be.

    jsonschema's own message ("'x y' does not match '^[a-z0-9_]{1,32}$'") is kept where it says something
    ("0 is less than the minimum of 1") and replaced by the admin's description where it only shows
    the schema's machinery; the option's title, description and examples are added after it.
    """
    path = _format_path(_USER_CONFIG, error.absolute_path)
    object_keyword = isinstance(error.instance, Mapping) and isinstance(error.schema, Mapping)
    if error.validator == "additionalProperties" and object_keyword:
        return f"{path}: {error.message}{_unexpected_hint(error.instance, error.schema)}"
    if error.validator == "required" and object_keyword:
        missing = [name for name in error.validator_value if name not in error.instance]
        properties = error.schema.get("properties")
        spec = _resolved(root, properties.get(missing[0])) if missing and isinstance(properties, Mapping) else None
        hint = _hint(spec) if isinstance(spec, Mapping) else ""
        return f"{path}: {error.message}" + (f" — {missing[0]}: {hint}" if hint else "")
    described = _described_schema(root, error)
    hint = _hint(described) if described is not None else ""
    if not hint:
        return f"{path}: {error.message}"
    option = next((part for part in error.absolute_path if isinstance(part, str)), None)
    if error.validator in _OPAQUE_KEYWORDS:
        what = "the name" if "propertyNames" in error.absolute_schema_path else "the value"
        problem = f"{what} {_value_text(error.instance)} is not accepted"
    else:
        problem = error.message
    return f"{path}: {problem} — {option or 'expected'}: {hint}"


def _unexpected_hint(config: Mapping[str, Any], schema: Mapping[str, Any]) -> str:
    """For names an object's schema does not offer: the option the first is closest to, and the ones it offers."""
    properties = schema.get("properties")
    if not isinstance(properties, Mapping) or not properties:
        return ""
    patterns = schema.get("patternProperties")
    patterns = list(patterns) if isinstance(patterns, Mapping) else []
    # the names jsonschema's additionalProperties refuses: neither listed nor matched by a patternProperties regex
    unexpected = [name for name in config
                  if name not in properties and not any(re.search(pattern, name) for pattern in patterns)]
    names = list(properties)
    close = difflib.get_close_matches(unexpected[0], names, n=1) if unexpected else []
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{suggestion}; the options are: {', '.join(names)}"


class OptionsSchema:
    """One admin schema, compiled once; ``check`` refuses options as the endpoint does, in its words.

    ``schema_path`` only names the file in messages (the SDK has the text, not the file).
    """

    def __init__(self, source: str, schema_path: str, reserved_names: frozenset[str] = RESERVED_OPTION_NAMES) -> None:
        self.schema_path = schema_path
        self.reserved_names = reserved_names
        self.validator = self._load(source)

    def _load(self, source: str) -> Validator:
        try:
            schema = json.loads(source)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(
                f"schema {self.schema_path}, line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})"
            ) from exc
        if not isinstance(schema, dict):
            raise ConfigurationError(f"schema {self.schema_path}: must be a JSON object")
        declared = schema.get("$schema")
        if declared is None:
            validator_class: type[Validator] | None = Draft202012Validator
        else:
            validator_class = validator_for(schema, default=None) if isinstance(declared, str) else None  # type: ignore[arg-type]
        if validator_class is None:
            raise ConfigurationError(
                f"schema {self.schema_path}: unknown $schema {declared!r}; "
                "use https://json-schema.org/draft/2020-12/schema or leave it out"
            )
        try:
            validator_class.check_schema(schema)
        except SchemaError as exc:
            raise ConfigurationError(
                _shorten(f"schema {self.schema_path}: {_format_path('', exc.absolute_path) or '(root)'}: {exc.message}")
            ) from exc
        return validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)

    def check(self, user_config: Mapping[str, Any]) -> dict[str, Any]:
        """The options as plain JSON, or ConfigInvalidError saying what the schema refuses."""
        if not isinstance(user_config, Mapping):
            raise ConfigInvalidError(f"{_USER_CONFIG} must be a mapping of option names to values")
        config: dict[str, Any] = _plain_json(user_config)
        for name in config:
            if not _OPTION_NAME.match(name):
                raise ConfigInvalidError(
                    _shorten(
                        f"{_USER_CONFIG}: option name {_yaml_string(name)} is not allowed; "
                        "use letters, digits and '_', not starting with a digit"
                    )
                )
            if name in self.reserved_names:
                raise ConfigInvalidError(f"{_USER_CONFIG}: option name '{name}' is reserved for mep; rename it")
        try:
            error = best_match(self.validator.iter_errors(config))
        except Unresolvable as exc:
            raise TemplateError(f"schema {self.schema_path}: a $ref in it cannot be resolved") from exc
        if error is not None:
            raise ConfigInvalidError(_shorten(_explain(self.validator.schema, error)))
        return config

    def offers(self, name: str) -> tuple[bool, str]:
        """Whether ``name`` may be passed in ``user_endpoint_config`` at all, and what the schema says of it.

        True when the schema names it in ``properties``, or lets names it doesn't list through (no
        ``additionalProperties: false``, nor an ``unevaluatedProperties: false``, a ``propertyNames``
        or a ``patternProperties`` that excludes it); decided by validating a config holding just that name.
        """
        if name in self.reserved_names or not _OPTION_NAME.match(name):
            return False, ""
        schema = self.validator.schema
        properties = schema.get("properties") if isinstance(schema, Mapping) else None
        spec = properties.get(name) if isinstance(properties, Mapping) else None
        spec = _resolved(schema, spec)
        if spec is not None:
            return spec is not False, _hint(spec) if isinstance(spec, Mapping) else ""
        try:
            # a propertyNames refusal is reported under its inner keyword (pattern, enum, ...)
            refused = any(not error.absolute_path and (error.validator in _NAME_REFUSALS
                                                       or "propertyNames" in error.absolute_schema_path)
                          for error in self.validator.iter_errors({name: None}))
        except Unresolvable:
            return False, ""
        return not refused, ""

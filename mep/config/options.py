"""The admin's JSON Schema for ``user_endpoint_config``, and the one check of a researcher's options against it.

Shared by the endpoint side (``mep.config.render.TemplateRenderer``, which
checks the options before rendering the template) and the SDK (the Executor
checks them at ``submit`` against the schema ``Client.endpoint_info`` fetched),
so a typo is refused at submit with exactly the message the endpoint would
give. It needs only jsonschema: the SDK imports it without Jinja, YAML or
pydantic.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match
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
            raise ConfigInvalidError(_shorten(f"{_format_path(_USER_CONFIG, error.absolute_path)}: {error.message}"))
        return config

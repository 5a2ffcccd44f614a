"""Turn a researcher's ``user_endpoint_config`` into a checked ``UserEndpointConfig`` via the admin's template.

The root spawner owns the admin's template (Jinja producing YAML) and JSON
Schema; a researcher owns only the option values. ``TemplateRenderer.render``:

1. checks the options are plain JSON with identifier keys that do not shadow
   the reserved ``mep`` namespace, then validates them against the admin's
   schema (Draft 2020-12 unless the schema's ``$schema`` says otherwise);
2. renders the template in an immutable Jinja sandbox with ``StrictUndefined``;
   every ``{{ }}`` value is emitted as a typed YAML flow scalar (strings always
   double-quoted with every non-printable character escaped), so no value can
   add, remove or retype a key, nor be cut by ``#`` or a line break;
3. parses the YAML (safe loader, duplicate keys refused) and validates it into
   ``UserEndpointConfig``, which forbids unknown keys; for an ``htex`` engine,
   the Parsl provider's and launcher's arguments are then checked against the
   classes' signatures (``mep.config.parsl_check``, without loading Parsl here).
   ``render_document`` stops after the parse, for the user endpoint, which
   checks the common shape with msgspec (``mep.endpoint.settings``) and leaves
   the rest to ``validate``: pydantic is imported only there.

A refused rendered config names the field, the template file and the template
line that produced it (found by aligning the template's literal YAML keys with
the rendered ones). The full guide is ``docs/templates.md``.

Template authoring, for admins: researcher options are top-level variables
(``{{ workers }}``); mep's own values live under ``mep`` (``mep.mapped_user``,
``mep.user_runtime``, ``mep.endpoint``). Guard optional options with
``{% if workers is defined %}`` or ``{{ workers | default(2) }}``. A ``{{ }}``
is a whole YAML value, so build composite strings inside it:
``{{ mep.mapped_user.home ~ "/mep" }}``, not ``/home/{{ name }}/mep``. The
``shell_quote`` filter quotes a value for a shell command line.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
import shlex
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from jinja2 import StrictUndefined, Template, TemplateSyntaxError, Undefined, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from mep.config.options import (
    _USER_CONFIG,
    RESERVED_NAMESPACE,
    OptionsSchema,
    _format_path,
    _shorten,
    _yaml_string,
)
from mep.errors import ConfigInvalidError, ConfigurationError, TemplateError

if TYPE_CHECKING:
    from mep.config.endpoint import UserEndpointConfig


class _UnplaceableValue(Exception):
    """A template tried to emit a value that has no faithful YAML form."""


def _yaml_float(number: float) -> str:
    if not math.isfinite(number):
        raise _UnplaceableValue("a non-finite number")
    text = float.__repr__(number)
    # YAML 1.1 (PyYAML) reads a float only if its mantissa has a '.': 1e-05 would load as a string.
    if "e" in text and "." not in text:
        text = text.replace("e", ".0e")
    return text


def _yaml_value(value: object) -> str:
    """Jinja ``finalize``: the YAML flow form of each ``{{ }}`` value, typed as in JSON."""
    if isinstance(value, Undefined):
        str(value)  # StrictUndefined raises UndefinedError naming the variable
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return _yaml_float(value)
    if isinstance(value, str):
        return _yaml_string(value)
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise _UnplaceableValue("a mapping with a non-string key")
            items.append(f"{_yaml_string(key)}: {_yaml_value(item)}")
        return "{" + ", ".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_yaml_value, value)) + "]"
    raise _UnplaceableValue(f"a value of type {type(value).__name__}")


def _shell_quote(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _UnplaceableValue(f"a value of type {type(value).__name__} in shell_quote")
    return shlex.quote(str(value))


def _new_environment() -> ImmutableSandboxedEnvironment:
    # Immutable: a template can't modify the mappings it is given either.
    environment = ImmutableSandboxedEnvironment(
        undefined=StrictUndefined,
        finalize=_yaml_value,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["shell_quote"] = _shell_quote
    return environment


_UNDEFINED_NAME = re.compile(r"'([A-Za-z_][A-Za-z0-9_]*)' is undefined")
_YAML_KEY = re.compile(r"(\s*)(?:-\s+)?([A-Za-z_][A-Za-z0-9_.-]*|\"[^\"]*\")\s*:(?:\s|$)")


def _line_key(line: str) -> tuple[int, str] | None:
    """(indentation, key) when ``line`` starts a block-mapping entry."""
    match = _YAML_KEY.match(line)
    return (len(match.group(1)), match.group(2).strip('"')) if match else None


def _document_path(document: Any, loc: Iterable[str | int]) -> tuple[str | int, ...]:
    """``loc`` without the parts that are not keys or indexes of ``document`` (pydantic's union tags)."""
    from mep.config.endpoint import ENGINE_TYPES  # a refusal's path only: pydantic is imported by then

    path: list[str | int] = []
    node = document
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(node, dict) and part in ENGINE_TYPES:
            continue  # the engine union's tag, not a key
        else:
            node = None  # a missing key or a check's own name: keep it, there is nothing below
        path.append(part)
    return tuple(path)


def _rendered_line(text: str, path: tuple[str | int, ...]) -> int | None:
    """The 1-based line of the deepest key of ``path`` that exists in the rendered YAML."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


class _RenderedConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a repeated key is an error instead of silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigurationError(f"cannot read the {what} {path}: {reason}") from exc


class TemplateRenderer:
    """One admin template and its schema, compiled once and rendered for each researcher's options.

    Pass ``template_text``/``schema_text`` when the caller has already read the
    files through its own ownership and permission checks; the paths then only
    name the files in messages. Otherwise the files are read here, unchecked.
    """

    def __init__(
        self,
        template_path: Path,
        schema_path: Path,
        *,
        template_text: str | None = None,
        schema_text: str | None = None,
    ) -> None:
        self._template_path = Path(template_path)
        self._schema_path = Path(schema_path)
        template_source = _read(self._template_path, "template") if template_text is None else template_text
        schema_source = _read(self._schema_path, "schema") if schema_text is None else schema_text
        self._environment = _new_environment()
        # Jinja's globals (range, dict, ...) are names a template author relies on, like ``mep``.
        self._reserved_names = frozenset({RESERVED_NAMESPACE, *self._environment.globals})
        self._template = self._compile(template_source)
        self._template_keys = self._data_keys(template_source)
        self._options = OptionsSchema(schema_source, str(self._schema_path), self._reserved_names)
        digest = hashlib.sha256()
        for part in (template_source, schema_source):
            data = part.encode("utf-8", "surrogatepass")
            # Length-prefixed, so text moved between template and schema changes the digest.
            digest.update(len(data).to_bytes(8, "big") + data)
        self._digest = digest.hexdigest()

    @property
    def template_path(self) -> Path:
        return self._template_path

    @property
    def schema_path(self) -> Path:
        return self._schema_path

    @property
    def digest(self) -> str:
        """sha256 hex over the template and schema texts: equal digests mean the same template."""
        return self._digest

    def render(
        self,
        user_config: Mapping[str, Any],
        *,
        mapped_user: Mapping[str, Any],
        user_runtime: Mapping[str, Any],
        endpoint: Mapping[str, Any],
    ) -> UserEndpointConfig:
        """Validate ``user_config``, render the template and return the checked endpoint config.

        Raises ConfigInvalidError when the options or the rendered config are
        refused, TemplateError when the template fails to render valid YAML.
        """
        text, document = self.render_document(user_config, mapped_user=mapped_user, user_runtime=user_runtime,
                                              endpoint=endpoint)
        return self.validate(text, document)

    def render_document(
        self,
        user_config: Mapping[str, Any],
        *,
        mapped_user: Mapping[str, Any],
        user_runtime: Mapping[str, Any],
        endpoint: Mapping[str, Any],
    ) -> tuple[str, dict[str, Any]]:
        """``render`` up to the parsed YAML, not yet validated: (rendered text, document) for ``validate``.

        For a caller with a faster check of the common shape (the user endpoint's msgspec structs) that
        leaves every other document, and every refusal's message, to ``validate``.
        """
        text = self.render_text(user_config, mapped_user=mapped_user, user_runtime=user_runtime, endpoint=endpoint)
        return text, self._parse(text)

    def validate(self, text: str, document: dict[str, Any]) -> UserEndpointConfig:
        """``render_document``'s output validated into ``UserEndpointConfig``; ConfigInvalidError if refused."""
        # pydantic, and Parsl's signatures for htex: only here, off the path of a config checked another way
        from pydantic import ValidationError

        from mep.config.endpoint import HtexEngine, UserEndpointConfig
        from mep.config.parsl_check import check_engine

        try:
            config = UserEndpointConfig.model_validate(document)
        except ValidationError as exc:
            first = exc.errors()[0]
            more = exc.error_count() - 1
            message = first["msg"].removeprefix("Value error, ") + (f" (and {more} more)" if more else "")
            raise self._invalid(text, document, first["loc"], message) from exc
        if isinstance(config.engine, HtexEngine):
            problem = check_engine(config.engine)
            if problem is not None:
                raise self._invalid(text, document, problem.path, problem.message)
        return config

    def _invalid(
        self, text: str, document: Any, loc: Iterable[str | int], message: str
    ) -> ConfigInvalidError:
        """The refusal of a rendered config: the field, and the template line that produced it when known."""
        path = _document_path(document, loc)
        line = self._template_line(text, path)
        where = f"template {self._template_path}" + (f", line {line}" if line else "")
        return ConfigInvalidError(_shorten(f"{where}: invalid endpoint config: {_format_path('', path)}: {message}"))

    def _template_line(self, text: str, path: tuple[str | int, ...]) -> int | None:
        """The template line that rendered ``path``'s key, found by aligning the template's keys with the output's.

        YAML keys are literal text in a template (``workers: {{ workers }}``),
        so the sequence of keys, with their indentation, is the same in the
        template's text and in its output, except where blocks repeat or drop
        lines; a diff of the two sequences maps an output line to its source.
        """
        rendered_line = _rendered_line(text, path)
        if rendered_line is None:
            return None
        template_keys = self._template_keys
        rendered_keys = [(number, key) for number, key in enumerate(map(_line_key, text.splitlines()), 1) if key]
        matcher = difflib.SequenceMatcher(
            None, [key for _, key in template_keys], [key for _, key in rendered_keys], autojunk=False
        )
        for block in matcher.get_matching_blocks():
            for offset in range(block.size):
                if rendered_keys[block.b + offset][0] == rendered_line:
                    return template_keys[block.a + offset][0]
        return None

    def render_text(
        self,
        user_config: Mapping[str, Any],
        *,
        mapped_user: Mapping[str, Any],
        user_runtime: Mapping[str, Any],
        endpoint: Mapping[str, Any],
    ) -> str:
        """Validate ``user_config`` and return the rendered YAML text, before parsing."""
        variables = self._options.check(user_config)
        variables[RESERVED_NAMESPACE] = {
            "user_runtime": dict(user_runtime),
            "mapped_user": dict(mapped_user),
            "endpoint": dict(endpoint),
        }
        try:
            return self._template.render(variables)
        except UndefinedError as exc:
            raise TemplateError(_shorten(f"{self._location(exc)}: {self._undefined(exc)}")) from exc
        except SecurityError as exc:
            raise TemplateError(f"{self._location(exc)}: the template uses an operation the sandbox forbids") from exc
        except _UnplaceableValue as exc:
            raise TemplateError(f"{self._location(exc)}: cannot place {exc} in the YAML") from exc
        except Exception as exc:  # the detail (a Jinja or Python internal message) stays in __cause__ for the log
            raise TemplateError(f"{self._location(exc)}: rendering failed ({type(exc).__name__})") from exc

    def _undefined(self, exc: UndefinedError) -> str:
        """Jinja's "'x' is undefined", with advice that depends on whether the schema lets a researcher pass x.

        Only an option the schema offers is worth asking the researcher for; a variable it does not
        offer can't come from any ``user_endpoint_config``, so the template is the admin's to fix.
        """
        message = exc.message or "undefined value"
        missing = _UNDEFINED_NAME.fullmatch(message)
        if missing is None:  # an attribute or item of a value: what was meant is not knowable from here
            return message
        name = missing.group(1)
        offered, hint = self._options.offers(name)
        if offered:
            about = f" ({hint})" if hint else ""
            return (f"{message}: pass {name!r}{about} in {_USER_CONFIG}, or the admin can make it optional "
                    "in the template with `is defined` or `| default(...)`")
        return (f"{message}: the admin's template uses a variable its schema ({self._schema_path.name}) does not "
                f"offer, so no {_USER_CONFIG} can set it; the admin must define it or guard it with `is defined`")

    def _compile(self, source: str) -> Template:
        try:
            code = self._environment.compile(source, name=self._template_path.name, filename=str(self._template_path))
        except TemplateSyntaxError as exc:
            raise ConfigurationError(
                f"template {self._template_path}, line {exc.lineno}: {exc.message or 'syntax error'}"
            ) from exc
        return self._environment.template_class.from_code(
            self._environment, code, self._environment.make_globals(None)
        )

    def _data_keys(self, source: str) -> list[tuple[int, tuple[int, str]]]:
        """(line, key) of every template line whose literal text starts a YAML key (comments and tags excluded)."""
        data: dict[int, str] = {}
        for lineno, token, value in self._environment.lex(source):
            if token == "data":
                for offset, part in enumerate(value.split("\n")):
                    data[lineno + offset] = data.get(lineno + offset, "") + part
        return [(number, key) for number, text in sorted(data.items()) if (key := _line_key(text))]

    def _parse(self, text: str) -> dict[str, Any]:
        try:
            document = yaml.load(text, Loader=_RenderedConfigLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "not valid YAML"
            raise TemplateError(
                _shorten(f"template {self._template_path} rendered invalid YAML{where}: {problem}")
            ) from exc
        if document is None:
            return {}
        if not isinstance(document, dict):
            raise TemplateError(
                f"template {self._template_path} must render a YAML mapping, not a {type(document).__name__}"
            )
        return document

    def _location(self, exc: BaseException) -> str:
        """``template PATH, line N`` from the deepest traceback frame Jinja mapped to the template."""
        filename = str(self._template_path)
        lines = [line for frame, line in traceback.walk_tb(exc.__traceback__) if frame.f_code.co_filename == filename]
        return f"template {filename}, line {lines[-1]}" if lines else f"template {filename}"

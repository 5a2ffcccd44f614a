"""Check an htex engine's Parsl provider and launcher arguments against the classes' signatures.

Importing any part of Parsl imports dill, and the root spawner, which
validates every rendered config, must never load dill. So the check runs in a
short-lived child interpreter (``python -I -m mep.config.parsl_check``) that
imports Parsl, looks each class up by name in ``parsl.providers`` or
``parsl.launchers`` and compares the arguments with ``inspect.signature`` and
the parameters' annotations (or, when a parameter has none, its default's
type). Nothing is constructed: some providers run scheduler commands in their
constructor. Answers are cached per (kind, class, arguments), so a config is
checked once per manager, not once per spawn.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import subprocess
import sys
import typing
from dataclasses import dataclass
from typing import Any

from mep.config.endpoint import HtexEngine
from mep.errors import TemplateError

_CHECK_TIMEOUT = 120.0
_MAX_LISTED = 8


@dataclass(frozen=True)
class ComponentProblem:
    """What is wrong, and where: ``path`` is the field's location in the endpoint config."""

    path: tuple[str, ...]
    message: str


def check_engine(engine: HtexEngine) -> ComponentProblem | None:
    """The first problem with ``engine``'s provider or launcher arguments, or None if Parsl would take them."""
    components = [("provider", engine.provider.type, engine.provider.arguments)]
    if engine.launcher is not None:
        components.append(("launcher", engine.launcher.type, engine.launcher.arguments))
    answer = _ask_child(json.dumps(components, sort_keys=True))
    if answer is None:
        return None
    kind, field, message = answer
    return ComponentProblem(("engine", kind, *((field,) if field else ())), message)


@functools.lru_cache(maxsize=256)
def _ask_child(request: str) -> tuple[str, str, str] | None:
    """One child interpreter checks every component of one engine (Parsl's import is most of the cost)."""
    try:
        child = subprocess.run(
            [sys.executable, "-I", "-m", "mep.config.parsl_check"], input=request, capture_output=True, text=True,
            timeout=_CHECK_TIMEOUT, cwd="/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TemplateError(f"the manager could not check the Parsl engine settings: {exc}") from exc
    if child.returncode != 0:
        reason = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        raise TemplateError(f"the manager could not check the Parsl engine settings: {reason}")
    answer = json.loads(child.stdout)
    return None if answer is None else (answer[0], answer[1], answer[2])


# --- the child's side: runs with Parsl imported ---------------------------------------


def _problem(kind: str, name: str, arguments: dict[str, Any]) -> tuple[str, str] | None:
    """``(argument or "type" or "", message)`` for the first thing Parsl would refuse, or None."""
    import parsl.launchers
    import parsl.providers

    module = parsl.providers if kind == "provider" else parsl.launchers
    known = sorted(set(module.__all__))
    if name not in known:
        return "type", f"unknown Parsl {kind} {name!r}{_suggest(name, known)}; known {kind}s: {', '.join(known)}"
    cls = getattr(module, name)
    parameters = inspect.signature(cls).parameters
    reserved = HtexEngine.RESERVED_ARGUMENTS if kind == "provider" else {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = [p for p in parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation Parsl itself can't resolve: fall back to the defaults' types
        hints = {}
    for argument, value in arguments.items():
        parameter = parameters.get(argument)
        if parameter is None or parameter not in named:
            if takes_any:
                continue
            choices = [p.name for p in named if p.name not in reserved]
            listed = ", ".join(choices[:_MAX_LISTED]) + (", ..." if len(choices) > _MAX_LISTED else "")
            return argument, f"{name} has no argument {argument!r}{_suggest(argument, choices)}; it takes: {listed}"
        wrong = _type_problem(value, hints.get(argument), parameter.default)
        if wrong:
            return argument, f"{name} argument {argument!r}: {wrong}"
    for parameter in named:
        if parameter.default is inspect.Parameter.empty and parameter.name not in arguments | reserved:
            return "", f"{name} needs the argument {parameter.name!r}"
    return None


def _type_problem(value: Any, annotation: Any, default: Any) -> str:
    """Why ``value`` can't be this parameter's, or "" when it can (or nothing says what it should be)."""
    if annotation is not None:
        import typeguard

        try:
            typeguard.check_type(value, annotation)
        except typeguard.TypeCheckError:
            return f"{_json_type(value)} {json.dumps(value)[:60]} is not {_describe(annotation)}"
        return ""
    # An unannotated parameter: its default's type is what Parsl's code expects.
    if isinstance(default, bool):
        return "" if isinstance(value, bool) else f"{_json_type(value)} {json.dumps(value)[:60]} is not a boolean"
    if isinstance(default, (int, float)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return "" if number else f"{_json_type(value)} {json.dumps(value)[:60]} is not a number"
    if isinstance(default, str):
        return "" if isinstance(value, str) else f"{_json_type(value)} {json.dumps(value)[:60]} is not a string"
    return ""


def _describe(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return f"of type {text or str(annotation).replace('typing.', '')}"


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def main() -> int:
    """Read ``[[kind, class name, arguments], ...]``; print ``[kind, field, message]`` or null."""
    for kind, name, arguments in json.loads(sys.stdin.read()):
        problem = _problem(kind, name, arguments)
        if problem is not None:
            print(json.dumps([kind, *problem]))
            return 0
    print("null")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

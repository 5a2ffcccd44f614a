"""A researcher's ``user_endpoint_config`` on the wire and on disk: plain JSON, bounded, one codec.

The config comes from the researcher and travels SDK -> service (stored in
SQLite) -> router -> spawner, where the admin's schema checks its meaning.
Before that, every process needs only to know that it is harmless data: JSON
types only (no msgpack ``bytes`` or ``ext``), integers that fit in 64 bits,
finite floats, bounded nesting (its size is bounded by the service, 64 KiB as
canonical JSON, and by the header's limit). ``config_problem`` says whether it
is, naming the key path; ``decode`` runs it on every config it reads, before
any handler sees the message, and the SDK's ``submit`` runs it before sending.

Why not a depth-bounded msgspec type instead: msgspec compiles such a type
(a union of scalars, lists and dicts, nested N levels) into a tree that doubles
per level, costing about 30 ms per decoder at 8 levels and 130 ms at 10, at
every process start. Decoding into ``Any`` is safe without it: msgspec checks
the interpreter's recursion limit before each nested container and refuses a
deeper one with ``RecursionError`` (which ``decode`` maps to
``ProtocolError``), so what it builds first is bounded by that limit and by
the header's size limit; the check below then refuses anything nested deeper
than ``MAX_CONFIG_DEPTH`` without recursing itself.

The stored text is written and read by the same codec (msgspec JSON), so what
was accepted can always be read back.
"""

from __future__ import annotations

from typing import Any

import msgspec

from mep.errors import ConfigInvalidError

MAX_CONFIG_DEPTH = 32  # containers inside the config itself
MAX_CONFIG_BYTES = 64 * 1024  # a user_endpoint_config as canonical JSON: options, not data
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
FLOAT_MAX = 1.7976931348623157e308  # the largest finite double: inf and NaN fail the bound

JsonConfig = dict[str, Any]

_encoder = msgspec.json.Encoder(order="sorted")
_decoder = msgspec.json.Decoder(JsonConfig)


def config_problem(value: Any) -> str | None:
    """What makes ``value`` unfit to be a user endpoint config, naming where; None if it is fit."""
    if not isinstance(value, dict):
        return f"user_endpoint_config must be a dict, not {type(value).__name__}"
    # Iterative, so deep nesting can't exhaust our own stack; a path is a tuple of keys and indexes,
    # spelled out only for the refusal (a long key is not copied into every descendant's path).
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if len(path) >= MAX_CONFIG_DEPTH:
                return f"{_spell(path)} is nested more than {MAX_CONFIG_DEPTH} levels deep"
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        return f"{_spell(path)} has a key {key!r} that is not a string"
                    stack.append(((*path, key), child))
            else:
                stack.extend(((*path, index), child) for index, child in enumerate(item))
        elif isinstance(item, (str, bool)) or item is None:
            continue
        elif isinstance(item, int):
            if not INT_MIN <= item <= INT_MAX:
                return f"{_spell(path)} is {item}, outside the 64-bit integer range a config may hold"
        elif isinstance(item, float):
            if not -FLOAT_MAX <= item <= FLOAT_MAX:
                return f"{_spell(path)} is {item}; a config may hold only finite numbers (JSON has no NaN or infinity)"
        else:
            return (f"{_spell(path)} is a {type(item).__name__}; a config may hold only JSON values "
                    "(str, int, float, bool, None, list, dict with str keys)")
    return None


def _spell(path: tuple[str | int, ...]) -> str:
    """``user_endpoint_config.engine.modules[2]``; keys shortened to what a message can show."""
    parts = ["user_endpoint_config"]
    for step in path:
        parts.append(f"[{step}]" if isinstance(step, int) else "." + (step if len(step) <= 40 else step[:37] + "..."))
    return "".join(parts)


def check_config(value: Any) -> None:
    """Raise ``ConfigInvalidError`` naming what is wrong with ``value`` as a user endpoint config."""
    problem = config_problem(value)
    if problem is not None:
        raise ConfigInvalidError(problem)


def check_config_size(value: dict[str, Any]) -> None:
    """Raise ``ConfigInvalidError`` if ``value`` is larger than the service accepts (so the SDK says so first)."""
    size = len(dumps_config(value).encode())
    if size > MAX_CONFIG_BYTES:
        raise ConfigInvalidError(f"user_endpoint_config is {size} bytes as JSON; the limit is {MAX_CONFIG_BYTES}: "
                                 "pass options, not data")


def dumps_config(value: dict[str, Any]) -> str:
    """Canonical JSON: equal configs give equal text, so they group and compare as equal."""
    return _encoder.encode(value).decode()


def loads_config(text: str | bytes) -> dict[str, Any]:
    """Read back what ``dumps_config`` wrote; anything else (a row written by an older mep) is refused."""
    try:
        config = _decoder.decode(text)
    except (msgspec.MsgspecError, RecursionError) as exc:
        raise ConfigInvalidError(f"the stored user_endpoint_config can't be read back: {exc}") from None
    check_config(config)
    return config

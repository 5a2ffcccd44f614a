"""What the router tells the service about its endpoint: the options it accepts, and what is starting.

``endpoint_options`` describes the admin's schema and template from their
texts as the root side read them for the router's boot document (policy-checked:
the files the spawner renders with; the router's account can't read
``/etc/mep/NAME``, which is 0700), or else, for a router started without them
(tests), by reading the files as the router's own account. Researchers read
the result through ``Client.endpoint_info``; the schema stays the spawner's to
enforce. A schema that can't be read or shown leaves the description without
it, with the reason, and tasks are checked on the endpoint side as before.
All parsing happens here, in the unprivileged router.

The template's description is the first paragraph of its opening ``{# #}``
comment (docs/templates.md).

``StartingReport`` turns the router's set of groups whose user endpoint is
being started into a ``STARTING`` message whenever that set changes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

from mep.config.manager import ManagerConfig
from mep.protocol.messages import (
    MAX_DESCRIPTION_CHARS,
    MAX_SCHEMA_CHARS,
    MAX_STARTING_GROUPS,
    EndpointOptions,
    Starting,
    StartingGroup,
)
from mep.service.endpoint_info import config_digest

log = logging.getLogger("mep.router")

_OPENING_COMMENT = re.compile(r"\s*\{#-?(.*?)-?#\}", re.DOTALL)


def template_description(template_text: str) -> str:
    """The first paragraph of the template's opening comment, on one line ("" if it has none)."""
    match = _OPENING_COMMENT.match(template_text)
    if match is None:
        return ""
    paragraph = match.group(1).strip().split("\n\n", 1)[0]
    return " ".join(paragraph.split())[:MAX_DESCRIPTION_CHARS]


def endpoint_options(config: ManagerConfig, schema_text: str = "", template_text: str = "") -> EndpointOptions:
    problems: list[str] = []
    schema = schema_text or _read(config.schema_file, problems)
    if schema and len(schema) > MAX_SCHEMA_CHARS:
        problems.append(f"the schema is {len(schema)} characters, more than the {MAX_SCHEMA_CHARS} it may show")
        schema = ""
    if schema:
        try:
            is_object = isinstance(json.loads(schema), dict)
        except ValueError:
            is_object = False
        if not is_object:
            problems.append(f"the schema {config.schema_file} is not a JSON object")
            schema = ""
    template = template_text or _read(config.template, problems)
    for problem in problems:
        log.warning("endpoint_info: %s; researchers see no schema to check options against before submitting",
                    problem)
    return EndpointOptions(schema=schema, schema_path=str(config.schema_file)[:MAX_DESCRIPTION_CHARS],
                           template_description=template_description(template),
                           problem="; ".join(problems)[:MAX_DESCRIPTION_CHARS])


def _read(path: Path, problems: list[str]) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        problems.append(f"the manager's router cannot read {path} ({reason})")
        return ""


class StartingReport:
    """The last set of starting groups the service was told; ``changed`` gives the message for a new set."""

    def __init__(self) -> None:
        self._sent: frozenset[tuple[str, str]] | None = None

    def reset(self) -> None:
        """The service forgot it (a new registration): the next ``changed`` reports the set anyway."""
        self._sent = None

    def changed(self, groups: Iterable[tuple[str, str]]) -> Starting | None:
        """``groups``: (submitter id, canonical config) pairs; None when the service already has this set."""
        current = frozenset(groups)
        if current == self._sent:
            return None
        self._sent = current
        named = sorted({(submitter, config_digest(config)) for submitter, config in current})
        return Starting(groups=[StartingGroup(submitter_id=submitter, config_sha256=digest)
                                for submitter, digest in named[:MAX_STARTING_GROUPS]])

"""How the service and manager processes log: one format per process, text or JSON lines, levels per component.

``--log-format json`` (or ``MEP_LOG_FORMAT=json``) writes one JSON object per
line with time, level, logger, pid and message, plus ``endpoint_id`` and
``task_id`` whenever the code logging it passed them (``extra=``), so the
service's, manager's and endpoints' lines can be joined. The manager hands its
format to the router and to every user endpoint it starts (in their boot
documents), so one choice covers all three logs. ``--log-level
mep.manager=DEBUG`` (repeatable, or ``MEP_LOG_LEVEL=mep.service=WARNING,...``)
sets one component's level.
"""

import json
import logging
import time
from collections.abc import Iterable

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
JOINABLE_FIELDS = ("endpoint_id", "task_id", "identity_id", "account")


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        entry = {"time": when, "level": record.levelname, "logger": record.name, "pid": record.process,
                 "message": record.getMessage()}
        entry.update({name: getattr(record, name) for name in JOINABLE_FIELDS if hasattr(record, name)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def parse_levels(values: Iterable[str]) -> dict[str, int]:
    """``component=LEVEL`` pairs (also comma-separated in one value) as logger name -> level."""
    levels = {}
    for pair in filter(None, (part.strip() for part in ",".join(values).split(","))):
        component, _, level = pair.partition("=")
        number = logging.getLevelName(level.strip().upper())
        if not component or not isinstance(number, int):
            raise ValueError(f"{pair!r}: expected COMPONENT=LEVEL, e.g. mep.manager=DEBUG")
        levels[component.strip()] = number
    return levels


def make_formatter(log_format: str, text_format: str = TEXT_FORMAT) -> logging.Formatter:
    return JsonLinesFormatter() if log_format == "json" else logging.Formatter(text_format)


def active_format() -> str:
    """This process's log format ("json" or "text"), to hand on to the processes it starts."""
    json_lines = any(isinstance(handler.formatter, JsonLinesFormatter) for handler in logging.getLogger().handlers)
    return "json" if json_lines else "text"


def setup_logging(verbose: bool, log_format: str = "text", levels: dict[str, int] | None = None) -> None:
    handler = logging.StreamHandler()  # to stderr
    handler.setFormatter(make_formatter(log_format))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for component, level in (levels or {}).items():
        logging.getLogger(component).setLevel(level)

"""One output convention for every admin command.

``--output table`` (the default, for people; ``mep status`` alone defaults to
json, which it always printed): a record prints as ``key: value`` lines, a
list of records as aligned columns with a header, and a command whose
answer is one value (``mep service key``) prints that value alone, so
``$(...)`` takes it as it is. ``--output json``
(for scripts): the same record or list as JSON, nothing else on stdout.
Messages meant for the person (next steps, warnings) go to stderr, so a
script's stdout stays parseable either way.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from mep.errors import ConfigurationError, MepError

F = TypeVar("F", bound=Callable[..., Any])


def output_option_defaulting_to(default: str) -> Callable[[F], F]:
    """``--output``; only a command whose JSON output scripts already parse (``mep status``) defaults to json."""
    return click.option(
        "--output", "output_format", type=click.Choice(["table", "json"]), default=default, show_default=True,
        help="table: for people; json: for scripts (stdout holds only the JSON).")


output_option: Callable[[F], F] = output_option_defaulting_to("table")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{key}={item}" for key, item in value.items()) or "-"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(map(str, value)) or "-"
    return str(value)


def emit_record(record: dict[str, Any], output_format: str) -> None:
    if output_format == "json":
        click.echo(json.dumps(record, indent=2, default=str))
        return
    for key, value in record.items():
        click.echo(f"{key}: {_cell(value)}")


def emit_value(name: str, value: Any, output_format: str) -> None:
    """One answer: bare in a table (for ``$(...)``), ``{name: value}`` in JSON."""
    if output_format == "json":
        emit_record({name: value}, output_format)
        return
    click.echo(_cell(value))


def emit_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], output_format: str) -> None:
    """``columns`` picks and orders the table's columns; JSON carries every key of every row."""
    if output_format == "json":
        click.echo(json.dumps(list(rows), indent=2, default=str))
        return
    cells = [[column.upper() for column in columns]]
    cells += [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(line[index]) for line in cells) for index in range(len(columns))]
    for line in cells:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every MepError becomes one line on stderr (exit 2 for configuration, else 1), never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MepError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2 if isinstance(exc, ConfigurationError) else 1)
        except Exception as exc:  # a bug: say so in one line; -v logs the traceback
            logging.getLogger("mep").debug("unexpected failure", exc_info=True)
            click.echo(f"internal error: {type(exc).__name__}: {exc} (run 'mep -v ...' for details)", err=True)
            sys.exit(3)

    return wrapper


def say(message: str) -> None:
    """For the person at the terminal, never for a script: stderr."""
    click.echo(message, err=True)

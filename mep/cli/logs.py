"""How mep processes log: defined in ``mep.root.logs`` (the root process logs the same way), used from here."""

import logging

from mep.root.logs import (  # noqa: F401 - re-exported
    JOINABLE_FIELDS,
    TEXT_FORMAT,
    JsonLinesFormatter,
    active_format,
    make_formatter,
    parse_levels,
    setup_logging,
)


def use_format(log_format: str, text_format: str = TEXT_FORMAT) -> None:
    """Switch the handlers ``logging.basicConfig`` set up to ``log_format`` (known only after a boot document)."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(make_formatter(log_format, text_format))

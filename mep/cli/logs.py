"""How mep processes log: defined in ``mep.root.logs`` (the root process logs the same way), used from here."""

from mep.root.logs import (  # noqa: F401 - re-exported
    JOINABLE_FIELDS,
    TEXT_FORMAT,
    JsonLinesFormatter,
    active_format,
    make_formatter,
    parse_levels,
    setup_logging,
    use_format,
)

"""The path checks of the endpoint config, without pydantic: the model and the endpoint's light reading share them.

``mep.config.endpoint`` (the model) and ``mep.endpoint.settings`` (the msgspec
structs the endpoint reads a plain ``process`` config with) must refuse the
same paths; each raises ``ValueError`` with the message the model reports.
"""

from __future__ import annotations

import os


def clean_path(path: str) -> str:
    """An absolute, normalised path: no ``..`` can walk a composed path out of the directory a template meant."""
    if not os.path.isabs(path) or os.path.normpath(path) != path or "\0" in path:
        raise ValueError(f"must be a normalised absolute path (no '..', '.' or '//'), not {path!r}")
    return path


def results_directory(path: str) -> str:
    """``~/...`` (the account's home, expanded by the endpoint as the user) or a clean absolute path."""
    if path.startswith("~/"):
        clean_path(path[1:])  # the part under the home, checked as if the home were /
        return path
    return clean_path(path)

"""Reading an admin's YAML settings file into a pydantic model, with errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from mep.errors import ConfigurationError

Model = TypeVar("Model", bound=BaseModel)


def read_mapping(path: Path, what: str, *, empty_is_defaults: bool = False) -> dict[str, Any]:
    """The settings in ``path`` (a YAML mapping); ``empty_is_defaults``: a file of comments only means {}."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path} is not valid YAML: {exc}") from None
    if data is None and empty_is_defaults:
        data = {}
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} must be a YAML mapping of settings")
    return data


def validated(model: type[Model], data: dict[str, Any], path: Path) -> Model:
    """``data`` as ``model``; a validation failure lists every bad key of ``path`` in one message."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"{path}: {problems}") from None

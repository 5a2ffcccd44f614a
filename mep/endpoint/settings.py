"""The endpoint's fast check of a plain ``process`` config: msgspec structs, no pydantic.

The endpoint validates the config it rendered itself (``mep.config.render``)
before it runs anything, with the same strictness as ``UserEndpointConfig``.
pydantic is the biggest import on that path, so the common shape, a
``process`` engine without a container, is checked here with msgspec structs
that mirror the models field for field (tests/test_endpoint_settings.py keeps
them in step and checks that they never accept what the model refuses).
Anything else, including every config either would refuse, goes to the model
(``read_settings`` returns None), so refusals keep the model's messages and
shapes msgspec can't express (a container, the htex engine's provider
arguments, its cross-field checks) keep the model's checks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import msgspec

from mep.config.paths import clean_path, results_directory
from mep.config.task_resources import check_resources

if TYPE_CHECKING:
    from mep.config.endpoint import UserEndpointConfig


def _finite(value: float, name: str) -> None:
    if not math.isfinite(value):  # the model's allow_inf_nan=False (its own message, through the model)
        raise ValueError(f"{name} must be finite")


class ProcessSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``mep.config.endpoint.ProcessEngine`` without a container."""

    type: Literal["process"] = "process"
    workers: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    worker_python: str | None = None
    container: None = None  # a config with a container is the model's (read_settings)

    def __post_init__(self) -> None:
        if self.worker_python is not None:
            clean_path(self.worker_python)


class LargeResultSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``mep.config.endpoint.LargeResults``."""

    threshold_bytes: Annotated[int, msgspec.Meta(ge=0)] = 1024 * 1024
    directory: str = "~/.mep/results"
    retention: Annotated[float, msgspec.Meta(gt=0)] = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        results_directory(self.directory)
        _finite(self.retention, "retention")


class ProcessEndpointSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``mep.config.endpoint.UserEndpointConfig`` with a ``process`` engine."""

    engine: ProcessSettings = msgspec.field(default_factory=ProcessSettings)
    idle_timeout: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    large_results: LargeResultSettings = msgspec.field(default_factory=LargeResultSettings)
    # The process engine honours no per-task resource, so the model refuses any limit: only {} is plain.
    task_resources: dict[str, int] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        _finite(self.idle_timeout, "idle_timeout")
        if self.task_resources:
            raise ValueError("task_resources: the process engine honours none (the model says why)")

    def check_resources(self, requested: dict[str, int]) -> dict[str, int]:
        return check_resources(self.task_resources, requested)

    @property
    def worker_python(self) -> str | None:
        return self.engine.worker_python


EndpointConfig = Union[ProcessEndpointSettings, "UserEndpointConfig"]


def read_settings(document: Any) -> ProcessEndpointSettings | None:
    """``document`` (a rendered, parsed config) as settings if it is a valid plain ``process`` config;
    None when the model must decide (another shape, or a config the structs refuse)."""
    try:
        return msgspec.convert(document, ProcessEndpointSettings)
    except (msgspec.ValidationError, ValueError):
        return None

"""The endpoint's own reading of its config: msgspec structs for the ``process`` engine, not pydantic.

The spawner validated the rendered config with ``mep.config.endpoint`` before
it wrote the boot document, so the endpoint needs no second validation, only
the values: pydantic (about half of the endpoint's import time) stays off the
cold-start path of the ``process`` engine. These structs mirror
``ProcessEngine`` and ``UserEndpointConfig`` field for field and refuse any key
they don't know (tests/test_endpoint_settings.py keeps the two in step), so a
field added to the model can't be silently ignored here. An ``htex`` config is
read with the pydantic model itself: that engine imports Parsl, which costs far
more than pydantic, and ``mep.endpoint.parsl_engine`` works on the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Union

import msgspec

from mep.config.task_resources import ResourceLimitError, check_resources

__all__ = ["EndpointConfig", "ResourceLimitError", "load_config"]

if TYPE_CHECKING:
    from mep.config.endpoint import UserEndpointConfig


class ProcessSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``mep.config.endpoint.ProcessEngine``, as the spawner dumped it."""

    type: Literal["process"] = "process"
    workers: int = 1
    worker_python: str | None = None
    container: None = None  # a config with a container is read with the model (load_config)


class LargeResultSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``mep.config.endpoint.LargeResults``, as the spawner dumped it."""

    threshold_bytes: int = 1024 * 1024
    directory: str = "~/.mep/results"
    retention: float = 7 * 24 * 3600.0


class ProcessEndpointSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``mep.config.endpoint.UserEndpointConfig`` with a ``process`` engine."""

    engine: ProcessSettings = msgspec.field(default_factory=ProcessSettings)
    idle_timeout: float = 300.0
    large_results: LargeResultSettings = msgspec.field(default_factory=LargeResultSettings)
    task_resources: dict[str, int] = msgspec.field(default_factory=dict)

    def check_resources(self, requested: dict[str, int]) -> dict[str, int]:
        return check_resources(self.task_resources, requested)

    @property
    def worker_python(self) -> str | None:
        return self.engine.worker_python


EndpointConfig = Union[ProcessEndpointSettings, "UserEndpointConfig"]


def load_config(document: dict[str, Any]) -> EndpointConfig:
    """The boot document's (already validated) config; raises ValueError if it is not one."""
    engine = document.get("engine", {})
    if isinstance(engine, dict) and engine.get("type", "process") == "process":
        try:
            return msgspec.convert(document, ProcessEndpointSettings)
        except msgspec.ValidationError:
            pass  # not the plain shape (a container, or not valid at all): the model decides, with its message
    from mep.config.endpoint import UserEndpointConfig

    return UserEndpointConfig.model_validate(document)

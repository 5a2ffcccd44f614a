"""The service's settings file (``/etc/mep/service.yaml``) and the one rule for finding its state.

Where the service's state lives, first match wins: ``--state-dir``, then
``$MEP_STATE_DIR``, then ``state_dir`` in the settings file (``--config``,
default ``/etc/mep/service.yaml`` when it exists), then the default
(``/var/lib/mep/service`` as root, ``~/.mep/service`` otherwise). Only
``mep service init`` and ``mep service start`` create state there; every other
admin command refuses and says where it looked, so a forgotten option never
silently makes a second, empty service with a new key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mep.config.settings_file import read_mapping, validated
from mep.errors import ConfigurationError
from mep.protocol.framing import DEFAULT_MAX_PAYLOAD_BYTES

DEFAULT_SERVICE_CONFIG = Path("/etc/mep/service.yaml")
STATE_DIR_VARIABLE = "MEP_STATE_DIR"


def default_state_dir(kind: str) -> Path:
    """Root's state lives under /var/lib/mep, a user's under ~/.mep: they never collide."""
    if os.geteuid() == 0:
        return Path("/var/lib/mep") / kind
    return Path.home() / ".mep" / kind


class ServiceConfig(BaseModel):
    """``/etc/mep/service.yaml``: every key is optional; command-line options override it.

    Apart from ``state_dir`` and ``metrics_listen`` these are the broker's settings
    (``mep.service.broker.BrokerSettings``), under the same names.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dir: Path | None = Field(default=None, description="The service's key pair and database (0700)")
    listen: str = Field(default="tcp://127.0.0.1:5790", description="Address to bind")
    heartbeat_interval: float = Field(default=10.0, gt=0, description="Seconds between heartbeats to managers")
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD_BYTES, ge=1024,
                                   description="Largest serialised function or arguments of one task")
    dispatch_batch: int = Field(default=500, ge=1, description="Tasks handed to a manager in one message")
    max_attempts: int = Field(default=3, ge=1, description="Runs a task gets when its endpoint keeps dying")
    result_retention: float = Field(default=7 * 24 * 3600.0, ge=1,
                                    description="Seconds an uncollected result is kept")
    max_queued_tasks: int = Field(default=100_000, ge=1, description="Unfinished tasks one identity may have; "
                                  "further tasks of a SUBMIT are refused (quota_exceeded)")
    max_result_bytes: int = Field(default=10 * 1024**3, ge=0, description="Stored, uncollected result bytes one "
                                  "identity may have before its SUBMITs are refused (quota_exceeded)")
    max_auth_failures: int = Field(default=100, ge=0, description="Failed token checks from one address within "
                                   "auth_failure_window before it is refused (auth_throttled); 0: no limit")
    auth_failure_window: float = Field(default=60.0, ge=1, description="Seconds over which failed token checks "
                                       "are counted, and how long an address over the limit is refused")
    max_upload_bytes: int = Field(default=100 * 1024**3, ge=0, description="Bytes of uploaded arguments one "
                                  "identity may hold on the service's disk (docs/user.md, \"Large arguments\")")
    upload_retention: float = Field(default=24 * 3600.0, ge=1, description="Seconds an upload no unfinished task "
                                    "needs is kept after it was last used")
    metrics_listen: str | None = Field(default=None, description="HOST:PORT or :PORT (loopback) for Prometheus "
                                       "metrics (mep.metrics); off when unset")

    @classmethod
    def load(cls, path: Path) -> ServiceConfig:
        return validated(cls, read_mapping(path, "service config", empty_is_defaults=True), path)

    def broker_settings(self, **overrides: Any) -> Any:  # BrokerSettings, imported lazily (zmq)
        from mep.service.broker import BrokerSettings

        names = {field.name for field in dataclasses.fields(BrokerSettings)}
        values = {name: value for name, value in self.model_dump().items() if name in names}
        values.update({name: value for name, value in overrides.items() if value is not None})
        return BrokerSettings(**values)


@dataclass(frozen=True)
class StateLocation:
    directory: Path
    source: str  # which rule chose it, for messages
    looked: tuple[str, ...]  # every rule tried, in order, for "where I looked"


def service_config(config_path: Path | None) -> tuple[ServiceConfig, Path | None]:
    """The settings file named, or /etc/mep/service.yaml if it exists, or all defaults."""
    if config_path is not None:
        return ServiceConfig.load(config_path), config_path
    if DEFAULT_SERVICE_CONFIG.is_file():
        return ServiceConfig.load(DEFAULT_SERVICE_CONFIG), DEFAULT_SERVICE_CONFIG
    return ServiceConfig(), None


def locate_state(state_dir: Path | None, config_path: Path | None = None) -> StateLocation:
    looked = []
    if state_dir is not None:
        return StateLocation(state_dir, "--state-dir", ("--state-dir",))
    looked.append("--state-dir (not given)")
    from_environment = os.environ.get(STATE_DIR_VARIABLE)
    if from_environment:
        return StateLocation(Path(from_environment), f"${STATE_DIR_VARIABLE}", (*looked, f"${STATE_DIR_VARIABLE}"))
    looked.append(f"${STATE_DIR_VARIABLE} (unset)")
    config, found = service_config(config_path)
    if config.state_dir is not None:
        return StateLocation(config.state_dir, f"state_dir in {found}", (*looked, f"state_dir in {found}"))
    looked.append(f"state_dir in {found} (not set)" if found else f"{DEFAULT_SERVICE_CONFIG} (absent)")
    default = default_state_dir("service")
    return StateLocation(default, "the default", (*looked, f"the default {default}"))


def open_state(state_dir: Path | None, config_path: Path | None = None, *, create: bool = False):  # noqa: ANN201
    """The service's state (``ServiceState``); unless ``create``, refuses when there is none."""
    from mep.service.state import ServiceState

    location = locate_state(state_dir, config_path)
    if not create and not ServiceState.exists(location.directory):
        raise ConfigurationError(
            f"no service state in {location.directory} (chosen by {location.source}; looked at: "
            f"{', '.join(location.looked)}). Point at the running service's state with --state-dir or "
            f"${STATE_DIR_VARIABLE}, or create new state with 'mep service init'")
    return ServiceState.open(location.directory)

"""The manager's configuration file (``/etc/mep/NAME/config.yaml``), read as root at start.

Every path in it is admin-owned policy: the spawner refuses files that others
could have written (see ``mep.manager.spawner.policy_files``). Nothing in a
user's request can name a path here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mep.errors import ConfigurationError


DEFAULT_DISABLED_SHELLS = ("/sbin/nologin", "/usr/sbin/nologin", "/bin/false")
_ACCOUNT_OR_GROUP_NAME = r"^[A-Za-z0-9._][A-Za-z0-9._@-]*$"


class PamConfig(BaseModel):
    """``pam:``: account and session management per user endpoint (see docs/identity.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enable: bool = False
    service: str = Field(default="mep", pattern=r"^[A-Za-z0-9._-]+$",
                         description="The /etc/pam.d file to use (ship packaging/pam.d/mep)")
    library: str = Field(default="libpam.so.0", description="The PAM library (libpam_wrapper.so in tests)")
    timeout: float = Field(default=30.0, gt=0, le=600,
                           description="Seconds to wait for account and session management per endpoint")


def shipped_templates_dir() -> Path:
    """Where the templates that ship with mep were installed (``<prefix>/share/mep/templates``)."""
    installed = Path(sys.prefix) / "share" / "mep" / "templates"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / "templates"  # running from a source checkout


class ManagerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_id: str = Field(description="The endpoint id the service registered for this manager")
    service_address: str = Field(description="tcp://host:port of the service")
    service_public_key: str = Field(description="The service's CURVE public key (pinned)")
    manager_secret_key_file: Path = Field(description="This manager's CURVE secret key, mode 0600")
    identity_mapping: Path = Field(description="Identity-mapping file (Globus Connect Server format)")
    template: Path = Field(default_factory=lambda: shipped_templates_dir() / "local.yaml.j2")
    schema_file: Path = Field(default_factory=lambda: shipped_templates_dir() / "local.schema.json",
                              alias="schema")
    min_uid: int = Field(default=1000, ge=1)
    router_user: str = Field(default="mep", description="Unprivileged account the router runs as")
    run_dir: Path | None = Field(default=None, description="Where the endpoint socket lives; default "
                                 "/run/mep/<endpoint id> as root, a private directory under /tmp otherwise")
    heartbeat_interval: float = Field(default=10.0, gt=0)
    identity_mapping_timeout: float = Field(default=5.0, gt=0, le=300,
                                            description="Seconds an external identity-mapping program may take")
    allow_users: frozenset[Annotated[str, Field(pattern=_ACCOUNT_OR_GROUP_NAME)]] = Field(
        default=frozenset(), description="If set, only these accounts may run tasks")
    deny_users: frozenset[Annotated[str, Field(pattern=_ACCOUNT_OR_GROUP_NAME)]] = frozenset()
    allow_groups: frozenset[Annotated[str, Field(pattern=_ACCOUNT_OR_GROUP_NAME)]] = Field(
        default=frozenset(), description="If set, only members of these groups may run tasks")
    deny_groups: frozenset[Annotated[str, Field(pattern=_ACCOUNT_OR_GROUP_NAME)]] = frozenset()
    disabled_shells: frozenset[str] = Field(default=frozenset(DEFAULT_DISABLED_SHELLS),
                                            description="Accounts with one of these login shells are refused")
    refuse_locked: bool = Field(default=False, description="Also refuse accounts whose password is locked (!, *)")
    pam: PamConfig = Field(default_factory=PamConfig)
    audit_log: Path | None = Field(default=None, description="JSON-lines audit log; default "
                                   "/var/log/mep/audit-<endpoint id>.jsonl as root, ~/.mep/log/... otherwise")
    metrics_listen: str | None = Field(default=None, description="HOST:PORT or :PORT (loopback) for the router's "
                                       "Prometheus metrics (mep.metrics); off when unset")

    @classmethod
    def load(cls, path: Path) -> ManagerConfig:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigurationError(f"cannot read manager config {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigurationError(f"{path} must be a YAML mapping of settings")
        base = path.parent
        for key in ("manager_secret_key_file", "identity_mapping", "template", "schema", "run_dir", "audit_log"):
            if isinstance(data.get(key), str) and not os.path.isabs(data[key]):
                data[key] = str(base / data[key])  # relative paths are relative to the config file
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigurationError(f"{path}: {problems}") from None

    def audit_log_path(self) -> Path:
        if self.audit_log is not None:
            return self.audit_log
        if os.geteuid() == 0:
            return Path("/var/log/mep") / f"audit-{self.endpoint_id}.jsonl"
        return Path.home() / ".mep" / "log" / f"audit-{self.endpoint_id}.jsonl"

    def socket_dir(self) -> Path:
        if self.run_dir is not None:
            return self.run_dir
        if os.geteuid() == 0:
            return Path("/run/mep") / self.endpoint_id
        return Path("/tmp") / f"mep-{os.geteuid()}" / self.endpoint_id[:8]

"""The manager's configuration file (``/etc/mep/NAME/config.yaml``), read as root at start.

Every path in it is admin-owned policy: the spawner refuses files that others
could have written (see ``mep.manager.spawner.policy_files``). Nothing in a
user's request can name a path here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mep.errors import ConfigurationError


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
        for key in ("manager_secret_key_file", "identity_mapping", "template", "schema", "run_dir"):
            if isinstance(data.get(key), str) and not os.path.isabs(data[key]):
                data[key] = str(base / data[key])  # relative paths are relative to the config file
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigurationError(f"{path}: {problems}") from None

    def socket_dir(self) -> Path:
        if self.run_dir is not None:
            return self.run_dir
        if os.geteuid() == 0:
            return Path("/run/mep") / self.endpoint_id
        return Path("/tmp") / f"mep-{os.geteuid()}" / self.endpoint_id[:8]

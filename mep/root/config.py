"""The manager's config file as the root process reads it: a msgspec Struct, no pydantic.

The admin's tools (``mep endpoint configure``, ``mep manager start`` before it
execs the root process, the docs) use ``mep.config.manager.ManagerConfig``,
which also describes each option; ``tests/test_root_size.py`` keeps the two
agreeing on every option's name and default. The root process itself reads
the file with this one. Relative paths are relative to the config file.
"""

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import msgspec
import msgspec.yaml

from mep.root.accounts import DEFAULT_DISABLED_SHELLS
from mep.root.errors import ConfigurationError
from mep.root.pam import DEFAULT_LIBRARY

_NAME = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._][A-Za-z0-9._@-]*$")]


def shipped_templates_dir() -> Path:
    """Where the templates that ship with mep were installed (``<prefix>/share/mep/templates``)."""
    installed = Path(sys.prefix) / "share" / "mep" / "templates"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "templates"  # or a checkout's


class PamSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``pam:``; the session holder gets it as it is."""

    service: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]+$")] = "mep"
    library: str = DEFAULT_LIBRARY  # tests point it at libpam_wrapper.so
    timeout: Annotated[float, msgspec.Meta(gt=0, le=600)] = 30.0  # how long the spawner waits for PAM's answer
    enable: bool = False


class EndpointLimits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    nproc: Annotated[int, msgspec.Meta(ge=1)] | None = None
    address_space: Annotated[int, msgspec.Meta(ge=1 << 26)] | None = None
    cpu: Annotated[int, msgspec.Meta(ge=1)] | None = None
    nofile: Annotated[int, msgspec.Meta(ge=16)] | None = None
    core: Annotated[int, msgspec.Meta(ge=0)] | None = None


class RootConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    endpoint_id: str
    service_address: str
    service_public_key: str
    manager_secret_key_file: Path
    identity_mapping: Path
    template: Path = msgspec.field(default_factory=lambda: shipped_templates_dir() / "local.yaml.j2")
    schema_file: Path = msgspec.field(default_factory=lambda: shipped_templates_dir() / "local.schema.json",
                                      name="schema")
    min_uid: Annotated[int, msgspec.Meta(ge=1)] = 1000
    router_user: str = "mep"
    run_dir: Path | None = None
    heartbeat_interval: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    identity_mapping_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    identity_mapping_user: _NAME = "nobody"
    allow_users: frozenset[_NAME] = frozenset()
    deny_users: frozenset[_NAME] = frozenset()
    allow_groups: frozenset[_NAME] = frozenset()
    deny_groups: frozenset[_NAME] = frozenset()
    disabled_shells: frozenset[str] = DEFAULT_DISABLED_SHELLS
    refuse_locked: bool = False
    pam: PamSettings = msgspec.field(default_factory=PamSettings)
    max_queued_tasks: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    max_queued_bytes: Annotated[int, msgspec.Meta(ge=1024**2)] = 256 * 1024**2
    submitter_share: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.25
    max_concurrent_spawns: Annotated[int, msgspec.Meta(ge=1)] = 4
    max_endpoints_per_account: Annotated[int, msgspec.Meta(ge=1)] = 8
    audit_log: Path | None = None
    task_log: Path | None = None
    service_signing_keys: Annotated[list[Annotated[str, msgspec.Meta(pattern=r"^ed25519:[A-Za-z0-9+/]{43}=$")]],
                                    msgspec.Meta(max_length=4)] = []
    share_endpoints_across_identities: bool = False
    endpoint_limits: EndpointLimits = msgspec.field(default_factory=EndpointLimits)
    allow_setuid_helpers: bool = False
    metrics_listen: str | None = None

    def __post_init__(self) -> None:
        # A compromised router could then trace the program and forge its answer: who maps to which account.
        if self.identity_mapping_user == self.router_user:
            raise ValueError(f"identity_mapping_user must not be the router's account ({self.router_user!r})")

    @classmethod
    def load(cls, path: Path) -> "RootConfig":
        """Read and check ``path``; the paths in it are relative to its directory (an absolute one stays so)."""
        def relative_to_the_file(kind: type, value: Any) -> Path:
            if kind is Path and isinstance(value, str):
                return path.parent / value
            raise TypeError(f"expected a path, got {type(value).__name__}")

        try:  # msgspec.yaml imports PyYAML only here: the session holder needs this module's structs, not YAML
            return msgspec.yaml.decode(path.read_bytes(), type=cls, dec_hook=relative_to_the_file)
        except OSError as exc:
            raise ConfigurationError(f"cannot read manager config {path}: {exc.strerror}") from None
        except msgspec.ValidationError as exc:
            raise ConfigurationError(f"{path}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise ConfigurationError(f"{path} is not valid YAML: {exc}") from None

    def as_json(self) -> dict[str, Any]:
        """The config as JSON data, for the router (which reads it with ``ManagerConfig``)."""
        return msgspec.to_builtins(self, enc_hook=str)

    def audit_log_path(self) -> Path:
        return default_audit_log(self.endpoint_id) if self.audit_log is None else self.audit_log

    def task_log_path(self) -> Path:
        return default_task_log(self.endpoint_id) if self.task_log is None else self.task_log

    def socket_dir(self) -> Path:
        return default_run_dir(self.endpoint_id) if self.run_dir is None else self.run_dir


def default_audit_log(endpoint_id: str) -> Path:
    return _as_root_or_single_user(f"/var/log/mep/audit-{endpoint_id}.jsonl", f"~/.mep/log/audit-{endpoint_id}.jsonl")


def default_task_log(endpoint_id: str) -> Path:
    """The router's task log; as root in a directory of its own, which the root half makes for its account."""
    return _as_root_or_single_user(f"/var/log/mep/router-{endpoint_id}/tasks.jsonl",
                                   f"~/.mep/log/tasks-{endpoint_id}.jsonl")


def default_run_dir(endpoint_id: str) -> Path:
    return _as_root_or_single_user(f"/run/mep/{endpoint_id}", f"/tmp/mep-{os.geteuid()}/{endpoint_id[:8]}")


def _as_root_or_single_user(as_root: str, single_user: str) -> Path:
    """Root's default, or a single-user manager's (under the home of the account it runs as)."""
    return Path(as_root if os.geteuid() == 0 else single_user).expanduser()

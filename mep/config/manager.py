"""The manager's configuration file (``/etc/mep/NAME/config.yaml``), read as root at start.

Every path in it is admin-owned policy: the spawner refuses files that others
could have written (see ``mep.root.policy_files``). Nothing in a
user's request can name a path here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mep.config.settings_file import read_mapping, validated
from mep.root.config import (  # noqa: F401 - one definition, with the root process's reading of this file
    DEFAULT_DISABLED_SHELLS,
    default_audit_log,
    default_run_dir,
    default_task_log,
    shipped_templates_dir,
)


# The options that name files: a relative path in the config file is relative to its directory.
PATH_KEYS = ("manager_secret_key_file", "identity_mapping", "template", "schema", "run_dir", "audit_log", "task_log")
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


class EndpointLimits(BaseModel):
    """``endpoint_limits:``: resource limits (soft and hard) set on every user endpoint before exec.

    A limit only ever lowers: one above the manager's own hard limit stays at
    that hard limit (raising it needs CAP_SYS_RESOURCE). Unset: inherited.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    nproc: int | None = Field(default=None, ge=1, description="Processes of the account (RLIMIT_NPROC)")
    address_space: int | None = Field(default=None, ge=1 << 26, description="Bytes of virtual memory per "
                                      "process (RLIMIT_AS)")
    cpu: int | None = Field(default=None, ge=1, description="CPU seconds per process (RLIMIT_CPU)")
    nofile: int | None = Field(default=None, ge=16, description="Open files per process (RLIMIT_NOFILE)")
    core: int | None = Field(default=None, ge=0, description="Bytes of a core dump (RLIMIT_CORE); 0: none")


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
    identity_mapping_user: str = Field(
        default="nobody", pattern=_ACCOUNT_OR_GROUP_NAME,
        description="Unprivileged account external identity-mapping programs run as (like sshd's "
                    "AuthorizedKeysCommandUser); never the router's account, which faces the network")
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
    # Flow control and limits (docs/reliability.md, "Limits and back-pressure").
    max_queued_tasks: int = Field(default=10_000, ge=1, description="Tasks the router holds at most, for all "
                                  "endpoints together, before they go to an endpoint; the rest wait at the service")
    max_queued_bytes: int = Field(default=256 * 1024**2, ge=1024**2, description="Bytes of arguments and function "
                                  "bodies the router holds at most (one task more may arrive)")
    submitter_share: float = Field(default=0.25, gt=0, le=1, description="Fraction of either limit one submitter "
                                   "may fill; beyond it the service sends that submitter's tasks no more for now")
    max_concurrent_spawns: int = Field(default=4, ge=1, description="User endpoints being started at once; "
                                       "further spawn requests wait their turn")
    max_endpoints_per_account: int = Field(default=8, ge=1, description="User endpoints running at once for one "
                                           "account; a spawn beyond it is refused (quota_exceeded)")
    audit_log: Path | None = Field(default=None, description="The spawner's JSON-lines audit log (its decisions); "
                                   "default /var/log/mep/audit-<endpoint id>.jsonl as root, ~/.mep/log/... "
                                   "otherwise")
    task_log: Path | None = Field(default=None, description="The router's JSON-lines task log (what it accepted, "
                                  "routed and saw end), written as the router's account; default "
                                  "/var/log/mep/router-<endpoint id>/tasks.jsonl as root, "
                                  "~/.mep/log/tasks-<endpoint id>.jsonl otherwise")
    service_signing_keys: list[Annotated[str, Field(pattern=r"^ed25519:[A-Za-z0-9+/]{43}=$")]] = Field(
        default_factory=list, max_length=4,
        description="The service's Ed25519 public keys (ed25519:...) its identity assertions must be signed with; "
                    "two during a key rollover (mep manager pin-signing-key)")
    share_endpoints_across_identities: bool = Field(
        default=False, description="Let identities that map to one account share a user endpoint (and its "
                                   "workers): one identity's code can then tamper with the other's results")
    endpoint_limits: EndpointLimits = Field(default_factory=EndpointLimits)
    allow_setuid_helpers: bool = Field(
        default=False, description="Start user endpoints without no_new_privs and with the capability bounding "
                                   "set, for a scheduler's setuid client (PBS's pbs_iff)")
    metrics_listen: str | None = Field(default=None, description="HOST:PORT or :PORT (loopback) for the router's "
                                       "Prometheus metrics (mep.metrics); off when unset")

    @model_validator(mode="after")
    def _mapping_programs_do_not_run_as_the_router(self) -> ManagerConfig:
        # A compromised router could then trace the program and forge its answer: who maps to which account.
        if self.identity_mapping_user == self.router_user:
            raise ValueError(f"identity_mapping_user must not be the router's account ({self.router_user!r})")
        return self

    @classmethod
    def load(cls, path: Path) -> ManagerConfig:
        data = read_mapping(path, "manager config")
        base = path.parent
        for key in PATH_KEYS:
            if isinstance(data.get(key), str) and not os.path.isabs(data[key]):
                data[key] = str(base / data[key])  # relative paths are relative to the config file
        return validated(cls, data, path)

    def audit_log_path(self) -> Path:
        return default_audit_log(self.endpoint_id) if self.audit_log is None else self.audit_log

    def task_log_path(self) -> Path:
        return default_task_log(self.endpoint_id) if self.task_log is None else self.task_log

    def socket_dir(self) -> Path:
        return default_run_dir(self.endpoint_id) if self.run_dir is None else self.run_dir

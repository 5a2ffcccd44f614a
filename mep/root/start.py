"""The root process's start (``python -I -m mep.root``): check everything as root, then split into spawner and router.

Like OpenSSH's privilege separation: this process keeps root and becomes the
spawner; the router is a fresh interpreter it starts (and restarts when it
dies) as the router account, which opens every socket and talks to the
spawner only over a socketpair (``spawner.router_process``). Started as an
ordinary account the manager is single-user: the same split happens without a
privilege change, and only identities that map to that account are served.
"""

from __future__ import annotations

import logging
import fcntl
import os
import stat
from pathlib import Path

import msgspec
from setproctitle import setproctitle

from mep.root.config import PamSettings, RootConfig
from mep.root.errors import ConfigurationError
from mep.root.logs import active_format
from mep.root.accounts import Account, AccountPolicy, unprivileged_account
from mep.root.pam import DEFAULT_LIBRARY
from mep.root.policy_files import check_policy_file, read_policy_file
from mep.root.router_process import RouterLaunch
from mep.root.spawner import Spawner, SpawnerSettings
from mep.root.messages import RouterBoot
from mep.root.keys import check_public_key, generate_keypair, public_from_secret, read_secret_key, write_secret_key

log = logging.getLogger("mep.manager")


def prepare_socket_dir(base: Path, owner_uid: int, owner_gid: int) -> tuple[Path, int]:
    """``base`` (root-owned, 0755) holding ``router/`` (router-owned, 0755) for the endpoint socket; the lock's fd.

    Nothing on the path is writable by the accounts whose endpoints connect, so
    no user can plant or swap the socket.
    """
    mode = 0o755 if os.geteuid() == 0 else 0o700
    base.mkdir(mode=mode, parents=True, exist_ok=True)
    info = os.lstat(base)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise ConfigurationError(f"{base} must be a directory owned by uid {os.geteuid()} (not a symlink)")
    os.chmod(base, mode)
    lock_fd = _hold_instance_lock(base)
    router_dir = base / "router"
    router_dir.mkdir(mode=0o755, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(router_dir).st_mode):
        raise ConfigurationError(f"{router_dir} must be a directory (not a symlink)")
    os.chown(router_dir, owner_uid, owner_gid)
    os.chmod(router_dir, 0o755)
    (router_dir / "endpoints.sock").unlink(missing_ok=True)
    return router_dir / "endpoints.sock", lock_fd


def prepare_task_log_dir(task_log: Path, owner: Account) -> None:
    """The router writes its task log itself: its directory is the router account's (made so here if missing).

    An existing directory is never handed over (it might hold root's own log):
    it must already be the router's.
    """
    directory = task_log.parent
    if not directory.exists():
        directory.mkdir(mode=0o750, parents=True)
        os.chown(directory, owner.uid, owner.gid)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != owner.uid:
        raise ConfigurationError(f"the task log's directory {directory} must be a directory (not a symlink) of the "
                                 f"router's account: 'install -d -o {owner.name} -m 0750 {directory}', or set task_log")


def _hold_instance_lock(base: Path) -> int:
    """One manager per endpoint on a host: a second one would take over the first one's socket.

    The lock lives as long as this process (and its router child, which is
    handed it) does; the endpoints never inherit it (privdrop closes every
    descriptor it is not told to pass).
    """
    fd = os.open(base / "manager.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigurationError(f"another manager for this endpoint is already running on this host "
                                 f"(pid {holder}, lock {base / 'manager.lock'})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def router_keypair(path: Path) -> tuple[str, str]:
    """The router's endpoint-facing key pair, kept across restarts so adopted endpoints can reconnect.

    It lives beside the instance lock in the manager's own run directory
    (owned by the manager's account, 0600); the router gets the secret from its
    parent, never from the file.
    """
    if not path.exists():
        write_secret_key(path, generate_keypair()[1])
    secret = read_secret_key(path)
    return public_from_secret(secret), secret


def account_rules(config: RootConfig, router: Account | None) -> tuple[AccountPolicy, frozenset[int]]:
    """The account policy and the owners trusted for policy files, as this process's manager would use them.

    As root (``router`` given) the manager's own uids are off limits and only
    root may own policy; otherwise the manager is single-user: only its own
    account may run tasks, and it may own the policy files too.
    """
    own = os.geteuid()
    policy = AccountPolicy(
        min_uid=config.min_uid, manager_uids=frozenset({0, router.uid}) if router else frozenset(),
        only_uid=None if router else own, allow_users=frozenset(config.allow_users),
        deny_users=frozenset(config.deny_users), allow_groups=frozenset(config.allow_groups),
        deny_groups=frozenset(config.deny_groups), disabled_shells=frozenset(config.disabled_shells),
        refuse_locked=config.refuse_locked)
    return policy, frozenset({0}) if router else frozenset({0, own})


def pam_settings(config: RootConfig, config_path: Path, *, trusted_owner_uids: frozenset[int]) -> PamSettings | None:
    """``pam:`` checked at start: root only, a real service file, a library only root can have replaced."""
    if not config.pam.enable:
        return None
    if os.geteuid() != 0:
        raise ConfigurationError(f"{config_path}: pam.enable needs a manager started as root (PAM sessions are "
                                 "opened by root); switch it off for a single-user manager")
    service_file = Path("/etc/pam.d") / config.pam.service
    if config.pam.library == DEFAULT_LIBRARY and not service_file.is_file():
        # Linux-PAM falls back to /etc/pam.d/other, which on Debian allows everyone.
        raise ConfigurationError(f"{config_path}: pam.service is {config.pam.service!r} but {service_file} does not "
                                 "exist; install packaging/pam.d/mep there (PAM would fall back to 'other')")
    if os.path.isabs(config.pam.library):
        check_policy_file(Path(os.path.realpath(config.pam.library)), trusted_owner_uids=trusted_owner_uids)
    # Built again: the admin's tools pass a ManagerConfig, whose pam section is a pydantic model.
    return PamSettings(service=config.pam.service, library=config.pam.library, timeout=config.pam.timeout, enable=True)


def start_manager(config_path: Path) -> int:
    config = RootConfig.load(config_path)
    as_root = os.geteuid() == 0
    secret_key = read_secret_key(config.manager_secret_key_file)
    check_public_key(config.service_public_key, f"service_public_key in {config_path}")
    if not config.service_signing_keys:
        raise ConfigurationError(f"{config_path}: service_signing_keys is empty, so no task could be verified; run "
                                 f"'mep manager pin-signing-key --config {config_path} KEY' with the key "
                                 "'mep service signing-key show' prints on the service host")
    router = unprivileged_account(config.router_user if as_root else None, "router_user")
    policy, trusted = account_rules(config, router if as_root else None)
    pam = pam_settings(config, config_path, trusted_owner_uids=trusted)
    socket_path, lock_fd = prepare_socket_dir(config.socket_dir(), router.uid, router.gid if as_root else os.getegid())
    router_public, router_secret = router_keypair(config.socket_dir() / "router.key")
    config = msgspec.structs.replace(config, task_log=config.task_log_path())  # the router is not root: say where
    prepare_task_log_dir(config.task_log, router)
    address = f"ipc://{socket_path}"
    launch = RouterLaunch(
        account=router, drop_privileges=as_root, lock_fd=lock_fd,
        boot=RouterBoot(config=config.as_json(), manager_secret_key=secret_key,
                        endpoint_address=address, endpoint_secret_key=router_secret,
                        log_level=logging.getLogger().getEffectiveLevel(), log_format=active_format(),
                        schema_text=read_policy_file(config.schema_file, trusted_owner_uids=trusted).decode(),
                        template_text=read_policy_file(config.template, trusted_owner_uids=trusted).decode()))
    spawner = Spawner(SpawnerSettings(config=config, router_address=address, router_public_key=router_public,
                                      policy=policy, trusted_owner_uids=trusted, drop_privileges=as_root,
                                      audit_log=config.audit_log_path(), pam=pam,
                                      registry_path=config.socket_dir() / "endpoints.json", router=launch))
    log.info("manager for endpoint %s starting (%s mode)", config.endpoint_id,
             "multi-user" if as_root else f"single-user as uid {os.geteuid()}")
    setproctitle(f"mep-manager spawner {config.endpoint_id}")
    return spawner.run()

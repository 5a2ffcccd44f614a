"""``mep manager start``: check everything as root, then split into spawner (root) and router.

Like OpenSSH's privilege separation: the parent keeps root and becomes the
spawner; the forked child drops to the router account before it opens a
single socket, and talks to the parent only over a socketpair. No ZeroMQ
context exists before the fork. Started as an ordinary account the manager
is single-user: the same split happens without a privilege change, and only
identities that map to that account are served.
"""

from __future__ import annotations

import logging
import fcntl
import os
import pwd
import signal
import stat
import sys
from pathlib import Path

from setproctitle import setproctitle

from mep.config.manager import ManagerConfig
from mep.errors import ConfigurationError
from mep.manager.spawner.accounts import Account, AccountPolicy
from mep.manager.spawner.authorize import account_policy
from mep.manager.spawner.interpreter import check_interpreter_usable
from mep.manager.spawner.pam import DEFAULT_LIBRARY
from mep.manager.spawner.policy_files import check_policy_file
from mep.manager.spawner.privdrop import drop_privileges_in_process
from mep.manager.spawner.session_holder import PamSettings
from mep.manager.spawner.spawner import Spawner, SpawnerSettings
from mep.manager.spawner_link import SpawnerLink, channel_pair
from mep.protocol.curve import check_public_key, generate_keypair, public_from_secret, read_secret_key, write_secret_key
from mep.sdnotify import notify_ready

log = logging.getLogger("mep.manager")


def router_account(name: str) -> Account:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigurationError(
            f"the router account {name!r} does not exist; create it with "
            f"'useradd --system --no-create-home --shell /usr/sbin/nologin {name}' or set router_user"
        ) from None
    if entry.pw_uid == 0:
        raise ConfigurationError(f"the router account {name!r} is root; it must be an unprivileged account")
    return Account.from_passwd(entry)


def prepare_socket_dir(base: Path, owner_uid: int, owner_gid: int) -> Path:
    """``base`` (root-owned, 0755) holding ``router/`` (router-owned, 0755) for the endpoint socket.

    Nothing on the path is writable by the accounts whose endpoints connect, so
    no user can plant or swap the socket.
    """
    root = os.geteuid() == 0
    base.mkdir(mode=0o755 if root else 0o700, parents=True, exist_ok=True)
    info = os.lstat(base)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise ConfigurationError(f"{base} must be a directory owned by uid {os.geteuid()} (not a symlink)")
    os.chmod(base, 0o755 if root else 0o700)
    _hold_instance_lock(base)
    router_dir = base / "router"
    router_dir.mkdir(mode=0o755, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(router_dir).st_mode):
        raise ConfigurationError(f"{router_dir} must be a directory (not a symlink)")
    os.chown(router_dir, owner_uid, owner_gid)
    os.chmod(router_dir, 0o755)
    socket_path = router_dir / "endpoints.sock"
    socket_path.unlink(missing_ok=True)
    return socket_path


_instance_lock: int | None = None


def _hold_instance_lock(base: Path) -> None:
    """One manager per endpoint on a host: a second one would take over the first one's socket.

    The lock lives as long as this process (and its router child) does; the
    spawner's children never inherit it (privdrop closes every descriptor).
    """
    global _instance_lock
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
    _instance_lock = fd


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


def account_rules(config: ManagerConfig, router: Account | None) -> tuple[AccountPolicy, frozenset[int]]:
    """The account policy and the owners trusted for policy files, as this process's manager would use them.

    As root (``router`` given) the manager's own uids are off limits and only
    root may own policy; otherwise the manager is single-user: only its own
    account may run tasks, and it may own the policy files too.
    """
    if router is not None:
        return account_policy(config, manager_uids=frozenset({0, router.uid})), frozenset({0})
    own = os.geteuid()
    return account_policy(config, manager_uids=frozenset(), only_uid=own), frozenset({0, own})


def pam_settings(config: ManagerConfig, config_path: Path, *, trusted_owner_uids: frozenset[int]) -> PamSettings | None:
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
    return PamSettings(service=config.pam.service, library=config.pam.library, timeout=config.pam.timeout)


def start_manager(config_path: Path) -> int:
    config = ManagerConfig.load(config_path)
    as_root = os.geteuid() == 0
    secret_key = read_secret_key(config.manager_secret_key_file)
    check_public_key(config.service_public_key, f"service_public_key in {config_path}")
    if as_root:
        check_interpreter_usable(sys.executable)
    router = router_account(config.router_user) if as_root else None
    policy, trusted = account_rules(config, router)
    pam = pam_settings(config, config_path, trusted_owner_uids=trusted)
    owner = (router.uid, router.gid) if router else (os.geteuid(), os.getegid())
    socket_path = prepare_socket_dir(config.socket_dir(), *owner)
    router_public, router_secret = router_keypair(config.socket_dir() / "router.key")
    address = f"ipc://{socket_path}"
    router_end, spawner_end = channel_pair()
    spawner = Spawner(SpawnerSettings(config=config, router_address=address, router_public_key=router_public,
                                      policy=policy, trusted_owner_uids=trusted, drop_privileges=as_root,
                                      audit_log=config.audit_log_path(), pam=pam,
                                      registry_path=config.socket_dir() / "endpoints.json"),
                      SpawnerLink(spawner_end))
    log.info("manager for endpoint %s starting (%s mode)", config.endpoint_id,
             "multi-user" if as_root else f"single-user as uid {os.geteuid()}")
    router_pid = os.fork()
    if router_pid == 0:
        _become_router(config, router, secret_key, address, router_secret, router_end, spawner_end)
    router_end.close()
    notify_ready()  # systemd (Type=notify): checks passed, router started
    setproctitle(f"mep-manager spawner {config.endpoint_id}")
    spawner.router_pid = router_pid
    code = spawner.run()
    _, status = os.waitpid(router_pid, 0)
    return code or os.waitstatus_to_exitcode(status)


def _become_router(config: ManagerConfig, account: Account | None, secret_key: str, address: str,
                   router_secret: str, router_end, spawner_end) -> None:  # noqa: ANN001 - sockets
    """The forked child: drop to the router account, then serve. Never returns."""
    code = 1
    try:
        spawner_end.close()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # SIGHUP is the spawner's (reload); a terminal's hangup too
        if account is not None:
            drop_privileges_in_process(account)
        setproctitle(f"mep-manager router {config.endpoint_id}")
        from mep.manager.router import Router  # imported after the drop: nothing of it runs as root

        code = Router(config, secret_key, address, router_secret, router_end).run()
    except ConfigurationError as exc:
        log.error("router: %s", exc)
    except BaseException:
        log.exception("router failed")
    finally:
        logging.shutdown()
        os._exit(code)

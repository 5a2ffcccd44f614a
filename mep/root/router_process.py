"""The router as the spawner's child: a fresh interpreter as the router account, restarted when it dies.

``start_router`` forks and, in the child, runs privdrop's checked steps: a
new session, the drop to the router account (none in single-user mode),
no_new_privs, stdout and stderr on ``/dev/null``, every descriptor closed but
the three it is handed at fixed numbers (``spawner_link.CHANNEL_FD``,
``LOCK_FD``, ``LOG_FD``), then ``execve`` of ``python -I -m
mep.manager.router_main``. The secrets (the manager's service key and the
router's endpoint-facing key) reach it on a stdin pipe, never in argv or the
environment. Its log lines come back on a pipe that a thread of the spawner
copies to its own stderr (``relay_log``), so the router never holds the
manager's terminal or log file (where it could inject input or truncate).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass

import msgspec

from mep.root.accounts import Account
from mep.root.privdrop import SpawnPlan, spawn
from mep.root.messages import RouterBoot, SpawnerLink, channel_pair


ROUTER_MODULE = "mep.manager.router_main"
_RELAY_CHUNK = 65536


@dataclass(frozen=True)
class RouterLaunch:
    """What every start of the router needs, fixed when the manager starts."""

    account: Account
    drop_privileges: bool
    boot: RouterBoot
    lock_fd: int


@dataclass
class RouterProcess:
    pid: int
    pidfd: int
    channel: SpawnerLink
    started_at: float
    relay: threading.Thread | None = None  # copying its log (``relay_log``)

    def close(self) -> None:
        """After its death: let what it said last reach our stderr, close the rest."""
        if self.relay is not None:  # a child of its may still hold the pipe: its lines are not worth a longer wait
            self.relay.join(timeout=1.0)
        os.close(self.pidfd)
        self.channel.sock.close()


def relay_log(log_read: int) -> None:
    """In a thread of its own: copy what a router logs to our stderr, until its pipe's end of file.

    It touches nothing but the two descriptors, so the loop stays the only owner of everything else; a child of
    the router that keeps the pipe open keeps this thread waiting, never the loop.
    """
    with open(log_read, "rb", buffering=0) as pipe:
        for data in iter(lambda: pipe.read(_RELAY_CHUNK), b""):
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(2, view):]
            except OSError:
                pass  # our stderr is gone: the router's lines are lost, never the router


def start_router(launch: RouterLaunch) -> RouterProcess:
    """Fork, drop and exec a router; raises ``SpawnError`` (naming the failed step) if it could not start."""
    router_end, spawner_end = channel_pair()
    log_read, log_write = os.pipe2(os.O_CLOEXEC)
    try:
        child = spawn(SpawnPlan(
            account=launch.account, argv=[sys.executable, "-I", "-m", ROUTER_MODULE],
            stdin_data=msgspec.json.encode(launch.boot), log_path="", drop_privileges=launch.drop_privileges,
            title="the router", pass_fds=(router_end.fileno(), launch.lock_fd, log_write)))
    except BaseException:
        spawner_end.close()
        os.close(log_read)
        raise
    finally:
        router_end.close()
        os.close(log_write)
    relay = threading.Thread(target=relay_log, args=(log_read,), name="router log", daemon=True)
    relay.start()
    return RouterProcess(pid=child.pid, pidfd=child.pidfd, channel=SpawnerLink(spawner_end),
                         started_at=time.monotonic(), relay=relay)

"""Workers in a container the admin allows: the command lines mep builds for Podman, Apptainer and Singularity.

Every command line is an argv list built here from the validated config
(``mep.config.endpoint.Container``): the image is one argument, the home
directory is bind-mounted at its own path so tasks see the researcher's
files, and the worker's connection is a socket passed by descriptor, as for
a ``worker_python`` worker (``mep.endpoint.interpreters``). No shell is
involved: for Podman a fixed line of this interpreter moves the connection
to descriptor 3 and execs podman, because Podman passes descriptors into a
container only from 3 up (``--preserve-fds``).

Podman runs rootless as the mapped account, which needs the setuid
``newuidmap``: the manager must allow setuid helpers (``allow_setuid_helpers``), or every task fails
saying so. It runs (``--userns=keep-id``: the same
uid inside), with no network (the worker talks only over its socket) and
the host's resource limits (a container may not raise them). Apptainer and
Singularity run the image as the account itself and keep descriptors open,
so they need no such steps.
"""

from __future__ import annotations

import shutil
import sys
from multiprocessing.connection import Connection

from mep.config.endpoint import Container
from mep.endpoint.interpreters import LOADER, WorkerProcess, start_bootstrap

PODMAN_FD = 3  # the first descriptor ``--preserve-fds`` passes into a container
# argv[1]: the connection's descriptor here; argv[2:]: the podman command (no shell: dash can't dup past fd 9)
_MOVE_TO_FD3 = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.execvp(sys.argv[2], sys.argv[2:])"


def worker_argv(container: Container, home: str, fd: int) -> list[str]:
    """The argv that starts a bootstrap worker in ``container``, its connection being ``fd`` in this process."""
    if container.type == "podman":
        runtime = ["--runtime", container.runtime] if container.runtime else []
        return [sys.executable, "-I", "-c", _MOVE_TO_FD3, str(fd),
                "podman", *runtime, "run", "--rm", "--preserve-fds=1", "--network=none", "--userns=keep-id",
                "--ulimit=host", f"--volume={home}:{home}", f"--workdir={home}", "--env=HOME=" + home,
                "--", container.image, container.python, "-I", "-c", LOADER, str(PODMAN_FD)]
    return [container.type, "exec", "--cleanenv", "--bind", f"{home}:{home}", "--pwd", home,
            container.image, container.python, "-I", "-c", LOADER, str(fd)]


def container_problem(container: Container) -> str | None:
    """Why workers can't start in ``container`` from this process, said so an admin can act; None: they can."""
    if shutil.which(container.type) is None:
        return f"the container tool {container.type} is not installed on the endpoint's host (not on PATH)"
    if container.type == "podman" and _no_new_privs():
        # rootless podman maps the account's subordinate ids with the setuid newuidmap/newgidmap
        return ("rootless podman needs the setuid helpers newuidmap and newgidmap, which can't gain privileges "
                "in a user endpoint started with no_new_privs: the admin must set allow_setuid_helpers: true in "
                "the manager's config to offer podman containers")
    return None


def _no_new_privs() -> bool:
    with open("/proc/self/status") as status:
        return any(line.split() == ["NoNewPrivs:", "1"] for line in status)


def start_container_worker(container: Container, home: str) -> tuple[WorkerProcess, Connection]:
    return start_bootstrap(lambda fd: worker_argv(container, home, fd))

"""Workers in a container the admin allows: Podman for real (rootless, as the mapped account), Apptainer by argv.

No registry is reachable, so the image is built here: a root file system holding this machine's Python
3.11 (the interpreter, its standard library and the shared libraries they load) and dill, made into an
image with ``podman import`` by the account itself (rootless images are per account).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import mep
from mep.config.endpoint import Container
from mep.config.manager import shipped_templates_dir
from mep.endpoint.containers import worker_argv
from mep.endpoint.interpreters import LOADER
from tests.harness import DOMAIN_STRIP, PYTHON, expression_mapping, wait_for
from tests.test_templates import CONTEXT, renderer

TEMPLATES = shipped_templates_dir()
IMAGE = "localhost/mep-python:3.11"  # the one image the shipped local schema lists
STDLIB = Path("/usr/lib/python3.11")
UNNEEDED = {"test", "idlelib", "tkinter", "ensurepip", "lib2to3", "turtledemo", "__pycache__"}


def where_am_i() -> dict:
    import os

    return {"container": os.path.exists("/run/.containerenv"), "host": os.uname().nodename, "uid": os.getuid(),
            "home_file": (open(os.path.expanduser("~/marker")).read())}


def python_rootfs_tar(path: Path) -> None:
    """A tarball of a root file system that runs /usr/bin/python3 with dill (what a bootstrap worker needs)."""
    import dill

    interpreter = Path(os.path.realpath("/usr/bin/python3"))
    libraries = {interpreter, *STDLIB.joinpath("lib-dynload").glob("*.so")}
    needed: set[str] = set()
    for binary in libraries:
        listing = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
        needed.update(word for word in listing.split() if word.startswith("/"))

    def lean(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if UNNEEDED & set(Path(info.name).parts) else info

    with tarfile.open(path, "w") as tar:
        tar.add(interpreter, "usr/bin/python3")
        tar.add(STDLIB, str(STDLIB).lstrip("/"), filter=lean)
        tar.add(Path(dill.__file__).parent, "usr/local/lib/python3.11/dist-packages/dill", filter=lean)
        for library in sorted(needed):
            tar.add(os.path.realpath(library), library.lstrip("/"))
        for directory in ("tmp", "proc", "sys", "dev", "run", "etc", "home"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)


def as_account(account, *command: str) -> subprocess.CompletedProcess:  # noqa: ANN001
    return subprocess.run(["runuser", "-u", account.pw_name, "--", "env", "-i", f"HOME={account.pw_dir}",
                           "PATH=/usr/bin:/bin", f"USER={account.pw_name}", *command],
                          capture_output=True, text=True, cwd=account.pw_dir, timeout=300)


def podman_clients_of(uid: int) -> list[int]:
    """The account's ``podman run`` processes (not the pause process, whose command line is plain "podman")."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
            if os.stat(f"/proc/{entry}").st_uid == uid and command.startswith(b"podman\0") and b"\0run\0" in command:
                found.append(int(entry))
        except OSError:
            continue
    return found


def stop_podman_pause_process(account, *managers) -> None:  # noqa: ANN001
    """Stop the managers (their endpoints end their container workers), then rootless podman's pause process,
    which holds the account's user namespace and would block userdel."""
    for manager in managers:
        manager.process.stop()
    wait_for(lambda: not podman_clients_of(account.pw_uid), timeout=60, what="the container workers to end")
    pid_file = Path(f"/tmp/podman-run-{account.pw_uid}/libpod/tmp/pause.pid")
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 9)
        except ProcessLookupError:
            pass
    shutil.rmtree(pid_file.parents[2], ignore_errors=True)


@pytest.mark.root
def test_a_task_runs_in_the_podman_container_the_researcher_chose(deploy, account_factory, tmp_path) -> None:
    assert shutil.which("podman") and Path("/usr/sbin/runc").exists(), ".ci/run installs podman, uidmap and runc"
    account = account_factory("mepctr")
    tarball = Path(account.pw_dir) / "python-rootfs.tar"
    python_rootfs_tar(tarball)
    os.chown(tarball, account.pw_uid, account.pw_gid)
    (Path(account.pw_dir) / "marker").write_text("from the home directory")
    os.chown(Path(account.pw_dir) / "marker", account.pw_uid, account.pw_gid)
    managers = []
    try:
        imported = as_account(account, "podman", "import", "--quiet", str(tarball), IMAGE)
        assert imported.returncode == 0, imported.stderr
        # the admin's one edit for this host: crun refuses its hybrid cgroups, runc does not
        template = tmp_path / "local.yaml.j2"
        template.write_text((TEMPLATES / "local.yaml.j2").read_text().replace(
            "{% set podman_runtime = none %}", '{% set podman_runtime = "/usr/sbin/runc" %}'))
        manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), template=template,
                                       schema=TEMPLATES / "local.schema.json",
                                       settings={"allow_setuid_helpers": True})  # rootless podman's newuidmap
        managers.append(manager)
        identity = deploy.identity(f"{account.pw_name}@example.org")
        with deploy.executor(identity, manager, user_endpoint_config={"container_image": IMAGE}) as executor:
            inside = executor.submit(where_am_i).result(timeout=180)
        with deploy.executor(identity, manager, user_endpoint_config={"container_image": "docker.io/evil"}) as other:
            with pytest.raises(mep.ConfigInvalidError, match="container_image"):
                other.submit(where_am_i).result(timeout=60)
        strict = deploy.start_manager(expression_mapping(DOMAIN_STRIP), template=template,
                                      schema=TEMPLATES / "local.schema.json")  # no_new_privs, as by default
        with deploy.executor(identity, strict, user_endpoint_config={"container_image": IMAGE}) as executor:
            with pytest.raises(mep.ConfigInvalidError, match="newuidmap.*allow_setuid_helpers: true"):
                executor.submit(where_am_i).result(timeout=60)
    finally:
        stop_podman_pause_process(account, *managers)
    assert inside["container"] is True, "podman writes /run/.containerenv in every container"
    assert inside["host"] != os.uname().nodename, "the container has its own UTS namespace"
    assert inside["uid"] == account.pw_uid, "keep-id: the researcher's own uid inside"
    assert inside["home_file"] == "from the home directory", "the home directory is mounted at its own path"


def test_podman_and_apptainer_command_lines_are_built_as_argv() -> None:
    podman = worker_argv(Container(type="podman", image="localhost/x:1", runtime="/usr/sbin/runc"), "/home/a b", 7)
    assert podman[:3] == [sys.executable, "-I", "-c"] and "os.dup2(int(sys.argv[1]), 3)" in podman[3]
    assert podman[4:] == ["7", "podman", "--runtime", "/usr/sbin/runc",
                      "run", "--rm", "--preserve-fds=1", "--network=none", "--userns=keep-id", "--ulimit=host",
                      "--volume=/home/a b:/home/a b", "--workdir=/home/a b", "--env=HOME=/home/a b", "--",
                      "localhost/x:1", "/usr/bin/python3", "-I", "-c", LOADER, "3"]
    apptainer = worker_argv(Container(type="apptainer", image="/images/analysis.sif"), "/home/a", 5)
    assert apptainer == ["apptainer", "exec", "--cleanenv", "--bind", "/home/a:/home/a", "--pwd", "/home/a",
                         "/images/analysis.sif", "/usr/bin/python3", "-I", "-c", LOADER, "5"]


def test_the_local_template_renders_the_admins_container_and_refuses_what_it_must() -> None:
    template = (TEMPLATES / "local.yaml.j2").read_text().replace('"podman"', '"apptainer"')
    config = renderer("local", schema={"type": "object"}).__class__(
        TEMPLATES / "local.yaml.j2", TEMPLATES / "local.schema.json", template_text=template,
        schema_text=(TEMPLATES / "local.schema.json").read_text()).render({"container_image": IMAGE}, **CONTEXT)
    assert config.engine.container == Container(type="apptainer", image=IMAGE)
    with pytest.raises(mep.ConfigInvalidError, match="container_image"):
        renderer("local").render({"container_image": "-v/:/host"}, **CONTEXT)
    with pytest.raises(mep.ConfigInvalidError, match="worker_python and container both"):
        renderer("local").render({"container_image": IMAGE, "python_env": "envs/a"}, **CONTEXT)
    for image in ("-v/:/host", "a b", "x;id"):
        with pytest.raises(ValueError, match="image"):
            Container(type="podman", image=image)
    with pytest.raises(ValueError, match="runtime is a podman setting"):
        Container(type="apptainer", image="/i.sif", runtime="/usr/sbin/runc")
    assert PYTHON  # the tests' interpreter is the endpoints' one: the image carries the same Python

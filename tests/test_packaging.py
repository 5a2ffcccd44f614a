"""The OS packages hold what docs/admin.md promises, their units verify clean, install.sh stays in its lane.

The packages come from ``dist/`` (CI's ``packaging/check.sh`` builds them before the suite, installs,
runs, removes and purges the .deb); as root with no ``dist/`` this module builds them itself.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

import mep

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "dist"
UNITS = ("mep-service.service", "mep-manager@.service")
SECURITY_THRESHOLD = 20  # tenths, as systemd-analyze counts: the service's exposure stays at or below 2.0
EXPECTED_FILES = (
    "/usr/bin/mep", "/opt/mep/venv/bin/python", "/opt/mep/venv/bin/mep", "/opt/mep/venv/pyvenv.cfg",
    "/etc/mep/service.yaml", "/etc/mep/manager.example.yaml", "/etc/pam.d/mep", "/etc/logrotate.d/mep",
    "/usr/lib/tmpfiles.d/mep.conf", *(f"/usr/lib/systemd/system/{unit}" for unit in UNITS),
    "/usr/share/mep/templates/local.yaml.j2", "/usr/share/mep/templates/slurm.schema.json",
    "/usr/share/mep/identity_maps/example-domain-strip.json", "/usr/share/mep/examples/manager.yaml",
    "/usr/share/doc/mep/admin.md", "/usr/share/doc/mep/user.md",
)


def _built(pattern: str) -> Path | None:
    found = sorted(DIST.glob(pattern))
    return found[-1] if found else None


@pytest.fixture(scope="module")
def packages() -> dict[str, Path]:
    version = mep.__version__
    names = {"deb": f"mep_{version}_*.deb", "rpm": f"mep-{version}-*.rpm"}
    if _built(names["deb"]) is None:
        if os.geteuid() != 0:
            pytest.skip("no dist/ packages; build them with 'bash packaging/build.sh' (root builds them here)")
        # as root both are built: rpmbuild missing is a failure to fix (apt-get install rpm), not a skip
        subprocess.run(["bash", str(REPO / "packaging" / "build.sh")], check=True, capture_output=True,
                       env={**os.environ, "MEP_PACKAGES": "deb rpm"})
    return {kind: path for kind, pattern in names.items() if (path := _built(pattern)) is not None}


@pytest.fixture(scope="module")
def deb_tree(packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("deb")
    subprocess.run(["dpkg-deb", "-x", str(packages["deb"]), str(tree)], check=True)
    subprocess.run(["dpkg-deb", "-e", str(packages["deb"]), str(tree / "DEBIAN")], check=True)
    return tree


def test_deb_holds_the_venv_entry_point_units_configs_and_shared_files(deb_tree: Path) -> None:
    for path in EXPECTED_FILES:
        assert os.path.lexists(deb_tree / path.lstrip("/")), f"the .deb lacks {path}"
    assert os.readlink(deb_tree / "usr/bin/mep") == "/opt/mep/venv/bin/mep"
    # the venv's shared files are the system's /usr/share/mep, where the installed mep finds its templates
    assert os.readlink(deb_tree / "opt/mep/venv/share/mep") == "/usr/share/mep"
    assert os.readlink(deb_tree / "opt/mep/venv/bin/python3") == "/usr/bin/python3"
    assert (deb_tree / "DEBIAN/conffiles").read_text().split() == ["/etc/mep/service.yaml",
                                                                  "/etc/mep/manager.example.yaml"]
    control = (deb_tree / "DEBIAN/control").read_text()
    assert f"Version: {mep.__version__}\n" in control and "Depends: python3." in control


def test_the_venv_names_only_its_final_path(deb_tree: Path) -> None:
    venv = deb_tree / "opt/mep/venv"
    assert "command = /usr/bin/python3 -m venv /opt/mep/venv" in (venv / "pyvenv.cfg").read_text()
    for script in (venv / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            first = script.read_bytes().split(b"\n", 1)[0]
            if first.startswith(b"#!"):
                assert first.startswith(b"#!/opt/mep/venv/bin/python"), f"{script.name}: {first!r}"
    assert not (venv / "bin" / "pip").exists(), "the package manager owns the venv: no pip in it"


def test_the_shipped_byte_code_names_the_installed_sources(deb_tree: Path) -> None:
    compiled = next((deb_tree / "opt/mep/venv/lib").glob("python3*/site-packages/mep/__pycache__/errors.*.pyc"))
    assert b"/opt/mep/venv/lib/python3" in compiled.read_bytes()
    assert str(deb_tree).encode() not in compiled.read_bytes()


def test_maintainer_scripts_create_the_account_and_clean_up(deb_tree: Path) -> None:
    scripts = {name: (deb_tree / "DEBIAN" / name) for name in ("postinst", "prerm", "postrm")}
    for name, path in scripts.items():
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, name
        subprocess.run(["sh", "-n", str(path)], check=True)  # the shell dpkg runs them with
    assert "mep_configure" in scripts["postinst"].read_text().rsplit("\n", 2)[-2]
    assert "__pycache__" in scripts["prerm"].read_text()
    assert "purge) mep_after_remove; mep_purge" in scripts["postrm"].read_text()


def test_logrotate_reopens_audit_logs_and_truncates_the_daemons_logs(deb_tree: Path) -> None:
    """Audit logs: a new file and SIGHUP to the spawners. The routers' task logs: rotated as the router's account in
    its own directory, no new file (the router opens one when it sees the rename). The daemons' stderr logs (no
    systemd): copytruncate, since nothing reopens stderr; moving them would leave the daemons writing to the old file."""
    stanzas = dict(re.findall(r"^(\S+) \{\n(.*?)^\}", (deb_tree / "etc/logrotate.d/mep").read_text(), flags=re.M | re.S))
    assert set(stanzas) == {"/var/log/mep/*.jsonl", "/var/log/mep/router-*/tasks.jsonl", "/var/log/mep/*.log"}
    assert "create 0600 root root" in stanzas["/var/log/mep/*.jsonl"] and "--signal=HUP" in stanzas["/var/log/mep/*.jsonl"]
    tasks = stanzas["/var/log/mep/router-*/tasks.jsonl"]
    assert "su mep mep" in tasks and "nocreate" in tasks and "postrotate" not in tasks
    assert "copytruncate" in stanzas["/var/log/mep/*.log"] and "create" not in stanzas["/var/log/mep/*.log"]


@pytest.mark.parametrize("unit", UNITS)
def test_units_verify_without_a_word(deb_tree: Path, unit: str) -> None:
    """systemd-analyze verify exits 0 even on unknown keys: any output is a failure.

    One line depends on this host rather than the unit: ExecStart's program (/usr/bin/mep, or the venv's
    python for the manager's root process) exists only where the package is installed (CI's
    packaging/check.sh verifies there, with nothing filtered).
    """
    result = subprocess.run(["systemd-analyze", "verify", str(deb_tree / "usr/lib/systemd/system" / unit)],
                            capture_output=True, text=True)
    output = (result.stdout + result.stderr).splitlines()
    program = "/opt/mep/venv/bin/python" if unit.startswith("mep-manager") else "/usr/bin/mep"
    if os.path.exists(program):
        assert result.returncode == 0 and output == []
    else:
        assert output == [f"{unit.replace('@.', '@i.')}: Command {program} is not executable: No such file or directory"]


def test_service_unit_is_hardened_below_the_threshold(deb_tree: Path) -> None:
    unit = deb_tree / "usr/lib/systemd/system/mep-service.service"
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--threshold={SECURITY_THRESHOLD}",
                             str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "Overall exposure level for mep-service.service: 1." in result.stdout


def test_manager_unit_keeps_user_endpoints_alive_across_restarts(deb_tree: Path) -> None:
    text = (deb_tree / "usr/lib/systemd/system/mep-manager@.service").read_text()
    settings = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert "KillMode=process" in settings and "Type=notify" in settings and "Restart=on-failure" in settings
    assert "ExecStart=/opt/mep/venv/bin/python -I -m mep.root --config /etc/mep/%i/config.yaml" in settings
    # namespaces, seccomp and NoNewPrivileges would be inherited by every user endpoint
    assert not [line for line in settings if line.startswith(("Protect", "Private", "NoNewPrivileges",
                                                               "SystemCallFilter", "CapabilityBoundingSet"))]


def test_rpm_lists_the_same_files_requires_python_and_runs_the_shared_scripts(packages: dict[str, Path]) -> None:
    if "rpm" not in packages and os.geteuid() != 0:
        pytest.skip("no .rpm in dist/ (rpmbuild missing: apt-get install rpm)")
    assert "rpm" in packages, "no .rpm in dist/: 'bash packaging/build.sh' with rpmbuild (apt-get install rpm)"
    rpm = str(packages["rpm"])
    listing = subprocess.run(["rpm", "-qpl", rpm], check=True, capture_output=True, text=True).stdout.split()
    assert set(EXPECTED_FILES) <= set(listing)
    requires = subprocess.run(["rpm", "-qpR", rpm], check=True, capture_output=True, text=True).stdout
    assert "python(abi) = 3." in requires and ".so" not in requires
    configs = subprocess.run(["rpm", "-qpc", rpm], check=True, capture_output=True, text=True).stdout.split()
    assert {"/etc/mep/service.yaml", "/etc/mep/manager.example.yaml"} <= set(configs)
    scripts = subprocess.run(["rpm", "-qp", "--scripts", rpm], check=True, capture_output=True, text=True).stdout
    assert "useradd --system" in scripts and 'if [ "$1" -eq 0 ]; then mep_after_remove; fi' in scripts


def test_install_sh_answers_help() -> None:
    result = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "MEP_VENV" in result.stdout and "demo" in result.stdout


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: install.sh changes modes only as root")
def test_install_sh_changes_no_mode_above_its_venv(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    sibling = private / "sibling.txt"
    sibling.write_text("not for others\n")
    sibling.chmod(0o600)
    venv = private / "made" / "by" / "install" / "venv"
    result = subprocess.run(["bash", str(REPO / "scripts" / "install.sh")], capture_output=True, text=True,
                            env={**os.environ, "MEP_VENV": str(venv)})
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert stat.S_IMODE(sibling.stat().st_mode) == 0o600
    assert f"warning: {private.resolve()} is not searchable by other accounts" in result.stderr
    assert stat.S_IMODE((private / "made").stat().st_mode) == 0o755  # created by it: searchable
    assert os.stat(venv / "bin" / "python").st_mode & stat.S_IXOTH


def test_every_file_in_the_deb_is_root_owned(packages: dict[str, Path], tmp_path: Path) -> None:
    """Built with --root-owner-group: nothing in it belongs to the builder's uid."""
    data = tmp_path / "data.tar"
    with open(data, "wb") as out:
        subprocess.run(["dpkg-deb", "--fsys-tarfile", str(packages["deb"])], stdout=out, check=True)
    with tarfile.open(data) as archive:
        owners = {(member.uid, member.gid) for member in archive.getmembers()}
    assert owners == {(0, 0)}

"""Researchers' own Python environments for tests: virtual environments with nothing but (some) dill.

``worker_env`` builds a venv from the system interpreter under /var/tmp,
readable by every account, once per dill version (later calls reuse it);
``link_env`` makes it appear under an account's home, where the templates'
``python_env`` option looks.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

ENVS_ROOT = Path("/var/tmp/mep-test-worker-envs")
SYSTEM_PYTHON = "/usr/bin/python3"


def worker_env(dill_version: str | None) -> Path:
    """A venv with only ``dill==dill_version`` installed (None: nothing at all); returns its directory."""
    path = ENVS_ROOT / (f"dill-{dill_version}" if dill_version else "bare")
    if (path / "ready").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    ENVS_ROOT.mkdir(mode=0o755, exist_ok=True)
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(path)], check=True, capture_output=True)
    if dill_version:
        subprocess.run([str(path / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                        f"dill=={dill_version}"], check=True, capture_output=True)
    subprocess.run(["chmod", "-R", "a+rX", str(path)], check=True)
    (path / "ready").touch()
    return path


def link_env(account: pwd.struct_passwd, env: Path, name: str) -> str:
    """Make ``env`` visible as ``~/envs/<name>`` of ``account``; returns that relative path (``python_env``)."""
    envs = Path(account.pw_dir) / "envs"
    envs.mkdir(exist_ok=True)
    os.chown(envs, account.pw_uid, account.pw_gid)
    link = envs / name
    if not link.is_symlink():
        link.symlink_to(env)
    return f"envs/{name}"

"""The installation the tests run is the one users get: non-editable, world-readable, system interpreter."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import mep
from mep.config.manager import shipped_templates_dir


def test_tests_run_the_installed_package() -> None:
    assert Path(mep.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), (
        f"mep imported from {mep.__file__}, not from the environment at {sys.prefix}: run scripts/test.sh")


def test_templates_ship_with_the_installation() -> None:
    templates = shipped_templates_dir()
    assert templates.is_relative_to(Path(sys.prefix))
    assert (templates / "local.yaml.j2").is_file() and (templates / "local.schema.json").is_file()


def test_environment_is_usable_by_other_accounts() -> None:
    """Every directory from / to the interpreter must be searchable by others (no 0700 /root on the way)."""
    path = Path(sys.executable).absolute()
    for directory in [*reversed(path.parents)]:
        mode = os.stat(directory).st_mode
        assert mode & stat.S_IXOTH, f"{directory} is not searchable by other accounts"
    assert Path(sys.executable).resolve().is_relative_to("/usr"), "the venv must be made from the system python"

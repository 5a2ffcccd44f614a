"""A manager started from an installation under a private directory refuses to start, naming that directory.

Like pyenv's python under a 0700 /root: the test reaches its own venv through a
0700 directory of its making and starts a real manager (``mep manager start``,
which execs ``python -I -m mep.root``) from there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness import DOMAIN_STRIP, expression_mapping

pytestmark = pytest.mark.root


def test_a_manager_started_from_a_private_directory_refuses_to_start_and_names_it(deploy) -> None:
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))  # a config that starts from a usable venv
    manager.process.stop()
    private = Path(tempfile.mkdtemp(prefix="mep-private-", dir="/var/tmp"))
    try:
        os.chmod(private, 0o700)
        (private / "venv").symlink_to(sys.prefix)  # the venv itself, reached through the 0700 directory
        python = private / "venv" / "bin" / Path(sys.executable).name
        started = subprocess.run([str(python), "-m", "mep", "manager", "start", "--config", str(manager.config_path)],
                                 capture_output=True, text=True, cwd="/", timeout=120, check=False)
        assert started.returncode == 2, started.stderr
        assert f"the mep installation at {python} can't be used by other accounts: {private} is mode 0700" \
            in started.stderr
        assert "router started" not in started.stderr, "refused before anything runs as another account"
    finally:
        shutil.rmtree(private)

"""Real PAM service files for tests: written to /etc/pam.d by the test, removed afterwards.

``pam_service`` (a fixture; import ``pam_service_fixture`` into a test module) gives a service
that refuses the accounts listed with ``deny`` (``pam_listfile``), applies
the system's account rules (``common-account``: expiry), exports
``MEP_PAM_SESSION=open`` and two variables mep must not pass on
(``pam_env``), and logs every session open and close (``pam_exec``), so a
test can see when a session was open.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PAM_DIR = Path("/etc/pam.d")

TEST_STACK = """\
    account  required  pam_listfile.so item=user sense=deny file={dir}/deny onerr=fail
    @include common-account
    session  required  pam_env.so conffile={dir}/env.conf readenv=0 user_readenv=0
    session  optional  pam_exec.so {dir}/hook.sh
    session  required  pam_unix.so
"""

HOOK = """\
#!/bin/sh
echo "$PAM_TYPE $PAM_USER $PPID" >> {dir}/sessions.log
"""

ENVIRONMENT = """\
MEP_PAM_SESSION DEFAULT=open
LD_PRELOAD DEFAULT=/nonexistent/evil.so
PYTHONPATH DEFAULT=/nonexistent
"""


@dataclass
class PamService:
    name: str
    directory: Path

    @property
    def file(self) -> Path:
        return PAM_DIR / self.name

    @property
    def hook_log(self) -> Path:
        return self.directory / "sessions.log"

    def deny(self, user: str) -> None:
        with open(self.directory / "deny", "a") as handle:
            handle.write(user + "\n")

    def events(self, user: str, holder: int | None = None) -> list[str]:
        """``open_session`` / ``close_session`` events of ``user`` (in the session ``holder`` pid held), in order."""
        if not self.hook_log.exists():
            return []
        return [fields[0] for fields in map(str.split, self.hook_log.read_text().splitlines())
                if fields[1:2] == [user] and (holder is None or fields[2:3] == [str(holder)])]

    def write(self, stack: str) -> None:
        """Replace the service's stack (``{dir}`` is this service's directory)."""
        self.file.write_text(textwrap.dedent(stack).format(dir=self.directory))
        self.file.chmod(0o644)


@pytest.fixture(name="pam_service")
def pam_service_fixture() -> Iterator[PamService]:
    directory = Path(tempfile.mkdtemp(prefix="mep-pam-", dir="/var/tmp"))
    os.chmod(directory, 0o755)
    service = PamService(name=f"mep-test-{secrets.token_hex(4)}", directory=directory)
    try:
        (directory / "deny").write_text("")
        (directory / "env.conf").write_text(ENVIRONMENT)
        hook = directory / "hook.sh"
        hook.write_text(HOOK.format(dir=directory))
        hook.chmod(0o755)
        service.write(TEST_STACK)
        yield service
    finally:
        service.file.unlink(missing_ok=True)
        shutil.rmtree(directory, ignore_errors=True)

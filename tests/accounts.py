"""Real, throwaway Unix accounts for tests that run as root.

``unix_account`` creates an account with ``useradd`` and always removes it
(``userdel -r -f``) when the block ends, even if the test failed.
``account_factory`` is the same as a pytest fixture: import it into a test
module (``from tests.accounts import account_factory``) and call it as often as
needed; every account is removed at teardown.
"""

from __future__ import annotations

import grp
import pwd
import secrets
import subprocess
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest

MAX_NAME_LENGTH = 32  # useradd's limit on Debian


def free_uid(candidates: Iterable[int]) -> int:
    """The first candidate that no account uses, for ``unix_account(uid=...)``."""
    for candidate in candidates:
        try:
            pwd.getpwuid(candidate)
        except KeyError:
            return candidate
    raise LookupError("every candidate uid is taken")


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed with exit code {result.returncode}: {result.stderr.strip()}"
        )


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _remove_account(name: str) -> None:
    # -f: remove it even if a test left a process running as it.
    result = subprocess.run(
        ("userdel", "-r", "-f", name), capture_output=True, text=True, check=False
    )
    try:
        pwd.getpwnam(name)
    except KeyError:
        pass
    else:
        raise RuntimeError(f"userdel -r -f {name} left the account behind: {result.stderr.strip()}")
    if _group_exists(name):
        _run("groupdel", name)


@contextmanager
def unix_account(
    prefix: str = "meptest",
    *,
    name: str | None = None,
    uid: int | None = None,
    shell: str = "/bin/bash",
    create_home: bool = True,
    primary_group_missing: bool = False,
) -> Iterator[pwd.struct_passwd]:
    """Create a uniquely named account, yield its passwd entry, and remove it afterwards.

    ``name`` replaces the generated ``prefix`` + random name; the caller makes
    it unique. Names useradd would call "bad" (all digits, ``user@domain``)
    are allowed, because tests need them.

    With ``uid`` the account gets that uid; its same-named group gets
    whatever gid ``useradd`` picks. With ``primary_group_missing`` the
    account's own group is deleted after creation, leaving ``pw_gid``
    pointing at no group.
    """
    name = name or f"{prefix}{secrets.token_hex(4)}"
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{name!r} is longer than useradd's {MAX_NAME_LENGTH} characters")
    command = ["useradd", "--badname", "--no-log-init", "--user-group", "--shell", shell]
    command.append("--create-home" if create_home else "--no-create-home")
    if uid is not None:
        command += ["--uid", str(uid)]
    _run(*command, name)
    try:
        if primary_group_missing:
            # groupdel refuses the primary group of a user unless forced.
            _run("groupdel", "--force", name)
            gid = pwd.getpwnam(name).pw_gid
            try:
                grp.getgrgid(gid)
            except KeyError:
                pass
            else:
                raise RuntimeError(f"group {gid} of {name} still exists after groupdel --force")
        yield pwd.getpwnam(name)
    finally:
        _remove_account(name)


@pytest.fixture
def account_factory() -> Iterator[Callable[..., pwd.struct_passwd]]:
    """Call with ``unix_account``'s arguments; every account made is removed at teardown."""
    with ExitStack() as accounts:

        def make(*args: Any, **kwargs: Any) -> pwd.struct_passwd:
            return accounts.enter_context(unix_account(*args, **kwargs))

        yield make

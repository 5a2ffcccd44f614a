"""Shared fixtures: real accounts, the router's system account, and real deployments."""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator

import pytest

from tests.accounts import account_factory  # noqa: F401  (a fixture, re-exported for every test module)
from tests.harness import ROUTER_USER, Deployment, deployment


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``root`` need real accounts and privilege changes; CI always runs as root."""
    needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(needs_root)


@pytest.fixture(scope="session")
def router_account() -> str:
    """The manager's unprivileged router account, created as the packages would create it."""
    try:
        pwd.getpwnam(ROUTER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", ROUTER_USER],
                       check=True)
    return ROUTER_USER


@pytest.fixture
def deploy(router_account: str) -> Iterator[Deployment]:
    """A fresh service run by root, ready for managers and identities."""
    with deployment() as running:
        yield running


"""Shared fixtures: real accounts, the router's system account, and real deployments."""

from __future__ import annotations

import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.accounts import account_factory  # noqa: F401  (a fixture, re-exported for every test module)
from tests.harness import ROUTER_USER, Deployment, deployment

# (attack, control that should stop it, what the test saw), one row per test marked ``attack``
ATTACK_OUTCOMES: list[tuple[str, str, str]] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "attack(name, control): an attack that must fail (tests/test_attacks.py)")


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
def gate() -> Iterator[Path]:
    """A path the test creates to release gated tasks, in a directory every account can search."""
    directory = tempfile.mkdtemp(prefix="mep-gate-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    path = Path(directory) / "open"
    yield path
    path.unlink(missing_ok=True)
    os.rmdir(directory)


@pytest.fixture
def deploy(router_account: str) -> Iterator[Deployment]:
    """A fresh service run by root, ready for managers and identities."""
    with deployment() as running:
        yield running



@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Collect each attack's outcome: held (the test passed), or SUCCEEDED (it failed), with what it saw."""
    report = (yield).get_result()
    marker = item.get_closest_marker("attack")
    if marker is None or not (report.when == "call" or report.outcome != "passed"):
        return
    name, control = marker.args
    observed = "; ".join(str(value) for key, value in item.user_properties if key == "observed")
    if report.passed:
        outcome = f"refused: {observed}" if observed else "refused"
    elif report.skipped:
        outcome = "NOT RUN (skipped)"
    else:
        outcome = f"ATTACK SUCCEEDED or the test broke ({report.when}): see the failure above"
    label = name + (f" [{item.callspec.id}]" if hasattr(item, "callspec") else "")
    ATTACK_OUTCOMES.append((label, control, outcome))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    """The attack table, printed whether or not output is captured (-s or not)."""
    if not ATTACK_OUTCOMES:
        return
    terminalreporter.write_sep("=", f"attacks and outcomes ({len(ATTACK_OUTCOMES)})")
    width = max(len(name) for name, _, _ in ATTACK_OUTCOMES)
    for name, control, outcome in ATTACK_OUTCOMES:
        terminalreporter.write_line(f"{name:<{width}}  {outcome}")
        terminalreporter.write_line(f"{'':<{width}}    control: {control}")

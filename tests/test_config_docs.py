"""Every config option is in the shipped example configs and in docs/admin.md, and nothing else is.

The models are the truth (``ManagerConfig``, ``ServiceConfig``); the example
files ship as /etc/mep/manager.example.yaml and /etc/mep/service.yaml and are
what ``mep endpoint configure`` writes from; the admin guide has one reference
table per file. Commented-out values in the examples are the real defaults.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from mep.cli.service_config import ServiceConfig
from mep.config.manager import ManagerConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "mep" / "cli" / "examples"
ADMIN_GUIDE = REPO / "docs" / "admin.md"
_OPTION_LINE = re.compile(r"^(?P<indent> *)(?P<key>[a-z_]+):(?: |$)")


def model_options(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Option names as a config file spells them (aliases; nested models as ``pam.enable``)."""
    names = set()
    for name, field in model.model_fields.items():
        spelled = prefix + (field.alias or name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= model_options(annotation, spelled + ".")
        else:
            names.add(spelled)
    return names


def uncommented(path: Path) -> str:
    """The example with every commented-out option switched on (prose comments stay comments)."""
    lines = []
    for line in path.read_text().splitlines():
        candidate = line[2:] if line.startswith("# ") else line
        lines.append(candidate if _OPTION_LINE.match(candidate) else line)
    return "\n".join(lines) + "\n"


def example_options(path: Path) -> set[str]:
    found, parents = set(), []
    for line in uncommented(path).splitlines():
        match = _OPTION_LINE.match(line)
        if not match:
            continue
        depth = len(match["indent"]) // 2
        parents = [*parents[:depth], match["key"]]
        found.add(".".join(parents))
    return found - {"pam", "endpoint_limits"}  # sections, not options


def _admin_guide_section(heading: str) -> str:
    text = ADMIN_GUIDE.read_text()
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def guide_options(section: str) -> set[str]:
    """The backticked first cells of the reference table under ``## <section>`` in docs/admin.md."""
    return set(re.findall(r"^\| `([a-z_.]+)` \|", _admin_guide_section(section), flags=re.M))


MANAGER = model_options(ManagerConfig) - {"pam"}
SERVICE = model_options(ServiceConfig)


def test_the_service_settings_cover_every_broker_setting() -> None:
    from mep.service.broker import BrokerSettings

    assert {field.name for field in dataclasses.fields(BrokerSettings)} == SERVICE - {"state_dir", "metrics_listen"}


@pytest.mark.parametrize(("example", "options"), [("manager.yaml", MANAGER), ("service.yaml", SERVICE)])
def test_the_example_config_lists_every_option_and_no_other(example: str, options: set[str]) -> None:
    assert example_options(EXAMPLES / example) == options


@pytest.mark.parametrize(("section", "options"), [("Manager configuration reference", MANAGER),
                                                  ("Service configuration reference", SERVICE)])
def test_the_admin_guide_documents_every_option_and_no_other(section: str, options: set[str]) -> None:
    assert guide_options(section) == options


def test_the_service_example_is_valid_and_its_commented_values_are_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "service.yaml"
    path.write_text(uncommented(EXAMPLES / "service.yaml"))
    loaded = ServiceConfig.load(path)
    examples = {"state_dir", "metrics_listen"}  # shown with a value to use; unset by default
    assert loaded.model_dump(exclude=examples) == ServiceConfig().model_dump(exclude=examples)
    assert loaded.state_dir == Path("/var/lib/mep/service") and loaded.metrics_listen == "127.0.0.1:9464"
    (tmp_path / "empty.yaml").write_text((EXAMPLES / "service.yaml").read_text())
    assert ServiceConfig.load(tmp_path / "empty.yaml") == ServiceConfig()  # as shipped: all defaults


def test_the_manager_example_is_valid_and_its_commented_values_are_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    key = "ed25519:" + "A" * 43 + "="
    path.write_text(uncommented(EXAMPLES / "manager.yaml").replace('"@SERVICE_SIGNING_KEYS@"', f'"{key}"'))
    loaded = ManagerConfig.load(path)
    required = {"endpoint_id": "x", "service_address": "tcp://h:1", "service_public_key": "k",
                "manager_secret_key_file": "k", "identity_mapping": "m"}
    defaults = ManagerConfig.model_validate(required)
    literal_defaults: dict[str, Any] = {name: getattr(defaults, name) for name in (
        "min_uid", "router_user", "heartbeat_interval", "identity_mapping_timeout", "deny_users", "deny_groups",
        "disabled_shells", "refuse_locked", "pam", "identity_mapping_user", "share_endpoints_across_identities",
        "endpoint_limits", "allow_setuid_helpers", "max_queued_tasks", "max_queued_bytes", "submitter_share",
        "max_concurrent_spawns", "max_endpoints_per_account")}
    assert {name: getattr(loaded, name) for name in literal_defaults} == literal_defaults
    assert loaded.template.name == "local.yaml.j2" and loaded.schema_file.name == "local.schema.json"


def test_the_example_has_placeholders_only_for_what_configure_fills_in() -> None:
    text = (EXAMPLES / "manager.yaml").read_text()
    assert set(re.findall(r"@[A-Z_]+@", text)) == {"@ENDPOINT_ID@", "@SERVICE_ADDRESS@", "@SERVICE_PUBLIC_KEY@",
                                                   "@SERVICE_SIGNING_KEYS@"}
    assert yaml.safe_load(text)["manager_secret_key_file"] == "manager.key"


def test_the_user_guide_explains_every_error_a_researcher_can_catch() -> None:
    import mep
    import mep.errors
    from mep.sdk import client

    exported = {name for name in mep.__all__ if name.endswith("Error")}
    explained = set(re.findall(r"^\| `([A-Za-z]+Error)` \|", (REPO / "docs" / "user.md").read_text(), flags=re.M))
    assert exported <= explained
    # and nothing made up: each is an error mep raises (PayloadTooLargeError is set on futures, not exported)
    assert all(issubclass(getattr(mep.errors, name, None) or getattr(client, name), mep.MepError)
               for name in explained)


def test_the_admin_guide_covers_every_topic_an_admin_needs() -> None:
    """Issue 11's list: install from each package, the first endpoint, ..., troubleshooting by symptom."""
    headings = set(re.findall(r"^#{2,3} (.+)$", ADMIN_GUIDE.read_text(), flags=re.M))
    assert {"From the .deb (Debian 12, Ubuntu 22.04+)", "From the .rpm (Fedora and others with Python 3.11)",
            "From a source checkout", "The first endpoint in ten minutes", "Identity mapping",
            "Templates and schemas", "PAM", "Schedulers", "Upgrading", "Where everything lives",
            "Troubleshooting by symptom", "The systemd units", "Metrics", "Admin commands"} <= headings
    assert len(re.findall(r"^\*\*.+\*\*", _admin_guide_section("Troubleshooting by symptom"), flags=re.M)) >= 10


def _listed_commands(cell: str) -> list[list[str]]:
    """`mep endpoint stop NAME` -> [[endpoint, stop]]; `mep service identity add / list` -> one per alternative."""
    commands = []
    for span in re.findall(r"`(mep [^`]+)`", cell):
        words = re.split(r"\s+", span)[1:]
        words = words[:next((i for i, word in enumerate(words) if word[0] in "-[" or word.isupper()), len(words))]
        if "/" in words:
            first = words.index("/")
            base, alternatives = words[:first - 1], [word for word in words[first - 1:] if word != "/"]
            commands += [[*base, alternative] for alternative in alternatives]
        else:
            commands.append(words)
    return commands


def test_every_command_the_admin_guide_lists_exists() -> None:
    import click

    from mep.cli.main import cli

    cells = re.findall(r"^\| (`mep .*?) \|", _admin_guide_section("Admin commands"), flags=re.M)
    listed = [words for cell in cells for words in _listed_commands(cell)]
    assert len(listed) >= 20, listed
    for words in listed:
        command: click.Command = cli
        for word in words:
            assert isinstance(command, click.Group) and word in command.commands, f"mep {' '.join(words)}: no {word!r}"
            command = command.commands[word]

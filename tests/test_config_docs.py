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


def guide_options(section: str) -> set[str]:
    """The backticked first cells of the reference table under ``## <section>`` in docs/admin.md."""
    text = ADMIN_GUIDE.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return set(re.findall(r"^\| `([a-z_.]+)` \|", text[start:end if end != -1 else None], flags=re.M))


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

"""The root process reads its config file itself (msgspec, no pydantic): paths relative to the file, errors typed."""

from __future__ import annotations

from pathlib import Path

import pytest

from mep.errors import ConfigurationError
from mep.root.config import RootConfig

REQUIRED = "endpoint_id: e1\nservice_address: tcp://service:5555\nservice_public_key: k\n"


def _load(tmp_path: Path, text: str) -> RootConfig:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return RootConfig.load(path)


def test_paths_in_the_file_are_relative_to_it_and_absolute_ones_stay(tmp_path: Path) -> None:
    config = _load(tmp_path, REQUIRED + "manager_secret_key_file: manager.key\nidentity_mapping: /etc/mep/map.json\n"
                             "audit_log: log/audit.jsonl\n")
    assert config.manager_secret_key_file == tmp_path / "manager.key"
    assert config.identity_mapping == Path("/etc/mep/map.json")
    assert config.audit_log == tmp_path / "log" / "audit.jsonl" and config.task_log is None


@pytest.mark.parametrize(("text", "said"), [
    (REQUIRED + "manager_secret_key_file: 3\nidentity_mapping: m\n", "expected a path, got int"),
    (REQUIRED + "manager_secret_key_file: k\nidentity_mapping: m\nno_such_option: 1\n", "no_such_option"),
    ("endpoint_id: [unclosed\n", "not valid YAML"),
    ("- a list\n", "Expected `object`"),
    (REQUIRED + "manager_secret_key_file: k\nidentity_mapping: m\nrouter_user: nobody\n",
     "identity_mapping_user must not be the router's account"),
])
def test_a_bad_file_is_a_configuration_error_that_names_it(tmp_path: Path, text: str, said: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        _load(tmp_path, text)
    assert said in str(refused.value) and str(tmp_path / "config.yaml") in str(refused.value)


def test_a_missing_file_says_it_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read manager config .*No such file"):
        RootConfig.load(tmp_path / "absent.yaml")

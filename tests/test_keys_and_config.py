"""Key files and manager configuration: refused when unsafe, with messages an admin can act on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mep.errors import ConfigurationError
from mep.protocol.assertions import AssertionSigner, generate_signing_key
from mep.protocol.curve import check_public_key, generate_keypair, read_secret_key, write_secret_key


def test_secret_key_round_trip_and_mode(tmp_path: Path) -> None:
    public, secret = generate_keypair()
    path = tmp_path / "k"
    write_secret_key(path, secret)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_secret_key(path) == secret
    with pytest.raises(FileExistsError):
        write_secret_key(path, secret)  # never overwrites or follows an existing file
    assert check_public_key(public, "key") == public


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_secret_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k"
    write_secret_key(path, generate_keypair()[1])
    path.chmod(mode)
    with pytest.raises(ConfigurationError, match=f"chmod 600 {path}"):
        read_secret_key(path)


def test_secret_key_symlink_and_garbage_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "real"
    write_secret_key(target, generate_keypair()[1])
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(ConfigurationError, match="cannot open"):
        read_secret_key(tmp_path / "link")
    garbage = tmp_path / "garbage"
    garbage.write_text("not a key\n")
    garbage.chmod(0o600)
    with pytest.raises(ConfigurationError, match="Z85"):
        read_secret_key(garbage)
    with pytest.raises(ConfigurationError, match="not a Z85"):
        check_public_key("short", "service_public_key")


def _manager_start(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mep", "manager", "start", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd="/")


def _valid_config(directory: Path) -> Path:
    secret = directory / "manager.key"
    write_secret_key(secret, generate_keypair()[1])
    config = directory / "config.yaml"
    config.write_text(yaml.safe_dump({
        "endpoint_id": "2b0e3f0c-6a55-4a7e-9a43-1d8a9c1e6a11", "service_address": "tcp://127.0.0.1:1",
        "service_public_key": generate_keypair()[0], "manager_secret_key_file": "manager.key",
        "identity_mapping": "identity_mapping.json", "run_dir": str(directory / "run"),
        "service_signing_keys": [AssertionSigner(generate_signing_key()).public_key]}))
    return config


@pytest.mark.parametrize(("change", "words"), [
    (lambda c: c.update(min_uid="many"), "min_uid"),
    (lambda c: c.update(surprise=1), "surprise"),
    (lambda c: c.pop("endpoint_id"), "endpoint_id"),
    (lambda c: c.update(service_public_key="abc"), "service_public_key"),
    (lambda c: c.update(manager_secret_key_file="missing.key"), "missing.key does not exist"),
    (lambda c: c.update(service_signing_keys=[]), "mep manager pin-signing-key"),
    (lambda c: c.update(service_signing_keys=["ed25519:short"]), "service_signing_keys.0"),
    pytest.param(lambda c: c.update(router_user="no-such-router-account"), "no-such-router-account",
                 marks=pytest.mark.root),
])
def test_manager_refuses_bad_config_with_one_clear_line(tmp_path: Path, change, words: str) -> None:
    config = _valid_config(tmp_path)
    settings = yaml.safe_load(config.read_text())
    change(settings)
    config.write_text(yaml.safe_dump(settings))
    result = _manager_start(config)
    assert result.returncode == 2
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_manager_refuses_a_mapping_file_others_can_write(tmp_path: Path) -> None:
    config = _valid_config(tmp_path)
    mapping = tmp_path / "identity_mapping.json"
    mapping.write_text("[]")
    mapping.chmod(0o666)
    result = _manager_start(config)
    assert result.returncode == 2 and "identity_mapping.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_manager_config_that_is_not_yaml(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("endpoint_id: [unclosed\n")
    result = _manager_start(config)
    assert result.returncode == 2 and "not valid YAML" in result.stderr

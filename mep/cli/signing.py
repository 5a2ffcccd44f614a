"""``mep service signing-key ...`` and ``mep manager pin-signing-key``: the keys of signed identity assertions.

The service signs who submitted each group of tasks with its signing key;
managers pin the public half (``service_signing_keys`` in their config). A
rollover keeps two keys valid: ``rotate`` stages the next key, managers pin it
beside the current one, ``rotate --finish`` makes it the signing key, and the
old pin is removed later. ``docs/identity.md`` has the steps.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click
import yaml

from mep.cli.main import _examples, _friendly, state_dir_option
from mep.cli.output import emit_record, output_option, say
from mep.cli.service_config import locate_state, open_state
from mep.errors import ConfigurationError
from mep.protocol.assertions import generate_signing_key, parse_public_key, public_key_text
from mep.protocol.curve import read_private_text, write_secret_key

_MAX_PINNED = 4  # as ManagerConfig.service_signing_keys allows


def _state_directory(state_dir: Path | None) -> Path:
    """Where the service's state is, found as every admin command finds it; refuses if there is none."""
    return open_state(state_dir).directory


@click.group("signing-key", epilog=_examples("mep service signing-key show", "mep service signing-key rotate",
                                            "mep service signing-key rotate --finish"))
def signing_key() -> None:
    """The Ed25519 key the service signs identity assertions with."""


@signing_key.command("show", epilog=_examples(
    "mep service signing-key show",
    "mep service signing-key show --state-dir /srv/mep/service",
    "mep service signing-key show --output json | jq -r .signing_key"))
@state_dir_option
@output_option
@_friendly
def show(state_dir: Path | None, output_format: str) -> None:
    """Print the public signing key(s) managers must pin."""
    from mep.service.state import ServiceState

    state = ServiceState.open(_state_directory(state_dir))
    keys = state.pinnable_signing_keys()
    emit_record(dict(zip(("signing_key", "next_signing_key"), keys)), output_format)


@signing_key.command("generate", epilog=_examples("mep service signing-key generate",
                                                      "mep service signing-key generate --output json"))
@state_dir_option
@output_option
@_friendly
def generate(state_dir: Path | None, output_format: str) -> None:
    """Create the signing key (the service also creates it on first start); never replaces one."""
    from mep.service.state import ServiceState

    directory = locate_state(state_dir).directory
    if not ServiceState.exists(directory):
        open_state(state_dir)  # refuses, saying where it looked
    if ServiceState.signing_key_path(directory).exists():
        raise ConfigurationError(f"{ServiceState.signing_key_path(directory)} already exists; "
                                 "to replace it, use 'mep service signing-key rotate'")
    state = ServiceState.open(directory)
    emit_record({"signing_key": state.signer.public_key}, output_format)
    say("pin it in each manager: mep manager pin-signing-key --config CONFIG KEY")


@signing_key.command("rotate", epilog=_examples(
    "mep service signing-key rotate            # stage the next key; pin it in every manager",
    "mep manager pin-signing-key --config /etc/mep/cluster/config.yaml ed25519:...",
    "mep service signing-key rotate --finish   # then restart the service; unpin the old key later",
    "mep service signing-key rotate --output json"))
@state_dir_option
@click.option("--finish", is_flag=True, help="Make the staged key the signing key (after managers pinned it).")
@output_option
@_friendly
def rotate(state_dir: Path | None, finish: bool, output_format: str) -> None:
    """Stage the next signing key; with --finish, switch to it. Restart the service after --finish."""
    from mep.service.state import ServiceState

    directory = _state_directory(state_dir)
    ServiceState.open(directory)  # checks the directory's owner and mode; creates the current key if missing
    current, staged = ServiceState.signing_key_path(directory), ServiceState.next_signing_key_path(directory)
    if not finish:
        if staged.exists():
            raise ConfigurationError(f"a next signing key is already staged ({staged}); pin it in every manager, "
                                     "then run 'mep service signing-key rotate --finish'")
        write_secret_key(staged, generate_signing_key())
        emit_record({"next_signing_key": public_key_text(read_private_text(staged))}, output_format)
        say("pin it in every manager beside the current key (mep manager pin-signing-key) and restart them; "
                   "then run 'mep service signing-key rotate --finish'")
        return
    if not staged.exists():
        raise ConfigurationError(f"no next signing key is staged in {directory}; run "
                                 "'mep service signing-key rotate' first")
    previous = public_key_text(read_private_text(current))
    read_private_text(staged)  # refuse a staged key with loose permissions before it is used
    os.replace(current, directory / "signing.previous.key")  # kept only for the record
    os.replace(staged, current)
    emit_record({"signing_key": public_key_text(read_private_text(current)), "previous_signing_key": previous},
                output_format)
    say("restart the service to sign with it; once endpoints started before the new key was pinned "
               f"have exited, unpin the old key: mep manager pin-signing-key --remove --config CONFIG {previous}")


@click.command("pin-signing-key", epilog=_examples(
    "mep manager pin-signing-key --config /etc/mep/cluster/config.yaml \"$(mep service signing-key show | cut -d' ' -f2)\"",
    "mep manager pin-signing-key --config /etc/mep/cluster/config.yaml --remove ed25519:OLD... --output json"))
@click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              required=True, help="The manager's config.yaml.")
@click.option("--remove", is_flag=True, help="Unpin the key instead (the end of a rollover).")
@click.argument("key")
@output_option
@_friendly
def pin_signing_key(config_path: Path, remove: bool, key: str, output_format: str) -> None:
    """Pin (or unpin) a service signing key in a manager's config; restart the manager to apply it."""
    parse_public_key(key)
    text = config_path.read_text()
    settings = yaml.safe_load(text)
    if not isinstance(settings, dict):
        raise ConfigurationError(f"{config_path} must be a YAML mapping of settings")
    keys = list(settings.get("service_signing_keys") or [])
    if remove:
        if key not in keys:
            raise ConfigurationError(f"{key} is not pinned in {config_path}")
        if keys == [key]:
            raise ConfigurationError(f"{key} is the only pinned key in {config_path}; pin its successor first")
        keys.remove(key)
    elif key not in keys:
        if len(keys) >= _MAX_PINNED:
            raise ConfigurationError(f"{config_path} already pins {len(keys)} keys; unpin an old one first")
        keys.append(key)
    settings["service_signing_keys"] = keys
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))  # keep its comment lines
    _replace_file(config_path, header + yaml.safe_dump(settings, sort_keys=False))
    emit_record({"config": str(config_path), "pinned": keys}, output_format)
    say("restart the manager to apply it")


def register(service: click.Group, manager: click.Group) -> None:
    """Add these commands to ``mep service`` and ``mep manager``."""
    service.add_command(signing_key)
    manager.add_command(pin_signing_key)


def _replace_file(path: Path, text: str) -> None:
    """Write ``text`` in place of ``path`` atomically, keeping its owner and mode."""
    info = path.stat()
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(temporary, info.st_mode & 0o7777)
        os.chown(temporary, info.st_uid, info.st_gid)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise

"""``mep identity test``: what the manager would decide for one identity, without running a manager.

The admin's dry run, through the same code the spawner uses, in its order
(``IdentityMapper.map``, ``accounts.resolve_account``, PAM's
``require_account``): which document and mapping (or program)
matched, and the local account alone on the last line of stdout. Exit 0 when
mapped (and, with ``--check-account``, allowed); 1 when this identity is not
mapped, its mapping fails, or the account is refused; 2 when the
configuration itself is invalid. Never a traceback.

``--config`` takes a manager's ``config.yaml`` (its mapping file, account
rules, endpoint id and PAM settings apply) or an identity-mapping JSON file
alone (``.json``, or content that is a list of documents or one document:
default account rules; external programs get the reference validator's
testing endpoint id; as root, the mapping helper runs as ``nobody``, the
default ``identity_mapping_user``).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from mep.errors import ConfigurationError, MepError, TaskRefusedError

if TYPE_CHECKING:
    from mep.root.config import PamSettings

_IDENTITY_KEYS = frozenset({"id", "sub", "username", "email", "name", "identity_provider", "organization", "status"})
EXIT_MAPPED, EXIT_REFUSED, EXIT_INVALID_CONFIG = 0, 1, 2


@click.group("identity", epilog="\b\nExamples:\n"
             "  mep identity test --config /etc/mep/cluster/config.yaml alice@example.org --check-account")
def identity_group() -> None:
    """Check identity mapping the way this machine's manager applies it."""


@identity_group.command("test", epilog="\b\nExamples:\n"
                        "  mep identity test --config /etc/mep/cluster/config.yaml alice@example.org --check-account\n"
                        "  mep identity test --config /usr/share/mep/identity_maps/example-email.json \\\n"
                        "      '{\"username\": \"jd@idp.example\", \"email\": \"jane.doe@chem.example.edu\"}'")
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="A manager config.yaml, or an identity-mapping JSON file.")
@click.option("--check-account", is_flag=True,
              help="Also apply the account policy and, if enabled, PAM account management.")
@click.argument("identity")
def identity_test(config_path: Path, check_account: bool, identity: str) -> None:
    """Map IDENTITY (a username such as alice@example.org, or a JSON identity resource) to a local account."""
    identities = _parse_identities(identity)
    try:
        setup = _Setup(config_path)
    except ConfigurationError as error:
        _fail(EXIT_INVALID_CONFIG, str(error))
    except Exception as error:  # noqa: BLE001 - an unreadable file is an invalid configuration, said in one line
        _fail(EXIT_INVALID_CONFIG, f"{config_path}: {type(error).__name__}: {error}")
    try:
        _decide(setup, identities, check_account)
    except ConfigurationError as error:
        _fail(EXIT_INVALID_CONFIG, str(error))
    except TaskRefusedError as error:
        _fail(EXIT_REFUSED, str(error), error.admin_detail)
    except MepError as error:
        _fail(EXIT_REFUSED, str(error), error.admin_detail)
    except Exception as error:  # noqa: BLE001 - a bug: one line, never a traceback
        _fail(EXIT_REFUSED, f"internal error: {type(error).__name__}: {error}")


class _Setup:
    """What a config file gives the dry run."""

    def __init__(self, config_path: Path) -> None:
        from mep.root.identity import IdentityMapper, MappingContext

        self.pam: PamSettings | None = None
        if _is_mapping_file(config_path):
            trusted = frozenset({0, os.geteuid()})
            self.mapping_path = config_path
            self.policy = None
            # As root, the helper runs as the default identity_mapping_user, as it would in a manager.
            context = MappingContext(trusted_owner_uids=trusted, run_as="nobody" if os.geteuid() == 0 else None)
        else:
            from mep.config.manager import ManagerConfig
            from mep.root.accounts import unprivileged_account
            from mep.root.start import account_rules, pam_settings

            config = ManagerConfig.load(config_path)
            router = unprivileged_account(config.router_user, "router_user") if os.geteuid() == 0 else None
            self.policy, trusted = account_rules(config, router)
            self.pam = pam_settings(config, config_path, trusted_owner_uids=trusted) if config.pam.enable else None
            self.mapping_path = config.identity_mapping
            context = MappingContext(endpoint_id=config.endpoint_id, external_timeout=config.identity_mapping_timeout,
                                     trusted_owner_uids=trusted,
                                     run_as=config.identity_mapping_user if os.geteuid() == 0 else None)
        self.mapper = IdentityMapper.from_file(self.mapping_path, trusted_owner_uids=trusted, context=context)


def _decide(setup: _Setup, identities: list[dict[str, object]], check_account: bool) -> None:
    """The spawner's steps in its order (``mep.root.spawner``'s ``_map``): mapping, account policy, PAM."""
    from mep.root.accounts import AccountPolicy, resolve_account

    for identity in identities:
        click.echo(f"identity: {identity.get('username', '')} (id {identity['id']}, status {identity['status']})")
    decision = setup.mapper.map(identities)
    click.echo(f"matched: {setup.mapping_path}: {decision.rule()} (identity {decision.identity_id})")
    if not check_account:
        click.echo(decision.account)
        return
    account = resolve_account(decision.account, setup.policy or AccountPolicy(manager_uids=frozenset({0})))
    click.echo(f"account policy: allowed (uid {account.uid}, gid {account.gid}, shell {account.shell})")
    if setup.pam is not None:
        _check_pam(setup.pam, account.name)
    click.echo(account.name)


def _check_pam(pam: PamSettings, account: str) -> None:
    from mep.root.pam import require_account

    messages = require_account(pam.service, account, library=pam.library)
    said = f"; the modules said: {' | '.join(messages)}" if messages else ""
    click.echo(f"PAM account management (service {pam.service}): allowed{said}")


def _is_mapping_file(path: Path) -> bool:
    """A ``.json`` file, or one holding a JSON list or an object with a DATA_TYPE, is a mapping file.

    Anything else is a manager config (YAML, of which JSON is a subset).
    """
    if path.suffix == ".json":
        return True
    try:
        content = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(content, list) or (isinstance(content, dict) and "DATA_TYPE" in content)


def _parse_identities(text: str) -> list[dict[str, object]]:
    """A username, a JSON identity resource, or a JSON list of them (an identity set)."""
    if not text.lstrip().startswith(("{", "[")):
        if not text.strip():
            raise click.BadParameter("give a username such as alice@example.org, or a JSON identity resource",
                                     param_hint="IDENTITY")
        return [{"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"mep-identity-test:{text}")), "username": text,
                 "status": "used"}]
    try:
        parsed = json.loads(text)
    except ValueError as error:
        raise click.BadParameter(f"not valid JSON: {error}", param_hint="IDENTITY") from None
    resources = parsed if isinstance(parsed, list) else [parsed]
    if not resources:
        raise click.BadParameter("an empty list names no identity", param_hint="IDENTITY")
    identities = []
    for resource in resources:
        if not isinstance(resource, dict) or not isinstance(resource.get("id"), str) or not resource["id"]:
            raise click.BadParameter("each identity resource must be a JSON object with an \"id\" string",
                                     param_hint="IDENTITY")
        unknown = sorted(set(resource) - _IDENTITY_KEYS)
        if unknown:
            raise click.BadParameter(f"unknown identity properties {unknown}; known: {sorted(_IDENTITY_KEYS)}",
                                     param_hint="IDENTITY")
        identities.append({"status": "used", **resource})
    return identities


def _fail(code: int, message: str, detail: str = "") -> NoReturn:
    click.echo(f"error: {message}", err=True)
    if detail and detail != message:
        click.echo(f"detail: {detail}", err=True)
    sys.exit(code)

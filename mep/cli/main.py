"""Command-line entry point (click). Every MepError becomes one line on stderr, never a traceback."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mep import __version__
from mep.cli.identity import identity_group
from mep.cli.template import template
from mep.errors import ConfigurationError, MepError


def default_state_dir(kind: str) -> Path:
    """Root's state lives under /var/lib/mep, a user's under ~/.mep: they never collide."""
    if os.geteuid() == 0:
        return Path("/var/lib/mep") / kind
    return Path.home() / ".mep" / kind


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MepError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2 if isinstance(exc, ConfigurationError) else 1)
        except Exception as exc:  # a bug: say so in one line; -v logs the traceback
            logging.getLogger("mep").debug("unexpected failure", exc_info=True)
            click.echo(f"internal error: {type(exc).__name__}: {exc} (run 'mep -v ...' for details)", err=True)
            sys.exit(3)

    return wrapper


state_dir_option = click.option(
    "--state-dir", type=click.Path(path_type=Path), default=None,
    help="Service state directory [default: /var/lib/mep/service as root, ~/.mep/service otherwise]")


def _state(state_dir: Path | None):  # noqa: ANN202 - ServiceState, imported lazily to keep startup light
    from mep.service.state import ServiceState

    return ServiceState.open(state_dir or default_state_dir("service"))


@click.group()
@click.version_option(__version__, "--version", prog_name="mep", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """mep: run Python functions on a cluster as your own account."""
    _setup_logging(verbose)


# --- service ------------------------------------------------------------------------


@cli.group()
def service() -> None:
    """Run and administer the service (the broker)."""


@service.command("start")
@state_dir_option
@click.option("--listen", default="tcp://127.0.0.1:5790", show_default=True, help="Address to bind.")
@click.option("--address-file", type=click.Path(path_type=Path), default=None,
              help="Write the bound address here once listening (useful with port 0).")
@click.option("--heartbeat-interval", type=float, default=10.0, show_default=True)
@click.option("--max-payload-bytes", type=click.IntRange(min=1024), default=10 * 1024 * 1024, show_default=True,
              help="Largest serialised function or arguments of one task.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs a task gets when its user endpoint keeps dying under it.")
@click.option("--result-retention", type=click.FloatRange(min=1), default=7 * 24 * 3600.0, show_default=True,
              help="Seconds an uncollected result is kept before it expires.")
@_friendly
def service_start(state_dir: Path | None, listen: str, address_file: Path | None, heartbeat_interval: float,
                  max_payload_bytes: int, max_attempts: int, result_retention: float) -> None:
    """Run the service in the foreground."""
    from mep.service.broker import Broker, BrokerSettings

    state = _state(state_dir)
    broker = Broker(state, BrokerSettings(listen=listen, heartbeat_interval=heartbeat_interval,
                                          max_payload_bytes=max_payload_bytes, max_attempts=max_attempts,
                                          result_retention=result_retention))
    if address_file is not None:
        address_file.write_text(broker.address + "\n")
    broker.serve_forever()


@service.command("key")
@state_dir_option
@_friendly
def service_key(state_dir: Path | None) -> None:
    """Print the service's public key (pin it in managers and clients)."""
    click.echo(_state(state_dir).public_key)


@service.group()
def identity() -> None:
    """Register and revoke identities."""


@identity.command("add")
@state_dir_option
@click.option("--username", required=True, help="e.g. alice@example.org")
@click.option("--email")
@click.option("--name")
@click.option("--organization")
@click.option("--identity-provider")
@click.option("--link", "link_to", help="Identity id to link with (same person, another identity).")
@_friendly
def identity_add(state_dir: Path | None, username: str, email: str | None, name: str | None,
                 organization: str | None, identity_provider: str | None, link_to: str | None) -> None:
    """Register an identity; prints its id and its token (shown once)."""
    created = _state(state_dir).store.add_identity(username, email=email, name=name, organization=organization,
                                                   identity_provider=identity_provider, link_to=link_to)
    click.echo(f"identity_id: {created.identity.id}")
    click.echo(f"token: {created.token}")


@identity.command("revoke")
@state_dir_option
@click.argument("identity_id")
@_friendly
def identity_revoke(state_dir: Path | None, identity_id: str) -> None:
    """Revoke an identity's token; takes effect on its next request."""
    if not _state(state_dir).store.revoke_identity(identity_id):
        raise ConfigurationError(f"no active identity {identity_id}")
    click.echo(f"revoked {identity_id}")


@identity.command("list")
@state_dir_option
@_friendly
def identity_list(state_dir: Path | None) -> None:
    click.echo(json.dumps(_state(state_dir).store.list_identities(), indent=2))


@service.group()
def endpoint() -> None:
    """Register endpoints (one per manager)."""


@endpoint.command("add")
@state_dir_option
@click.argument("name")
@click.option("--config-dir", type=click.Path(path_type=Path), required=True,
              help="Directory to write the manager's config.yaml and secret key into (e.g. /etc/mep/NAME).")
@click.option("--service-address", default="tcp://127.0.0.1:5790", show_default=True,
              help="Address the manager will reach the service at.")
@_friendly
def endpoint_add(state_dir: Path | None, name: str, config_dir: Path, service_address: str) -> None:
    """Register an endpoint and write what its manager needs to connect."""
    from mep.service.admin import register_endpoint

    written = register_endpoint(_state(state_dir), name, config_dir, service_address)
    click.echo(f"endpoint_id: {written.endpoint_id}")
    click.echo(f"manager config: {written.config_path}")
    click.echo(f"manager secret key: {written.secret_key_path}")
    click.echo("edit identity_mapping in the config, then run: mep manager start --config "
               f"{written.config_path}")


@endpoint.command("list")
@state_dir_option
@_friendly
def endpoint_list(state_dir: Path | None) -> None:
    click.echo(json.dumps(_state(state_dir).store.list_endpoints(), indent=2))


# --- manager ------------------------------------------------------------------------


@cli.group()
def manager() -> None:
    """Run the manager (root spawner + unprivileged router)."""


@manager.command("start")
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True)
@_friendly
def manager_start(config_path: Path) -> None:
    """Serve an endpoint: as root for every mapped user, as anyone else for yourself only."""
    from mep.manager.start import start_manager

    sys.exit(start_manager(config_path))


# --- clients ------------------------------------------------------------------------


@cli.command("status")
@click.option("--service", "service_address", envvar="MEP_SERVICE", required=True)
@click.option("--service-key", envvar="MEP_SERVICE_KEY", required=True)
@click.option("--token", envvar="MEP_TOKEN", required=True)
@click.option("--endpoint", "endpoint_id", default="", help="Also report this endpoint's manager processes.")
@click.option("--timeout", type=float, default=10.0, show_default=True)
@_friendly
def status(service_address: str, service_key: str, token: str, endpoint_id: str, timeout: float) -> None:
    """Print the service's and a manager's processes: pid, uid, and whether dill was ever loaded."""
    from mep.sdk.status import fetch_status

    click.echo(json.dumps(fetch_status(service_address, service_key, token, endpoint_id, timeout), indent=2))


@cli.command("demo")
@click.option("--as", "as_user", default=None, help="As root: run the demo's tasks as this existing account.")
@click.option("--tasks", type=int, default=4, show_default=True)
@_friendly
def demo(as_user: str | None, tasks: int) -> None:
    """Service, manager and a sample submission on this machine, printing who each task ran as."""
    from mep.cli.demo import run_demo

    sys.exit(run_demo(as_user=as_user, tasks=tasks))


cli.add_command(template)
cli.add_command(identity_group)


def main() -> int:
    cli(prog_name="mep")
    return 0

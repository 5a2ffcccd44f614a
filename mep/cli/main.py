"""Command-line entry point (click). Every MepError becomes one line on stderr, never a traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from mep import __version__
from mep.cli.diagnose import diagnose
from mep.cli.endpoint_admin import endpoint_admin
from mep.cli.identity import identity_group
from mep.cli.logs import parse_levels, setup_logging
from mep.cli.output import (emit_record, emit_rows, emit_value, friendly as _friendly, output_option,
                            output_option_defaulting_to, say)
from mep.cli.service_config import open_state, service_config
from mep.cli.template import template
from mep.errors import ConfigurationError


state_dir_option = click.option(
    "--state-dir", type=click.Path(path_type=Path), default=None,
    help="Service state directory [default: $MEP_STATE_DIR, else state_dir in /etc/mep/service.yaml, else "
         "/var/lib/mep/service as root, ~/.mep/service otherwise]")
service_config_option = click.option(
    "--config", "config_path", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
    help="Service settings file [default: /etc/mep/service.yaml if it exists]")


def _state(state_dir: Path | None, config_path: Path | None = None):  # noqa: ANN202 - ServiceState, lazily
    """The existing service state, found by the one rule (mep.cli.service_config); never creates it."""
    return open_state(state_dir, config_path)


def _examples(*lines: str) -> str:
    """A help footer of worked examples (click keeps \b paragraphs as written)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


@click.group(epilog=_examples(
    "mep --version",
    "mep service init && mep endpoint configure cluster        # an admin's first endpoint (docs/admin.md)",
    "mep endpoint status cluster --output json",
    "mep --log-format json --log-level mep.manager=DEBUG manager start --config /etc/mep/cluster/config.yaml"))
@click.version_option(__version__, "--version", prog_name="mep", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              envvar="MEP_LOG_FORMAT", help="text, or JSON lines carrying endpoint and task ids where known.")
@click.option("--log-level", "log_levels", multiple=True, envvar="MEP_LOG_LEVEL", metavar="COMPONENT=LEVEL",
              help="One component's level, e.g. mep.manager=DEBUG (repeatable; MEP_LOG_LEVEL takes a,b).")
def cli(verbose: bool, log_format: str, log_levels: tuple[str, ...]) -> None:
    """mep: run Python functions on a cluster as your own account.

    Admins: docs/admin.md (/usr/share/doc/mep/admin.md); researchers: docs/user.md.
    """
    try:
        levels = parse_levels(log_levels)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--log-level") from None
    setup_logging(verbose, log_format, levels)


# --- service ------------------------------------------------------------------------


@cli.group(epilog=_examples("mep service init", "mep service start --listen tcp://0.0.0.0:5790",
                            "mep service identity add --username alice@example.org", "mep service key"))
def service() -> None:
    """Run and administer the service (the broker).

    Every subcommand finds the service's state the same way: --state-dir, then $MEP_STATE_DIR, then state_dir
    in /etc/mep/service.yaml, then /var/lib/mep/service (root) or ~/.mep/service. Only 'init' and 'start'
    create it.
    """


@service.command("init", epilog=_examples("mep service init", "mep service init --state-dir /srv/mep/service"))
@state_dir_option
@service_config_option
@output_option
@_friendly
def service_init(state_dir: Path | None, config_path: Path | None, output_format: str) -> None:
    """Create the service's state (key pair and database) if there is none; print where and its public key."""
    state = open_state(state_dir, config_path, create=True)
    emit_record({"state_dir": str(state.directory), "public_key": state.public_key}, output_format)


@service.command("start", epilog=_examples(
    "mep service start                                    # settings from /etc/mep/service.yaml",
    "mep service start --listen tcp://0.0.0.0:5790 --state-dir /srv/mep/service",
    "systemctl enable --now mep-service                   # the packaged unit runs the first form"))
@state_dir_option
@service_config_option
@click.option("--listen", default=None, help="Address to bind [default: listen in the settings file, else "
              "tcp://127.0.0.1:5790].")
@click.option("--address-file", type=click.Path(path_type=Path), default=None,
              help="Write the bound address here once listening (useful with port 0).")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds between heartbeats to managers [default: 10].")
@click.option("--max-payload-bytes", type=click.IntRange(min=1024), default=None,
              help="Largest serialised function or arguments of one task [default: 10 MiB].")
@click.option("--max-attempts", type=click.IntRange(min=1), default=None,
              help="Runs a task gets when its user endpoint keeps dying under it [default: 3].")
@click.option("--result-retention", type=click.FloatRange(min=1), default=None,
              help="Seconds an uncollected result is kept before it expires [default: one week].")
@click.option("--max-queued-tasks", type=click.IntRange(min=1), default=None,
              help="Unfinished tasks one identity may have; SUBMIT beyond it is refused (quota_exceeded) "
                   "[default: 100000].")
@click.option("--max-result-bytes", type=click.IntRange(min=0), default=None,
              help="Stored, uncollected result bytes one identity may have before its SUBMITs are refused "
                   "[default: 10 GiB].")
@click.option("--max-auth-failures", type=click.IntRange(min=0), default=None,
              help="Failed token checks from one address within --auth-failure-window before it is refused "
                   "(auth_throttled) for that long; 0: no limit [default: 100].")
@click.option("--auth-failure-window", type=click.FloatRange(min=1), default=None,
              help="Seconds over which failed token checks are counted, and how long an address is refused "
                   "[default: 60].")
@click.option("--metrics-listen", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics here (':9464' is loopback) [default: metrics_listen in the settings "
                   "file, else off].")
@_friendly
def service_start(state_dir: Path | None, config_path: Path | None, listen: str | None, address_file: Path | None,
                  heartbeat_interval: float | None, max_payload_bytes: int | None, max_attempts: int | None,
                  result_retention: float | None, max_queued_tasks: int | None, max_result_bytes: int | None,
                  max_auth_failures: int | None, auth_failure_window: float | None,
                  metrics_listen: str | None) -> None:
    """Run the service in the foreground (creates its state on first start)."""
    from mep.sdnotify import notify_ready
    from mep.service.broker import Broker

    config, _ = service_config(config_path)
    state = open_state(state_dir, config_path, create=True)
    broker = Broker(state, config.broker_settings(listen=listen, heartbeat_interval=heartbeat_interval,
                                                  max_payload_bytes=max_payload_bytes, max_attempts=max_attempts,
                                                  result_retention=result_retention,
                                                  max_queued_tasks=max_queued_tasks, max_result_bytes=max_result_bytes,
                                                  max_auth_failures=max_auth_failures,
                                                  auth_failure_window=auth_failure_window))
    if metrics_listen or config.metrics_listen:
        from mep.metrics import serve_service_metrics

        serve_service_metrics(state.store.path, metrics_listen or config.metrics_listen)
    if address_file is not None:  # written once everything listens
        address_file.write_text(broker.address + "\n")
    notify_ready()  # systemd (Type=notify): listening
    broker.serve_forever()


@service.command("key", epilog=_examples("mep service key", "MEP_STATE_DIR=/srv/mep/service mep service key",
                                         'export MEP_SERVICE_KEY="$(mep service key)"'))
@state_dir_option
@output_option
@_friendly
def service_key(state_dir: Path | None, output_format: str) -> None:
    """Print the service's public key (pin it in managers and clients: service_key=)."""
    emit_value("public_key", _state(state_dir).public_key, output_format)


@service.group(epilog=_examples("mep service identity add --username alice@example.org --email alice@example.org",
                                "mep service identity list --output json",
                                "mep service identity rotate-token 3f1c...", "mep service identity revoke 3f1c..."))
def identity() -> None:
    """Register identities, rotate and revoke their tokens."""


@identity.command("add", epilog=_examples(
    "mep service identity add --username alice@example.org --email alice@example.org",
    "mep service identity add --username alice@orcid.org --link 3f1c...   # the same person, another identity"))
@state_dir_option
@click.option("--username", required=True, help="e.g. alice@example.org")
@click.option("--email")
@click.option("--name")
@click.option("--organization")
@click.option("--identity-provider")
@click.option("--link", "link_to", help="Identity id to link with (same person, another identity).")
@output_option
@_friendly
def identity_add(state_dir: Path | None, username: str, email: str | None, name: str | None,
                 organization: str | None, identity_provider: str | None, link_to: str | None,
                 output_format: str) -> None:
    """Register an identity; prints its id and its token (shown once: hand it to the researcher)."""
    created = _state(state_dir).store.add_identity(username, email=email, name=name, organization=organization,
                                                   identity_provider=identity_provider, link_to=link_to)
    emit_record({"identity_id": created.identity.id, "token": created.token}, output_format)


@identity.command("rotate-token", epilog=_examples("mep service identity rotate-token 3f1c...",
                                                   "mep service identity rotate-token 3f1c... --output json"))
@state_dir_option
@click.argument("identity_id")
@output_option
@_friendly
def identity_rotate_token(state_dir: Path | None, identity_id: str, output_format: str) -> None:
    """Give an identity a new token; the old one stops working on its next request."""
    token = _state(state_dir).store.rotate_token(identity_id)
    if token is None:
        raise ConfigurationError(f"no active identity {identity_id} ('mep service identity list' shows them)")
    emit_record({"identity_id": identity_id, "token": token}, output_format)


@identity.command("revoke", epilog=_examples("mep service identity revoke 3f1c...",
                                             "mep service identity revoke 3f1c... --output json"))
@state_dir_option
@click.argument("identity_id")
@output_option
@_friendly
def identity_revoke(state_dir: Path | None, identity_id: str, output_format: str) -> None:
    """Revoke an identity's token; takes effect on its next request."""
    if not _state(state_dir).store.revoke_identity(identity_id):
        raise ConfigurationError(f"no active identity {identity_id} ('mep service identity list' shows them)")
    emit_record({"identity_id": identity_id, "revoked": True}, output_format)


@identity.command("list", epilog=_examples("mep service identity list", "mep service identity list --output json"))
@state_dir_option
@output_option
@_friendly
def identity_list(state_dir: Path | None, output_format: str) -> None:
    """Every registered identity: id, username, linked set, revoked or not."""
    emit_rows(_state(state_dir).store.list_identities(), ("id", "username", "set_id", "revoked"), output_format)


@service.group(epilog=_examples("mep service endpoint add cluster --config-dir /etc/mep/cluster",
                                "mep service endpoint list --output json"))
def endpoint() -> None:
    """Register endpoints (one per manager); 'mep endpoint configure' does this and writes a full config."""


@endpoint.command("add", epilog=_examples(
    "mep service endpoint add cluster --config-dir /etc/mep/cluster --service-address tcp://login:5790"))
@state_dir_option
@click.argument("name")
@click.option("--config-dir", type=click.Path(path_type=Path), required=True,
              help="Directory to write the manager's config.yaml and secret key into (e.g. /etc/mep/NAME).")
@click.option("--service-address", default="tcp://127.0.0.1:5790", show_default=True,
              help="Address the manager will reach the service at.")
@output_option
@_friendly
def endpoint_add(state_dir: Path | None, name: str, config_dir: Path, service_address: str,
                 output_format: str) -> None:
    """Register an endpoint and write the minimal config its manager needs to connect."""
    from mep.service.admin import register_endpoint

    written = register_endpoint(_state(state_dir), name, config_dir, service_address)
    emit_record({"endpoint_id": written.endpoint_id, "manager config": str(written.config_path),
                 "manager secret key": str(written.secret_key_path)}, output_format)
    say(f"edit identity_mapping in the config, then run: mep manager start --config {written.config_path}")


@endpoint.command("list", epilog=_examples("mep service endpoint list", "mep service endpoint list --output json"))
@state_dir_option
@output_option
@_friendly
def endpoint_list(state_dir: Path | None, output_format: str) -> None:
    """Every endpoint registered with the service."""
    rows = _state(state_dir).store.list_endpoints()
    emit_rows(rows, tuple(rows[0]) if rows else ("id", "name"), output_format)


# --- manager ------------------------------------------------------------------------


@cli.group(epilog=_examples("mep manager start --config /etc/mep/cluster/config.yaml"))
def manager() -> None:
    """Run the manager (root spawner + unprivileged router)."""


@manager.command("start", epilog=_examples("mep manager start --config /etc/mep/cluster/config.yaml",
                                            "systemctl enable --now mep-manager@cluster   # the packaged unit"))
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="The endpoint's config.yaml ('mep endpoint configure NAME' writes /etc/mep/NAME/config.yaml).")
@_friendly
def manager_start(config_path: Path) -> None:
    """Serve an endpoint: as root for every mapped user, as anyone else for yourself only.

    Checks the config (naming every bad key) and, as root, that other accounts can run this installation
    (``mep.cli.interpreter``), then execs the root process, ``python -I -m mep.root``: its own small entry point,
    without this CLI.
    """
    from mep.cli.interpreter import check_interpreter_usable
    from mep.config.manager import ManagerConfig

    ManagerConfig.load(config_path)
    check_interpreter_usable(sys.executable)  # as root only: a single-user manager's endpoints run as itself
    options = click.get_current_context().find_root().params
    argv = [sys.executable, "-I", "-m", "mep.root", "--config", str(config_path), "--log-format",
            options["log_format"], *(f"--log-level={level}" for level in options["log_levels"])]
    os.execv(sys.executable, argv + (["--verbose"] if options["verbose"] else []))


# --- clients ------------------------------------------------------------------------


@cli.command("status", epilog=_examples(
    "mep status                                  # MEP_SERVICE, MEP_SERVICE_KEY, MEP_TOKEN from the environment",
    "mep status --endpoint 5f0c... --timeout 30 --output table"))
@click.option("--service", "service_address", envvar="MEP_SERVICE", required=True)
@click.option("--service-key", envvar="MEP_SERVICE_KEY", required=True)
@click.option("--token", envvar="MEP_TOKEN", required=True)
@click.option("--endpoint", "endpoint_id", default="", help="Also report this endpoint's manager processes.")
@click.option("--timeout", type=float, default=10.0, show_default=True)
@output_option_defaulting_to("json")  # scripts and tests parse its JSON, which it always printed
@_friendly
def status(service_address: str, service_key: str, token: str, endpoint_id: str, timeout: float,
           output_format: str) -> None:
    """Print the service's and a manager's processes: pid, uid, and whether dill was ever loaded."""
    from mep.sdk.status import fetch_status

    report = fetch_status(service_address, service_key, token, endpoint_id, timeout)
    if output_format == "json":
        emit_record(report, output_format)
        return
    emit_record({"endpoint_online": report["endpoint_online"]}, output_format)
    emit_rows(report["processes"], ["role", "pid", "uid", "dill_loaded", "unpickling_refused"], output_format)


@cli.command("demo", epilog=_examples("sudo mep demo                 # a temporary account runs the tasks",
                                     "sudo mep demo --as alice --tasks 8", "mep demo                      # as yourself"))
@click.option("--as", "as_user", default=None, help="As root: run the demo's tasks as this existing account.")
@click.option("--tasks", type=int, default=4, show_default=True)
@_friendly
def demo(as_user: str | None, tasks: int) -> None:
    """Service, manager and a sample submission on this machine, printing who each task ran as."""
    from mep.cli.demo import run_demo

    sys.exit(run_demo(as_user=as_user, tasks=tasks))


cli.add_command(endpoint_admin)
cli.add_command(diagnose)
cli.add_command(template)
cli.add_command(identity_group)
from mep.cli.signing import register as register_signing_commands  # noqa: E402 - uses the helpers above

register_signing_commands(service, manager)


def main() -> int:
    cli(prog_name="mep")
    return 0

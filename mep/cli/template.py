"""``mep template render``: an admin's dry run of a template and schema against a researcher's options.

It renders exactly as the root spawner does (schema check, sandboxed
rendering, the endpoint model, the Parsl signature check) and prints the
resulting endpoint config as YAML alone on stdout, exit 0; or the one-line
error on stderr, exit 1. Never a traceback: an admin pastes the error into a
ticket, a researcher reads it in their future.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import pwd
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import click
import yaml

import mep
from mep.errors import ConfigInvalidError, MepError

DRY_RUN_ENDPOINT = {"id": "00000000-0000-0000-0000-000000000000", "name": "dry-run"}


@click.group("template", epilog="\b\nExamples:\n"
             "  mep template render --template /etc/mep/cluster/local.yaml.j2 \\\n"
             "      --schema /etc/mep/cluster/local.schema.json --user-config '{\"workers\": 2}' --user alice")
def template() -> None:
    """Check the admin's endpoint templates."""


@template.command("render", epilog="\b\nExamples:\n"
                  "  mep template render --template /etc/mep/cluster/slurm.yaml.j2 \\\n"
                  "      --schema /etc/mep/cluster/slurm.schema.json --user-config '{\"partition\": \"debug\"}' --user alice")
@click.option("--template", "template_path", type=click.Path(path_type=Path), required=True,
              help="The Jinja template (e.g. templates/slurm.yaml.j2).")
@click.option("--schema", "schema_path", type=click.Path(path_type=Path), required=True,
              help="The JSON Schema for the researcher's options (e.g. templates/slurm.schema.json).")
@click.option("--user-config", default="{}", show_default=True,
              help="The researcher's user_endpoint_config, as JSON.")
@click.option("--user", "user_name", default=None,
              help="Render as if mapped to this local account [default: you].")
def render(template_path: Path, schema_path: Path, user_config: str, user_name: str | None) -> None:
    """Print the endpoint config a researcher's options would give, or why they would be refused."""
    try:
        click.echo(render_config(template_path, schema_path, user_config, user_name), nl=False)
    except MepError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:  # a bug, still one line: the traceback is for `mep -v`
        logging.getLogger("mep").debug("template render failed", exc_info=True)
        click.echo(f"error: internal error: {type(exc).__name__}: {exc} (run 'mep -v template render ...')", err=True)
        sys.exit(1)


def render_config(template_path: Path, schema_path: Path, user_config: str, user_name: str | None) -> str:
    """The rendered, validated config as YAML; raises MepError with the reason it is refused."""
    from mep.config.render import TemplateRenderer

    try:
        options = json.loads(user_config)
    except json.JSONDecodeError as exc:
        raise ConfigInvalidError(f"--user-config is not valid JSON: {exc.msg} at column {exc.colno}") from None
    renderer = TemplateRenderer(template_path, schema_path)
    config = renderer.render(options, mapped_user=_mapped_user(user_name), user_runtime=_this_runtime(),
                             endpoint=DRY_RUN_ENDPOINT)
    return yaml.dump(config.model_dump(mode="json"), Dumper=_ReadableDumper, sort_keys=False)


class _ReadableDumper(yaml.SafeDumper):
    """Multi-line strings (``worker_init``) as literal blocks, the way an admin would write them."""


def _string(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_ReadableDumper.add_representer(str, _string)


def _mapped_user(user_name: str | None) -> dict[str, Any]:
    try:
        entry = pwd.getpwnam(user_name) if user_name else pwd.getpwuid(os.getuid())
    except KeyError:
        raise ConfigInvalidError(f"--user: there is no local account named {user_name!r}") from None
    groups = sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)))
    return {"name": entry.pw_name, "uid": entry.pw_uid, "gid": entry.pw_gid, "home": entry.pw_dir,
            "groups": groups, "shell": entry.pw_shell}


def _this_runtime() -> dict[str, str]:
    """This interpreter's versions, standing in for a client's (without importing dill)."""
    try:
        dill_version = version("dill")
    except PackageNotFoundError:
        dill_version = ""
    return {"python": ".".join(map(str, sys.version_info[:3])), "dill": dill_version, "mep": mep.__version__,
            "platform": platform.platform()}

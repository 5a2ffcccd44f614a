"""``python -I -m mep.root``: the manager's root process, the one program of mep that runs as root.

``mep manager start`` (the admin's CLI) execs this, and the systemd unit runs
it directly, so the root process image holds only ``mep.root`` (no click, no
template engine, no pydantic): what ``tests/test_root_size.py`` pins.

examples:
  # serve an endpoint for every mapped user (as root; what the systemd unit runs)
  /opt/mep/venv/bin/python -I -m mep.root --config /etc/mep/cluster/config.yaml

  # the same through the admin's CLI, which execs the line above
  mep manager start --config /etc/mep/cluster/config.yaml

  # JSON log lines, the spawner's decisions at debug level
  python -I -m mep.root --config /etc/mep/cluster/config.yaml --log-format json --log-level mep.spawner=DEBUG

  # as an ordinary account: a single-user manager that serves only identities mapped to you
  python -I -m mep.root --config ~/.mep/cluster/config.yaml

What it does: checks the config, keys and policy files as root;
starts the unprivileged router (as router_user) and restarts it if it dies;
verifies each spawn request's signed identity assertion, maps the identity to
an account, checks it (policy, PAM) and starts that account's endpoint after
a checked privilege drop; writes every decision to the audit log. SIGHUP
reloads the identity mapping and reopens the audit log; SIGTERM stops.
"""

import argparse
import os
import sys
from pathlib import Path

from mep.root.errors import ConfigurationError, MepError
from mep.root.logs import parse_levels, setup_logging

# The help's examples are the end of this module's docstring (which python -OO leaves out).
EXAMPLES = "examples:" + (__doc__ or "").partition("\nexamples:")[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -I -m mep.root", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The mep manager's root process: spawner of user endpoints and supervisor of the router.")
    parser.add_argument("--config", type=Path, required=True,
                        help="the endpoint's config.yaml ('mep endpoint configure NAME' writes /etc/mep/NAME/)")
    parser.add_argument("--log-format", choices=("text", "json"), default=os.environ.get("MEP_LOG_FORMAT", "text"),
                        help="text (default), or JSON lines carrying endpoint and task ids")
    parser.add_argument("--log-level", action="append", default=[], metavar="COMPONENT=LEVEL",
                        help="one component's level, e.g. mep.spawner=DEBUG (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    options = parser.parse_args(argv)
    try:
        levels = parse_levels(options.log_level)
    except ValueError as exc:
        parser.error(str(exc))
    setup_logging(options.verbose, options.log_format, levels)
    from mep.root.start import start_manager  # after --help: it needs nothing of this

    try:
        return start_manager(options.config)
    except MepError as exc:  # one line for the admin, never a traceback; 2: fix the configuration
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigurationError) else 1


if __name__ == "__main__":
    sys.exit(main())

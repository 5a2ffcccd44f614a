"""The router process's entry point: ``python -I -m mep.manager.router_main``, exec'd by the spawner.

The spawner forks, drops to the router account and execs this fresh
interpreter (``mep.root.router_process``), so nothing of the root
image lives on here. It arrives with stdin a pipe holding its ``RouterBoot``
(the secrets), stdout and stderr on ``/dev/null``, its channel to the
spawner, the instance lock and its log pipe at the numbers in
``spawner_link``, and no other descriptor.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys

import msgspec
from setproctitle import setproctitle

from mep.cli.logs import use_format
from mep.config.manager import ManagerConfig
from mep.errors import ConfigurationError
from mep.manager.describe import endpoint_options
from mep.manager.spawner_link import CHANNEL_FD, LOG_FD, RouterBoot

log = logging.getLogger("mep.router")


def main() -> int:
    log_stream = os.fdopen(LOG_FD, "w", buffering=1, encoding="utf-8", errors="replace")
    logging.basicConfig(stream=log_stream, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # SIGHUP is the spawner's (reload)
    try:
        boot = msgspec.json.decode(sys.stdin.buffer.read(), type=RouterBoot)
    except msgspec.MsgspecError as exc:
        log.error("unusable boot document from the spawner: %s", exc)
        return 2
    null = os.open(os.devnull, os.O_RDONLY)  # the boot pipe held secrets: done with it
    os.dup2(null, 0)
    os.close(null)
    logging.getLogger().setLevel(boot.log_level)
    use_format(boot.log_format)
    config = ManagerConfig.model_validate(boot.config)
    setproctitle(f"mep-manager router {config.endpoint_id}")
    from mep.manager.router import Router

    try:
        return Router(config, boot.manager_secret_key, boot.endpoint_address, boot.endpoint_secret_key,
                      socket.socket(fileno=CHANNEL_FD),
                      options=endpoint_options(config, boot.schema_text, boot.template_text)).run()
    except ConfigurationError as exc:
        log.error("router: %s", exc)
    except Exception:
        log.exception("router failed")
    return 1


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.exit(code)

"""systemd's readiness notification (``sd_notify(3)``) without a library: one datagram to $NOTIFY_SOCKET.

``Type=notify`` units (packaging/systemd) count as started only once the
process says ``READY=1``: the service once its broker listens, the manager once
its router is running. Outside systemd $NOTIFY_SOCKET is unset and this does
nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("mep.sdnotify")


def notify(state: str) -> bool:
    """Send ``state`` (``KEY=VALUE`` lines) to the service manager; False when there is none to tell."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket: the name starts with a NUL byte
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET=%s is neither a path nor an abstract socket; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify systemd through %s: %s", os.environ["NOTIFY_SOCKET"], exc)
        return False
    return True


def notify_ready() -> bool:
    """Tell systemd this process is ready; then forget the socket, so no process started later speaks for us."""
    sent = notify("READY=1")
    os.environ.pop("NOTIFY_SOCKET", None)
    return sent

"""systemd's readiness notification (``sd_notify(3)``) without a library: one datagram to $NOTIFY_SOCKET.

``Type=notify`` units (packaging/systemd) count as started only once the
process says ``READY=1``: the service once its broker listens, the manager once
its router is running. Outside systemd $NOTIFY_SOCKET is unset and this does
nothing.
"""

import logging
import os
import socket

log = logging.getLogger("mep.sdnotify")


def notify_ready() -> bool:
    """Tell systemd this process is ready (False: there is none to tell, or it could not be told).

    Then forget the socket, so no process started later speaks for us.
    """
    address = os.environ.pop("NOTIFY_SOCKET", "")
    if not address:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # "@name" is an abstract socket, whose name starts with a NUL byte; anything else is a path.
            sock.connect("\0" + address[1:] if address.startswith("@") else address)
            sock.sendall(b"READY=1")
    except OSError as exc:
        log.warning("could not notify systemd through %s: %s", address, exc)
        return False
    return True

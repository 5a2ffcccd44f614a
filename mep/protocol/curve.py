"""CURVE keys on disk and the ZAP handler that turns a peer's key into an identity.

Key files hold one Z85 key (40 characters). A secret key file must be 0600
(or stricter) and is refused otherwise, as sshd refuses an open private key.
The ZAP handler runs in a thread and answers libzmq's authentication requests
by asking a callback which identity a public key belongs to; the answer comes
back on every received frame as the ``User-Id`` property, so the receiving
loop learns who sent each message from the handshake, never from the message.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import zmq
import zmq.utils.z85

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ANONYMOUS = ""


from mep.root.keys import (  # noqa: E402,F401 - defined with the root process, re-exported
    check_public_key,
    generate_keypair,
    public_from_secret,
    read_private_text,
    read_secret_key,
    write_secret_key,
)


KeyLookup = Callable[[str], str | None]
"""Maps a client's Z85 public key to its identity string, or None to refuse it."""


class ZapHandler:
    """Answers ZAP requests for one context from a key lookup, in a daemon thread.

    Sockets opt in by setting ``zap_domain``; the domain selects the lookup,
    so one process can authenticate several sockets differently.
    """

    def __init__(self, context: zmq.Context, lookups: dict[str, KeyLookup]) -> None:
        self._context = context
        self._lookups = lookups
        self._socket = context.socket(zmq.REP)
        self._socket.linger = 0
        self._socket.bind(ZAP_ENDPOINT)
        self._thread = threading.Thread(target=self._serve, name="zap", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                request = self._socket.recv_multipart()
            except zmq.ContextTerminated:
                self._socket.close()
                return
            self._socket.send_multipart(self._answer(request))

    def _answer(self, request: list[bytes]) -> list[bytes]:
        version, request_id, domain, address, _identity, mechanism, *credentials = request
        refuse = [version, request_id, b"400", b"refused", b"", b""]
        lookup = self._lookups.get(domain.decode("utf-8", "replace"))
        if lookup is None or mechanism != b"CURVE" or len(credentials) != 1:
            log.warning("refused %s connection from %s: no CURVE credentials for domain %r",
                        mechanism.decode(errors="replace"), address.decode(errors="replace"), domain)
            return refuse
        public_key = zmq.utils.z85.encode(credentials[0]).decode("ascii")
        try:
            user_id = lookup(public_key)
        except Exception:  # a lookup failure must refuse, and must not kill the thread
            log.exception("key lookup failed; refusing the connection")
            user_id = None
        if user_id is None:
            log.warning("refused connection from %s: unknown CURVE key %s (domain %s)",
                        address.decode(errors="replace"), public_key, domain.decode(errors="replace"))
            return refuse
        return [version, request_id, b"200", b"OK", user_id.encode("utf-8"), b""]


def make_curve_server(socket: zmq.Socket, secret_key: str, zap_domain: str) -> None:
    socket.curve_server = True
    socket.curve_secretkey = secret_key.encode("ascii")
    socket.zap_domain = zap_domain.encode("ascii")


def make_curve_client(socket: zmq.Socket, server_public: str, secret_key: str) -> None:
    socket.curve_serverkey = server_public.encode("ascii")
    socket.curve_secretkey = secret_key.encode("ascii")
    socket.curve_publickey = public_from_secret(secret_key).encode("ascii")


def peer_user_id(frame: zmq.Frame) -> str:
    """The identity the ZAP handler assigned to the connection this frame came on."""
    return frame.get("User-Id")

"""The root spawner's own message set, its decoder, and the channel it talks to the router on.

Only envelopes travel between router and spawner (``SpawnRequest`` and its
answers, endpoint news), never a task frame (nor a task record: the router
keeps its own task log, ``mep.manager.task_audit``): one msgpack envelope per
SOCK_SEQPACKET datagram of a ``socketpair`` made before the manager splits, so
no other process can reach it. The spawner decodes them with a decoder of this
set alone: anything else the router sends is a ``ProtocolError``. The other
wire envelopes (``mep.protocol.messages``) build on ``Envelope`` from here, so
the version field is defined once.

Both ends are non-blocking with an outbox: if each side blocked writing while
the other's buffer was full of its own writes, both would wait forever. A
loop calls ``flush`` when the socket is writable (``wants_write``).
"""

import collections
import socket
from typing import Any, Literal

import msgspec

from mep.root.errors import ProtocolError

PROTOCOL_VERSION = 1


class Envelope(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of all headers; the version lets a peer refuse what it can't read."""

    v: int = PROTOCOL_VERSION


class ProcessStatus(msgspec.Struct, forbid_unknown_fields=True):
    """What a process says of itself: who it runs as and whether it ever loaded dill."""

    role: str
    pid: int
    uid: int
    dill_loaded: bool
    unpickling_refused: bool


class IdentityResource(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """An identity in the Globus Auth shape, as the service asserts it."""

    id: str
    username: str
    status: str = "used"
    email: str | None = None
    name: str | None = None
    organization: str | None = None
    identity_provider: str | None = None


class SpawnRequest(Envelope, tag="SPAWN"):
    request_id: int = 0
    submitter_id: str = ""
    identities: list[IdentityResource] = []
    user_endpoint_config: dict[str, Any] = {}
    # The client's interpreter (mep.protocol.messages.Runtime): root only hands it to the endpoint, which renders
    # its config with it, so it is not looked into here.
    runtime: dict[str, str] | None = None
    identity_assertion: str = ""


class Spawned(Envelope, tag="SPAWNED"):
    request_id: int = 0
    endpoint_id: str = ""
    pid: int = 0
    account: str = ""
    public_key: str = ""
    reused: bool = False


class SpawnRefused(Envelope, tag="SPAWN_REFUSED"):
    request_id: int = 0
    code: str = ""
    message: str = ""
    step: str = ""  # for spawn_failed: the step that failed (a privdrop step, PAM's), for the router's metrics


class EndpointExited(Envelope, tag="ENDPOINT_EXITED"):
    """``signalled``: killed from outside (OOM killer, an admin), not a failure of its own making."""

    endpoint_id: str = ""
    pid: int = 0
    how: str = ""
    log_tail: str = ""
    signalled: bool = False


class RouterStopping(Envelope, tag="ROUTER_STOPPING"):
    """The router is stopping on purpose: when it hangs up, stop the endpoints rather than keep them for adoption."""


class RetireEndpoint(Envelope, tag="RETIRE"):
    """The router is shutting this endpoint down: never hand it out again (``kill``: it is hung, SIGKILL it)."""

    endpoint_id: str = ""
    kill: bool = False


class RemapGroups(Envelope, tag="REMAP_GROUPS"):
    """Forget which endpoint serves which submitter: the mapping changed, or an account was disabled."""

    reason: str = ""


class SpawnerStatusRequest(Envelope, tag="SPAWNER_STATUS"):
    """The router asks for ``process_status`` of the spawner, for ``mep status``."""


class SpawnerStatus(Envelope, tag="SPAWNER_STATUS_REPLY"):
    process: ProcessStatus | None = None


class EndpointBoot(msgspec.Struct, forbid_unknown_fields=True):
    """Everything a freshly exec'd user endpoint needs; secrets travel only here, never in argv/env."""

    endpoint_id: str
    account: str
    router_address: str
    router_public_key: str
    secret_key: str
    # The admin's template and schema (read by root through its policy-file checks) and the researcher's
    # options: the endpoint renders them itself, as the user (mep.config.render).
    template: str
    schema: str
    template_path: str  # names the files in messages only
    schema_path: str
    user_config: dict[str, Any] = {}
    user_runtime: dict[str, Any] = {}
    mapped_user: dict[str, Any] = {}
    heartbeat_interval: float = 10.0
    # Whom this endpoint serves, checked against each task's signed assertion with these pinned keys;
    # serves_any_identity: the admin lets identities mapped to one account share endpoints.
    manager_endpoint_id: str = ""
    identity_id: str = ""
    identities: list[IdentityResource] = []
    serves_any_identity: bool = False
    assertion_keys: list[str] = []
    log_format: Literal["text", "json"] = "text"  # the manager's: its logs and the endpoints' join on ids


class RouterBoot(msgspec.Struct, forbid_unknown_fields=True):
    """What the spawner writes to a new router's stdin (secrets travel there, never in argv or the environment)."""

    config: dict  # the ManagerConfig, as JSON
    manager_secret_key: str  # for the service link
    endpoint_address: str  # ipc:// address of the endpoint socket
    endpoint_secret_key: str  # the router's endpoint-facing key, kept across restarts
    log_level: int
    log_format: Literal["text", "json"] = "text"
    # The admin's schema and template as the root side read them (policy-checked), for ENDPOINT_INFO: the
    # router's account can't read /etc/mep/NAME (0700, it holds manager.key). Parsed only by the router.
    schema_text: str = ""
    template_text: str = ""


SpawnerMessage = (SpawnRequest | Spawned | SpawnRefused | EndpointExited | RetireEndpoint | RouterStopping | RemapGroups
                  | SpawnerStatusRequest | SpawnerStatus)
_decoder = msgspec.msgpack.Decoder(SpawnerMessage)


def decode_message(data: bytes) -> SpawnerMessage:
    """One envelope of this set, validated; anything else (another type, a newer version) is a ``ProtocolError``."""
    try:
        message = _decoder.decode(data)
    except (msgspec.MsgspecError, RecursionError, MemoryError, ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"invalid message on the spawner channel: {type(exc).__name__}: {exc}") from None
    if message.v != PROTOCOL_VERSION:
        raise ProtocolError(f"{type(message).__name__} of protocol version {message.v}; this manager speaks "
                            f"{PROTOCOL_VERSION}")
    return message


MAX_DATAGRAM = 1024 * 1024


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(router end, spawner end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class SpawnerLink:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self._outbox: collections.deque[bytes] = collections.deque()

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def wants_write(self) -> bool:
        return bool(self._outbox)

    def send(self, message: msgspec.Struct) -> None:
        data = msgspec.msgpack.encode(message)
        if len(data) > MAX_DATAGRAM:
            raise ProtocolError(f"{type(message).__name__} of {len(data)} bytes exceeds {MAX_DATAGRAM}")
        self._outbox.append(data)
        self.flush()

    def flush(self) -> None:
        """Send what the socket takes now; the rest waits for the next ``flush``."""
        while self._outbox:
            try:
                self.sock.send(self._outbox[0])
            except (BlockingIOError, InterruptedError):
                return
            except (BrokenPipeError, ConnectionResetError):
                self._outbox.clear()  # the other side is gone; receive() reports it
                return
            self._outbox.popleft()

    def receive(self) -> msgspec.Struct | None:
        """The next envelope, or None when the other side has closed the channel.

        Raises ``BlockingIOError`` when nothing is waiting (call it when the socket is readable).
        """
        try:
            data = self.sock.recv(MAX_DATAGRAM)
        except ConnectionResetError:
            data = b""
        return decode_message(data) if data else None

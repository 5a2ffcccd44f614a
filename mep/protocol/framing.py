"""Turn envelopes into ZeroMQ multipart messages and back, validating as we go.

A message is ``[SIGNATURE, header, *payload]``. ``decode`` never raises
anything but ``ProtocolError`` (``ConfigInvalidError`` when only the
``user_endpoint_config`` is at fault) with a message saying what was wrong, so a
malformed message from a peer is answered or logged, never a traceback.

Its bounds (docs/protocol.md, "Limits"): the frame count and header size
before anything is read; while it is read, the types themselves bound every
list a client sends and every id's length, and msgspec's recursion guard
bounds nesting (a peer's deep nesting is a ``RecursionError`` here, mapped to
``ProtocolError`` like every other decoder failure); then, before any handler
sees it, each ``user_endpoint_config`` (the only field whose shape the sender
chooses) is checked for depth and JSON-only content (see ``user_config``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from mep.errors import ConfigInvalidError, ProtocolError
from mep.protocol.messages import (
    MAX_IDS_PER_REQUEST,
    PROTOCOL_VERSION,
    SIGNATURE,
    Dispatch,
    Header,
    Results,
    SpawnRequest,
    Submit,
    Tasks,
)
from mep.protocol.user_config import config_problem

MAX_HEADER_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PAYLOAD_BYTES = 10 * 1024 * 1024  # one task's function or arguments, serialised
MAX_FRAMES = 2 + 2 * MAX_IDS_PER_REQUEST  # signature, header, then at most arguments and a function per task

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Header)

Frame = Any  # bytes, memoryview or zmq.Frame: relayed without copying


def encode(header: msgspec.Struct, payloads: Sequence[Frame] = ()) -> list[Frame]:
    """Frames for ``header`` followed by the opaque ``payloads``."""
    return [SIGNATURE, _encoder.encode(header), *payloads]


def _as_bytes(frame: Frame) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def decode_header(raw: Frame, what: str = "header") -> Any:
    """One envelope, validated, its configs checked; any failure of the decoder is a ``ProtocolError``."""
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{what} of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = _decoder.decode(raw if isinstance(raw, bytes) else _as_bytes(raw))
    except msgspec.ValidationError as exc:
        if "$.user_endpoint_config" in str(exc):
            raise ConfigInvalidError(f"user_endpoint_config refused: {exc}") from None
        raise ProtocolError(f"invalid {what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable {what}: {exc}") from None
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"undecodable {what}: {type(exc).__name__}: {exc}") from None
    for config in _configs(header):
        problem = config_problem(config)
        if problem is not None:
            raise ConfigInvalidError(problem)
    return header


def _configs(header: Any) -> list[Any]:
    """The user endpoint configs a header carries: the only fields whose shape the sender chooses."""
    if isinstance(header, (Submit, SpawnRequest)):
        return [header.user_endpoint_config]
    if isinstance(header, Dispatch):
        return [group.user_endpoint_config for group in header.groups]
    return []


def decode(frames: Sequence[Frame]) -> tuple[Any, list[Frame]]:
    """Split a received message into its validated header and payload frames."""
    if not 2 <= len(frames) <= MAX_FRAMES:
        raise ProtocolError(f"message has {len(frames)} frame(s); expected signature, header and at most "
                            f"{MAX_FRAMES - 2} payload frames")
    signature = _as_bytes(frames[0])
    if signature != SIGNATURE:
        raise ProtocolError(f"bad signature {signature[:16]!r}; expected {SIGNATURE!r}")
    header = decode_header(frames[1])
    if header.v != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {header.v} is not supported (this side speaks {PROTOCOL_VERSION})"
        )
    payloads = list(frames[2:])
    count = len(payloads)
    if isinstance(header, (Submit, Dispatch, Tasks)):
        for task in header.tasks:
            if not (0 <= task.args_frame < count and -1 <= task.fn_frame < count):
                raise _bad_frame_index(task.task_id, count)
    elif isinstance(header, Results):
        for result in header.results:
            if not -1 <= result.payload_frame < count:
                raise _bad_frame_index(result.task_id, count)
    return header, payloads


def _bad_frame_index(task_id: str, count: int) -> ProtocolError:
    return ProtocolError(f"task {task_id} points at a payload frame the message does not have ({count} frames)")

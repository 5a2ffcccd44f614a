"""Turn envelopes into ZeroMQ multipart messages and back, validating as we go.

A message is ``[SIGNATURE, header, *payload]``. ``decode`` never raises
anything but ``ProtocolError`` with a message saying what was wrong, so a
malformed message from a peer is answered or logged, never a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from mep.errors import ProtocolError
from mep.protocol.messages import PROTOCOL_VERSION, SIGNATURE, Dispatch, Header, Results, Submit, Tasks

MAX_HEADER_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PAYLOAD_BYTES = 10 * 1024 * 1024  # one task's function or arguments, serialised

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Header)

Frame = Any  # bytes, memoryview or zmq.Frame: relayed without copying


def encode(header: msgspec.Struct, payloads: Sequence[Frame] = ()) -> list[Frame]:
    """Frames for ``header`` followed by the opaque ``payloads``."""
    return [SIGNATURE, _encoder.encode(header), *payloads]


def _as_bytes(frame: Frame) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def decode(frames: Sequence[Frame]) -> tuple[Any, list[Frame]]:
    """Split a received message into its validated header and payload frames."""
    if len(frames) < 2:
        raise ProtocolError(f"message has {len(frames)} frame(s); expected signature and header")
    signature = _as_bytes(frames[0])
    if signature != SIGNATURE:
        raise ProtocolError(f"bad signature {signature[:16]!r}; expected {SIGNATURE!r}")
    raw = frames[1]
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = _decoder.decode(_as_bytes(raw) if not isinstance(raw, bytes) else raw)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid header: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable header: {exc}") from None
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

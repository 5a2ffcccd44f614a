"""Turn envelopes into ZeroMQ multipart messages and back, validating as we go.

A message is ``[SIGNATURE, header, *payload]``. ``decode`` never raises
anything but ``ProtocolError`` (``ConfigInvalidError`` when only the
``user_endpoint_config`` is at fault) with a message saying what was wrong, so a
malformed message from a peer is answered or logged, never a traceback.

Its bounds (docs/protocol.md, "Limits") are checked before or while the
header is read, never after objects are built: the frame count and header
size first, then the types themselves, which bound every list a client sends,
every id's length, and the nesting and content of ``user_endpoint_config``
(the only field whose shape the sender chooses; see ``user_config``). So no
nesting a peer sends can reach the decoder's recursion limit; if some other
decoder failure does, it is still a ``ProtocolError``.
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
    """One envelope, validated; any failure of the decoder is a ``ProtocolError``."""
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{what} of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    data = raw if isinstance(raw, bytes) else _as_bytes(raw)
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        if "$.user_endpoint_config" in str(exc):
            raise ConfigInvalidError(_config_refusal(data, exc)) from None
        raise ProtocolError(f"invalid {what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable {what}: {exc}") from None
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"undecodable {what}: {type(exc).__name__}: {exc}") from None


class _AnyConfig(msgspec.Struct):
    user_endpoint_config: Any = None


_lenient_decoder = msgspec.msgpack.Decoder(_AnyConfig)


def _config_refusal(data: bytes, exc: msgspec.ValidationError) -> str:
    """Name the key path the refusal is about (msgspec shows object keys as ``[...]``)."""
    try:
        problem = config_problem(_lenient_decoder.decode(data).user_endpoint_config)
    except (msgspec.MsgspecError, RecursionError, ValueError, TypeError, OverflowError):
        problem = None  # e.g. nested too deep to read at all: msgspec's own words then
    return f"user_endpoint_config refused: {problem or exc}"


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

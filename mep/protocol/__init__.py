"""The wire protocol: message envelopes, framing and CURVE key handling.

Imported by every process; contains no code that could deserialise a user
payload (payloads stay ``bytes`` / ``zmq.Frame`` from socket to socket).
"""

from mep.protocol.framing import decode, encode
from mep.protocol.messages import PROTOCOL_VERSION, SIGNATURE

__all__ = ["PROTOCOL_VERSION", "SIGNATURE", "decode", "encode"]

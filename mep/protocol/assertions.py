"""The service's half of signed identity assertions: keys and the signer.

The format (claims, envelope, signing context) and the checking half live in
``mep.root.assertions``, with the root spawner that checks them; this module
signs with that one definition. ``docs/identity.md`` ("Signed identity
assertions") describes both.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from collections.abc import Iterable

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mep.errors import ConfigurationError
from mep.protocol.messages import TaskGroup
from mep.root.assertions import (  # noqa: F401 - the shared format and the checking half, re-exported
    ALGORITHM,
    CLOCK_SKEW,
    DEFAULT_LIFETIME,
    FORMAT_VERSION,
    PUBLIC_KEY_PREFIX,
    SIGNING_CONTEXT,
    AssertionVerifier,
    Claims,
    NonceCache,
    SignedAssertion,
    Verified,
    _claims_encoder,
    _raw,
    check_spawn_claims,
    check_task_claims,
    config_digest,
    key_id_of,
    parse_public_key,
)


def generate_signing_key() -> str:
    """A new Ed25519 secret key as text (base64 of the 32-byte seed), for a 0600 file."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _private_key(secret: str) -> Ed25519PrivateKey:
    try:
        seed = base64.b64decode(secret.strip(), validate=True)
        return Ed25519PrivateKey.from_private_bytes(seed)
    except (binascii.Error, ValueError):
        raise ConfigurationError("the service signing key is not a base64 Ed25519 seed of 32 bytes") from None


def public_key_text(secret: str) -> str:
    """``ed25519:<base64>``: the form managers pin."""
    return PUBLIC_KEY_PREFIX + base64.b64encode(_raw(_private_key(secret).public_key())).decode()


# --- the service's side ----------------------------------------------------------------


class AssertionSigner:
    def __init__(self, secret: str, lifetime: float = DEFAULT_LIFETIME) -> None:
        self._key = _private_key(secret)
        raw = _raw(self._key.public_key())
        self.key_id = key_id_of(raw)
        self.public_key = PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode()
        self.lifetime = lifetime

    def sign(self, claims: Claims) -> str:
        body = _claims_encoder.encode(claims)
        envelope = SignedAssertion(v=FORMAT_VERSION, alg=ALGORITHM, key_id=self.key_id, claims=body,
                                   signature=self._key.sign(SIGNING_CONTEXT + body))
        return base64.urlsafe_b64encode(msgspec.msgpack.encode(envelope)).decode()

    def sign_groups(self, endpoint_id: str, groups: Iterable[TaskGroup]) -> None:
        """Set each group's ``identity_assertion``: who submitted it, for this endpoint, valid for ``lifetime``."""
        now = time.time()
        for group in groups:
            group.identity_assertion = self.sign(Claims(
                submitter_id=group.submitter_id, identities=group.identities, endpoint_id=endpoint_id,
                config_digest=config_digest(group.user_endpoint_config), task_ids=group.task_ids,
                issued_at=now, expires_at=now + self.lifetime, nonce=secrets.token_hex(16)))

"""The unprivileged halves of signed identity assertions: the service's keys and signer, the user endpoint's checks.

The format (claims, envelope, signing context) and the spawner's checks live
in ``mep.root.assertions``, with the root spawner that runs them; this module
signs with that one definition, and checks each task where it runs.
``docs/identity.md`` ("Signed identity assertions") describes both.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from collections.abc import Iterable

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mep.errors import ConfigurationError, ErrorCode
from mep.protocol.messages import TaskGroup
from mep.root.assertions import (  # noqa: F401 - the shared format and the spawner's checks, re-exported
    ALGORITHM,
    CLOCK_SKEW,
    FORMAT_VERSION,
    PUBLIC_KEY_PREFIX,
    SIGNING_CONTEXT,
    AssertionVerifier,
    Claims,
    NonceCache,
    SignedAssertion,
    Verified,
    check_spawn_claims,
    config_digest,
    key_id_of,
    load_public_key,
    refusal,
)

# Seconds a dispatched group may wait in the router before its endpoint sees it: long, since a task still
# queued there when it expires fails. A longer life only widens the window for replaying a group's own tasks
# into its own identity's endpoint; spawn requests can't be replayed (the spawner remembers nonces till expiry).
DEFAULT_LIFETIME = 24 * 3600.0
_CACHE_LIMIT = 10_000  # verified assertions a user endpoint remembers (by signature)


def parse_public_key(text: str) -> tuple[str, Ed25519PublicKey]:
    """(key id, key) of an ``ed25519:<base64>`` key an admin gave; ConfigurationError names what is wrong."""
    if not text.startswith(PUBLIC_KEY_PREFIX):
        raise ConfigurationError(f"service signing key {text!r} does not start with {PUBLIC_KEY_PREFIX!r}; "
                                 "copy it from 'mep service signing-key show'")
    try:
        return load_public_key(text)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"service signing key {text!r} is not a base64 Ed25519 public key "
                                 "of 32 bytes") from None


def generate_signing_key() -> str:
    """A new Ed25519 secret key as text (base64 of the 32-byte seed), for a 0600 file."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes_raw()


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
        body = msgspec.msgpack.encode(claims)
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


# --- the user endpoint's side ----------------------------------------------------------


class CachingVerifier(AssertionVerifier):
    """The user endpoint's verifier: each distinct assertion's signature is checked once.

    A group's tasks share one assertion, and every task is checked; expiry and
    the endpoint are checked on every call. Used from the endpoint's loop only.
    """

    def __init__(self, public_keys: Iterable[str], endpoint_id: str) -> None:
        super().__init__(public_keys, endpoint_id)
        self._verified: dict[bytes, Verified] = {}  # by signature

    def verify(self, assertion: str) -> Verified:
        envelope = self.decode(assertion)
        verified = self._verified.get(envelope.signature)
        if verified is None:
            verified = self.check_signature(envelope)
            if len(self._verified) >= _CACHE_LIMIT:
                self._forget_expired()
            self._verified[envelope.signature] = verified
        self.check_validity(verified.claims, envelope.key_id)
        return verified

    def _forget_expired(self) -> None:
        now = time.time()
        for signature in [s for s, v in self._verified.items() if v.claims.expires_at < now]:
            del self._verified[signature]
        if len(self._verified) >= _CACHE_LIMIT:
            self._verified.clear()  # all still valid: re-verifying later is only slower


def check_task_claims(verified: Verified, task_id: str, serves: str | None) -> None:
    """A task may run on an endpoint only under an assertion that covers it, for the identity it serves.

    ``serves`` is the identity id the endpoint was started for, or None when
    the admin lets identities share endpoints.
    """
    claims = verified.claims
    if task_id not in verified.task_ids:
        raise refusal(ErrorCode.ASSERTION_MISMATCH, "it does not cover this task",
                      f"task {task_id} is not among the tasks the assertion of {claims.submitter_id} covers")
    if serves is not None and claims.submitter_id != serves:
        raise refusal(ErrorCode.ASSERTION_MISMATCH, "this endpoint serves another identity",
                      f"task {task_id} of identity {claims.submitter_id} was routed to an endpoint that serves "
                      f"identity {serves}")

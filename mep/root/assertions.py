"""Signed identity assertions: the service's word on who submitted a group of tasks, checked where they run.

The service signs, for every ``TaskGroup`` it dispatches, the claims below
with an Ed25519 key whose public half each manager pins in its config
(``service_signing_keys``). The root spawner verifies a spawn request's
assertion before it maps or starts anything, and each user endpoint verifies
the assertion of every task it is given against the identity it was started
for, so a compromised router can neither start endpoints for identities that
never submitted nor route one identity's task into another's endpoint.
``docs/identity.md`` ("Signed identity assertions") describes the format, the
checks and key rotation.

Wire form (the ``identity_assertion`` string of ``TaskGroup`` and
``SpawnRequest``, and ``Tasks.assertions``): URL-safe base64 of the msgpack
encoding of ``SignedAssertion``, whose ``claims`` are the msgpack bytes of
``Claims`` exactly as signed. The signature covers ``SIGNING_CONTEXT`` followed
by those bytes, so nothing else mep signs can pass for an assertion.

This module holds the format and what root checks. The service's signer, and
the user endpoint's per-task checks (``check_task_claims``, a verifier that
checks each signature once), are in ``mep.protocol.assertions``: they run
unprivileged.
"""

import base64
import binascii
import hashlib
import json
import threading
import time
from collections.abc import Iterable
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mep.root.errors import AssertionRefusedError, ErrorCode
from mep.root.messages import IdentityResource

FORMAT_VERSION = 1
ALGORITHM = "Ed25519"
SIGNING_CONTEXT = b"mep identity assertion v1\0"
PUBLIC_KEY_PREFIX = "ed25519:"
CLOCK_SKEW = 300.0  # seconds the service's clock may run ahead of the manager's


class Claims(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What the service asserts about one group of tasks.

    ``idp_token`` is reserved for a site identity provider's own signed token
    (an OIDC ID token, say) for the submitter, so a later verifier can check
    the researcher's identity end to end without the service being trusted for
    it; today it is carried and signed, not checked.
    """

    submitter_id: str
    identities: list[IdentityResource]
    endpoint_id: str  # the manager's endpoint, as registered at the service
    config_digest: str  # config_digest() of the group's user endpoint config
    task_ids: list[str]
    issued_at: float  # Unix seconds
    expires_at: float
    nonce: str
    idp_token: str = ""


class Verified(msgspec.Struct, frozen=True):
    """Claims whose signature checked out, with their task ids as a set for cheap membership tests."""

    claims: Claims
    task_ids: frozenset[str]


class SignedAssertion(msgspec.Struct, forbid_unknown_fields=True):
    v: int
    alg: str
    key_id: str
    claims: bytes
    signature: bytes


def config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a user endpoint config: equal configs, equal digests."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def key_id_of(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def load_public_key(text: str) -> tuple[str, Ed25519PublicKey]:
    """(key id, key) of a pinned ``ed25519:<base64>`` key, as the config's pattern for it has checked already.

    (What an admin types is checked with messages by ``mep.protocol.assertions.parse_public_key``.)
    """
    raw = base64.b64decode(text.removeprefix(PUBLIC_KEY_PREFIX), validate=True)
    return key_id_of(raw), Ed25519PublicKey.from_public_bytes(raw)


def refusal(code: ErrorCode, why: str, detail: str) -> AssertionRefusedError:
    """The researcher is told ``why`` in general terms; ``detail`` is for the admin's log and audit record."""
    message = (f"this endpoint could not verify the service's signed statement of who submitted these tasks "
               f"({why}); ask your admin")
    return AssertionRefusedError(message, code, detail)


class AssertionVerifier:
    """Checks assertions against the pinned keys; several may be pinned, so a key rotation has no gap.

    It keeps no state (replays are ``NonceCache``'s to refuse), so the
    spawner's threads may share it. The user endpoint's subclass
    (``mep.protocol.assertions.CachingVerifier``) checks each distinct
    signature once, since a group's tasks share one assertion.
    """

    def __init__(self, public_keys: Iterable[str], endpoint_id: str) -> None:
        self.keys = dict(load_public_key(text) for text in public_keys)
        self.endpoint_id = endpoint_id

    def verify(self, assertion: str) -> Verified:
        """A valid, unexpired assertion for this endpoint; raises ``AssertionRefusedError`` saying what failed."""
        envelope = self.decode(assertion)
        verified = self.check_signature(envelope)
        self.check_validity(verified.claims, envelope.key_id)
        return verified

    def decode(self, assertion: str) -> SignedAssertion:
        if not assertion:
            raise refusal(ErrorCode.ASSERTION_MISSING, "they carry none",
                          "the request carries no identity assertion (was it signed by the service?)")
        try:
            envelope = msgspec.msgpack.decode(base64.urlsafe_b64decode(assertion), type=SignedAssertion)
        except (binascii.Error, ValueError, msgspec.MsgspecError) as exc:
            raise refusal(ErrorCode.ASSERTION_INVALID, "it is malformed",
                          f"undecodable identity assertion: {exc}") from None
        if envelope.v != FORMAT_VERSION or envelope.alg != ALGORITHM:
            raise refusal(ErrorCode.ASSERTION_INVALID, "its format is unknown here",
                          f"identity assertion version {envelope.v} ({envelope.alg}); this manager reads version "
                          f"{FORMAT_VERSION} ({ALGORITHM}): upgrade it")
        return envelope

    def check_signature(self, envelope: SignedAssertion) -> Verified:
        key = self.keys.get(envelope.key_id)
        if key is None:
            raise refusal(ErrorCode.ASSERTION_INVALID, "it is signed by an unknown key",
                          f"identity assertion signed by key id {envelope.key_id}, which is not among the pinned "
                          f"service_signing_keys (ids {sorted(self.keys)}); if the service rotated its key, pin "
                          "the new one: mep manager pin-signing-key")
        try:
            key.verify(envelope.signature, SIGNING_CONTEXT + envelope.claims)
        except InvalidSignature:
            raise refusal(ErrorCode.ASSERTION_INVALID, "its signature is invalid",
                          f"identity assertion with a bad signature for key id {envelope.key_id}: forged or "
                          "altered after the service signed it") from None
        try:
            claims = msgspec.msgpack.decode(envelope.claims, type=Claims)
        except msgspec.MsgspecError as exc:
            raise refusal(ErrorCode.ASSERTION_INVALID, "it is malformed",
                          f"signed identity assertion claims undecodable: {exc}") from None
        return Verified(claims, frozenset(claims.task_ids))

    def check_validity(self, claims: Claims, key_id: str) -> None:
        now = time.time()
        if now > claims.expires_at:
            raise refusal(ErrorCode.ASSERTION_EXPIRED, "it has expired",
                          f"identity assertion of {claims.submitter_id} (nonce {claims.nonce}, key {key_id}) "
                          f"expired {now - claims.expires_at:.0f} s ago")
        if claims.issued_at > now + CLOCK_SKEW:
            raise refusal(ErrorCode.ASSERTION_EXPIRED, "it is dated in the future",
                          f"identity assertion issued {claims.issued_at - now:.0f} s in the future: check the "
                          "clocks of the service and this host")
        if claims.endpoint_id != self.endpoint_id:
            raise refusal(ErrorCode.ASSERTION_MISMATCH, "it was issued for another endpoint",
                          f"identity assertion for endpoint {claims.endpoint_id}, not this one ({self.endpoint_id})")


class NonceCache:
    """Nonces already used, each kept until its assertion expires (after which expiry refuses it anyway)."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def use(self, claims: Claims) -> None:
        now = time.time()
        with self._lock:
            for nonce in [n for n, expires in self._seen.items() if expires < now]:
                del self._seen[nonce]
            if claims.nonce in self._seen:
                raise refusal(ErrorCode.ASSERTION_REPLAYED, "it was used before",
                              f"identity assertion of {claims.submitter_id} replayed (nonce {claims.nonce})")
            self._seen[claims.nonce] = claims.expires_at


def check_spawn_claims(claims: Claims, *, submitter_id: str, identities: list[IdentityResource],
                       config: dict[str, Any]) -> None:
    """A spawn request must name exactly the identities and config the service signed."""
    if claims.submitter_id != submitter_id or claims.identities != identities:
        raise refusal(ErrorCode.ASSERTION_MISMATCH, "it names another identity",
                      f"spawn request for submitter {submitter_id} with identities "
                      f"{[i.id for i in identities]}, but the service signed {claims.submitter_id} with "
                      f"{[i.id for i in claims.identities]}")
    if claims.config_digest != config_digest(config):
        raise refusal(ErrorCode.ASSERTION_MISMATCH, "it was signed for another configuration",
                      f"spawn request's user endpoint config digest {config_digest(config)} differs from the "
                      f"signed {claims.config_digest}")

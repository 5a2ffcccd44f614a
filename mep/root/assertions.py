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
"""

from __future__ import annotations

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

from mep.root.errors import (
    AssertionExpiredError,
    AssertionMismatchError,
    AssertionMissingError,
    AssertionRefusedError,
    AssertionReplayedError,
    ConfigurationError,
)
from mep.root.messages import IdentityResource

FORMAT_VERSION = 1
ALGORITHM = "Ed25519"
SIGNING_CONTEXT = b"mep identity assertion v1\0"
PUBLIC_KEY_PREFIX = "ed25519:"
# Seconds a dispatched group may wait in the router before its endpoint sees it: long, since a task still
# queued there when it expires fails. A longer life only widens the window for replaying a group's own tasks
# into its own identity's endpoint; spawn requests can't be replayed (the spawner remembers nonces till expiry).
DEFAULT_LIFETIME = 24 * 3600.0
CLOCK_SKEW = 300.0  # seconds the service's clock may run ahead of the manager's
_CACHE_LIMIT = 10_000  # verified assertions remembered per verifier (by signature)

_RESEARCHER_MESSAGE = ("this endpoint could not verify the service's signed statement of who submitted these tasks "
                       "({why}); ask your admin")


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


_claims_encoder = msgspec.msgpack.Encoder()
_claims_decoder = msgspec.msgpack.Decoder(Claims)
_assertion_decoder = msgspec.msgpack.Decoder(SignedAssertion)


def config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a user endpoint config: equal configs, equal digests."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- keys ---------------------------------------------------------------------------


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes_raw()


def key_id_of(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def parse_public_key(text: str) -> tuple[str, Ed25519PublicKey]:
    """(key id, key) of a pinned ``ed25519:<base64>`` key; ConfigurationError names what is wrong."""
    if not text.startswith(PUBLIC_KEY_PREFIX):
        raise ConfigurationError(f"service signing key {text!r} does not start with {PUBLIC_KEY_PREFIX!r}; "
                                 "copy it from 'mep service signing-key show'")
    try:
        raw = base64.b64decode(text.removeprefix(PUBLIC_KEY_PREFIX), validate=True)
        return key_id_of(raw), Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"service signing key {text!r} is not a base64 Ed25519 public key "
                                 "of 32 bytes") from None


# --- the checking side (spawner and user endpoint) -------------------------------------------


def _refusal(cls: type[AssertionRefusedError], why: str, detail: str) -> AssertionRefusedError:
    error = cls(_RESEARCHER_MESSAGE.format(why=why))
    error.admin_detail = detail
    return error


class AssertionVerifier:
    """Checks assertions against the pinned keys; each distinct assertion's signature is checked once.

    Thread-safe: the spawner may check from several threads.
    """

    def __init__(self, public_keys: Iterable[str], endpoint_id: str) -> None:
        self.keys = dict(parse_public_key(text) for text in public_keys)
        self.endpoint_id = endpoint_id
        self._verified: dict[bytes, Verified] = {}  # by signature
        self._lock = threading.Lock()

    def verify(self, assertion: str) -> Verified:
        """A valid, unexpired assertion for this endpoint; raises an ``AssertionRefusedError``."""
        if not assertion:
            raise _refusal(AssertionMissingError, "they carry none",
                           "the request carries no identity assertion (was it signed by the service?)")
        envelope = self._decode(assertion)
        with self._lock:
            verified = self._verified.get(envelope.signature)
        if verified is None:
            claims = self._check_signature(envelope)
            verified = Verified(claims, frozenset(claims.task_ids))
            with self._lock:
                if len(self._verified) >= _CACHE_LIMIT:
                    self._forget_expired()
                self._verified[envelope.signature] = verified
        self._check_validity(verified.claims, envelope.key_id)
        return verified

    def _decode(self, assertion: str) -> SignedAssertion:
        try:
            envelope = _assertion_decoder.decode(base64.urlsafe_b64decode(assertion))
        except (binascii.Error, ValueError, msgspec.MsgspecError) as exc:
            raise _refusal(AssertionRefusedError, "it is malformed", f"undecodable identity assertion: {exc}") from None
        if envelope.v != FORMAT_VERSION or envelope.alg != ALGORITHM:
            raise _refusal(AssertionRefusedError, "its format is unknown here",
                           f"identity assertion version {envelope.v} ({envelope.alg}); this manager reads version "
                           f"{FORMAT_VERSION} ({ALGORITHM}): upgrade it")
        return envelope

    def _check_signature(self, envelope: SignedAssertion) -> Claims:
        key = self.keys.get(envelope.key_id)
        if key is None:
            raise _refusal(AssertionRefusedError, "it is signed by an unknown key",
                           f"identity assertion signed by key id {envelope.key_id}, which is not among the pinned "
                           f"service_signing_keys (ids {sorted(self.keys)}); if the service rotated its key, pin "
                           "the new one: mep manager pin-signing-key")
        try:
            key.verify(envelope.signature, SIGNING_CONTEXT + envelope.claims)
        except InvalidSignature:
            raise _refusal(AssertionRefusedError, "its signature is invalid",
                           f"identity assertion with a bad signature for key id {envelope.key_id}: forged or "
                           "altered after the service signed it") from None
        try:
            return _claims_decoder.decode(envelope.claims)
        except msgspec.MsgspecError as exc:
            raise _refusal(AssertionRefusedError, "it is malformed",
                           f"signed identity assertion claims undecodable: {exc}") from None

    def _check_validity(self, claims: Claims, key_id: str) -> None:
        now = time.time()
        if now > claims.expires_at:
            raise _refusal(AssertionExpiredError, "it has expired",
                           f"identity assertion of {claims.submitter_id} (nonce {claims.nonce}, key {key_id}) "
                           f"expired {now - claims.expires_at:.0f} s ago")
        if claims.issued_at > now + CLOCK_SKEW:
            raise _refusal(AssertionExpiredError, "it is dated in the future",
                           f"identity assertion issued {claims.issued_at - now:.0f} s in the future: check the "
                           "clocks of the service and this host")
        if claims.endpoint_id != self.endpoint_id:
            raise _refusal(AssertionMismatchError, "it was issued for another endpoint",
                           f"identity assertion for endpoint {claims.endpoint_id}, not this one "
                           f"({self.endpoint_id})")

    def _forget_expired(self) -> None:
        now = time.time()
        for signature in [s for s, v in self._verified.items() if v.claims.expires_at < now]:
            del self._verified[signature]
        if len(self._verified) >= _CACHE_LIMIT:
            self._verified.clear()  # all still valid: re-verifying later is only slower


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
                raise _refusal(AssertionReplayedError, "it was used before",
                               f"identity assertion of {claims.submitter_id} replayed (nonce {claims.nonce})")
            self._seen[claims.nonce] = claims.expires_at


def check_spawn_claims(claims: Claims, *, submitter_id: str, identities: list[IdentityResource],
                       config: dict[str, Any]) -> None:
    """A spawn request must name exactly the identities and config the service signed."""
    if claims.submitter_id != submitter_id or claims.identities != identities:
        raise _refusal(AssertionMismatchError, "it names another identity",
                       f"spawn request for submitter {submitter_id} with identities "
                       f"{[i.id for i in identities]}, but the service signed {claims.submitter_id} with "
                       f"{[i.id for i in claims.identities]}")
    if claims.config_digest != config_digest(config):
        raise _refusal(AssertionMismatchError, "it was signed for another configuration",
                       f"spawn request's user endpoint config digest {config_digest(config)} differs from the "
                       f"signed {claims.config_digest}")


def check_task_claims(verified: Verified, task_id: str, serves: str | None) -> None:
    """A task may run on an endpoint only under an assertion that covers it, for the identity it serves.

    ``serves`` is the identity id the endpoint was started for, or None when
    the admin lets identities share endpoints.
    """
    claims = verified.claims
    if task_id not in verified.task_ids:
        raise _refusal(AssertionMismatchError, "it does not cover this task",
                       f"task {task_id} is not among the tasks the assertion of {claims.submitter_id} covers")
    if serves is not None and claims.submitter_id != serves:
        raise _refusal(AssertionMismatchError, "this endpoint serves another identity",
                       f"task {task_id} of identity {claims.submitter_id} was routed to an endpoint that serves "
                       f"identity {serves}")

"""The service's state directory: its CURVE key pair and its database, created on first use.

Layout (directory 0700)::

    service.key        secret key, 0600
    service.key.pub    public key: pinned by managers and SDKs
    signing.key        Ed25519 key that signs identity assertions, 0600 (its public half: pinned by managers)
    signing.next.key   the next signing key, staged by 'mep service signing-key rotate' (0600)
    mep.db             SQLite (see store.py)
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from mep.errors import ConfigurationError
from mep.protocol.assertions import AssertionSigner, generate_signing_key, public_key_text
from mep.protocol.curve import generate_keypair, public_from_secret, read_private_text, read_secret_key, write_secret_key
from mep.service.store import Store

DATABASE_NAME = "mep.db"


@dataclass
class ServiceState:
    directory: Path
    secret_key: str
    public_key: str
    store: Store
    signer: AssertionSigner

    @staticmethod
    def signing_key_path(directory: Path) -> Path:
        return directory / "signing.key"

    @staticmethod
    def next_signing_key_path(directory: Path) -> Path:
        return directory / "signing.next.key"

    def pinnable_signing_keys(self) -> list[str]:
        """The public keys a manager should pin now: the signing key, and the next one once staged."""
        keys = [self.signer.public_key]
        staged = self.next_signing_key_path(self.directory)
        if staged.exists():
            keys.append(public_key_text(read_private_text(staged)))
        return keys

    @staticmethod
    def exists(directory: Path) -> bool:
        """Whether ``directory`` holds a service's state (its key pair): what admin commands need."""
        try:
            return (directory.expanduser() / "service.key").is_file()
        except PermissionError:
            raise ConfigurationError(f"cannot look into the state directory {directory}: permission denied; "
                                     "run this as the account that owns it") from None

    @classmethod
    def open(cls, directory: Path) -> ServiceState:
        """Open the state in ``directory``, creating it (and a new key pair) if there is none."""
        directory = directory.expanduser().absolute()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
        if info.st_uid != os.geteuid():
            raise ConfigurationError(f"state directory {directory} is owned by uid {info.st_uid}, not by you")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise ConfigurationError(
                f"state directory {directory} is mode {stat.S_IMODE(info.st_mode):04o}: chmod 700 {directory}"
            )
        secret_path = directory / "service.key"
        if not secret_path.exists():
            public, secret = generate_keypair()
            write_secret_key(secret_path, secret)
            (directory / "service.key.pub").write_text(public + "\n")
        secret = read_secret_key(secret_path)
        signing_path = cls.signing_key_path(directory)
        if not signing_path.exists():
            write_secret_key(signing_path, generate_signing_key())
        return cls(directory=directory, secret_key=secret, public_key=public_from_secret(secret),
                   store=Store(directory / DATABASE_NAME), signer=AssertionSigner(read_private_text(signing_path)))

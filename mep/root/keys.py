"""CURVE key files and keys: what the root process needs (the ZAP handler stays in ``mep.protocol.curve``)."""

import os
import stat
from pathlib import Path

import zmq
import zmq.utils.z85

from mep.root.errors import ConfigurationError

_Z85_CHARACTERS = frozenset(zmq.utils.z85.Z85CHARS.decode())


def generate_keypair() -> tuple[str, str]:
    """A new (public, secret) CURVE key pair as Z85 text."""
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


def public_from_secret(secret: str) -> str:
    return zmq.curve_public(secret.encode("ascii")).decode("ascii")


def write_secret_key(path: Path, secret: str) -> None:
    """Write a secret key 0600, refusing to follow or reuse an existing file."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "w") as handle:
        handle.write(secret + "\n")


def read_secret_key(path: Path) -> str:
    """Read a CURVE secret key file, refusing one that group or others can read or write."""
    key = read_private_text(path).strip()
    if len(key) != 40:
        raise ConfigurationError(f"{path} does not hold a Z85 CURVE key (expected 40 characters)")
    return key


def read_private_text(path: Path) -> str:
    """Read a secret file (any key format) that only its owner, this account, can read or write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ConfigurationError(f"secret key file {path} does not exist") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot open secret key file {path}: {exc.strerror}") from None
    with open(fd) as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigurationError(f"secret key file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigurationError(f"secret key file {path} is mode {stat.S_IMODE(info.st_mode):04o}; "
                                     f"it must not be readable by others: chmod 600 {path}")
        if info.st_uid != os.geteuid():
            raise ConfigurationError(f"secret key file {path} is owned by uid {info.st_uid}, not by the account "
                                     f"reading it (uid {os.geteuid()})")
        return handle.read()


def check_public_key(key: str, what: str) -> str:
    """Validate a Z85 public key given in a config or argument: 40 characters of the Z85 alphabet."""
    key = key.strip()
    if len(key) != 40 or not _Z85_CHARACTERS.issuperset(key):
        raise ConfigurationError(f"{what} is not a Z85 CURVE public key (40 characters)")
    return key

"""An account's shadow entry, as NSS gives it to root: expiry date and whether its password is locked.

Python's ``spwd`` module is gone from 3.13, so this binds glibc's
``getspnam``: the lookup goes through NSS (``shadow:`` in nsswitch.conf), as
``pam_unix`` and ``chage`` see it. ``getspnam`` answers in one static buffer,
so a lock keeps the spawner's workers from reading it at once. Only two facts
leave this module: the password hash is never copied into a Python object
(only its first byte is compared), and it is wiped from that buffer.

Where NSS has no shadow entry for an account (LDAP or SSSD accounts usually
have none) or the caller may not read it (not root), ``read_shadow`` returns
None and the decision is left to PAM account management.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass

# "!" is how passwd -l / usermod -L lock, and what useradd writes for "no password yet";
# "*" is the conventional "no password may ever match".
_LOCK_PREFIXES = (b"!", b"*")


class _Spwd(ctypes.Structure):
    """glibc's struct spwd, as far as sp_expire (only read, never allocated here)."""

    # sp_pwdp is not c_char_p: the hash must not become a Python string. Then sp_lstchg, sp_min, sp_max,
    # sp_warn, sp_inact, and sp_expire (-1 when the field is empty).
    _fields_ = [("sp_namp", ctypes.c_char_p), ("sp_pwdp", ctypes.c_void_p), ("sp_lstchg_etc", ctypes.c_long * 5),
                ("sp_expire", ctypes.c_long)]


_libc = ctypes.CDLL(None)
_libc.getspnam.argtypes = [ctypes.c_char_p]
_libc.getspnam.restype = ctypes.POINTER(_Spwd)
_lock = threading.Lock()


@dataclass(frozen=True)
class ShadowEntry:
    """What account policy needs from a shadow entry."""

    expire_day: int | None  # days since 1970-01-01 (UTC) from which the account is expired; None: never
    password_locked: bool  # the password field starts with "!" or "*"

    def expired(self, today: int | None = None) -> bool:
        """True from the expiry day on (``today``: days since 1970-01-01 UTC), as ``pam_unix`` and ``chage`` count."""
        today = int(time.time()) // 86400 if today is None else today
        return self.expire_day is not None and today >= self.expire_day


def read_shadow(name: str) -> ShadowEntry | None:
    """The shadow entry of ``name`` via NSS, or None when there is none or it can't be read (ENOENT, EACCES)."""
    with _lock:
        found = _libc.getspnam(name.encode())
        if not found:
            return None
        entry = found.contents
        locked = False
        if entry.sp_pwdp:  # only the hash's first byte is read, then the hash is wiped from that buffer
            locked = ctypes.string_at(entry.sp_pwdp, 1) in _LOCK_PREFIXES
            ctypes.memset(entry.sp_pwdp, 0, _libc.strlen(ctypes.c_void_p(entry.sp_pwdp)))
        return ShadowEntry(expire_day=None if entry.sp_expire == -1 else entry.sp_expire, password_locked=locked)

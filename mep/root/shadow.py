"""An account's shadow entry, as NSS gives it to root: expiry date and whether its password is locked.

Python's ``spwd`` module is gone from 3.13, so this binds glibc's
``getspnam_r``: the lookup goes through NSS (``shadow:`` in nsswitch.conf),
as ``pam_unix`` and ``chage`` see it. Only two facts leave this module; the
password hash itself is never copied into a Python object.

Where NSS has no shadow entry for an account (LDAP or SSSD accounts usually
have none) or the caller may not read it (not root), ``read_shadow`` returns
None and the decision is left to PAM account management.
"""

from __future__ import annotations

import ctypes
import errno
import time
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_NO_VALUE = -1  # shadow fields left empty read as -1
_MAX_BUFFER = 1 << 20
# "!" is how passwd -l / usermod -L lock, and what useradd writes for "no password yet";
# "*" is the conventional "no password may ever match".
_LOCK_PREFIXES = (b"!", b"*")


class _Spwd(ctypes.Structure):
    _fields_ = [
        ("sp_namp", ctypes.c_char_p),
        ("sp_pwdp", ctypes.c_void_p),  # not c_char_p: the hash must not become a Python string
        ("sp_lstchg", ctypes.c_long),
        ("sp_min", ctypes.c_long),
        ("sp_max", ctypes.c_long),
        ("sp_warn", ctypes.c_long),
        ("sp_inact", ctypes.c_long),
        ("sp_expire", ctypes.c_long),
        ("sp_flag", ctypes.c_ulong),
    ]


_getspnam_r = _libc.getspnam_r
# getspnam_r(name, result buffer, string buffer, its size, where the result pointer goes)
_getspnam_r.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Spwd), ctypes.c_char_p, ctypes.c_size_t,
                        ctypes.POINTER(ctypes.POINTER(_Spwd))]
_getspnam_r.restype = ctypes.c_int


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
    """The shadow entry of ``name`` via NSS, or None when there is none or it can't be read."""
    size = 4096
    while size <= _MAX_BUFFER:
        entry = _Spwd()
        result = ctypes.POINTER(_Spwd)()
        buffer = ctypes.create_string_buffer(size)
        code = _getspnam_r(name.encode(), ctypes.byref(entry), buffer, size, ctypes.byref(result))
        if code == errno.ERANGE:
            size *= 2
            continue
        if code != 0 or not result:
            return None  # ENOENT, EACCES (not root), or no entry: leave it to PAM
        try:  # only the hash's first byte is read, and the buffer that held it is wiped
            locked = bool(entry.sp_pwdp) and ctypes.string_at(entry.sp_pwdp, 1) in _LOCK_PREFIXES
        finally:
            ctypes.memset(buffer, 0, size)
        return ShadowEntry(expire_day=None if entry.sp_expire == _NO_VALUE else entry.sp_expire, password_locked=locked)
    return None

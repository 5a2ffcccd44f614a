"""A small ctypes binding of Linux-PAM for account management and sessions, without authentication.

python-pam only covers ``pam_authenticate`` with a password, and its session
support crashes the interpreter when a session module converses (its
conversation callback is freed while PAM still holds it). ``PamHandle`` keeps
one handle *and* its conversation callback alive from ``pam_start`` to
``pam_end``, so modules may talk at any step.

There is nobody to answer prompts: the identity comes from the mapping, never
from a password. The conversation records informational and error messages
(for the admin's log; calls are not made ``PAM_SILENT``, so modules say why
they refuse) and fails any prompt, so a stack that wants a password in the
account or session phase fails instead of hanging.

The library name is configurable (``pam.library``), so tests can point it at
``libpam_wrapper.so``.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field
from functools import cache

from mep.root.errors import ConfigurationError
from mep.root.accounts import AccountRefused

log = logging.getLogger("mep.spawner.pam")

DEFAULT_LIBRARY = "libpam.so.0"

PAM_SUCCESS = 0
PAM_NEW_AUTHTOK_REQD = 12
PAM_CONV_ERR = 19
PAM_ESTABLISH_CRED = 0x0002
PAM_DELETE_CRED = 0x0004
PAM_TTY = 3
PAM_RUSER = 8
_PROMPT_ECHO_OFF, _PROMPT_ECHO_ON, _ERROR_MSG, _TEXT_INFO = 1, 2, 3, 4
_MAX_KEPT_MESSAGES = 20
_MAX_MESSAGE_CHARS = 500


class PamError(Exception):
    """A PAM step failed: ``step`` is the PAM function, ``code`` its return value; ``detail`` adds what modules said."""

    def __init__(self, step: str, code: int, text: str, messages: list[str]) -> None:
        said = "; the modules said: " + " | ".join(messages) if messages else ""
        self.step, self.code, self.detail = step, code, f"{step} failed: {text} (PAM code {code}){said}"
        super().__init__(self.detail)


class _Message(ctypes.Structure):
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]


class _Response(ctypes.Structure):
    _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]


_CONVERSATION = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(ctypes.POINTER(_Message)),
    ctypes.POINTER(ctypes.POINTER(_Response)),
    ctypes.c_void_p,
)


class _Conv(ctypes.Structure):
    _fields_ = [("conv", _CONVERSATION), ("appdata_ptr", ctypes.c_void_p)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
_libc.calloc.restype = ctypes.c_void_p
_libc.free.argtypes = [ctypes.c_void_p]
_libc.free.restype = None


@cache
def _load(library: str) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(library, use_errno=True)
    except OSError as error:
        raise ConfigurationError(f"cannot load the PAM library {library!r} (pam.library): {error}") from None
    handle, flags = ctypes.c_void_p, ctypes.c_int
    signatures = {  # name: (argument types, return type)
        "pam_start": ([ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_Conv), ctypes.POINTER(handle)], ctypes.c_int),
        "pam_set_item": ([handle, ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
        "pam_strerror": ([handle, ctypes.c_int], ctypes.c_char_p),
        "pam_getenvlist": ([handle], ctypes.POINTER(ctypes.c_void_p)),
        **{name: ([handle, flags], ctypes.c_int)
           for name in ("pam_end", "pam_acct_mgmt", "pam_setcred", "pam_open_session", "pam_close_session")},
    }
    for name, (argtypes, restype) in signatures.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype
    return lib


@dataclass
class _Conversation:
    """The callback PAM calls; records what modules say and refuses every prompt."""

    messages: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Kept as an attribute: the C thunk lives exactly as long as this object.
        self.callback = _CONVERSATION(self._converse)

    def _converse(self, count: int, messages, responses, _appdata) -> int:  # noqa: ANN001 - ctypes pointers
        try:
            styles = [(messages[i].contents.msg_style, messages[i].contents.msg or b"") for i in range(count)]
            for style, text in styles:
                self._record(style, text.decode("utf-8", "replace"))
            if any(style in (_PROMPT_ECHO_OFF, _PROMPT_ECHO_ON) for style, _ in styles):
                return PAM_CONV_ERR  # nobody can answer: mep never asks for a password
            array = _libc.calloc(max(count, 1), ctypes.sizeof(_Response))
            if not array:
                return PAM_CONV_ERR
            responses[0] = ctypes.cast(array, ctypes.POINTER(_Response))  # PAM frees it
            return PAM_SUCCESS
        except Exception:  # noqa: BLE001 - an exception must never unwind into C
            log.exception("the PAM conversation failed")
            return PAM_CONV_ERR

    def _record(self, style: int, text: str) -> None:
        kind = {_ERROR_MSG: "error", _TEXT_INFO: "info"}.get(style, "prompt")
        if len(self.messages) < _MAX_KEPT_MESSAGES:
            self.messages.append(f"{kind}: {text[:_MAX_MESSAGE_CHARS]}")


class PamHandle:
    """One PAM transaction for ``user`` under ``service``, from ``pam_start`` to ``pam_end``."""

    def __init__(self, service: str, user: str, *, library: str = DEFAULT_LIBRARY) -> None:
        self._lib = _load(library)
        self._conversation = _Conversation()
        self._conv = _Conv(self._conversation.callback, None)
        self._handle = ctypes.c_void_p()
        self._last_status = PAM_SUCCESS
        code = self._lib.pam_start(service.encode(), user.encode(), ctypes.byref(self._conv),
                                   ctypes.byref(self._handle))
        if code != PAM_SUCCESS:
            raise PamError("pam_start", code, f"could not start PAM for service {service!r}", [])

    @property
    def messages(self) -> list[str]:
        return list(self._conversation.messages)

    def set_item(self, item: int, value: str) -> None:
        self._check("pam_set_item", self._lib.pam_set_item(self._handle, item, value.encode()))

    def account_management(self) -> int:
        """``pam_acct_mgmt``; returns ``PAM_NEW_AUTHTOK_REQD`` when only the password has aged (not used here)."""
        code = self._lib.pam_acct_mgmt(self._handle, 0)
        if code == PAM_NEW_AUTHTOK_REQD:
            return code
        self._check("pam_acct_mgmt", code)
        return code

    def establish_credentials(self) -> None:
        self._check("pam_setcred", self._lib.pam_setcred(self._handle, PAM_ESTABLISH_CRED))

    def delete_credentials(self) -> None:
        self._check("pam_setcred", self._lib.pam_setcred(self._handle, PAM_DELETE_CRED))

    def open_session(self) -> None:
        self._check("pam_open_session", self._lib.pam_open_session(self._handle, 0))

    def close_session(self) -> None:
        self._check("pam_close_session", self._lib.pam_close_session(self._handle, 0))

    def environment(self) -> dict[str, str]:
        """The variables the modules exported (``pam_getenvlist``)."""
        array = self._lib.pam_getenvlist(self._handle)
        if not array:
            return {}
        found: dict[str, str] = {}
        index = 0
        try:
            while array[index]:  # NULL-terminated; PAM leaves each string and the array for us to free
                name, separator, value = ctypes.string_at(array[index]).decode("utf-8", "replace").partition("=")
                _libc.free(array[index])
                if separator:
                    found[name] = value
                index += 1
        finally:
            _libc.free(array)
        return found

    def __enter__(self) -> PamHandle:
        return self

    def __exit__(self, *_exception: object) -> None:
        self.end()

    def end(self) -> None:
        if self._handle:
            self._lib.pam_end(self._handle, self._last_status)
            self._handle = ctypes.c_void_p()

    def _check(self, step: str, code: int) -> None:
        self._last_status = code
        if code != PAM_SUCCESS:
            text = (self._lib.pam_strerror(self._handle, code) or b"unknown error").decode("utf-8", "replace")
            raise PamError(step, code, text, self._conversation.messages)


def check_account(service: str, user: str, *, library: str = DEFAULT_LIBRARY) -> list[str]:
    """Run PAM account management for ``user`` (no session); returns what the modules said, or raises ``PamError``."""
    with PamHandle(service, user, library=library) as pam:
        pam.account_management()
        return pam.messages


def require_account(service: str, user: str, *, library: str = DEFAULT_LIBRARY) -> list[str]:
    """``check_account``, refusing with the ``AccountRefused`` a submitter and the admin can act on."""
    try:
        return check_account(service, user, library=library)
    except PamError as error:
        raise AccountRefused(user, "is refused by this system's account checks (PAM)",
                             f"service {service}: {error.detail}") from None

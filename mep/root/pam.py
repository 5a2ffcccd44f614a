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

``PamHandle.call`` calls a PAM function by its C name with the handle first
(``pam.call("pam_setcred", PAM_ESTABLISH_CRED)``), so the steps read as in
Linux-PAM's documentation; any result but ``PAM_SUCCESS`` is a ``PamError``.

The library name is configurable (``pam.library``), so tests can point it at
``libpam_wrapper.so``.
"""

from __future__ import annotations

import ctypes
from contextlib import AbstractContextManager

from mep.root.errors import ConfigurationError
from mep.root.accounts import AccountRefused

DEFAULT_LIBRARY = "libpam.so.0"
#: The reason an ``AccountRefused`` gives when ``pam_acct_mgmt`` says no (the spawner's check and the holder's).
REFUSED_BY_PAM = "is refused by this system's account checks (PAM)"

PAM_SUCCESS = 0
PAM_NEW_AUTHTOK_REQD = 12
PAM_CONV_ERR = 19
PAM_ESTABLISH_CRED = 0x0002
PAM_DELETE_CRED = 0x0004
PAM_RUSER = 8
_MESSAGE_KINDS = {3: "error", 4: "info"}  # PAM_ERROR_MSG, PAM_TEXT_INFO; every other style asks for an answer
_MAX_KEPT_MESSAGES = 20
_MAX_MESSAGE_CHARS = 500


class PamError(Exception):
    """A PAM step failed: ``step`` is the PAM function, ``code`` its return value; ``detail`` adds what modules said."""

    def __init__(self, step: str, code: int, text: str, messages: list[str]) -> None:
        # At most _MAX_KEPT_MESSAGES from the modules, then the first failure of the conversation itself, if any.
        said = "; the modules said: " + " | ".join(messages[:_MAX_KEPT_MESSAGES + 1]) if messages else ""
        self.step, self.code, self.detail = step, code, f"{step} failed: {text} (PAM code {code}){said}"
        super().__init__(self.detail)


class _Message(ctypes.Structure):  # struct pam_message
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]


class _Response(ctypes.Structure):  # struct pam_response
    _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]


# int (*conv)(int num_msg, const struct pam_message **msg, struct pam_response **resp, void *appdata_ptr)
_CONVERSATION = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.POINTER(_Message)),
                                 ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)


class _Conv(ctypes.Structure):  # struct pam_conv
    _fields_ = [("conv", _CONVERSATION), ("appdata_ptr", ctypes.c_void_p)]


_calloc = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t)(("calloc", ctypes.CDLL(None)))


class PamHandle(AbstractContextManager):
    """One PAM transaction for ``user`` under ``service``, from ``pam_start`` to ``pam_end`` (use it in ``with``).

    ``messages`` holds what the modules said, as "info: ..." / "error: ..." (and "prompt: ..." for a refused prompt).
    """

    def __init__(self, service: str, user: str, *, library: str = DEFAULT_LIBRARY) -> None:
        try:  # loaded once per process by the dynamic linker; this is a handle on it
            self._lib = ctypes.CDLL(library)
        except OSError as error:
            raise ConfigurationError(f"cannot load the PAM library {library!r} (pam.library): {error}") from None
        # Every other function used takes the handle (a c_void_p), ints and bytes, and returns an int: ctypes' defaults.
        self._lib.pam_strerror.restype = ctypes.c_char_p
        self._lib.pam_getenvlist.restype = ctypes.POINTER(ctypes.c_char_p)
        self.messages: list[str] = []
        # The struct keeps the C thunk (in its _objects) as long as the handle lives: PAM may call it at any step.
        self._conv = _Conv(_CONVERSATION(self._converse), None)
        self._handle = ctypes.c_void_p()
        self._last_status = PAM_SUCCESS
        code = self._lib.pam_start(service.encode(), user.encode(), ctypes.byref(self._conv),
                                   ctypes.byref(self._handle))
        if code != PAM_SUCCESS:
            raise PamError("pam_start", code, f"could not start PAM for service {service!r}", [])

    def call(self, function: str, *arguments: int | bytes, accept: int = PAM_SUCCESS) -> int:
        """``function(handle, *arguments)``; returns its code, ``PamError`` unless it is PAM_SUCCESS or ``accept``."""
        code = self._last_status = getattr(self._lib, function)(self._handle, *arguments)
        if code not in (PAM_SUCCESS, accept):
            text = (self._lib.pam_strerror(self._handle, code) or b"unknown error").decode("utf-8", "replace")
            raise PamError(function, code, text, self.messages)
        return code

    def environment(self) -> dict[str, str]:
        """The variables the modules exported (``pam_getenvlist``, a NULL-terminated array of "NAME=value").

        The array is not freed: a session holder asks once, for a few hundred bytes.
        """
        array = self._lib.pam_getenvlist(self._handle)
        count = 0
        while array and array[count]:
            count += 1
        return dict(array[index].decode("utf-8", "replace").split("=", 1) for index in range(count))

    def __exit__(self, *_exception: object) -> None:  # AbstractContextManager's __enter__ returns the handle
        self._lib.pam_end(self._handle, self._last_status)

    def _converse(self, count: int, messages, responses, _appdata) -> int:  # noqa: ANN001 - ctypes pointers
        """The callback PAM calls: records what modules say and refuses every prompt."""
        try:
            said = [messages[index].contents for index in range(count)]
            for message in said[:_MAX_KEPT_MESSAGES - len(self.messages)]:
                text = (message.msg or b"").decode("utf-8", "replace")[:_MAX_MESSAGE_CHARS]
                self.messages.append(f"{_MESSAGE_KINDS.get(message.msg_style, 'prompt')}: {text}")
            if any(message.msg_style not in _MESSAGE_KINDS for message in said):
                return PAM_CONV_ERR  # nobody can answer: mep never asks for a password
            responses[0] = _calloc(max(count, 1), ctypes.sizeof(_Response))  # empty answers; PAM frees them
            return PAM_SUCCESS if responses[0] else PAM_CONV_ERR
        except Exception as error:  # noqa: BLE001 - an exception must never unwind into C
            # A bug: it reaches the admin with the step's PamError, as something a module said.
            self.messages.append(f"error: mep's PAM conversation function failed: {error!r}")
            return PAM_CONV_ERR


def check_account(service: str, user: str, *, library: str = DEFAULT_LIBRARY) -> list[str]:
    """Run PAM account management for ``user`` (no session); returns what the modules said, or raises ``PamError``.

    A password that has only aged (``PAM_NEW_AUTHTOK_REQD``) passes: mep uses no password.
    """
    with PamHandle(service, user, library=library) as pam:
        pam.call("pam_acct_mgmt", 0, accept=PAM_NEW_AUTHTOK_REQD)
        return pam.messages


def require_account(service: str, user: str, *, library: str = DEFAULT_LIBRARY) -> list[str]:
    """``check_account``, refusing with the ``AccountRefused`` a submitter and the admin can act on."""
    try:
        return check_account(service, user, library=library)
    except PamError as error:
        raise AccountRefused(user, REFUSED_BY_PAM, f"service {service}: {error.detail}") from None

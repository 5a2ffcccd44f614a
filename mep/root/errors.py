"""The errors the root half raises, and their wire codes.

They live here so that the root process imports no mep module outside this
package; ``mep.errors`` re-exports the classes, so there is one hierarchy for
all of mep (a researcher can ``except mep.MappingError`` whichever process
raised it), and holds every process's codes.
"""

from enum import StrEnum


class ErrorCode(StrEnum):
    """The wire codes of the failures the root half reports: a subset of ``mep.errors.ErrorCode``, same values.

    Only these can leave the root process; the codes of every other mep
    process are in ``mep.errors.ErrorCode``, which compares and hashes equal
    (both are ``str``), so a root code can be looked up or matched there.
    """

    BAD_REQUEST = "bad_request"
    UNMAPPED = "unmapped"
    MAPPING_ERROR = "mapping_error"
    ACCOUNT_REFUSED = "account_refused"
    SPAWN_FAILED = "spawn_failed"
    QUOTA_EXCEEDED = "quota_exceeded"
    # The service's signed identity assertion failed a check where the tasks were to run (docs/identity.md).
    ASSERTION_MISSING = "assertion_missing"
    ASSERTION_INVALID = "assertion_invalid"
    ASSERTION_EXPIRED = "assertion_expired"
    ASSERTION_REPLAYED = "assertion_replayed"
    ASSERTION_MISMATCH = "assertion_mismatch"
    INTERNAL = "internal"


class MepError(Exception):
    """Base of every error mep raises on purpose; ``str()`` is the actionable message."""

    code: str = ErrorCode.INTERNAL  # a value of this ErrorCode, or of mep.errors.ErrorCode outside root
    admin_detail: str = ""  # what only the admin's log may see (which rule, which step, which errno)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigurationError(MepError):
    """A configuration file, key file or directory an admin owns is unusable."""

    code = ErrorCode.BAD_REQUEST


class ProtocolError(MepError):
    """A message did not follow ``docs/protocol.md`` (bad framing, version, or fields)."""

    code = ErrorCode.BAD_REQUEST


class TaskRefusedError(MepError):
    """The endpoint refused to run the task; subclasses say why (and set the code: this one's is ``internal``)."""


class UnmappedIdentityError(TaskRefusedError):
    """No identity-mapping rule maps the submitter to a local account."""

    code = ErrorCode.UNMAPPED


class MappingError(TaskRefusedError):
    """The identity-mapping configuration failed while mapping the submitter (fails closed)."""

    code = ErrorCode.MAPPING_ERROR


class AccountRefusedError(TaskRefusedError):
    """The mapped account exists in the mapping but policy forbids running as it."""

    code = ErrorCode.ACCOUNT_REFUSED


class SpawnError(TaskRefusedError):
    """Starting the user endpoint failed (names the failed step)."""

    code = ErrorCode.SPAWN_FAILED


class AssertionRefusedError(TaskRefusedError):
    """The service's signed statement of who submitted the tasks failed a check; ``code`` says which one.

    ``assertion_missing`` (none carried), ``assertion_invalid`` (malformed,
    unknown key, bad signature), ``assertion_expired`` (or dated in the
    future), ``assertion_replayed`` (its nonce was used), ``assertion_mismatch``
    (another identity, endpoint, config or task than the service signed).
    """

    code = ErrorCode.ASSERTION_INVALID

    def __init__(self, message: str, code: str = ErrorCode.ASSERTION_INVALID, admin_detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.admin_detail = admin_detail


class QuotaExceededError(TaskRefusedError):
    """A limit the admin set was reached (queued tasks or stored results of an identity, endpoints of an
    account); the message names the limit and what to do."""

    code = ErrorCode.QUOTA_EXCEEDED

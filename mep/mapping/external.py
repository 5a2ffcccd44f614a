"""Running an admin's external identity-mapping program (``external_identity_mapping#1.0.0``).

The program's protocol is the one Globus Connect Server and Globus Compute
use (``globus_identity_mapping.mappers.external_program``): the identities go
to its stdin as ``identity_mapping_input#1.0.0``, the caller appends
``-c <connector id> -s <endpoint id>`` to its command line, plus ``-a`` when
it hands over a whole identity set, and the program answers on stdout with
``identity_mapping_output#1.0.0``. Exit status non-zero is an error, empty
output means "no mapping".

This module owns running it the way a root process must run admin code:

* argv exec, never a shell; the program (and every absolute-path argument
  naming a regular file, such as a script or its data) must pass the same
  ownership checks as the mapping file, checked again before every run;
* the program is opened, the descriptor checked, and the descriptor executed
  (``/proc/self/fd/N``), so a symlink swapped between the check and the exec
  changes nothing; file arguments are passed as the resolved paths that were
  checked (in directories only root can write);
* it runs as the mapping helper does (``mep.mapping``): as an unprivileged
  account (``identity_mapping_user``, like sshd's
  ``AuthorizedKeysCommandUser``) with no supplementary groups, so a program
  that is fooled by its input can't act as root;
* an empty environment but ``PATH`` and ``LANG``, ``/`` as working
  directory, umask 077, a new session, no inherited descriptors;
* a deadline (5 s by default, as the reference), after which the program's
  whole process group is killed, and a bound on what it may print;
* its stderr goes to the admin's log; its output is validated strictly: a
  result id that is not one of the input ids is a lie, not a mapping.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mep.root.errors import ConfigurationError
from mep.root.policy_files import check_policy_file, open_policy_file

log = logging.getLogger("mep.mapping.external")

#: Globus's connector id for POSIX storage; Globus Compute's endpoint manager passes it as ``-c``.
POSIX_CONNECTOR_ID = "145812c8-decc-41f1-83cf-bb2a85a2a70b"
INPUT_DATA_TYPE = "identity_mapping_input#1.0.0"
OUTPUT_DATA_TYPE = "identity_mapping_output#1.0.0"
DEFAULT_TIMEOUT_SECONDS = 5.0
MAX_OUTPUT_BYTES = 256 * 1024
MAX_LOGGED_STDERR_BYTES = 8 * 1024
PROGRAM_ENVIRONMENT = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
_OUTPUT_KEYS = frozenset({"DATA_TYPE", "result"})
_RESULT_KEYS = frozenset({"id", "output"})
_READ_CHUNK = 65536


class ProgramFailed(Exception):
    """The program could not give a trustworthy answer; ``reason`` says why (for the admin)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ProgramResult:
    """One line of the program's answer: this input identity maps to this account."""

    identity_id: str
    account: str


@dataclass(frozen=True)
class ExternalProgram:
    """An admin's mapping program and what mep appends to its command line."""

    command: tuple[str, ...]
    endpoint_id: str
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    trusted_owner_uids: frozenset[int] = frozenset({0})
    connector_id: str = POSIX_CONNECTOR_ID

    @classmethod
    def from_command(cls, command: object, *, endpoint_id: str, timeout: float = DEFAULT_TIMEOUT_SECONDS,
                     trusted_owner_uids: frozenset[int] = frozenset({0})) -> ExternalProgram:
        """Validate a document's ``command`` (the reference also accepts numbers as arguments); ``ValueError``."""
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(arg, str | int | float) and not isinstance(arg, bool) for arg in command)
        ):
            raise ValueError("'command' must be a non-empty list of strings (the program and its arguments)")
        argv = tuple(str(arg) for arg in command)
        if not os.path.isabs(argv[0]):
            raise ValueError(f"the program {argv[0]!r} must be an absolute path (no PATH search)")
        if any("\0" in arg for arg in argv):
            raise ValueError("an argument of 'command' contains a NUL byte")
        return cls(command=argv, endpoint_id=endpoint_id, timeout=timeout, trusted_owner_uids=trusted_owner_uids)

    @property
    def label(self) -> str:
        return f"program {self.command[0]}"

    def check_files(self) -> None:
        """The program and every regular file its arguments name must be root's (``ConfigurationError``)."""
        os.close(self._open_program())
        self._checked_arguments()

    def _open_program(self) -> int:
        """A descriptor of the program, checked as opened: what is executed is what was checked."""
        program = Path(os.path.realpath(self.command[0]))
        fd = open_policy_file(program, trusted_owner_uids=self.trusted_owner_uids)
        if not os.fstat(fd).st_mode & 0o111:
            os.close(fd)
            raise ConfigurationError(f"the identity-mapping program {program} is not executable")
        return fd

    def _checked_arguments(self) -> list[str]:
        """The arguments, each one that names a regular file checked and replaced by the resolved path checked."""
        arguments = []
        for argument in self.command[1:]:
            if os.path.isabs(argument) and os.path.isfile(argument):
                resolved = os.path.realpath(argument)  # its directories are root's: nobody else can swap it
                check_policy_file(Path(resolved), trusted_owner_uids=self.trusted_owner_uids)
                argument = resolved
            arguments.append(argument)
        return arguments

    def argv(self, *, whole_set: bool, arguments: Sequence[str] | None = None) -> list[str]:
        arguments = self.command[1:] if arguments is None else arguments
        return [self.command[0], *arguments, "-c", self.connector_id, "-s", self.endpoint_id,
                *(["-a"] if whole_set else [])]

    def run(self, identities: Sequence[Mapping[str, object]], *, whole_set: bool) -> list[ProgramResult]:
        """The program's answer for these identities, in its order; raises ``ProgramFailed``."""
        try:
            program_fd = self._open_program()
        except ConfigurationError as error:
            raise ProgramFailed(str(error)) from None
        try:
            try:
                argv = self.argv(whole_set=whole_set, arguments=self._checked_arguments())
            except ConfigurationError as error:
                raise ProgramFailed(str(error)) from None
            document = {"DATA_TYPE": INPUT_DATA_TYPE, "identities": [dict(identity) for identity in identities]}
            stdout, stderr, status = _run_bounded(argv, json.dumps(document).encode(), self.timeout,
                                                  program_fd=program_fd)
        finally:
            os.close(program_fd)
        if stderr:
            level = logging.INFO if status == 0 else logging.WARNING
            log.log(level, "%s wrote to stderr: %s", argv[0], _printable(stderr))
        if status != 0:
            how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
            raise ProgramFailed(f"{argv[0]} {how}" + (f": {_printable(stderr)}" if stderr else ""))
        input_ids = [str(identity["id"]) for identity in identities]
        return parse_output(stdout, input_ids, argv[0])


def parse_output(stdout: bytes, input_ids: Sequence[str], program: str) -> list[ProgramResult]:
    """Check the program's stdout against the protocol; empty output (not even a newline) is "no mapping"."""
    if not stdout:
        return []
    try:
        output = json.loads(stdout)
    except (UnicodeDecodeError, ValueError) as error:
        raise ProgramFailed(f"{program} printed something that is not JSON ({error}): {_printable(stdout)}") from None
    if not isinstance(output, dict) or not isinstance(output.get("result"), list):
        raise ProgramFailed(f"{program} printed JSON without a 'result' list: {_printable(stdout)}")
    unknown = sorted(set(output) - _OUTPUT_KEYS)
    if unknown:
        raise ProgramFailed(f"{program} printed unknown keys {unknown}; allowed: {sorted(_OUTPUT_KEYS)}")
    if output.get("DATA_TYPE", OUTPUT_DATA_TYPE) != OUTPUT_DATA_TYPE:
        raise ProgramFailed(f"{program} printed DATA_TYPE {output['DATA_TYPE']!r}, expected {OUTPUT_DATA_TYPE!r}")
    by_normal_id = {_normal_id(identity_id): identity_id for identity_id in input_ids}
    results = []
    for item in output["result"]:
        if (
            not isinstance(item, dict)
            or set(item) != _RESULT_KEYS
            or not isinstance(item["id"], str)
            or not isinstance(item["output"], str)
        ):
            raise ProgramFailed(f"{program}: each result must be {{\"id\": string, \"output\": string}}, got {item!r}")
        identity_id = by_normal_id.get(_normal_id(item["id"]))
        if identity_id is None:
            raise ProgramFailed(
                f"{program} answered for identity {item['id']!r}, which it was not asked about"
                f" (asked about {list(input_ids)}); its answer is not trusted"
            )
        if not item["output"]:
            continue  # an empty account name is no mapping for this identity, never an account named ""
        results.append(ProgramResult(identity_id=identity_id, account=item["output"]))
    return results


def _normal_id(identity_id: str) -> str:
    """Identity ids are UUIDs: compare them as the reference does (case and braces don't matter)."""
    try:
        return str(uuid.UUID(identity_id))
    except ValueError:
        return identity_id


def _run_bounded(argv: list[str], stdin: bytes, timeout: float, *, program_fd: int) -> tuple[bytes, bytes, int]:
    """(stdout, start of stderr, exit code; negative for a signal), or ``ProgramFailed``.

    ``program_fd`` is executed (``argv[0]`` is only its name).
    """
    try:
        process = subprocess.Popen(
            argv, executable=f"/proc/self/fd/{program_fd}", pass_fds=(program_fd,),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=PROGRAM_ENVIRONMENT, cwd="/", close_fds=True, start_new_session=True, umask=0o077,
        )
    except OSError as error:
        raise ProgramFailed(f"cannot run {argv[0]}: {error.strerror}") from None
    deadline = time.monotonic() + timeout
    pidfd = -1
    try:
        pidfd = os.pidfd_open(process.pid)
        stdout, stderr = _exchange(process, stdin, deadline, argv[0], timeout)
        if not _wait_readable(pidfd, max(0.0, deadline - time.monotonic())):
            raise ProgramFailed(f"{argv[0]} closed its output but did not exit within {timeout:g} s")
        # Exited but not reaped: its pid, and so its process group id, can't be reused yet.
        _kill_group(process.pid)
        return stdout, stderr, process.wait()
    finally:
        # Timed out or printed too much: it and whatever it started in its session die.
        if process.returncode is None:
            _kill_group(process.pid)
            process.wait()
        if pidfd != -1:
            os.close(pidfd)
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def _exchange(process: subprocess.Popen, stdin: bytes, deadline: float, program: str,
              timeout: float) -> tuple[bytes, bytes]:
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    stdout, stderr = bytearray(), bytearray()
    pending = memoryview(stdin)
    with selectors.DefaultSelector() as selector:
        os.set_blocking(process.stdin.fileno(), False)
        selector.register(process.stdin, selectors.EVENT_WRITE)
        selector.register(process.stdout, selectors.EVENT_READ)
        selector.register(process.stderr, selectors.EVENT_READ)
        while len(selector.get_map()) > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProgramFailed(f"{program} did not answer within {timeout:g} s")
            for key, _ in selector.select(remaining):
                if key.fileobj is process.stdin:
                    try:
                        pending = pending[os.write(key.fd, pending[:_READ_CHUNK]):]
                    except BrokenPipeError:
                        pending = pending[:0]  # it stopped reading; its exit status tells the rest
                    if not pending:
                        selector.unregister(process.stdin)
                        process.stdin.close()
                    continue
                chunk = os.read(key.fd, _READ_CHUNK)
                if not chunk:
                    selector.unregister(key.fileobj)
                elif key.fileobj is process.stdout:
                    stdout += chunk
                    if len(stdout) > MAX_OUTPUT_BYTES:
                        raise ProgramFailed(f"{program} printed more than {MAX_OUTPUT_BYTES} bytes")
                elif len(stderr) < MAX_LOGGED_STDERR_BYTES:
                    stderr += chunk[: MAX_LOGGED_STDERR_BYTES - len(stderr)]
    return bytes(stdout), bytes(stderr)


def _wait_readable(fd: int, timeout: float) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        return bool(selector.select(timeout))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _printable(data: bytes, limit: int = 2000) -> str:
    """Program output for one log line: decoded, control characters escaped, shortened."""
    text = data.decode("utf-8", "replace")
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."

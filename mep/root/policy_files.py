"""Reading admin policy files (identity maps, templates, schemas) only when nobody else could have written them.

Like sshd's ``StrictModes``: a root process must not take policy from a file
that another account could have edited, or swapped through a directory it can
write. ``read_policy_file`` is the only way the spawner reads such a file.

The rules, checked on the file as opened (no time-of-check/time-of-use gap):

* the last path component must not be a symlink (opened with ``O_NOFOLLOW``);
* the file must be a regular file owned by a trusted uid and not writable by
  group or others;
* symlinks in the *directories* are followed, as sshd does, but every
  directory of the resolved path, from ``/`` down, must be owned by root or a
  trusted uid and must not be writable by group or others, unless it is
  sticky (``/tmp``, ``/var/tmp``): in a sticky directory others can add
  entries but can't rename or replace ours, and the next component's owner is
  checked anyway. The walk opens each directory with ``O_NOFOLLOW`` relative to
  the previous one, so a directory swapped for a symlink after resolution is
  refused rather than followed.

A root manager trusts only uid 0; a single-user manager trusts 0 and its own uid.
"""

import errno
import os
import pwd
import stat
from pathlib import Path

from mep.root.errors import ConfigurationError

_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
_OPEN_DIRECTORY = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK so a FIFO planted under the name can't hang the open; it is
# refused as "not a regular file" right after.
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def read_policy_file(path: Path, *, trusted_owner_uids: frozenset[int]) -> bytes:
    """Return the contents of ``path`` after proving only trusted accounts could have written it.

    Raises ``ConfigurationError`` naming the path, what is wrong and the command that fixes it.
    """
    with open(open_policy_file(path, trusted_owner_uids=trusted_owner_uids), "rb") as policy_file:
        return policy_file.read()


def check_policy_file(path: Path, *, trusted_owner_uids: frozenset[int]) -> os.stat_result:
    """Prove ``path`` passes the same checks as ``read_policy_file`` without reading it (a program to run).

    Returns its status as checked; raises ``ConfigurationError`` like ``read_policy_file``.
    """
    with open(open_policy_file(path, trusted_owner_uids=trusted_owner_uids), "rb") as policy_file:
        return os.fstat(policy_file.fileno())


def open_checked_directory(directory: Path, *, trusted_owner_uids: frozenset[int]) -> int:
    """An ``O_PATH`` descriptor of ``directory`` after checking every directory from ``/`` down.

    For files the root process writes (the audit log): the caller opens the
    file relative to the descriptor with ``O_NOFOLLOW``, so no other account
    can have swapped anything on the way. Raises ``ConfigurationError``.
    """
    resolved = Path(os.path.realpath(directory))
    return _open_checked_directory(resolved, resolved, trusted_owner_uids | {0})


def open_policy_file(path: Path, *, trusted_owner_uids: frozenset[int]) -> int:
    """A descriptor (close-on-exec) of ``path`` after the checks of ``read_policy_file``: a program to execute."""
    absolute = Path(os.path.abspath(path))
    directory_fd = _open_checked_directory(Path(os.path.realpath(absolute.parent)), absolute, trusted_owner_uids | {0})
    try:
        file_fd = os.open(absolute.name, _OPEN_FILE, dir_fd=directory_fd)
    except OSError as error:
        raise _open_failure(absolute, error) from None
    finally:
        os.close(directory_fd)
    try:
        _check(os.fstat(file_fd), absolute, absolute, trusted_owner_uids, directory=False)
    except BaseException:
        os.close(file_fd)
        raise
    return file_fd


def _open_checked_directory(directory: Path, policy_path: Path, trusted: frozenset[int]) -> int:
    """Walk ``directory`` from ``/`` checking each level; return an ``O_PATH`` descriptor of the last."""
    fd = os.open("/", _OPEN_DIRECTORY)
    current = Path("/")
    try:
        _check(os.fstat(fd), current, policy_path, trusted, directory=True)
        for part in directory.parts[1:]:
            current = current / part
            try:
                next_fd = os.open(part, _OPEN_DIRECTORY, dir_fd=fd)
            except OSError as error:
                raise ConfigurationError(f"cannot use {policy_path}: its directory {current} can't be opened "
                                         f"({os.strerror(error.errno)}); make sure it exists and is a real "
                                         "directory") from None
            os.close(fd)
            fd = next_fd
            _check(os.fstat(fd), current, policy_path, trusted, directory=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check(status: os.stat_result, path: Path, policy_path: Path, trusted: frozenset[int], *,
           directory: bool) -> None:
    """Owned by a trusted uid and writable by nobody else: the policy file, or (``directory``) one on its path.

    A sticky directory may be writable by others: they can add entries there but not replace ours.
    """
    what = f"its directory {path}" if directory else "it"
    if not directory and not stat.S_ISREG(status.st_mode):
        raise ConfigurationError(f"refusing to use {path}: it is not a regular file; put the policy in a plain file")
    if status.st_uid not in trusted:
        owners = " or ".join(_describe_uid(uid) for uid in sorted(trusted))
        raise ConfigurationError(f"refusing to use {policy_path}: {what} is owned by {_describe_uid(status.st_uid)}, "
                                 f"not by {owners}; fix with: chown root {path}")
    if status.st_mode & _WRITABLE_BY_OTHERS and not (directory and status.st_mode & stat.S_ISVTX):
        raise ConfigurationError(f"refusing to use {policy_path}: {what} is writable by group or others "
                                 f"(mode {stat.S_IMODE(status.st_mode):04o}); fix with: chmod go-w {path}")


def _open_failure(path: Path, error: OSError) -> ConfigurationError:
    if error.errno == errno.ELOOP:
        return ConfigurationError(f"refusing to use {path}: it is a symlink, which could redirect the policy; "
                                  "point mep at the real file instead")
    return ConfigurationError(f"cannot use {path}: {os.strerror(error.errno)}")


def _describe_uid(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"

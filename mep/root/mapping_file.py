"""The identity-mapping file over time: reloaded on SIGHUP and when it changes, never replaced by a broken one.

The spawner asks ``refresh()`` before every spawn request: one ``lstat`` tells
whether the file changed (device, inode, size, modification or change time),
so an admin's edit takes effect for the next request, and an editor that
replaces the file (new inode) is seen too. A new version that fails to load
leaves the previous mapper (and its helper) in place; the outcome says why, for the admin's log
and the audit log, and the same broken version is not retried until it changes
again or SIGHUP asks for it. Endpoints already running are not touched.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from mep.root.errors import ConfigurationError
from mep.root.identity import IdentityMapper, MappingContext


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload attempt did: ``loaded`` the new version, or kept the previous one because of ``error``."""

    path: str
    trigger: str  # "SIGHUP" or "the file changed"
    loaded: bool
    error: str = ""


class MappingFile:
    """The current ``IdentityMapper`` for one file; the first load raises ``ConfigurationError``."""

    def __init__(self, path: Path, *, trusted_owner_uids: frozenset[int], context: MappingContext) -> None:
        self.path = path
        self._load = functools.partial(IdentityMapper.from_file, path, trusted_owner_uids=trusted_owner_uids,
                                       context=context)
        self._attempted = _signature(path)  # the version last loaded or tried
        self.mapper = self._load()

    def refresh(self) -> ReloadOutcome | None:
        """Reload if the file changed since the last attempt; None when there was nothing to do."""
        return None if _signature(self.path) == self._attempted else self.reload("the file changed")

    def reload(self, trigger: str) -> ReloadOutcome:
        """Load the file now; on failure keep the current mapper and say why."""
        self._attempted = _signature(self.path)
        try:
            previous, self.mapper = self.mapper, self._load()
        except ConfigurationError as error:
            return ReloadOutcome(str(self.path), trigger, loaded=False, error=str(error))
        previous.close()  # its helper ends once the new one has loaded
        return ReloadOutcome(str(self.path), trigger, loaded=True)


def _signature(path: Path) -> tuple[int, ...] | None:
    try:
        status = os.lstat(path)
    except OSError:
        return None
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)

"""The account's own cache of rendered configs: the second cold start of a config skips rendering it.

Rendering the admin's template (Jinja, the options' JSON Schema, YAML) costs a
cold start more than anything else after the interpreter's own imports, and its
output depends on nothing but its inputs: the template and schema texts, the
researcher's options, ``mep.mapped_user``, ``mep.user_runtime``,
``mep.endpoint`` and mep's version. So a validated plain ``process`` config
(``mep.endpoint.settings``) is kept under the sha256 of those inputs in
``~/.mep/cache/configs`` (0700), written by the endpoint as the account.

Trust: the file is the account's own, written and read only by processes of
the account, which is the party the render itself is trusted for (whoever can
write it can already run code as the account; docs/security.md). An entry is
read back through the same structs a fresh render is checked with, so it can't
hold a config the model refuses. The directory is opened without following
symlinks and used only if it is the account's and not writable by others;
anything unreadable is a miss, and a cache that can't be written costs only
the next render.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
from pathlib import Path

import msgspec

from mep import __version__
from mep.endpoint.settings import ProcessEndpointSettings
from mep.protocol.messages import EndpointBoot

log = logging.getLogger(__name__)

FORMAT = 1  # the entries' layout; part of every key, so a change of it misses instead of misreading
MAX_ENTRIES = 32  # one per distinct (template, options, runtime): beyond this the least recently used go
SUFFIX = ".json"


def cache_key(boot: EndpointBoot) -> str:
    """sha256 hex over everything the rendered config depends on (dict keys sorted: one digest per content)."""
    inputs = [FORMAT, __version__, boot.template, boot.schema, boot.user_config, boot.mapped_user,
              boot.user_runtime, boot.manager_endpoint_id]
    return hashlib.sha256(msgspec.json.encode(inputs, order="sorted")).hexdigest()


def default_directory() -> Path:
    return Path.home() / ".mep" / "cache" / "configs"


class ConfigCache:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def load(self, key: str) -> ProcessEndpointSettings | None:
        """The config cached under ``key``, checked by the structs; None on any miss."""
        with self._opened(create=False) as directory:
            if directory is None:
                return None
            try:
                fd = os.open(key + SUFFIX, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=directory)
            except FileNotFoundError:
                return None
            except OSError as exc:
                log.warning("not using the cached config %s/%s%s: %s", self.directory, key, SUFFIX, exc)
                return None
            with os.fdopen(fd, "rb") as handle:
                data = handle.read()
            try:
                settings = msgspec.json.decode(data, type=ProcessEndpointSettings)
            except (msgspec.DecodeError, ValueError) as exc:  # torn by a crash, or from another mep
                log.warning("not using the cached config %s/%s%s: %s", self.directory, key, SUFFIX, exc)
                return None
            with contextlib.suppress(OSError):  # recently used: kept by the pruning
                os.utime(key + SUFFIX, dir_fd=directory)
            return settings

    def store(self, key: str, settings: ProcessEndpointSettings) -> None:
        """Keep ``settings`` under ``key`` (atomically), then drop the least recently used beyond MAX_ENTRIES."""
        with self._opened(create=True) as directory:
            if directory is None:
                return
            partial = f".{key}.{os.getpid()}.partial"
            try:
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600,
                             dir_fd=directory)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(msgspec.json.encode(settings))
                os.replace(partial, key + SUFFIX, src_dir_fd=directory, dst_dir_fd=directory)
                self._prune(directory)
            except OSError as exc:
                log.warning("could not cache the rendered config in %s: %s", self.directory, exc)
                with contextlib.suppress(OSError):
                    os.unlink(partial, dir_fd=directory)

    @contextlib.contextmanager
    def _opened(self, *, create: bool):
        """The cache directory as a descriptor, or None when it is missing or not safely the account's own."""
        if create:
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                log.warning("could not create the config cache %s: %s", self.directory, exc)
                yield None
                return
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            yield None  # not made yet (nothing cached), or not a plain directory
            return
        try:
            info = os.fstat(fd)
            if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                log.warning("not using the config cache %s: it must be this account's and writable by it alone",
                            self.directory)
                yield None
            else:
                yield fd
        finally:
            os.close(fd)

    def _prune(self, directory: int) -> None:
        entries = []
        for name in os.listdir(directory):
            if name.endswith(SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    entries.append((os.stat(name, dir_fd=directory, follow_symlinks=False).st_mtime, name))
        for _, name in sorted(entries, reverse=True)[MAX_ENTRIES:]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=directory)

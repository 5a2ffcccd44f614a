"""The router's end of the private channel to the root spawner: defined in ``mep.root.messages``, used from here."""

from mep.root.messages import (  # noqa: F401 - re-exported
    CHANNEL_FD,
    LOCK_FD,
    LOG_FD,
    MAX_DATAGRAM,
    RouterBoot,
    SpawnerLink,
    channel_pair,
)

"""The router's end of the private channel to the root spawner: defined in ``mep.root.messages``, used from here."""

from mep.root.messages import (  # noqa: F401 - re-exported
    MAX_DATAGRAM,
    RouterBoot,
    SpawnerLink,
    channel_pair,
)

# The router's descriptors, as the spawner passes them to the fresh router process (0-2 are /dev/null), in the
# order of mep.root.router_process's pass_fds.
CHANNEL_FD = 3  # its end of this channel
LOCK_FD = 4  # the instance lock, held as long as any part of the manager runs
LOG_FD = 5  # a pipe the spawner relays to its own log

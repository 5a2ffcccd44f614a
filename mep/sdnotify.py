"""systemd's readiness notification: defined in ``mep.root.sdnotify`` (the root process sends it), used from here."""

from mep.root.sdnotify import notify_ready  # noqa: F401 - re-exported

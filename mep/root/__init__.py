"""The root spawner: maps an identity to an account, checks it, renders its config, spawns.

Everything that runs as root lives in this package so it can be audited in one
sitting. It never sees a task frame: its only input is a ``SpawnRequest`` from
the router over a private socketpair.
"""

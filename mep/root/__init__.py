"""The root half of the manager: verifies who submitted, maps the identity to an account, checks it, spawns.

Everything that runs as root lives in this package so it can be audited in one
sitting (``tests/test_root_size.py`` pins the modules and counts their lines).
It never sees a task frame: its input is the ``SpawnRequest`` set of
``mep.root.messages`` from the router over a private socketpair, and it acts
only on a request whose signed identity assertion checks out. It renders no
template: the user endpoint does, as the user, after the privilege drop.
"""

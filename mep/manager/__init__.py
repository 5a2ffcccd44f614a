"""The manager: one per login node, privilege-separated like OpenSSH.

``spawner`` is the small root half (identity -> account -> checked spawn);
``router`` is the unprivileged half that talks to the service and the user
endpoints. Only ``spawner`` ever holds root.
"""

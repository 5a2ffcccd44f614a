"""The ``mep`` command: service administration, the manager, status, and the demo."""

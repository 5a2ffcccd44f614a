"""The audit hook that forbids unpickling: defined in ``mep.root.guard`` (the root process installs it too)."""

from mep.root.guard import UnpicklingForbidden, forbid_unpickling, process_status, unpickling_refused  # noqa: F401

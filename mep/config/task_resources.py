"""A task's ``resource_specification`` checked against the most its endpoint's template grants.

Kept apart from the config model so that the check and its error type read
without pydantic's machinery.
"""

from __future__ import annotations

from collections.abc import Mapping


class ResourceLimitError(ValueError):
    """A task's resource_specification asks for something this endpoint does not grant; says which limit."""


def check_resources(limits: Mapping[str, int], requested: dict[str, int]) -> dict[str, int]:
    """``requested`` if every amount is within ``limits`` (``task_resources``); raises ResourceLimitError."""
    for name, amount in sorted(requested.items()):
        if name not in limits:
            allowed = ", ".join(f"{key} (at most {most})" for key, most in sorted(limits.items()))
            raise ResourceLimitError(
                f"this endpoint does not accept {name!r} in a task's resource_specification; "
                + (f"it accepts {allowed}" if allowed else "it accepts none (its template sets no task_resources)"))
        if amount > limits[name]:
            raise ResourceLimitError(
                f"resource_specification asks for {name}={amount}, more than this endpoint allows: "
                f"task_resources.{name} is {limits[name]} (set by the admin's template)")
    return requested

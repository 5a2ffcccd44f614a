"""A task's ``resource_specification``, taken at ``submit()`` and checked for shape before it is sent.

The keys are Parsl's names (``num_nodes``, ``ranks_per_node``, ``num_ranks``
for MPI tasks; ``cores``, ``memory``, ``gpus``, ``priority`` ...), the values
whole numbers. Which keys an endpoint honours, and up to what amount, is the
admin's choice (the template's ``task_resources``): the endpoint refuses a
task that asks for more, naming the limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from mep.protocol.messages import ResourceSpecification


def task_resources(executor_spec: Mapping[str, Any] | None, fn: Any) -> dict[str, int]:
    """The executor's ``resource_specification`` overlaid by the function's own (an ``MPIFunction``'s), frozen."""
    merged = {**(executor_spec or {}), **(getattr(fn, "resource_specification", None) or {})}
    return checked_resources(merged) if merged else {}  # none asked for, the usual case: nothing to check


def checked_resources(spec: Mapping[str, Any]) -> dict[str, int]:
    try:
        return msgspec.convert(dict(spec), ResourceSpecification, strict=True)
    except msgspec.ValidationError as exc:
        raise ValueError(f"resource_specification must map Parsl's lowercase resource names (num_nodes, "
                         f"ranks_per_node, cores, memory, gpus, ...) to whole numbers >= 0: {exc}") from None

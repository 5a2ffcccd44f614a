"""``MPIFunction``: a ``ShellFunction`` whose command runs under the endpoint's MPI launcher.

::

    hello = MPIFunction("python3 -m mpi4py.bench helloworld {label}",
                        resource_specification={"num_nodes": 1, "ranks_per_node": 2}, walltime=300)
    done = executor.submit(hello, label="run 7").result()   # a subprocess.CompletedProcess

The endpoint must run the ``htex`` engine in Parsl's MPI mode (its template
says so): each task is given nodes of a block, and the command line runs as
``$PARSL_MPI_PREFIX <command>`` (``mpiexec -n 2 -ppn 2 -hosts <nodes>`` for the
``mpiexec`` launcher), so the ranks come from the launcher the admin chose.
``resource_specification`` uses Parsl's names (``num_nodes``,
``ranks_per_node``, ``num_ranks``); the endpoint refuses amounts beyond its
``task_resources``, naming the limit. Placeholders are shell-quoted exactly as
for ``ShellFunction``.
"""

from __future__ import annotations

from typing import Any

from mep.sdk.resources import checked_resources
from mep.sdk.shell import DEFAULT_MAX_OUTPUT_BYTES, ShellFunction


class MPIFunction(ShellFunction):
    """A command line run under ``$PARSL_MPI_PREFIX`` with its own ``resource_specification``."""

    launcher_variable = "PARSL_MPI_PREFIX"

    def __init__(self, command: str, *, resource_specification: dict[str, Any] | None = None,
                 walltime: float | None = None, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> None:
        super().__init__(command, walltime=walltime, max_output_bytes=max_output_bytes)
        self.resource_specification = checked_resources(resource_specification or {})

    def _repr_extra(self) -> str:
        return f", resource_specification={self.resource_specification!r}{super()._repr_extra()}"

"""``ShellFunction``: run a command line on the endpoint, as your account, and get its exit code and output.

::

    count = ShellFunction("wc -l {path}", walltime=60)
    done = executor.submit(count, path="results/run 7.csv").result()
    done.returncode, done.stdout, done.stderr     # a subprocess.CompletedProcess

Each ``{name}`` in the command is replaced by the keyword argument of that
name, shell-quoted: a value is always one word and never shell syntax (so
``path="x; rm -rf ~"`` names a file called that). Write placeholders bare,
not inside quotes. The rest of the command is shell syntax you wrote
(pipes, redirections, ``&&``), run by ``/bin/sh -c`` in the task's working
directory (your home on the endpoint).

It travels by value: the worker needs only dill, not mep, so it works in any
``python_env``.
"""

from __future__ import annotations

import subprocess
from typing import Any

from mep.sdk.serialize import by_value

DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024


class ShellFunction:
    """A command line template to submit like a function; the task's result is a ``subprocess.CompletedProcess``.

    ``walltime`` (seconds): the command and everything it started are killed when it runs longer, and the
    task fails with ``TimeoutError``. ``max_output_bytes``: stdout and stderr each keep their last that many
    bytes (a note says how much was cut), so a chatty command can't exceed the result size limit.
    """

    def __init__(self, command: str, *, walltime: float | None = None,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> None:
        if walltime is not None and not 0 < walltime < float("inf"):
            raise ValueError(f"walltime must be a positive number of seconds or None, not {walltime!r}")
        self.command = command
        self.walltime = walltime
        self.max_output_bytes = max_output_bytes

    #: The environment variable whose value goes in front of the command line (MPIFunction's launcher).
    launcher_variable: str | None = None

    def __call__(self, **arguments: Any) -> subprocess.CompletedProcess:
        """Run here, exactly as the endpoint does."""
        return _shell_runner(*self._runner_arguments())(**arguments)

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuilt on the endpoint by a copy of _shell_runner that travels by value (it lives in "__main__")
        return by_value(_shell_runner), self._runner_arguments()

    def _runner_arguments(self) -> tuple[Any, ...]:
        return self.command, self.walltime, self.max_output_bytes, self.launcher_variable

    def _repr_extra(self) -> str:
        return f", walltime={self.walltime!r}" if self.walltime is not None else ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.command!r}{self._repr_extra()})"


def _shell_runner(command: str, walltime: float | None, max_output_bytes: int,
                  launcher_variable: str | None = None) -> Any:
    """The callable a worker runs; standard library only, imported inside, since it travels by value.

    With ``launcher_variable``, that variable's value (e.g. ``mpiexec -n 2 -ppn 2 -hosts node1``, set by
    the worker for this task) goes in front of the command line.
    """

    def run_command(**arguments: Any) -> Any:
        import os
        import shlex
        import signal
        import string
        import subprocess

        used = {name for _, name, _, _ in string.Formatter().parse(command) if name}
        missing = sorted(used - set(arguments))
        if missing:
            raise TypeError(f"the command {command!r} needs the argument(s) {', '.join(missing)}")
        line = command.format(**{name: shlex.quote(str(value)) for name, value in arguments.items()})
        if launcher_variable is not None:
            launcher = os.environ.get(launcher_variable)
            if not launcher:
                raise RuntimeError(f"this endpoint did not give the task ${launcher_variable}: its engine is not "
                                   "in MPI mode (ask for an htex template with mpi enabled)")
            line = f"{launcher} {line}"
        process = subprocess.Popen(["/bin/sh", "-c", line], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=walltime)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: whatever it started goes too
            process.communicate()
            raise TimeoutError(f"the command ran longer than its walltime of {walltime} s and was stopped: "
                               f"{line}") from None

        def tail(output: bytes) -> str:
            text = output[-max_output_bytes:].decode(errors="replace")
            cut = len(output) - max_output_bytes
            return f"[{cut} earlier bytes cut]\n{text}" if cut > 0 else text

        return subprocess.CompletedProcess(line, process.returncode, tail(stdout), tail(stderr))

    return run_command

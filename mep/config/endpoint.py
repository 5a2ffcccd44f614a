"""The user endpoint config model: the final gate on what a rendered admin template may configure.

A user endpoint's configuration is produced by rendering the admin's template
with the researcher's options (see ``mep.config.render``), then validated into
``UserEndpointConfig``. Everything the endpoint does as the mapped account is
decided by this model, so it deliberately has no privileged knob: no account to
run as, no paths outside the user's home, no audit or encryption settings.
Every model forbids extra keys, so a template (or an injected value) that emits
``user: root`` or any other unknown key is rejected rather than ignored.

Two engines: ``process`` (a pool of worker processes beside the endpoint) and
``htex`` (Parsl's HighThroughputExecutor: blocks of workers from a scheduler
through a Parsl provider). A provider's or launcher's own arguments are only
checked for shape here (JSON values under identifier names); whether the named
Parsl class takes them is checked by ``mep.config.parsl_check`` without
importing Parsl into the process that validates.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from mep.config.paths import clean_path, results_directory
from mep.config.task_resources import check_resources
from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

_IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"


class _StrictModel(BaseModel):
    # strict: a YAML string "5" must not become the integer 5, nor true become 1.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


WorkerPython = Annotated[
    str | None,
    AfterValidator(lambda path: path if path is None else clean_path(path)),
    Field(description="Interpreter tasks run in (a researcher's conda or virtual environment); it needs only "
          "dill. Default: the endpoint's own interpreter."),
]


class Container(_StrictModel):
    """Workers run in a container the admin allows; mep builds the command line (``mep.endpoint.containers``).

    The image is one word that can't be read as an option (no leading ``-``); it is passed as its own
    argument, never through a shell.
    """

    type: Literal["podman", "apptainer", "singularity"]
    image: str = Field(pattern=r"^[A-Za-z0-9/][A-Za-z0-9._/:@+-]{0,254}$",
                       description="Image name (podman) or image file / URI (apptainer, singularity)")
    python: Annotated[str, AfterValidator(clean_path)] = Field(
        default="/usr/bin/python3", description="The interpreter inside the image; it needs only dill")
    runtime: Annotated[str, AfterValidator(clean_path)] | None = Field(
        default=None, description="podman only: the OCI runtime's path (e.g. /usr/sbin/runc where crun can't "
        "run, as on hosts with hybrid cgroups); default: podman's own choice")

    @model_validator(mode="after")
    def _runtime_is_podmans(self) -> Container:
        if self.runtime is not None and self.type != "podman":
            raise ValueError(f"runtime is a podman setting; {self.type} has none")
        return self


class ProcessEngine(_StrictModel):
    """Run tasks in a pool of worker processes on the host the user endpoint runs on."""

    type: Literal["process"] = "process"
    workers: int = Field(default=1, ge=1, le=1024)
    worker_python: WorkerPython = None
    container: Container | None = Field(default=None, description="Run each worker in this container")

    @model_validator(mode="after")
    def _one_interpreter(self) -> ProcessEngine:
        if self.container is not None and self.worker_python is not None:
            raise ValueError("worker_python and container both choose the workers' interpreter: give one "
                             "(container.python names the interpreter in the image)")
        return self


class ParslComponent(BaseModel):
    """A Parsl provider or launcher by class name, with that class's own keyword arguments beside ``type``.

    Arguments must be JSON values under identifier names; ``parsl_check``
    compares them with the class's signature.
    """

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    type: str = Field(pattern=_IDENTIFIER, description="Class name, e.g. SlurmProvider or SrunLauncher")

    @property
    def arguments(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _arguments_are_plain(self) -> ParslComponent:
        for name, value in self.arguments.items():
            if not re.match(_IDENTIFIER, name):
                raise ValueError(f"argument name {name!r} is not a Python identifier")
            _check_json(value, name)
        return self


def _check_json(value: object, where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: mapping keys must be strings")
            _check_json(item, f"{where}.{key}")
        return
    raise ValueError(f"{where}: a {type(value).__name__} is not a JSON value")


MPI_RESOURCES = ("num_nodes", "ranks_per_node", "num_ranks")
"""The resource_specification keys Parsl's MPI mode places a task by (``launcher_options`` is never
accepted: Parsl pastes it into the launch command line)."""
HTEX_RESOURCES = ("priority",)
"""What HTEX honours per task outside MPI mode."""


class MpiMode(_StrictModel):
    """Parsl's MPI mode: each task gets nodes of its block and ``$PARSL_MPI_PREFIX`` to launch its ranks with."""

    launcher: Literal["mpiexec", "srun", "aprun"] = Field(
        default="mpiexec", description="How $PARSL_MPI_PREFIX launches ranks (mpiexec: MPICH's or Open MPI's)")


class HtexEngine(_StrictModel):
    """Parsl's HighThroughputExecutor: workers in blocks that ``provider`` obtains from a scheduler.

    Blocks scale between ``min_blocks`` and ``max_blocks`` with Parsl's
    ``htex_auto_scale`` strategy; the endpoint's idle shutdown cancels every
    block it still has. Provider arguments that decide which account blocks
    run as, or that this model sets itself, are refused (``RESERVED_ARGUMENTS``).
    """

    #: Provider arguments a config may not pass, and where the setting comes from instead.
    RESERVED_ARGUMENTS: ClassVar[dict[str, str]] = {
        "launcher": "set it with engine.launcher",
        "init_blocks": "set it with engine.init_blocks",
        "min_blocks": "set it with engine.min_blocks",
        "max_blocks": "set it with engine.max_blocks",
        "worker_init": "set it with engine.worker_init",
        "user_id": "blocks always run as the endpoint's own account",
        "group_id": "blocks always run as the endpoint's own account",
        "run_as_non_root": "blocks always run as the endpoint's own account",
    }

    type: Literal["htex"]
    provider: ParslComponent
    launcher: ParslComponent | None = Field(default=None, description="Default: the provider's own default")
    workers_per_node: int = Field(default=1, ge=1, le=4096)
    worker_init: str = Field(default="", description="Shell lines run before the workers start (quote with shell_quote)")
    worker_python: WorkerPython = None
    init_blocks: int = Field(default=1, ge=0, le=1024)
    min_blocks: int = Field(default=0, ge=0, le=1024)
    max_blocks: int = Field(default=1, ge=1, le=1024)
    address: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9.:_-]+$",
        description="Address the workers connect back to; default: Parsl tries every address of this host")
    start_timeout: float = Field(
        default=600.0, gt=0, allow_inf_nan=False,
        description="Seconds tasks may wait for a first block to start before they fail")
    mpi: MpiMode | None = Field(default=None, description="Run tasks in Parsl's MPI mode (MPIFunction)")
    # On a shared login node the interchange's port is a way into the account unless it is encrypted.
    encrypted: Literal[True] = True

    @property
    def honoured_resources(self) -> tuple[str, ...]:
        return MPI_RESOURCES if self.mpi is not None else HTEX_RESOURCES

    @field_validator("provider")
    @classmethod
    def _no_reserved_arguments(cls, provider: ParslComponent) -> ParslComponent:
        for name in provider.arguments:
            if name in cls.RESERVED_ARGUMENTS:
                raise ValueError(f"argument {name!r} is not allowed here: {cls.RESERVED_ARGUMENTS[name]}")
        return provider

    @model_validator(mode="after")
    def _consistent(self) -> HtexEngine:
        if self.min_blocks > self.max_blocks:
            raise ValueError(f"min_blocks ({self.min_blocks}) is more than max_blocks ({self.max_blocks})")
        if self.init_blocks > self.max_blocks:
            raise ValueError(f"init_blocks ({self.init_blocks}) is more than max_blocks ({self.max_blocks})")
        if self.mpi is not None and self.worker_python is not None:
            # a worker_python worker keeps the environment of its first task, so a later task would launch
            # its ranks with another task's $PARSL_MPI_PREFIX
            raise ValueError("mpi mode runs tasks in mep's own interpreter: it can't be combined with worker_python")
        return self


ENGINE_TYPES = ("process", "htex")


def _engine_type(value: Any) -> str | None:
    # ``type`` may be left out for the default engine, as before there was a choice.
    if isinstance(value, dict):
        return value.get("type", "process")
    return getattr(value, "type", None)


Engine = Annotated[
    Annotated[ProcessEngine, Tag("process")] | Annotated[HtexEngine, Tag("htex")],
    Discriminator(_engine_type, custom_error_type="engine_type",
                  custom_error_message="type must be 'process' or 'htex'"),
]


class LargeResults(_StrictModel):
    """Results above a size are kept in a file on the endpoint's host, not sent through the service.

    docs/templates.md ("Large results"): the SDK reads the file where it is
    readable and fetches it in chunks through the service otherwise.
    """

    threshold_bytes: int = Field(
        default=1024 * 1024, ge=0, description="Serialised results larger than this go to a file (0: every one)")
    directory: Annotated[str, AfterValidator(results_directory)] = Field(
        default="~/.mep/results", description="Where the endpoint writes them, as the account (mode 0700); "
        "~/ is the account's home; a shared scratch directory lets the SDK read them in place on the cluster")
    retention: float = Field(
        default=7 * 24 * 3600.0, gt=0, allow_inf_nan=False,
        description="Seconds a result file is kept before the endpoint's sweep removes it (the service's "
        "result retention by default)")


class UserEndpointConfig(_StrictModel):
    """What one user endpoint runs with, as the mapped account.

    This model is the last check between an admin's template and a running
    endpoint: it must never gain a field that lets a rendered config choose the
    account, reach outside the user's home, or weaken audit or encryption.
    Unknown keys are rejected (``extra="forbid"``).
    """

    engine: Engine = Field(default_factory=ProcessEngine)
    idle_timeout: float = Field(
        default=300.0, gt=0, allow_inf_nan=False, description="Seconds without tasks before the endpoint exits."
    )
    large_results: LargeResults = Field(default_factory=LargeResults)
    task_resources: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")], Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict,
        description="The most of each resource one task's resource_specification may ask for, by Parsl's names "
        "(num_nodes, ranks_per_node, ...); a key not listed may not be asked for")

    @model_validator(mode="after")
    def _resources_honoured(self) -> UserEndpointConfig:
        honoured = self.engine.honoured_resources if isinstance(self.engine, HtexEngine) else ()
        unhonoured = sorted(set(self.task_resources) - set(honoured))
        if unhonoured:
            raise ValueError(f"task_resources names {', '.join(unhonoured)}, which the {self.engine.type} engine"
                             f"{' in this mode' if honoured else ''} can't honour per task"
                             + (f" (it honours {', '.join(honoured)})" if honoured else ""))
        return self

    def check_resources(self, requested: dict[str, int]) -> dict[str, int]:
        """``requested`` if every amount is within ``task_resources``; raises ResourceLimitError naming the limit."""
        return check_resources(self.task_resources, requested)

    @property
    def worker_python(self) -> str | None:
        """The interpreter tasks run in, when it is not the endpoint's own."""
        return self.engine.worker_python

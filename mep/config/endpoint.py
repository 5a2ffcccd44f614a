"""The user endpoint config model: the final gate on what a rendered admin template may configure.

A user endpoint's configuration is produced by rendering the admin's template
with the researcher's options (see ``mep.config.render``), then validated into
``UserEndpointConfig``. Everything the endpoint does as the mapped account is
decided by this model, so it deliberately has no privileged knob: no account to
run as, no paths outside the user's home, no audit or encryption settings.
Every model forbids extra keys, so a template (or an injected value) that emits
``user: root`` or any other unknown key is rejected rather than ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _StrictModel(BaseModel):
    # strict: a YAML string "5" must not become the integer 5, nor true become 1.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ProcessEngine(_StrictModel):
    """Run tasks in a pool of worker processes on the host the user endpoint runs on."""

    type: Literal["process"] = "process"
    workers: int = Field(default=1, ge=1, le=1024)


class UserEndpointConfig(_StrictModel):
    """What one user endpoint runs with, as the mapped account.

    This model is the last check between an admin's template and a running
    endpoint: it must never gain a field that lets a rendered config choose the
    account, reach outside the user's home, or weaken audit or encryption.
    Unknown keys are rejected (``extra="forbid"``).
    """

    # Becomes a discriminated union on ``type`` when Parsl's htex engine is added.
    engine: ProcessEngine = Field(default_factory=ProcessEngine)
    idle_timeout: float = Field(
        default=300.0, gt=0, allow_inf_nan=False, description="Seconds without tasks before the endpoint exits."
    )

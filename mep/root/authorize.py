"""From a submitter's identity set to the account tasks may run as: mapping, then account policy.

The one path both the spawner and ``mep identity test`` take, so the dry run
answers exactly as the manager would. PAM account management, when enabled,
comes last: in the session holder for real spawns, in-process for the dry run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mep.root.accounts import Account, AccountPolicy, resolve_account
from mep.root.identity import IdentityMapper, MappingDecision


@dataclass
class Authorization:
    """How far a request got: filled in step by step, so a refusal can still say which rule mapped whom."""

    decision: MappingDecision | None = None
    account: Account | None = None


def authorize(
    mapper: IdentityMapper,
    identities: Sequence[Mapping[str, object]],
    policy: AccountPolicy,
    progress: Authorization | None = None,
) -> Account:
    """The account ``identities`` may run tasks as; raises the ``TaskRefusedError`` that says why not."""
    progress = progress if progress is not None else Authorization()
    progress.decision = mapper.map(identities)
    progress.account = resolve_account(progress.decision.account, policy)
    return progress.account

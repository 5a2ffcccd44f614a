"""From a submitter's identity set to the account tasks may run as: mapping, then account policy.

The one path both the spawner and ``mep identity test`` take, so the dry run
answers exactly as the manager would. PAM account management, when enabled,
comes last: in the session holder for real spawns, in-process for the dry run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mep.root.accounts import Account, AccountPolicy, resolve_account
from mep.root.identity import IdentityMapper, MappingDecision

if TYPE_CHECKING:
    from mep.config.manager import ManagerConfig


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


def account_policy(
    config: ManagerConfig, *, manager_uids: frozenset[int], only_uid: int | None = None
) -> AccountPolicy:
    """The manager config's account rules; ``manager_uids`` are never allowed, ``only_uid`` is single-user mode."""
    return AccountPolicy(
        min_uid=config.min_uid,
        manager_uids=manager_uids,
        only_uid=only_uid,
        allow_users=frozenset(config.allow_users),
        deny_users=frozenset(config.deny_users),
        allow_groups=frozenset(config.allow_groups),
        deny_groups=frozenset(config.deny_groups),
        disabled_shells=frozenset(config.disabled_shells),
        refuse_locked=config.refuse_locked,
    )

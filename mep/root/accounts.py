"""Account policy: whether the spawner may run tasks as the local account a mapping produced.

``resolve_account`` checks the name's syntax before any NSS lookup, looks the
account up by name only, then runs ``ACCOUNT_CHECKS`` in order; the first that
objects raises ``AccountRefused``. Checks are small named functions, one rule
each: canonical name, primary group, never root / system / ``nobody`` / the
manager's own accounts, the admin's deny and allow lists (users and groups,
by name, as sshd's ``DenyUsers``/``AllowUsers``/``DenyGroups``/``AllowGroups``:
a deny always wins, and each allow list that is set must be satisfied),
disabled login shells, and the shadow entry (expired accounts always, locked
passwords only when the admin opts in). PAM account management, when enabled,
comes after these, in the session holder (``session_holder``).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from mep.root.errors import AccountRefusedError, ConfigurationError, MepError
from mep.root.shadow import read_shadow

# Conservative on purpose: no "/", whitespace, control characters or a leading
# "-" (which a later command line could read as an option).
_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._@-]*")
MAX_ACCOUNT_NAME_LENGTH = 64
# The kernel's overflow id, used for "nobody"/"nogroup" and for ids that can't
# be represented (NFS, user namespaces): files it owns are shared with anything
# else squashed to it.
OVERFLOW_ID = 65534
#: Login shells that mean "this account must not run anything" (``disabled_shells`` in the config).
DEFAULT_DISABLED_SHELLS = frozenset({"/sbin/nologin", "/usr/sbin/nologin", "/bin/false"})


@dataclass(frozen=True)
class Account:
    """A local account the spawner may run tasks as."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[int, ...]  # from os.getgrouplist, primary group included

    @classmethod
    def from_passwd(cls, entry: pwd.struct_passwd) -> Account:
        return cls(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir,
                   shell=entry.pw_shell,
                   groups=tuple(dict.fromkeys(os.getgrouplist(entry.pw_name, entry.pw_gid))))


@dataclass(frozen=True)
class AccountPolicy:
    """Which accounts are off limits on this endpoint."""

    min_uid: int = 1000
    manager_uids: frozenset[int] = frozenset()  # the manager's own uid and the router's uid: never run as them
    only_uid: int | None = None  # single-user mode: only this uid is allowed
    allow_users: frozenset[str] = frozenset()  # empty: no user list to satisfy
    deny_users: frozenset[str] = frozenset()
    allow_groups: frozenset[str] = frozenset()  # empty: no group list to satisfy
    deny_groups: frozenset[str] = frozenset()
    disabled_shells: frozenset[str] = DEFAULT_DISABLED_SHELLS
    refuse_locked: bool = False  # accounts without a usable password are normal (SSH keys, single sign-on)


def unprivileged_account(name: str | None, setting: str, error: type[MepError] = ConfigurationError) -> Account:
    """The account the admin's ``setting`` names for one of mep's own processes (None: this process's own).

    Never root nor a member of group 0 by its primary group; ``error`` is raised, naming the setting, otherwise.
    """
    try:
        entry = pwd.getpwuid(os.geteuid()) if name is None else pwd.getpwnam(name)
    except KeyError:
        raise error(f"{setting} {name!r} does not exist; create it (useradd --system --no-create-home --shell"
                    f" /usr/sbin/nologin {name}) or name another unprivileged account") from None
    if name is not None and 0 in (entry.pw_uid, entry.pw_gid):
        raise error(f"{setting} {name!r} is root or in group 0; name an unprivileged account")
    return Account.from_passwd(entry)


class AccountRefused(AccountRefusedError):
    """``AccountRefusedError`` that keeps its parts, so the caller can name the identity.

    ``str()`` reads "account 'bob' is a system account (uid 5 < 1000); tasks
    can't run as it. Ask your admin."; ``for_identity`` puts the submitter in.
    ``admin_detail`` is for the log.
    """

    def __init__(self, account: str, reason: str, admin_detail: str) -> None:
        super().__init__(f"account {account!r} {reason}; tasks can't run as it. Ask your admin.")
        self.account = account
        self.reason = reason
        self.admin_detail = admin_detail

    def for_identity(self, identity: str) -> str:
        """The user-facing message naming who mapped to the account."""
        return (
            f"the account {self.account!r} that {identity} maps to {self.reason};"
            " tasks can't run as it. Ask your admin."
        )


AccountCheck = Callable[[str, pwd.struct_passwd, AccountPolicy], None]


def resolve_account(name: str, policy: AccountPolicy) -> Account:
    """Look up ``name`` and prove policy allows running tasks as it, or raise ``AccountRefused``."""
    if len(name) > MAX_ACCOUNT_NAME_LENGTH or not _ACCOUNT_NAME.fullmatch(name):
        raise AccountRefused(name, "is not a valid account name",
                             f"mapped name {name!r} does not match {_ACCOUNT_NAME.pattern}"
                             f" (at most {MAX_ACCOUNT_NAME_LENGTH} characters); checked before any lookup")
    try:
        passwd = pwd.getpwnam(name)  # getpwnam only: a numeric name stays a name and never selects a uid
    except KeyError:
        raise AccountRefused(name, "does not exist on this host", f"getpwnam({name!r}) found no account") from None
    for check in ACCOUNT_CHECKS:
        check(name, passwd, policy)
    return Account.from_passwd(passwd)


def refuse_non_canonical_name(name: str, passwd: pwd.struct_passwd, policy: AccountPolicy) -> None:
    """NSS modules may answer for aliases (SSSD's user@domain, case folding); only the real name counts."""
    if passwd.pw_name != name:
        raise AccountRefused(name, f"is not the account's canonical name (the system calls it {passwd.pw_name!r})",
                             f"getpwnam({name!r}) returned pw_name {passwd.pw_name!r} (uid {passwd.pw_uid})")


def refuse_missing_primary_group(name: str, passwd: pwd.struct_passwd, policy: AccountPolicy) -> None:
    try:
        grp.getgrgid(passwd.pw_gid)
    except KeyError:
        raise AccountRefused(name, f"has no primary group (gid {passwd.pw_gid} does not exist)",
                             f"getgrgid({passwd.pw_gid}) found no group for account {name!r}") from None


def refuse_root(name: str, passwd: pwd.struct_passwd, policy: AccountPolicy) -> None:
    who = f"{name!r} (uid {passwd.pw_uid})"
    if passwd.pw_uid == 0:
        raise AccountRefused(name, "is the superuser (uid 0)", f"{name!r} has uid 0")
    if passwd.pw_gid == 0:
        raise AccountRefused(name, "has the root group (gid 0) as its primary group", f"{who} has primary gid 0")
    if 0 in os.getgrouplist(passwd.pw_name, passwd.pw_gid):
        raise AccountRefused(name, "is a member of the root group (gid 0)",
                             f"{who} has gid 0 among its supplementary groups")


def refuse_system_account(name: str, passwd: pwd.struct_passwd, policy: AccountPolicy) -> None:
    if passwd.pw_uid < policy.min_uid:
        raise AccountRefused(name, f"is a system account (uid {passwd.pw_uid} < {policy.min_uid})",
                             f"{name!r} has uid {passwd.pw_uid}, below min_uid {policy.min_uid}")


def refuse_overflow_ids(name: str, passwd: pwd.struct_passwd, policy: AccountPolicy) -> None:
    if passwd.pw_uid == OVERFLOW_ID:
        raise AccountRefused(name, f"is the shared 'nobody' account (uid {OVERFLOW_ID})",
                             f"{name!r} has the overflow uid {OVERFLOW_ID}")
    if passwd.pw_gid == OVERFLOW_ID:
        raise AccountRefused(name, f"has the shared 'nogroup' group (gid {OVERFLOW_ID}) as its primary group",
                             f"{name!r} (uid {passwd.pw_uid}) has the overflow gid {OVERFLOW_ID} as primary group")


def refuse_manager_accounts(name: str, passwd: pwd.struct_passwd, policy: AccountPolicy) -> None:
    if passwd.pw_uid in policy.manager_uids:
        raise AccountRefused(name, f"is an account mep itself runs as (uid {passwd.pw_uid})",
                             f"{name!r} has uid {passwd.pw_uid}, one of the manager's uids"
                             f" {sorted(policy.manager_uids)}")


def refuse_other_than_single_user(name: str, passwd: pwd.struct_passwd, policy: AccountPolicy) -> None:
    if policy.only_uid is not None and passwd.pw_uid != policy.only_uid:
        raise AccountRefused(name, f"is not the account this single-user endpoint runs as (uid {policy.only_uid})",
                             f"{name!r} has uid {passwd.pw_uid}; single-user mode allows only uid {policy.only_uid}")


def _group_names(passwd: pwd.struct_passwd) -> set[str]:
    """Names of the account's groups, primary included (gids without a group have no name to match)."""
    names = set()
    for gid in os.getgrouplist(passwd.pw_name, passwd.pw_gid):
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return names


def refuse_denied(name: str, passwd: pwd.struct_passwd, policy: AccountPolicy) -> None:
    if name in policy.deny_users:
        raise AccountRefused(name, "is on this endpoint's deny list", f"{name!r} is listed in deny_users")
    denied = sorted(_group_names(passwd) & policy.deny_groups) if policy.deny_groups else []
    if denied:
        raise AccountRefused(name, f"is a member of group {denied[0]!r}, which this endpoint denies",
                             f"{name!r} is a member of {denied}, listed in deny_groups")


def refuse_not_allowed(name: str, passwd: pwd.struct_passwd, policy: AccountPolicy) -> None:
    if policy.allow_users and name not in policy.allow_users:
        raise AccountRefused(name, "is not on this endpoint's list of allowed users",
                             f"{name!r} is not listed in allow_users")
    if policy.allow_groups and not _group_names(passwd) & policy.allow_groups:
        raise AccountRefused(name, "is not a member of any group this endpoint allows",
                             f"{name!r} is a member of none of allow_groups {sorted(policy.allow_groups)}")


def refuse_disabled_shell(name: str, passwd: pwd.struct_passwd, policy: AccountPolicy) -> None:
    if passwd.pw_shell in policy.disabled_shells:
        raise AccountRefused(name, f"is disabled (its login shell is {passwd.pw_shell})",
                             f"{name!r} has shell {passwd.pw_shell!r}, one of disabled_shells"
                             f" {sorted(policy.disabled_shells)}")


def refuse_expired_or_locked(name: str, passwd: pwd.struct_passwd, policy: AccountPolicy) -> None:
    """From the shadow entry, where NSS has one and it can be read; otherwise PAM decides."""
    shadow = read_shadow(name)
    if shadow is None:
        return
    if shadow.expired():
        expired_on = time.strftime("%Y-%m-%d", time.gmtime(shadow.expire_day * 86400))
        raise AccountRefused(name, f"has expired (on {expired_on})", f"{name!r} has shadow account expiry day"
                             f" {shadow.expire_day} ({expired_on}); see chage -l {name}")
    if policy.refuse_locked and shadow.password_locked:
        raise AccountRefused(name, "has a locked password, and this endpoint refuses such accounts",
                             f"{name!r} has a password field starting with '!' or '*' and refuse_locked is true")


# Run in order after the lookup; the first to object decides the message.
ACCOUNT_CHECKS: tuple[AccountCheck, ...] = (
    refuse_non_canonical_name,
    refuse_missing_primary_group,
    refuse_root,
    refuse_system_account,
    refuse_overflow_ids,
    refuse_manager_accounts,
    refuse_other_than_single_user,
    refuse_denied,
    refuse_not_allowed,
    refuse_disabled_shell,
    refuse_expired_or_locked,
)

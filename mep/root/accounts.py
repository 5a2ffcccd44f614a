"""Account policy: whether the spawner may run tasks as the local account a mapping produced.

``resolve_account`` checks the name's syntax before any NSS lookup, looks the
account up by name only, then runs the checks of ``account_refusal`` in order:
one table, a row per check with its own reason (for the researcher) and detail
(for the admin's log); the first row that refuses raises ``AccountRefused``.
The checks: canonical name, primary group, never root / system / ``nobody`` / the
manager's own accounts, the admin's deny and allow lists (users and groups,
by name, as sshd's ``DenyUsers``/``AllowUsers``/``DenyGroups``/``AllowGroups``:
a deny always wins, and each allow list that is set must be satisfied),
disabled login shells, and the shadow entry (expired accounts always, locked
passwords only when the admin opts in). PAM account management, when enabled,
comes after these, in the session holder (``session_holder``).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import time
from dataclasses import dataclass

from mep.root.errors import AccountRefusedError, ConfigurationError
from mep.root.shadow import ShadowEntry, read_shadow

# Conservative on purpose: no "/", whitespace, control characters or a leading
# "-" (which a later command line could read as an option); at most 64 characters.
_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._@-]{0,63}")
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
        return cls(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir, shell=entry.pw_shell,
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


def unprivileged_account(name: str | None, setting: str) -> Account:
    """The account the admin's ``setting`` names for one of mep's own processes (None: this process's own).

    Never root nor a member of group 0 by its primary group; a ``ConfigurationError`` naming the setting otherwise.
    """
    try:
        entry = pwd.getpwuid(os.geteuid()) if name is None else pwd.getpwnam(name)
    except KeyError:
        raise ConfigurationError(f"{setting} {name!r} does not exist; create it (useradd --system --no-create-home"
                                 f" --shell /usr/sbin/nologin {name}) or name another unprivileged account") from None
    if name is not None and 0 in (entry.pw_uid, entry.pw_gid):
        raise ConfigurationError(f"{setting} {name!r} is root or in group 0; name an unprivileged account")
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
        return (f"the account {self.account!r} that {identity} maps to {self.reason};"
                " tasks can't run as it. Ask your admin.")


def resolve_account(name: str, policy: AccountPolicy) -> Account:
    """Look up ``name`` and prove policy allows running tasks as it, or raise ``AccountRefused``."""
    if not _ACCOUNT_NAME.fullmatch(name):
        raise AccountRefused(name, "is not a valid account name",
                             f"mapped name {name!r} does not match {_ACCOUNT_NAME.pattern}; checked before any lookup")
    try:
        passwd = pwd.getpwnam(name)  # getpwnam only: a numeric name stays a name and never selects a uid
    except KeyError:
        raise AccountRefused(name, "does not exist on this host", f"getpwnam({name!r}) found no account") from None
    account = Account.from_passwd(passwd)
    refusal = account_refusal(name, account, policy)
    if refusal is not None:
        raise AccountRefused(name, *refusal)
    return account


def account_refusal(name: str, account: Account, policy: AccountPolicy) -> tuple[str, str] | None:
    """The first check, in this order, that ``account`` (what NSS answered for ``name``) fails: its reason for
    the researcher and its detail for the admin's log; None when every check passes."""
    uid, gid, shell = account.uid, account.gid, account.shell
    who = f"{name!r} (uid {uid})"
    groups: dict[int, str] = {}  # names by gid, the primary group included; a gid without a group has no name
    for group_id in account.groups:
        with contextlib.suppress(KeyError):
            groups[group_id] = grp.getgrgid(group_id).gr_name
    denied = sorted(set(groups.values()) & policy.deny_groups)
    allowed = set(groups.values()) & policy.allow_groups
    # The shadow entry, where NSS has one and it can be read; otherwise PAM decides.
    shadow = read_shadow(name) or ShadowEntry(expire_day=None, password_locked=False)
    expired_on = time.strftime("%Y-%m-%d", time.gmtime((shadow.expire_day or 0) * 86400))
    # Every check is one row: (refuses, reason, detail). All are computed; the first that refuses decides.
    checks = (
        # The canonical name: NSS modules may answer for aliases (SSSD's user@domain, case folding).
        (account.name != name, f"is not the account's canonical name (the system calls it {account.name!r})",
         f"getpwnam({name!r}) returned pw_name {account.name!r} (uid {uid})"),
        (gid not in groups, f"has no primary group (gid {gid} does not exist)",
         f"getgrgid({gid}) found no group for account {name!r}"),
        # Root, its group, system accounts.
        (uid == 0, "is the superuser (uid 0)", f"{name!r} has uid 0"),
        (gid == 0, "has the root group (gid 0) as its primary group", f"{who} has primary gid 0"),
        (0 in account.groups, "is a member of the root group (gid 0)",
         f"{who} has gid 0 among its supplementary groups"),
        (uid < policy.min_uid, f"is a system account (uid {uid} < {policy.min_uid})",
         f"{name!r} has uid {uid}, below min_uid {policy.min_uid}"),
        # The overflow ids: files they own are shared with anything else squashed to them.
        (uid == OVERFLOW_ID, f"is the shared 'nobody' account (uid {OVERFLOW_ID})",
         f"{name!r} has the overflow uid {OVERFLOW_ID}"),
        (gid == OVERFLOW_ID, f"has the shared 'nogroup' group (gid {OVERFLOW_ID}) as its primary group",
         f"{who} has the overflow gid {OVERFLOW_ID} as primary group"),
        # The manager's own accounts (itself, the router); single-user mode.
        (uid in policy.manager_uids, f"is an account mep itself runs as (uid {uid})",
         f"{name!r} has uid {uid}, one of the manager's uids {sorted(policy.manager_uids)}"),
        (policy.only_uid is not None and uid != policy.only_uid,
         f"is not the account this single-user endpoint runs as (uid {policy.only_uid})",
         f"{name!r} has uid {uid}; single-user mode allows only uid {policy.only_uid}"),
        # The admin's deny lists, then allow lists (as sshd's DenyUsers, DenyGroups, AllowUsers, AllowGroups).
        (name in policy.deny_users, "is on this endpoint's deny list", f"{name!r} is listed in deny_users"),
        (bool(denied), f"is a member of group {(denied or [''])[0]!r}, which this endpoint denies",
         f"{name!r} is a member of {denied}, listed in deny_groups"),
        (bool(policy.allow_users) and name not in policy.allow_users,
         "is not on this endpoint's list of allowed users", f"{name!r} is not listed in allow_users"),
        (bool(policy.allow_groups) and not allowed, "is not a member of any group this endpoint allows",
         f"{name!r} is a member of none of allow_groups {sorted(policy.allow_groups)}"),
        # Disabled login shells; expired accounts; locked passwords, only when the admin says so.
        (shell in policy.disabled_shells, f"is disabled (its login shell is {shell})",
         f"{name!r} has shell {shell!r}, one of disabled_shells {sorted(policy.disabled_shells)}"),
        (shadow.expired(), f"has expired (on {expired_on})",
         f"{name!r} has shadow account expiry day {shadow.expire_day} ({expired_on}); see chage -l {name}"),
        (policy.refuse_locked and shadow.password_locked,
         "has a locked password, and this endpoint refuses such accounts",
         f"{name!r} has a password field starting with '!' or '*' and refuse_locked is true"),
    )
    return next(((reason, detail) for refuses, reason, detail in checks if refuses), None)

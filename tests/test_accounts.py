"""Account policy against real Unix accounts (needs root: creates and removes accounts)."""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import subprocess
from collections.abc import Callable

import pytest

from mep.errors import AccountRefusedError
from mep.manager.spawner.accounts import (
    ACCOUNT_CHECKS,
    Account,
    AccountPolicy,
    AccountRefused,
    refuse_non_canonical_name,
    resolve_account,
)
from tests.accounts import free_uid

pytestmark = pytest.mark.root

MakeAccount = Callable[..., pwd.struct_passwd]
DEFAULT = AccountPolicy()


def refusal(name: str, policy: AccountPolicy = DEFAULT) -> AccountRefused:
    with pytest.raises(AccountRefused) as raised:
        resolve_account(name, policy)
    assert isinstance(raised.value, AccountRefusedError), "must travel with the account_refused code"
    assert str(raised.value).endswith("; tasks can't run as it. Ask your admin.")
    assert raised.value.admin_detail
    return raised.value


def usermod(*arguments: str) -> None:
    subprocess.run(["usermod", *arguments], check=True, capture_output=True)


def test_normal_account_is_allowed(account_factory: MakeAccount) -> None:
    entry = account_factory()
    account = resolve_account(entry.pw_name, DEFAULT)
    assert account == Account(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        home=entry.pw_dir,
        shell="/bin/bash",
        groups=(entry.pw_gid,),
    )


def test_groups_include_supplementary_groups(account_factory: MakeAccount) -> None:
    entry = account_factory()
    usermod("-a", "-G", "users", entry.pw_name)
    account = resolve_account(entry.pw_name, DEFAULT)
    assert set(account.groups) == {entry.pw_gid, grp.getgrnam("users").gr_gid}
    assert account.groups[0] == entry.pw_gid


def test_user_at_domain_name_is_allowed(account_factory: MakeAccount) -> None:
    name = f"mep{secrets.token_hex(4)}@example.org"
    assert resolve_account(account_factory(name=name).pw_name, DEFAULT).name == name


def test_uid_below_min_uid_is_refused(account_factory: MakeAccount) -> None:
    entry = account_factory(uid=free_uid(range(500, 1000)), create_home=False)
    refused = refusal(entry.pw_name)
    assert str(refused) == (
        f"account {entry.pw_name!r} is a system account (uid {entry.pw_uid} < 1000);"
        " tasks can't run as it. Ask your admin."
    )
    assert resolve_account(entry.pw_name, AccountPolicy(min_uid=entry.pw_uid)).uid == entry.pw_uid


@pytest.mark.parametrize("policy", [DEFAULT, AccountPolicy(min_uid=0)], ids=["default", "min_uid 0"])
def test_root_is_refused(policy: AccountPolicy) -> None:
    assert refusal("root", policy).reason == "is the superuser (uid 0)"


def test_primary_group_root_is_refused(account_factory: MakeAccount) -> None:
    entry = account_factory()
    usermod("-g", "0", entry.pw_name)
    assert refusal(entry.pw_name).reason == "has the root group (gid 0) as its primary group"


def test_member_of_root_group_is_refused(account_factory: MakeAccount) -> None:
    entry = account_factory()
    usermod("-a", "-G", "root", entry.pw_name)
    assert refusal(entry.pw_name).reason == "is a member of the root group (gid 0)"


def test_nobody_is_refused() -> None:
    assert pwd.getpwnam("nobody").pw_uid == 65534  # >= min_uid, so only its own check stops it
    assert refusal("nobody").reason == "is the shared 'nobody' account (uid 65534)"


def test_primary_group_nogroup_is_refused(account_factory: MakeAccount) -> None:
    entry = account_factory()
    usermod("-g", "nogroup", entry.pw_name)
    assert refusal(entry.pw_name).reason == (
        "has the shared 'nogroup' group (gid 65534) as its primary group"
    )


def test_manager_uid_is_refused(account_factory: MakeAccount) -> None:
    router = account_factory()
    policy = AccountPolicy(manager_uids=frozenset({os.getuid(), router.pw_uid}))
    refused = refusal(router.pw_name, policy)
    assert refused.reason == f"is an account mep itself runs as (uid {router.pw_uid})"


def test_single_user_mode_allows_only_its_uid(account_factory: MakeAccount) -> None:
    owner, other = account_factory(), account_factory()
    policy = AccountPolicy(only_uid=owner.pw_uid)
    assert resolve_account(owner.pw_name, policy).uid == owner.pw_uid
    refused = refusal(other.pw_name, policy)
    assert refused.reason == (
        f"is not the account this single-user endpoint runs as (uid {owner.pw_uid})"
    )


def test_nonexistent_account_is_refused() -> None:
    name = f"mepnobody{secrets.token_hex(4)}"
    assert refusal(name).reason == "does not exist on this host"


def test_numeric_name_is_a_name_not_a_uid(account_factory: MakeAccount) -> None:
    numeric = account_factory(name=str(700_000_000 + secrets.randbelow(10**8)))
    assert resolve_account(numeric.pw_name, DEFAULT).uid == numeric.pw_uid
    # Its uid, written as a name, is not an account name.
    with pytest.raises(KeyError):
        pwd.getpwnam(str(numeric.pw_uid))
    assert refusal(str(numeric.pw_uid)).reason == "does not exist on this host"


@pytest.mark.parametrize(
    "name",
    ["../x", "a b", "-rf", "", "a\nb", "alice\n", "a/b", "a:b", "jürgen", "x" * 65, "mep+bad"],
    ids=repr,
)
def test_bad_syntax_is_refused(name: str) -> None:
    refused = refusal(name)
    assert refused.reason == "is not a valid account name"
    assert str(refused).startswith(f"account {name!r} ")
    assert "\n" not in str(refused)


def test_bad_syntax_is_refused_even_when_the_account_exists(account_factory: MakeAccount) -> None:
    """The syntax check comes first: an existing account with a disallowed name is never looked up."""
    entry = account_factory(name=f"mep+{secrets.token_hex(4)}")
    assert pwd.getpwnam(entry.pw_name).pw_uid >= 1000
    assert refusal(entry.pw_name).reason == "is not a valid account name"


def test_longest_allowed_name_reaches_the_lookup() -> None:
    assert refusal("x" * 64).reason == "does not exist on this host"


def test_missing_primary_group_is_refused(account_factory: MakeAccount) -> None:
    entry = account_factory(primary_group_missing=True)
    assert refusal(entry.pw_name).reason == f"has no primary group (gid {entry.pw_gid} does not exist)"


def test_non_canonical_answer_is_refused(account_factory: MakeAccount) -> None:
    """NSS modules such as SSSD answer for aliases; files can't, so feed the check a real entry renamed."""
    entry = account_factory()
    alias = entry.pw_name.upper()
    with pytest.raises(AccountRefused) as raised:
        refuse_non_canonical_name(alias, entry, DEFAULT)
    assert raised.value.reason == (
        f"is not the account's canonical name (the system calls it {entry.pw_name!r})"
    )
    assert refuse_non_canonical_name in ACCOUNT_CHECKS


def test_message_for_identity(account_factory: MakeAccount) -> None:
    entry = account_factory(uid=free_uid(range(500, 1000)), create_home=False)
    refused = refusal(entry.pw_name)
    assert refused.for_identity("alice@example.org") == (
        f"the account {entry.pw_name!r} that alice@example.org maps to is a system account"
        f" (uid {entry.pw_uid} < 1000); tasks can't run as it. Ask your admin."
    )
    assert "below min_uid 1000" in refused.admin_detail

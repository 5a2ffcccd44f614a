"""Account policy against real Unix accounts (needs root: creates and removes accounts)."""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import subprocess
import sys
from collections.abc import Callable

import pytest

from mep.config.manager import ManagerConfig
from mep.errors import AccountRefusedError
from mep.root.accounts import (
    DEFAULT_DISABLED_SHELLS,
    Account,
    AccountPolicy,
    AccountRefused,
    account_refusal,
    resolve_account,
)
from mep.root.start import account_rules
from mep.root.shadow import ShadowEntry, read_shadow
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
    """NSS modules such as SSSD answer for aliases; files can't, so feed the checks a real entry asked for by alias."""
    entry = account_factory()
    alias = entry.pw_name.upper()
    reason, detail = account_refusal(alias, Account.from_passwd(entry), DEFAULT)
    assert reason == f"is not the account's canonical name (the system calls it {entry.pw_name!r})"
    assert detail == f"getpwnam({alias!r}) returned pw_name {entry.pw_name!r} (uid {entry.pw_uid})"
    assert account_refusal(entry.pw_name, Account.from_passwd(entry), DEFAULT) is None


def test_message_for_identity(account_factory: MakeAccount) -> None:
    entry = account_factory(uid=free_uid(range(500, 1000)), create_home=False)
    refused = refusal(entry.pw_name)
    assert refused.for_identity("alice@example.org") == (
        f"the account {entry.pw_name!r} that alice@example.org maps to is a system account"
        f" (uid {entry.pw_uid} < 1000); tasks can't run as it. Ask your admin."
    )
    assert "below min_uid 1000" in refused.admin_detail


# --- the admin's lists, disabled shells, the shadow entry -------------------------------------------


@pytest.mark.parametrize("shell", sorted(DEFAULT_DISABLED_SHELLS))
def test_disabled_shell_is_refused(account_factory: MakeAccount, shell: str) -> None:
    entry = account_factory(shell=shell)
    assert refusal(entry.pw_name).reason == f"is disabled (its login shell is {shell})"


def test_disabled_shells_are_configurable(account_factory: MakeAccount) -> None:
    entry = account_factory(shell="/usr/sbin/nologin")
    assert resolve_account(entry.pw_name, AccountPolicy(disabled_shells=frozenset())).shell == "/usr/sbin/nologin"
    other = account_factory(shell="/bin/sh")
    assert refusal(other.pw_name, AccountPolicy(disabled_shells=frozenset({"/bin/sh"}))).reason.startswith(
        "is disabled")


def test_expired_account_is_refused(account_factory: MakeAccount) -> None:
    entry = account_factory()
    subprocess.run(["chage", "-E", "0", entry.pw_name], check=True)
    refused = refusal(entry.pw_name)
    assert refused.reason == "has expired (on 1970-01-01)"
    assert f"chage -l {entry.pw_name}" in refused.admin_detail


def test_account_expiring_in_the_future_is_allowed(account_factory: MakeAccount) -> None:
    entry = account_factory()
    subprocess.run(["chage", "-E", "2999-01-01", entry.pw_name], check=True)
    assert resolve_account(entry.pw_name, DEFAULT).uid == entry.pw_uid


def test_expiry_counts_from_the_expiry_day() -> None:
    entry = ShadowEntry(expire_day=20000, password_locked=False)
    assert (entry.expired(today=19999), entry.expired(today=20000)) == (False, True)
    assert not ShadowEntry(expire_day=None, password_locked=True).expired()


def test_account_without_a_password_is_normal_unless_the_admin_refuses_locked(account_factory: MakeAccount) -> None:
    entry = account_factory()  # useradd leaves "!" in the password field: no password, as with SSH keys
    assert read_shadow(entry.pw_name) == ShadowEntry(expire_day=None, password_locked=True)
    assert resolve_account(entry.pw_name, DEFAULT).uid == entry.pw_uid
    refused = refusal(entry.pw_name, AccountPolicy(refuse_locked=True))
    assert refused.reason == "has a locked password, and this endpoint refuses such accounts"


def test_locked_password_is_refused_only_when_the_admin_opts_in(account_factory: MakeAccount) -> None:
    entry = account_factory()
    usermod("-p", "$6$salt$" + "x" * 86, entry.pw_name)
    assert read_shadow(entry.pw_name) == ShadowEntry(expire_day=None, password_locked=False)
    assert resolve_account(entry.pw_name, AccountPolicy(refuse_locked=True)).uid == entry.pw_uid
    usermod("-L", entry.pw_name)
    assert read_shadow(entry.pw_name).password_locked
    assert resolve_account(entry.pw_name, DEFAULT).uid == entry.pw_uid
    assert refusal(entry.pw_name, AccountPolicy(refuse_locked=True)).reason.startswith("has a locked password")


def test_shadow_entry_unreadable_leaves_the_decision_to_pam(account_factory: MakeAccount) -> None:
    """As a non-root process (or for LDAP/SSSD accounts without shadow data) there is no entry to judge."""
    expired = account_factory()
    subprocess.run(["chage", "-E", "0", expired.pw_name], check=True)
    reader = account_factory()
    script = (f"from mep.root.shadow import read_shadow; print(read_shadow({expired.pw_name!r}))")
    result = subprocess.run(["runuser", "-u", reader.pw_name, "--", sys.executable, "-c", script],
                            capture_output=True, text=True, check=True, cwd="/")
    assert result.stdout.strip() == "None"
    assert read_shadow(f"mepnosuch{secrets.token_hex(4)}") is None


def test_deny_lists_win(account_factory: MakeAccount) -> None:
    entry = account_factory()
    usermod("-a", "-G", "users", entry.pw_name)
    assert refusal(entry.pw_name, AccountPolicy(deny_users=frozenset({entry.pw_name}),
                                                allow_users=frozenset({entry.pw_name}))).reason == (
        "is on this endpoint's deny list")
    refused = refusal(entry.pw_name, AccountPolicy(deny_groups=frozenset({"users", "nosuchgroup"})))
    assert refused.reason == "is a member of group 'users', which this endpoint denies"
    primary = grp.getgrgid(entry.pw_gid).gr_name
    assert refusal(entry.pw_name, AccountPolicy(deny_groups=frozenset({primary}))).reason.startswith(
        "is a member of group")


def test_allow_lists_must_each_be_satisfied(account_factory: MakeAccount) -> None:
    member, outsider = account_factory(), account_factory()
    usermod("-a", "-G", "users", member.pw_name)
    groups_only = AccountPolicy(allow_groups=frozenset({"users"}))
    assert resolve_account(member.pw_name, groups_only).uid == member.pw_uid
    assert refusal(outsider.pw_name, groups_only).reason == "is not a member of any group this endpoint allows"
    users_only = AccountPolicy(allow_users=frozenset({outsider.pw_name}))
    assert resolve_account(outsider.pw_name, users_only).uid == outsider.pw_uid
    assert refusal(member.pw_name, users_only).reason == "is not on this endpoint's list of allowed users"
    both = AccountPolicy(allow_users=frozenset({outsider.pw_name}), allow_groups=frozenset({"users"}))
    assert refusal(outsider.pw_name, both).reason.startswith("is not a member of any group")


def test_policy_comes_from_the_manager_config() -> None:
    config = ManagerConfig.model_validate({
        "endpoint_id": "e", "service_address": "tcp://x:1", "service_public_key": "k",
        "manager_secret_key_file": "/k", "identity_mapping": "/m", "min_uid": 2000,
        "allow_users": ["a"], "deny_users": ["b"], "allow_groups": ["g"], "deny_groups": ["h"],
        "disabled_shells": ["/bin/sh"], "refuse_locked": True,
    })
    router = Account(name="router", uid=5, gid=5, home="/", shell="/usr/sbin/nologin", groups=(5,))
    assert account_rules(config, router) == (AccountPolicy(
        min_uid=2000, manager_uids=frozenset({0, 5}), allow_users=frozenset({"a"}), deny_users=frozenset({"b"}),
        allow_groups=frozenset({"g"}), deny_groups=frozenset({"h"}), disabled_shells=frozenset({"/bin/sh"}),
        refuse_locked=True), frozenset({0}))
    defaults = ManagerConfig.model_validate({
        "endpoint_id": "e", "service_address": "tcp://x:1", "service_public_key": "k",
        "manager_secret_key_file": "/k", "identity_mapping": "/m"})
    assert account_rules(defaults, router)[0] == AccountPolicy(manager_uids=frozenset({0, 5}))
    assert account_rules(defaults, None)[0] == AccountPolicy(manager_uids=frozenset(), only_uid=os.geteuid())

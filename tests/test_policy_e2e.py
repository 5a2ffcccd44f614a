"""Account policy and mapping reloads end to end: real accounts, real submissions, real audit lines.

Each kind of account the issue names is allowed or refused through a
submission to a root manager; a refused one never gets a process. Reloads
(SIGHUP, or an edited file noticed at the next spawn) change who maps where
without dropping tasks already routed, and a broken file keeps the previous
mapping. Functions travel by value.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

import mep
from tests.accounts import free_uid
from tests.harness import (
    DOMAIN_STRIP,
    audit_log_of,
    expression_mapping,
    processes_of_uid,
    wait_for,
)

pytestmark = pytest.mark.root

EXAMPLES = Path(__file__).resolve().parent.parent / "identity_maps"
USER_AT_DOMAIN = {"source": "{username}", "match": r"(.*)@corp\.example\.org", "output": "{0}@corp"}


def whoami() -> tuple[int, str]:
    import os
    import pwd

    return os.getuid(), pwd.getpwuid(os.getuid()).pw_name


def nap(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "done"


def without_primary_group(account: pwd.struct_passwd) -> pwd.struct_passwd:
    """Point the account's primary gid at a group that is then deleted.

    The gid is above GID_MAX, where useradd never allocates: a freed gid in the
    normal range is handed to the next account created, on this machine by
    any other test running meanwhile.
    """
    name = f"mepgone{secrets.token_hex(3)}"
    gid = next(gid for gid in range(60100, 60900) if not _group_exists(gid))
    subprocess.run(["groupadd", "-g", str(gid), name], check=True)
    subprocess.run(["usermod", "-g", name, account.pw_name], check=True)
    subprocess.run(["groupdel", "--force", name], check=True)
    return pwd.getpwnam(account.pw_name)


def _group_exists(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
    except KeyError:
        return False
    return True


def decisions(manager) -> dict[str, dict]:  # noqa: ANN001
    """The last decision per identity username, from the manager's audit log."""
    found = {}
    for line in audit_log_of(manager.config_path).read_text().splitlines():
        record = json.loads(line)
        if record["event"] == "decision":
            found[record["identity"]["username"]] = record
    return found


def submit(deploy, manager, username: str):  # noqa: ANN001, ANN201
    identity = deploy.identity(username)
    with deploy.executor(identity, manager) as executor:
        future = executor.submit(whoami)
        try:
            return future.result(timeout=60)
        except mep.MepError as error:
            return error


def test_each_kind_of_account_is_allowed_or_refused_as_specified(deploy, account_factory) -> None:
    normal = account_factory("mepnormal")
    system = account_factory("mepsys", uid=free_uid(range(900, 1000)))
    nologin = account_factory("mepnologin", shell="/usr/sbin/nologin")
    locked = account_factory("meplocked")
    subprocess.run(["usermod", "-p", "$6$salt$" + "x" * 86, locked.pw_name], check=True)
    subprocess.run(["usermod", "-L", locked.pw_name], check=True)
    expired = account_factory("mepexpired")
    subprocess.run(["chage", "-E", "0", expired.pw_name], check=True)
    domain = account_factory(name=f"mep{secrets.token_hex(3)}@corp")
    groupless = without_primary_group(account_factory("mepgroupless"))
    manager = deploy.start_manager(expression_mapping(USER_AT_DOMAIN, DOMAIN_STRIP))
    cases = [  # (account, refusal reason or None for allowed)
        (normal, None),
        (locked, None),  # a locked password is normal unless the admin opts in
        (domain, None),
        (system, f"is a system account (uid {system.pw_uid} < 1000)"),
        (nologin, "is disabled (its login shell is /usr/sbin/nologin)"),
        (expired, "has expired (on 1970-01-01)"),
        (groupless, f"has no primary group (gid {groupless.pw_gid} does not exist)"),
    ]
    leftovers = {account.pw_uid: set(processes_of_uid(account.pw_uid)) for account, _ in cases}
    for account, reason in cases:
        username = (account.pw_name.replace("@corp", "@corp.example.org") if "@" in account.pw_name
                    else f"{account.pw_name}@example.org")
        outcome = submit(deploy, manager, username)
        decision = decisions(manager)[username]
        if reason is None:
            assert outcome == (account.pw_uid, account.pw_name), (account.pw_name, outcome)
            assert (decision["outcome"], decision["uid"]) == ("allowed", account.pw_uid)
        else:
            assert isinstance(outcome, mep.AccountRefusedError), (account.pw_name, outcome)
            assert str(outcome) == (f"the account {account.pw_name!r} that {username} maps to {reason};"
                                    " tasks can't run as it. Ask your admin."), account.pw_name
            assert (decision["outcome"], decision["code"], decision["account"]) == (
                "refused", "account_refused", account.pw_name)
            assert set(processes_of_uid(account.pw_uid)) <= leftovers[account.pw_uid], "nothing ran as it"
            assert not (Path(account.pw_dir) / ".mep").exists()


def test_refuse_locked_refuses_locked_and_passwordless_accounts(deploy, account_factory) -> None:
    with_password, without = account_factory("mephaspw"), account_factory("mepnopw")
    subprocess.run(["usermod", "-p", "$6$salt$" + "x" * 86, with_password.pw_name], check=True)
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), settings={"refuse_locked": True})
    assert submit(deploy, manager, f"{with_password.pw_name}@example.org") == (with_password.pw_uid,
                                                                                with_password.pw_name)
    refused = submit(deploy, manager, f"{without.pw_name}@example.org")
    assert isinstance(refused, mep.AccountRefusedError) and "has a locked password" in str(refused)
    subprocess.run(["usermod", "-L", with_password.pw_name], check=True)
    other_config = deploy.identity(f"{with_password.pw_name}@example.org")
    with deploy.executor(other_config, manager, user_endpoint_config={"workers": 2}) as executor:
        with pytest.raises(mep.AccountRefusedError, match="has a locked password"):
            executor.submit(whoami).result(timeout=60)


def test_allow_and_deny_lists(deploy, account_factory) -> None:
    member, outsider, denied = account_factory("mepmember"), account_factory("mepoutsider"), account_factory("mepdeny")
    for account in (member, denied):
        subprocess.run(["usermod", "-a", "-G", "users", account.pw_name], check=True)
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP),
                                   settings={"allow_groups": ["users"], "deny_users": [denied.pw_name]})
    assert submit(deploy, manager, f"{member.pw_name}@example.org") == (member.pw_uid, member.pw_name)
    refused = submit(deploy, manager, f"{outsider.pw_name}@example.org")
    assert isinstance(refused, mep.AccountRefusedError) and "not a member of any group this endpoint allows" in str(
        refused)
    refused = submit(deploy, manager, f"{denied.pw_name}@example.org")
    assert isinstance(refused, mep.AccountRefusedError) and "deny list" in str(refused)


def test_external_program_maps_a_collaborator_end_to_end(deploy, account_factory) -> None:
    collaborator = account_factory("mepcollab")
    programs = Path(deploy.root) / "mapper"
    programs.mkdir(mode=0o755)
    shutil.copy(EXAMPLES / "csv_mapper.py", programs / "csv_mapper.py")
    (programs / "csv_mapper.py").chmod(0o755)
    (programs / "accounts.csv").write_text(f"identity,account\nerin@partner.example.net,{collaborator.pw_name}\n")
    (programs / "accounts.csv").chmod(0o644)
    document = {"DATA_TYPE": "external_identity_mapping#1.0.0",
                "command": [str(programs / "csv_mapper.py"), "--csv", str(programs / "accounts.csv")]}
    manager = deploy.start_manager([*expression_mapping(DOMAIN_STRIP), document])
    assert submit(deploy, manager, "erin@partner.example.net") == (collaborator.pw_uid, collaborator.pw_name)
    decision = decisions(manager)["erin@partner.example.net"]
    assert decision["mapping"]["program"] == str(programs / "csv_mapper.py")
    assert decision["mapping"]["rule"] == f"document 1, program {programs / 'csv_mapper.py'}"
    refused = submit(deploy, manager, "mallory@partner.example.net")
    assert isinstance(refused, mep.UnmappedIdentityError)


# --- reloads ---------------------------------------------------------------------------------------


def mapping_file(manager) -> Path:  # noqa: ANN001
    return manager.config_path.parent / "identity_mapping.json"


def test_sighup_reloads_without_dropping_routed_tasks_and_a_broken_file_keeps_the_old_one(
        deploy, account_factory) -> None:
    alice, bob = account_factory("mepreloada"), account_factory("mepreloadb")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    alice_identity = deploy.identity(f"{alice.pw_name}@example.org")
    bob_identity = deploy.identity(f"{bob.pw_name}@other.example.net")
    with deploy.executor(alice_identity, manager) as alice_executor:
        running = alice_executor.submit(nap, 3)
        wait_for(lambda: processes_of_uid(alice.pw_uid), what="alice's endpoint")
        with deploy.executor(bob_identity, manager) as executor:
            with pytest.raises(mep.UnmappedIdentityError):
                executor.submit(whoami).result(timeout=60)
        other_domain = {"source": "{username}", "match": r"(.*)@other\.example\.net", "output": "{0}"}
        mapping_file(manager).write_text(json.dumps(expression_mapping(DOMAIN_STRIP, other_domain)))
        os.kill(manager.spawner_pid, signal.SIGHUP)
        wait_for(lambda: "reloaded (SIGHUP)" in manager.log(), what="the reload")
        with deploy.executor(bob_identity, manager, user_endpoint_config={"workers": 2}) as executor:
            assert executor.submit(whoami).result(timeout=60) == (bob.pw_uid, bob.pw_name)
        assert running.result(timeout=60) == "done", "a task routed before the reload is not dropped"

        mapping_file(manager).write_text('[{"DATA_TYPE": "expression_identity_mapping#1.0.0", "mappings": [')
        os.kill(manager.spawner_pid, signal.SIGHUP)
        wait_for(lambda: "is broken; keeping the previous version" in manager.log(), what="the refused reload")
        assert "not valid JSON" in manager.log()
        with deploy.executor(bob_identity, manager, user_endpoint_config={"workers": 3}) as executor:
            assert executor.submit(whoami).result(timeout=60) == (bob.pw_uid, bob.pw_name), "the old mapping holds"
        assert alice_executor.submit(whoami).result(timeout=60) == (alice.pw_uid, alice.pw_name)
    reloads = [json.loads(line) for line in audit_log_of(manager.config_path).read_text().splitlines()
               if '"mapping_reload"' in line]
    assert [(r["trigger"], r["outcome"]) for r in reloads] == [("SIGHUP", "loaded"), ("SIGHUP", "kept_previous")]
    assert "not valid JSON" in reloads[1]["reason"]


def test_an_edited_file_is_picked_up_at_the_next_request(deploy, account_factory) -> None:
    carol = account_factory("mepedit")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{carol.pw_name}@edited.example.net")
    assert isinstance(submit(deploy, manager, f"{carol.pw_name}@edited.example.net"), mep.UnmappedIdentityError)
    replacement = mapping_file(manager).with_suffix(".new")
    edited = {"source": "{username}", "match": r"(.*)@edited\.example\.net", "output": "{0}"}
    replacement.write_text(json.dumps(expression_mapping(edited)))
    replacement.rename(mapping_file(manager))  # as editors do: a new inode
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(whoami).result(timeout=60) == (carol.pw_uid, carol.pw_name)
    assert "reloaded (the file changed)" in manager.log()
    mapping_file(manager).chmod(0o666)  # now anyone could have written it: refused, previous mapping kept
    os.utime(mapping_file(manager))
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 3}) as executor:  # a new spawn request
        assert executor.submit(whoami).result(timeout=60) == (carol.pw_uid, carol.pw_name)
    assert "writable by group or others" in manager.log()

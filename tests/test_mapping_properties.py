"""Property: no configuration makes a root manager run a task as root, as its own accounts, or below min_uid.

Hypothesis writes the admin's side (mapping documents, min_uid, allow and
deny lists, disabled shells, refuse_locked) and the submitter's side (an
identity set); the decision goes through the code the spawner runs
(mapping, then ``resolve_account``, with the policy ``mep manager start`` builds from the config)
against this machine's real accounts: root, system accounts, ``nobody``, the
router account, and test accounts above and below 1000. Whatever it allows
must be safe; anything else must be a refusal with a wire code, never a crash.
"""

from __future__ import annotations

import pwd
import string
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mep.config.manager import ManagerConfig
from mep.errors import ConfigurationError, TaskRefusedError
from mep.mapping.engine import MappingRules
from mep.root.start import account_rules
from mep.root.accounts import resolve_account, unprivileged_account
from tests.accounts import free_uid

pytestmark = pytest.mark.root

SYSTEM_NAMES = ["root", "daemon", "bin", "sys", "nobody", "mep", "0", "1000", "65534", "ROOT", "root "]


@pytest.fixture(scope="module")
def known_accounts(router_account: str) -> Iterator[list[str]]:
    """Accounts on this machine that a mapping may name, test accounts included (made once for the module)."""
    from tests.accounts import unix_account

    with unix_account("mepprop") as normal, unix_account("mepproplow", uid=free_uid(range(800, 1000))) as low, \
            unix_account("mepprop", shell="/usr/sbin/nologin") as nologin:
        # The ordinary account first (Hypothesis favours early elements) and as often as all the others
        # together, so that plenty of decisions get past the mapping to the account checks.
        others = [*SYSTEM_NAMES, low.pw_name, nologin.pw_name, router_account]
        yield [normal.pw_name] * len(others) + others


def configs(names: list[str]) -> st.SearchStrategy[dict]:
    valid_name = st.sampled_from([name for name in names if name.strip() == name])
    return st.fixed_dictionaries({
        "min_uid": st.one_of(st.integers(min_value=1, max_value=1000), st.integers(min_value=1, max_value=70_000)),
        "allow_users": st.one_of(st.just([]), st.lists(valid_name, max_size=3)),
        "deny_users": st.one_of(st.just([]), st.lists(valid_name, max_size=2)),
        "allow_groups": st.one_of(st.just([]), st.lists(st.sampled_from(["root", "users", "nogroup", "mep"]),
                                                        max_size=2)),
        "deny_groups": st.lists(st.sampled_from(["nogroup", "daemon", "root"]), max_size=2),
        "disabled_shells": st.one_of(st.just([]), st.lists(st.sampled_from(["/usr/sbin/nologin", "/bin/bash"]),
                                                           max_size=2)),
        "refuse_locked": st.booleans(),
    })


def rules(names: list[str]) -> st.SearchStrategy[dict]:
    output = st.one_of(st.just("{0}"), st.sampled_from(names), st.just("{username}"), st.just("{0}{0}"),
                       st.text(string.ascii_letters + string.digits + "._@-{}", min_size=1, max_size=12))
    match = st.one_of(st.just("(.*)"), st.just(r"(.*)@example\.org"), st.just("(root|mep|.*)"),
                      st.sampled_from(names), st.text(string.ascii_lowercase + ".*()|@", min_size=1, max_size=8),
                      st.just("(.*)"))
    return st.fixed_dictionaries(
        {"source": st.sampled_from(["{username}", "{id}", "{username}{id}"]), "match": match, "output": output},
        optional={"ignore_case": st.booleans(), "literal": st.booleans()})


def identities(names: list[str]) -> st.SearchStrategy[list[dict]]:
    username = st.one_of(st.sampled_from(names), st.sampled_from(names).map(lambda n: f"{n}@example.org"),
                         st.text(string.printable, min_size=1, max_size=20))
    resource = st.fixed_dictionaries({"id": st.sampled_from(names + ["b34bb069-3b68-4d38-b4e6-bc1e4fc95332"]),
                                      "username": username,
                                      "status": st.sampled_from(["used", "private", "unused"])})
    return st.lists(resource, min_size=1, max_size=3)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_configuration_runs_a_task_as_root_the_manager_or_a_system_account(known_accounts: list[str],
                                                                              data: st.DataObject) -> None:
    try:
        config = ManagerConfig.model_validate({
            "endpoint_id": "e", "service_address": "tcp://127.0.0.1:1", "service_public_key": "k",
            "manager_secret_key_file": "/k", "identity_mapping": "/m", "router_user": "mep",
            **data.draw(configs(known_accounts), label="config")})
    except ValidationError:
        return  # the manager refuses to start with this config
    policy, _ = account_rules(config, unprivileged_account(config.router_user, "router_user"))
    documents = data.draw(st.lists(st.fixed_dictionaries({
        "DATA_TYPE": st.just("expression_identity_mapping#1.0.0"),
        "mappings": st.lists(rules(known_accounts), min_size=1, max_size=4)}), min_size=1, max_size=3),
        label="documents")
    try:
        mapper = MappingRules.from_documents(documents)
    except ConfigurationError:
        return  # the manager refuses to start with this file
    try:
        decision = mapper.map(data.draw(identities(known_accounts), label="identities"))
        account = resolve_account(decision.account, policy)
    except TaskRefusedError as refused:
        assert refused.code and str(refused)
        event(f"refused: {refused.code}")
        return
    event("allowed")
    router = pwd.getpwnam("mep")
    assert account.uid != 0 and account.gid != 0 and 0 not in account.groups
    assert account.uid not in (router.pw_uid,), "never the manager's own accounts"
    assert account.uid >= config.min_uid
    assert account.name not in config.deny_users
    assert account.shell not in config.disabled_shells
    assert pwd.getpwnam(account.name).pw_uid == account.uid, "the name it mapped to, not a uid read from it"

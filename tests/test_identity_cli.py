"""``mep identity test``: the admin's dry run, run as the admin runs it (a real command, real files, real PAM)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.harness import PYTHON, ROUTER_USER
from tests.pam_services import PamService, pam_service_fixture  # noqa: F401 - the pam_service fixture

pytestmark = pytest.mark.root  # the files must be root's, as the manager demands

EXAMPLES = Path(__file__).resolve().parent.parent / "identity_maps"
ENDPOINT_ID = "0d9e8f7a-6b5c-4d3e-8f2a-1b0c9d8e7f6a"
DOMAIN_STRIP = {"source": "{username}", "match": r"(.*)@example\.org", "output": "{0}"}
EMAIL_RULE = {"source": "{email}", "match": r"(.*)@mail\.example\.org", "output": "{0}"}


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        return self.stdout.splitlines()[-1] if self.stdout else ""


@pytest.fixture
def admin_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="mep-idtest-", dir="/var/tmp"))
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def mapping(directory: Path, *documents: object, name: str = "map.json") -> Path:
    path = directory / name
    path.write_text(json.dumps(list(documents)))
    path.chmod(0o644)
    return path


def expression(*rules: dict) -> dict:
    return {"DATA_TYPE": "expression_identity_mapping#1.0.0", "mappings": list(rules)}


def identity_test(config: Path, identity: str, *options: str) -> Run:
    result = subprocess.run([PYTHON, "-m", "mep", "identity", "test", "--config", str(config), *options, identity],
                            capture_output=True, text=True, cwd="/")
    assert "Traceback" not in result.stdout + result.stderr
    return Run(result.returncode, result.stdout, result.stderr)


def manager_config(directory: Path, mapping_path: Path, **settings: object) -> Path:
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({
        "endpoint_id": ENDPOINT_ID, "service_address": "tcp://127.0.0.1:5790", "service_public_key": "k" * 40,
        "manager_secret_key_file": str(directory / "manager.key"), "identity_mapping": str(mapping_path),
        "router_user": ROUTER_USER, **settings}))
    path.chmod(0o644)
    return path


# --- mapping only ------------------------------------------------------------------------------------


def test_mapped_username_prints_the_rule_and_the_account_last(admin_dir: Path) -> None:
    physics = {"source": "{username}", "match": r"(.*)@physics\.example\.org", "output": "{0}"}
    run = identity_test(mapping(admin_dir, expression(physics, DOMAIN_STRIP)), "alice@example.org")
    assert run.code == 0 and run.stderr == ""
    assert run.last_line == "alice"
    assert f"matched: {admin_dir / 'map.json'}: document 0, mapping 1" in run.stdout


def test_identity_resource_in_json(admin_dir: Path) -> None:
    resource = {"id": "8e2f6a3c-7d1b-4c5e-9f0a-3b2d1c4e5f6a", "username": "jd@idp.example.org",
                "email": "jdoe@mail.example.org", "name": "J. Doe", "identity_provider": "x", "organization": "y",
                "status": "used"}
    run = identity_test(mapping(admin_dir, expression(EMAIL_RULE)), json.dumps(resource))
    assert (run.code, run.last_line) == (0, "jdoe")
    assert f"identity {resource['id']}" in run.stdout


def test_identity_set_in_json_is_evaluated_as_a_set(admin_dir: Path) -> None:
    config = mapping(admin_dir, expression(DOMAIN_STRIP))
    linked = [{"id": "a1", "username": "orcid-id@orcid.org"}, {"id": "a2", "username": "alice@example.org"}]
    assert identity_test(config, json.dumps(linked)).last_line == "alice"
    ambiguous = [{"id": "b1", "username": "alice@example.org"}, {"id": "b2", "username": "bob@example.org"}]
    run = identity_test(config, json.dumps(ambiguous))
    assert run.code == 1 and "ambiguous" in run.stderr and run.stdout.splitlines()[-1].startswith("identity:")
    unused = [{"id": "c1", "username": "alice@example.org", "status": "unused"}]
    assert identity_test(config, json.dumps(unused)).code == 1


@pytest.mark.parametrize(("identity", "words"), [
    ('{"id": "c1", "username": "carol@elsewhere.org", "email": "carol@elsewhere.org"}',
     "no local account is mapped to carol@elsewhere.org"),
    ('{"id": "d1", "username": "dave@example.net"}', "the identity mapping on this endpoint failed for dave"),
], ids=["unmapped", "mapping error"])
def test_no_mapping_or_a_mapping_error_is_exit_1(admin_dir: Path, identity: str, words: str) -> None:
    config = mapping(admin_dir, expression(DOMAIN_STRIP), expression({**EMAIL_RULE, "match": r"(.*)@example\.net"}))
    run = identity_test(config, identity)
    assert run.code == 1 and words in run.stderr
    assert "detail: " in run.stderr, "the admin sees which rule and why"
    assert all(line.startswith("identity:") for line in run.stdout.splitlines())


@pytest.mark.parametrize(("content", "words"), [
    ("[{", "not valid JSON"),
    (json.dumps([expression({"source": "{username}", "match": r"\d+", "output": "x"})]),
     "document 0, mapping 0: invalid match expression"),
    (json.dumps([{"DATA_TYPE": "nope"}]), "document 0: unsupported DATA_TYPE 'nope'"),
    (json.dumps([{"DATA_TYPE": "external_identity_mapping#1.0.0", "command": ["/nonexistent/prog"]}]),
     "/nonexistent"),
], ids=["bad JSON", "bad expression", "unknown DATA_TYPE", "missing program"])
def test_invalid_configuration_is_exit_2(admin_dir: Path, content: str, words: str) -> None:
    path = admin_dir / "map.json"
    path.write_text(content)
    run = identity_test(path, "alice@example.org")
    assert run.code == 2 and words in run.stderr and run.stdout == ""


def test_unprotected_or_missing_file_is_exit_2(admin_dir: Path) -> None:
    config = mapping(admin_dir, expression(DOMAIN_STRIP))
    config.chmod(0o666)
    run = identity_test(config, "alice@example.org")
    assert run.code == 2 and "writable by group or others" in run.stderr
    assert identity_test(admin_dir / "missing.json", "alice@example.org").code == 2


def test_invalid_manager_config_is_exit_2(admin_dir: Path) -> None:
    config = manager_config(admin_dir, mapping(admin_dir, expression(DOMAIN_STRIP)), min_uid="many")
    run = identity_test(config, "alice@example.org")
    assert run.code == 2 and "min_uid" in run.stderr


def test_malformed_identity_argument_is_a_usage_error(admin_dir: Path) -> None:
    run = identity_test(mapping(admin_dir, expression(DOMAIN_STRIP)), '{"username": "no id"}')
    assert run.code == 2 and '"id"' in run.stderr


@pytest.mark.parametrize(("name", "identity", "account"), [
    ("example-domain-strip.json", "alice@example.org", "alice"),
    ("example-domain-strip.json", "Bob@PHYSICS.example.edu", "Bob"),
    ("example-id-table.json", '{"id": "c7e2f4a9-1b3d-4e5f-8a6b-9c0d1e2f3a4b", "username": "a@orcid.org"}', "alice"),
    ("example-id-table.json", "dave@example.org", "projacct"),
    ("example-email.json", '{"id": "e1", "username": "x", "email": "Jane.Doe@chem.example.edu"}', "Jane_Doe"),
    ("example-email.json", '{"id": "e2", "username": "x", "email": "kim@chem.example.edu"}', "kim"),
])
def test_shipped_examples_work(admin_dir: Path, name: str, identity: str, account: str) -> None:
    shutil.copy(EXAMPLES / name, admin_dir / name)
    run = identity_test(admin_dir / name, identity)
    assert (run.code, run.last_line) == (0, account), run.stderr


# --- a manager's config: its mapping, endpoint, account policy and PAM ---------------------------------


def test_manager_config_gives_external_programs_its_endpoint_id(admin_dir: Path) -> None:
    program = admin_dir / "echo_endpoint"
    program.write_text(textwrap.dedent("""\
        #!/usr/bin/python3
        import json, sys
        request = json.load(sys.stdin)
        print(json.dumps({"result": [{"id": request["identities"][0]["id"],
                                      "output": sys.argv[sys.argv.index("-s") + 1]}]}))
    """))
    program.chmod(0o755)
    documents = mapping(admin_dir, {"DATA_TYPE": "external_identity_mapping#1.0.0", "command": [str(program)]})
    run = identity_test(manager_config(admin_dir, documents), "alice@example.org")
    assert (run.code, run.last_line) == (0, ENDPOINT_ID)
    assert f"document 0, program {program}" in run.stdout
    assert identity_test(documents, "alice@example.org").last_line == "11111111-1111-1111-1111-111111111111"


MakeAccount = Callable[..., object]


def test_check_account_applies_the_account_policy(admin_dir: Path, account_factory: MakeAccount) -> None:
    normal, nologin = account_factory("mepcli"), account_factory("mepclinologin", shell="/usr/sbin/nologin")
    config = manager_config(admin_dir, mapping(admin_dir, expression(DOMAIN_STRIP)))
    run = identity_test(config, f"{normal.pw_name}@example.org", "--check-account")
    assert (run.code, run.last_line) == (0, normal.pw_name)
    assert f"account policy: allowed (uid {normal.pw_uid}" in run.stdout
    assert identity_test(config, f"{normal.pw_name}@example.org").last_line == normal.pw_name
    refused = identity_test(config, f"{nologin.pw_name}@example.org", "--check-account")
    assert refused.code == 1 and "is disabled (its login shell is /usr/sbin/nologin)" in refused.stderr
    assert "matched: " in refused.stdout, "which rule mapped it, even though the account is refused"
    assert identity_test(config, f"{nologin.pw_name}@example.org").code == 0, "without the flag: mapping only"
    for refused_name in ("root", ROUTER_USER):
        run = identity_test(config, f"{refused_name}@example.org", "--check-account")
        assert run.code == 1 and refused_name in run.stderr
    strict = manager_config(admin_dir, admin_dir / "map.json", deny_users=[normal.pw_name])
    assert identity_test(strict, f"{normal.pw_name}@example.org", "--check-account").code == 1


def test_check_account_runs_pam_account_management(admin_dir: Path, account_factory: MakeAccount,
                                                   pam_service: PamService) -> None:
    allowed, denied = account_factory("mepclipam"), account_factory("mepclipamno")
    pam_service.deny(denied.pw_name)
    config = manager_config(admin_dir, mapping(admin_dir, expression(DOMAIN_STRIP)),
                            pam={"enable": True, "service": pam_service.name})
    run = identity_test(config, f"{allowed.pw_name}@example.org", "--check-account")
    assert (run.code, run.last_line) == (0, allowed.pw_name)
    assert f"PAM account management (service {pam_service.name}): allowed" in run.stdout
    refused = identity_test(config, f"{denied.pw_name}@example.org", "--check-account")
    assert refused.code == 1 and "refused by this system's account checks (PAM)" in refused.stderr
    assert "pam_acct_mgmt failed" in refused.stderr
    assert pam_service.events(allowed.pw_name) == [], "account management only: no session"
    missing = manager_config(admin_dir, admin_dir / "map.json", pam={"enable": True, "service": "mep-no-such"})
    run = identity_test(missing, f"{allowed.pw_name}@example.org", "--check-account")
    assert run.code == 2 and "/etc/pam.d/mep-no-such does not exist" in run.stderr

"""External identity-mapping programs: the protocol as the reference runs it, and every way a program can fail.

Each program is a real executable in a root-owned directory. Where a program
answers validly, mep's decision is compared with what
``globus_identity_mapping``'s ``ExternalIdentityMapping`` makes of the same
program.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from globus_identity_mapping.errors import IdentityMappingError, InvalidMappingError
from globus_identity_mapping.mappers.external_program import ExternalIdentityMapping

from mep.errors import ConfigurationError, MappingError, UnmappedIdentityError
from mep.mapping.engine import MappingRules
from mep.mapping.external import POSIX_CONNECTOR_ID, PROGRAM_ENVIRONMENT
from mep.root.identity import MappingContext

pytestmark = pytest.mark.root  # the programs must be root-owned, as mep demands

ENDPOINT_ID = "6d0b4c6e-3a9f-4c1e-9b7d-2f5a8e1c4b3a"
EXTERNAL = "external_identity_mapping#1.0.0"
EXPRESSION = "expression_identity_mapping#1.0.0"
EXAMPLES = Path(__file__).resolve().parent.parent / "identity_maps"
PYTHON3 = "/usr/bin/python3"

Program = Callable[..., str]


def identity(username: str, *, status: str = "used", **extra: object) -> dict[str, object]:
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, username)), "username": username, "status": status, **extra}


ALICE = identity("alice@example.org")
ALICE_ORCID = identity("0000-0001@orcid.org")
ALICE_OLD = identity("alice@old.example.org", status="unused")


@pytest.fixture
def program_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="mep-mappers-", dir="/var/tmp"))
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def program(program_dir: Path) -> Program:
    """Write a Python program (its body after ``import json, os, sys``) and return its path."""

    def write(body: str, name: str = "mapper") -> str:
        path = program_dir / name
        path.write_text(f"#!{PYTHON3}\nimport json, os, sys, time\n" + textwrap.dedent(body))
        path.chmod(0o755)
        return str(path)

    return write


# A program that answers like a well-behaved mapper: every identity of the input, account = username's local part.
ANSWER_ALL = """
request = json.load(sys.stdin)
result = [{"id": i["id"], "output": i["username"].split("@")[0]} for i in request["identities"]]
print(json.dumps({"DATA_TYPE": "identity_mapping_output#1.0.0", "result": result}))
"""


def external(command: list[str]) -> dict[str, object]:
    return {"DATA_TYPE": EXTERNAL, "command": command}


def mapper(*documents: dict[str, object], timeout: float = 5.0) -> MappingRules:
    return MappingRules.from_documents(
        list(documents), source="map.json",
        context=MappingContext(endpoint_id=ENDPOINT_ID, external_timeout=timeout),
    )


def reference(command: list[str], identities: list[dict[str, object]]) -> set[str]:
    """The accounts the reference gets from the same program (set semantics with -a for several identities)."""
    ref = ExternalIdentityMapping(*command, connector=POSIX_CONNECTOR_ID, storage_gateway=ENDPOINT_ID)
    if len(identities) == 1:
        answer = ref.map_identity(identities[0])
        return {answer} if answer else set()
    return {account for mapping in ref.map_identities(identities) for accounts in mapping.values()
            for account in accounts}


def refusal(error: type[Exception], documents: list[dict[str, object]], identities: list[dict[str, object]],
            timeout: float = 5.0) -> Exception:
    with pytest.raises(error) as raised:
        mapper(*documents, timeout=timeout).map(identities)
    return raised.value


# --- the protocol ---------------------------------------------------------------------------------


def test_a_mapped_identity_agrees_with_the_reference(program: Program) -> None:
    command = [program(ANSWER_ALL)]
    decision = mapper(external(command)).map([ALICE])
    assert (decision.account, decision.identity_id) == ("alice", ALICE["id"])
    assert (decision.document_index, decision.mapping_index, decision.program) == (0, None, command[0])
    assert decision.rule() == f"document 0, program {command[0]}"
    assert reference(command, [ALICE]) == {"alice"}


def test_caller_arguments_are_appended_as_the_reference_does(program: Program) -> None:
    echo_argv = """
    request = json.load(sys.stdin)
    print(json.dumps({"result": [{"id": request["identities"][0]["id"], "output": json.dumps(sys.argv[1:])}]}))
    """
    command = [program(echo_argv), "--table", "$(touch /tmp/pwned); a b", "7"]
    single = json.loads(mapper(external(command)).map([ALICE]).account)
    assert single == command[1:] + ["-c", POSIX_CONNECTOR_ID, "-s", ENDPOINT_ID]
    whole_set = json.loads(mapper(external(command)).map([ALICE, ALICE_ORCID]).account)
    assert whole_set == command[1:] + ["-c", POSIX_CONNECTOR_ID, "-s", ENDPOINT_ID, "-a"]
    assert not Path("/tmp/pwned").exists(), "no shell ever sees the arguments"


def test_numbers_in_the_command_become_arguments_as_in_the_reference(program: Program) -> None:
    echo_argv = """
    request = json.load(sys.stdin)
    print(json.dumps({"result": [{"id": request["identities"][0]["id"], "output": " ".join(sys.argv[1:3])}]}))
    """
    assert mapper(external([program(echo_argv), 7, 2.5])).map([ALICE]).account == "7 2.5"


def test_program_runs_in_a_clean_environment(program: Program, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent.so")
    monkeypatch.setenv("MEP_SECRET", "do not leak")
    report = """
    request = json.load(sys.stdin)
    mask = os.umask(0)
    fds = {int(fd): os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    seen = {"env": dict(os.environ), "cwd": os.getcwd(), "umask": mask, "sid": os.getsid(0) == os.getpid(),
            "fds": sorted(fd for fd, target in fds.items() if target != os.path.realpath(__file__))}
    print(json.dumps({"result": [{"id": request["identities"][0]["id"], "output": json.dumps(seen)}]}))
    """
    seen = json.loads(mapper(external([program(report)])).map([ALICE]).account)
    assert seen["env"] == PROGRAM_ENVIRONMENT
    assert (seen["cwd"], seen["umask"], seen["sid"]) == ("/", 0o077, True)
    # only stdio (and listdir's own fd), besides the program's own, which was executed (its interpreter reads it)
    assert seen["fds"][:3] == [0, 1, 2] and len(seen["fds"]) <= 4, seen["fds"]


def test_program_gets_the_identities_as_the_reference_sends_them(program: Program) -> None:
    echo_input = """
    request = json.load(sys.stdin)
    print(json.dumps({"result": [{"id": request["identities"][0]["id"], "output": json.dumps(request)}]}))
    """
    sent = json.loads(mapper(external([program(echo_input)])).map([ALICE]).account)
    assert sent == {"DATA_TYPE": "identity_mapping_input#1.0.0", "identities": [ALICE]}


def test_only_used_and_private_identities_of_a_set_are_handed_over(program: Program) -> None:
    count = """
    request = json.load(sys.stdin)
    ids = [i["id"] for i in request["identities"]]
    print(json.dumps({"result": [{"id": ids[0], "output": str(len(ids))}]}))
    """
    private = identity("alice@private.example.org", status="private")
    assert mapper(external([program(count)])).map([ALICE, ALICE_OLD, private]).account == "2"


def test_agreeing_set_maps_and_disagreeing_set_is_ambiguous(program: Program) -> None:
    same_account = """
    request = json.load(sys.stdin)
    print(json.dumps({"result": [{"id": i["id"], "output": "alice"} for i in request["identities"]]}))
    """
    command = [program(same_account, "same")]
    assert mapper(external(command)).map([ALICE, ALICE_ORCID]).account == "alice"
    assert reference(command, [ALICE, ALICE_ORCID]) == {"alice"}
    different = [program(ANSWER_ALL, "different")]
    error = refusal(MappingError, [external(different)], [ALICE, ALICE_ORCID])
    assert "ambiguous" in str(error)
    assert reference(different, [ALICE, ALICE_ORCID]) == {"alice", "0000-0001"}, "the reference sees both too"


def test_without_a_set_only_the_first_result_counts_as_in_the_reference(program: Program) -> None:
    two_answers = """
    request = json.load(sys.stdin)
    me = request["identities"][0]["id"]
    print(json.dumps({"result": [{"id": me, "output": "first"}, {"id": me, "output": "second"}]}))
    """
    command = [program(two_answers)]
    assert mapper(external(command)).map([ALICE]).account == "first"
    assert reference(command, [ALICE]) == {"first"}


def test_uuid_ids_are_compared_as_uuids(program: Program) -> None:
    upper = """
    request = json.load(sys.stdin)
    print(json.dumps({"result": [{"id": request["identities"][0]["id"].upper(), "output": "alice"}]}))
    """
    command = [program(upper)]
    decision = mapper(external(command)).map([ALICE])
    assert (decision.account, decision.identity_id) == ("alice", ALICE["id"])
    assert reference(command, [ALICE]) == {"alice"}


@pytest.mark.parametrize("body", [
    "sys.stdin.read()",
    "sys.stdin.read(); print(json.dumps({'DATA_TYPE': 'identity_mapping_output#1.0.0', 'result': []}))",
], ids=["silent", "empty result"])
def test_no_answer_is_no_mapping_and_the_next_document_decides(program: Program, body: str) -> None:
    command = [program(body)]
    domain_strip = {"DATA_TYPE": EXPRESSION,
                    "mappings": [{"source": "{username}", "match": r"(.*)@example\.org", "output": "{0}_local"}]}
    decision = mapper(external(command), domain_strip).map([ALICE])
    assert (decision.account, decision.document_index) == ("alice_local", 1)
    assert reference(command, [ALICE]) == set()
    assert "no local account is mapped" in str(refusal(UnmappedIdentityError, [external(command)], [ALICE]))


def test_an_empty_account_name_is_no_mapping_never_an_account(program: Program) -> None:
    empty = f"print(json.dumps({{'result': [{{'id': '{ALICE['id']}', 'output': ''}}]}}))"
    domain_strip = {"DATA_TYPE": EXPRESSION,
                    "mappings": [{"source": "{username}", "match": r"(.*)@example\.org", "output": "{0}_local"}]}
    decision = mapper(external([program(empty)]), domain_strip).map([ALICE])
    assert (decision.account, decision.document_index) == ("alice_local", 1)
    assert "no local account is mapped" in str(refusal(UnmappedIdentityError, [external([program(empty)])], [ALICE]))


def test_program_does_not_have_to_read_its_input(program: Program) -> None:
    ignores_stdin = f"""
    print(json.dumps({{"result": [{{"id": "{ALICE['id']}", "output": "alice"}}]}}))
    """
    assert mapper(external([program(ignores_stdin)])).map([ALICE]).account == "alice"


def test_a_lot_of_stderr_is_drained_and_logged_in_part(program: Program, caplog: pytest.LogCaptureFixture) -> None:
    noisy = ANSWER_ALL + "\nsys.stderr.write('warning: noisy\\n' * 100000)\n"
    with caplog.at_level(logging.INFO, logger="mep.mapping.external"):
        assert mapper(external([program(noisy)])).map([ALICE]).account == "alice"
    logged = [r.getMessage() for r in caplog.records if r.name == "mep.mapping.external"]
    assert len(logged) == 1 and "warning: noisy" in logged[0] and len(logged[0]) < 5000


# --- failing, hanging, garbage-printing and lying programs: all fail closed -------------------------


@dataclass(frozen=True)
class Broken:
    name: str
    body: str
    detail: str  # in the admin's detail


BROKEN_PROGRAMS = [
    Broken("exit status", "sys.stdin.read(); sys.stderr.write('no such table\\n'); sys.exit(3)",
           "exited with status 3: no such table"),
    Broken("killed by a signal", "os.kill(os.getpid(), 9)", "was killed by signal 9"),
    Broken("garbage", "sys.stdin.read(); print('alice')", "printed something that is not JSON"),
    Broken("blank line", "sys.stdin.read(); print('  ')", "printed something that is not JSON"),
    Broken("binary garbage", "sys.stdout.buffer.write(b'\\xff\\xfe{')", "not JSON"),
    Broken("a JSON list", "print('[]')", "without a 'result' list"),
    Broken("no result", "print(json.dumps({'DATA_TYPE': 'identity_mapping_output#1.0.0'}))",
           "without a 'result' list"),
    Broken("unknown keys", "print(json.dumps({'result': [], 'note': 'x'}))", "unknown keys ['note']"),
    Broken("wrong DATA_TYPE", "print(json.dumps({'DATA_TYPE': 'identity_mapping_input#1.0.0', 'result': []}))",
           "expected 'identity_mapping_output#1.0.0'"),
    Broken("result not an object", "print(json.dumps({'result': ['alice']}))", "each result must be"),
    Broken("output not a string", f"print(json.dumps({{'result': [{{'id': '{ALICE['id']}', 'output': 7}}]}}))",
           "each result must be"),
    Broken("extra result key",
           f"print(json.dumps({{'result': [{{'id': '{ALICE['id']}', 'output': 'a', 'uid': 0}}]}}))",
           "each result must be"),
    Broken("foreign id", "print(json.dumps({'result': [{'id': '00000000-0000-4000-8000-000000000000', "
           "'output': 'root'}]}))", "which it was not asked about"),
    Broken("too much output", "sys.stdout.write('x' * 2_000_000)", "printed more than"),
    Broken("hangs", "time.sleep(60)", "did not answer within 1 s"),
    Broken("hangs after its answer", ANSWER_ALL + "\nsys.stdout.flush(); os.close(1); os.close(2); time.sleep(60)",
           "did not exit within 1 s"),
]


@pytest.mark.parametrize("broken", BROKEN_PROGRAMS, ids=lambda broken: broken.name)
def test_broken_program_is_a_mapping_error_and_never_falls_through(program: Program, broken: Broken) -> None:
    catch_all = {"DATA_TYPE": EXPRESSION, "mappings": [{"source": "{username}", "match": ".*", "output": "nobody"}]}
    error = refusal(MappingError, [external([program(broken.body)]), catch_all], [ALICE], timeout=1)
    assert "the identity mapping on this endpoint failed for alice@example.org" in str(error)
    assert "Traceback" not in str(error)
    assert error.admin_detail.startswith("map.json: document 0, program ")
    assert broken.detail in error.admin_detail


@pytest.mark.parametrize("body", [
    "print(json.dumps({'result': [{'id': '00000000-0000-4000-8000-000000000000', 'output': 'root'}]}))",
    "sys.exit(2)",
    "print('alice')",
    "print()",
], ids=["foreign id", "exit status", "garbage", "blank line"])
def test_the_reference_also_refuses_what_mep_refuses(program: Program, body: str) -> None:
    with pytest.raises((IdentityMappingError, InvalidMappingError)):
        reference([program(body)], [ALICE])


def test_a_hung_program_and_what_it_started_are_killed(program: Program, program_dir: Path) -> None:
    pid_file = program_dir / "grandchild.pid"
    leaves_a_child = f"""
    import subprocess
    child = subprocess.Popen(["sleep", "300"])
    open({str(pid_file)!r}, "w").write(str(child.pid))
    time.sleep(60)
    """
    refusal(MappingError, [external([program(leaves_a_child)])], [ALICE], timeout=2)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.05)
    assert not _alive(grandchild), "the program's whole process group must die with it"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stderr_of_a_failing_program_goes_to_the_log(program: Program, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mep.mapping.external"):
        refusal(MappingError, [external([program("sys.stderr.write('ldap down\\x1b[31m\\n'); sys.exit(1)")])],
                [ALICE])
    (record,) = [r for r in caplog.records if r.name == "mep.mapping.external"]
    assert record.levelno == logging.WARNING
    assert "ldap down\\x1b[31m\\n" in record.getMessage(), "control characters are escaped in the log"


# --- who may own the program -------------------------------------------------------------------------


def test_program_others_can_write_is_refused_at_load(program: Program) -> None:
    path = program(ANSWER_ALL)
    os.chmod(path, 0o775)
    with pytest.raises(ConfigurationError, match="writable by group or others"):
        mapper(external([path]))


def test_program_owned_by_another_account_is_refused_at_load(program: Program) -> None:
    path = program(ANSWER_ALL)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigurationError, match="owned by uid 65534"):
        mapper(external([path]))


def test_program_that_is_not_executable_is_refused_at_load(program: Program) -> None:
    path = program(ANSWER_ALL)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigurationError, match="not executable"):
        mapper(external([path]))


def test_file_named_in_the_arguments_must_be_protected_too(program: Program, program_dir: Path) -> None:
    table = program_dir / "accounts.csv"
    table.write_text("identity,account\n")
    table.chmod(0o666)
    with pytest.raises(ConfigurationError, match="accounts.csv: it is writable by group or others"):
        mapper(external([program(ANSWER_ALL), "--csv", str(table)]))


def test_program_made_writable_after_loading_is_refused_when_run(program: Program) -> None:
    path = program(ANSWER_ALL)
    loaded = mapper(external([path]))
    os.chmod(path, 0o777)
    with pytest.raises(MappingError) as raised:
        loaded.map([ALICE])
    assert "writable by group or others" in raised.value.admin_detail


def test_program_that_vanished_is_refused_when_run(program: Program) -> None:
    path = program(ANSWER_ALL)
    loaded = mapper(external([path]))
    os.unlink(path)
    with pytest.raises(MappingError) as raised:
        loaded.map([ALICE])
    assert "No such file or directory" in raised.value.admin_detail


def test_program_symlinked_from_a_protected_place_is_checked_where_it_points(program: Program,
                                                                              program_dir: Path) -> None:
    target = Path(program(ANSWER_ALL))
    link = program_dir / "link"
    link.symlink_to(target)
    assert mapper(external([str(link)])).map([ALICE]).account == "alice"
    target.chmod(0o777)
    with pytest.raises(ConfigurationError, match="writable by group or others"):
        mapper(external([str(link)]))


# --- the shipped CSV example ---------------------------------------------------------------------------


@pytest.fixture
def csv_mapper(program_dir: Path) -> tuple[str, Path]:
    script = program_dir / "csv_mapper.py"
    shutil.copy(EXAMPLES / "csv_mapper.py", script)
    script.chmod(0o755)
    table = program_dir / "accounts.csv"
    shutil.copy(EXAMPLES / "example-accounts.csv", table)
    table.chmod(0o644)
    return str(script), table


def example_document(name: str, script: str, table: Path) -> object:
    """A shipped example with its program and table moved to where this test installed them."""
    text = (EXAMPLES / name).read_text()
    return json.loads(text.replace("/usr/local/libexec/mep/csv_mapper.py", script)
                      .replace("/etc/mep/accounts.csv", str(table)))


def test_csv_example_maps_by_username_and_by_id(csv_mapper: tuple[str, Path]) -> None:
    script, table = csv_mapper
    loaded = MappingRules.from_documents(example_document("example-external-csv.json", script, table),
                                           context=MappingContext(endpoint_id=ENDPOINT_ID))
    assert loaded.map([identity("Erin@Partner.Example.NET")]).account == "erin"
    by_id = {"id": "9c2a7e4d-6f1b-4a3c-8e5d-2b7f9a1c0d3e", "username": "pipeline@clients.auth.globus.org",
             "status": "used"}
    assert loaded.map([by_id]).account == "svc_pipeline"
    orcid = identity("0000-0002-1825-0097@orcid.org")
    assert loaded.map([identity("someone@else.org"), orcid]).account == "jcarberry"
    with pytest.raises(UnmappedIdentityError):
        loaded.map([identity("stranger@else.org")])
    assert reference([script, "--csv", str(table)], [identity("erin@partner.example.net")]) == {"erin"}


def test_csv_example_with_a_broken_table_refuses(csv_mapper: tuple[str, Path]) -> None:
    script, table = csv_mapper
    table.write_text("who,account\nerin@partner.example.net,erin\n")
    loaded = MappingRules.from_documents(example_document("example-external-csv.json", script, table))
    with pytest.raises(MappingError) as raised:
        loaded.map([identity("erin@partner.example.net")])
    assert "must name the columns 'identity' and 'account'" in raised.value.admin_detail


def test_chained_example_tries_documents_in_order(csv_mapper: tuple[str, Path]) -> None:
    script, table = csv_mapper
    loaded = MappingRules.from_documents(example_document("example-chained.json", script, table))
    service = {"id": "b34bb069-3b68-4d38-b4e6-bc1e4fc95332", "username": "svc@example.org", "status": "used"}
    decision = loaded.map([service])
    assert (decision.account, decision.document_index) == ("svc_pipeline", 0), "the id table wins over the domain"
    assert (loaded.map([identity("carol@example.org")]).account, loaded.map([identity("carol@example.org")])
            .document_index) == ("carol", 1)
    collaborator = loaded.map([identity("erin@partner.example.net")])
    assert (collaborator.account, collaborator.document_index, collaborator.program) == ("erin", 2, script)


def test_timeout_is_the_documented_default() -> None:
    assert ExternalIdentityMapping.mapping_timeout_s == MappingContext().external_timeout == 5


def test_signal_names_are_reported_by_number(program: Program) -> None:
    error = refusal(MappingError, [external([program(f"os.kill(os.getpid(), {int(signal.SIGTERM)})")])], [ALICE])
    assert f"killed by signal {int(signal.SIGTERM)}" in error.admin_detail

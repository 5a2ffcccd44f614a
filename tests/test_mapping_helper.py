"""Root's side of identity mapping: the file is evaluated by ``python -I -m mep.mapping`` as an unprivileged account.

The rules themselves are tested in-process against the engine (``test_identity_mapping``,
``test_external_mapper``); here real helper processes run: as ``nobody`` on a file only root can
read, with error types and admin details carried across, and helpers that lie, crash or hang are
refused (fail closed), never believed; one helper serves every decision of a loaded file.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mep.errors import ConfigurationError, MappingError, UnmappedIdentityError
from mep.root import identity as root_identity
from mep.root.identity import HelperReply, IdentityMapper, MappingContext
from mep.root.mapping_file import MappingFile
from mep.protocol.messages import SpawnRefused
from tests.harness import children_of, wait_for
from tests.spawner_peer import SpawnerPeer, identity_of, spawner_peer

pytestmark = pytest.mark.root

DOMAIN_STRIP = {"DATA_TYPE": "expression_identity_mapping#1.0.0",
                "mappings": [{"source": "{username}", "match": "(.*)@example\\.org", "output": "{0}"}]}
ALICE = {"id": str(uuid.uuid4()), "username": "alice@example.org", "status": "used"}


def mapper_of(documents: object, *, source: str = "<memory>", context: MappingContext | None = None) -> IdentityMapper:
    """A mapper for parsed JSON (a list of mapping documents, or one), its helper started."""
    return IdentityMapper(json.dumps(documents).encode(), source, context or MappingContext())


@pytest.fixture
def root_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="mep-mapping-helper-", dir="/var/tmp"))  # root's, 0700
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_the_helper_maps_as_nobody_a_file_only_root_can_read(root_dir: Path) -> None:
    path = root_dir / "identity_mapping.json"
    path.write_text(json.dumps([DOMAIN_STRIP]))
    path.chmod(0o600)
    nobody = MappingContext(run_as="nobody")
    decision = IdentityMapper.from_file(path, trusted_owner_uids=frozenset({0}), context=nobody).map([ALICE])
    assert (decision.account, decision.identity_id, decision.rule()) == ("alice", ALICE["id"], "document 0, mapping 0")


def test_the_helper_is_not_dumpable_and_has_no_groups(root_dir: Path) -> None:
    """The program the helper runs sees its parent's /proc files owned by root: the helper made itself undumpable."""
    program = root_dir / "inspect"
    program.write_text(f"#!{shutil.which('python3', path='/usr/bin')}\n" + textwrap.dedent("""\
        import json, os, sys
        request = json.load(sys.stdin)
        parent = os.getppid()
        status = dict(line.split(":", 1) for line in open(f"/proc/{parent}/status"))
        seen = f"{os.stat(f'/proc/{parent}/mem').st_uid}/{status['Uid'].split()[0]}/{status['Groups'].strip()}"
        print(json.dumps({"result": [{"id": i["id"], "output": seen} for i in request["identities"]]}))
        """))
    program.chmod(0o755)
    root_dir.chmod(0o755)  # nobody runs the program from here
    external = {"DATA_TYPE": "external_identity_mapping#1.0.0", "command": [str(program)]}
    mapper = mapper_of([external], context=MappingContext(run_as="nobody"))
    nobody = pwd.getpwnam("nobody").pw_uid
    assert mapper.map([ALICE]).account == f"0/{nobody}/"  # /proc/<helper>/mem is root's: not dumpable


def test_refusals_keep_their_type_and_admin_detail_across_the_process() -> None:
    mapper = mapper_of([DOMAIN_STRIP], source="map.json", context=MappingContext(run_as="nobody"))
    with pytest.raises(UnmappedIdentityError) as unmapped:
        mapper.map([{**ALICE, "username": "alice@elsewhere.org"}])
    assert "no local account is mapped to alice@elsewhere.org" in str(unmapped.value)
    assert unmapped.value.admin_detail.startswith("map.json: no document maps any of")
    with pytest.raises(MappingError, match="ambiguous"):
        mapper.map([ALICE, {"id": str(uuid.uuid4()), "username": "bob@example.org", "status": "used"}])


def test_a_broken_file_is_refused_when_loaded() -> None:
    with pytest.raises(ConfigurationError, match="map.json: document 0: unsupported DATA_TYPE"):
        mapper_of([{"DATA_TYPE": "nope"}], source="map.json")


def test_a_missing_or_privileged_identity_mapping_user_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="'mep-no-such-account' does not exist"):
        mapper_of([DOMAIN_STRIP], context=MappingContext(run_as="mep-no-such-account"))
    with pytest.raises(ConfigurationError, match="'root' is root or in group 0"):
        mapper_of([DOMAIN_STRIP], context=MappingContext(run_as="root"))


def stand_in_helper(directory: Path, after_loading: str) -> str:
    """A program standing in for the interpreter: it answers the load as a real helper would, then runs
    ``after_loading`` (Python, with ``channel`` the socket at fd 3 and ``frame(data)`` to send one answer)."""
    fake = directory / "python"
    fake.write_text(f"#!{shutil.which('python3', path='/usr/bin')}\n" + textwrap.dedent("""\
        import socket, sys, time
        sys.stdin.read()
        channel = socket.socket(fileno=3)
        def frame(data): channel.send(data)
        frame(b"{}")
        """) + textwrap.dedent(after_loading))
    fake.chmod(0o755)
    return str(fake)


def status_of(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict; empty once the process is gone (reaped)."""
    try:
        return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except FileNotFoundError:
        return {}


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        ({"decision": {"account": "root", "identity_id": "someone-else", "document_index": 0, "mapping_index": 0}},
         "naming no identity it was asked about"),
        ({"decision": {"account": "", "identity_id": ALICE["id"], "document_index": 0, "mapping_index": 0}},
         "Expected `str` of length >= 1"),
        ({"decision": None, "refusal": None, "extra": 1}, "Object contains unknown field `extra`"),
        ({}, "naming no identity it was asked about"),
        ("not json", "JSON is malformed"),
        (None, "ended without answering"),  # exits: no answer at all
    ],
    ids=["another identity", "empty account", "unknown field", "no decision", "garbage", "crash"],
)
def test_a_helper_that_lies_or_crashes_is_refused(root_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                  answer: object, detail: str) -> None:
    """A compromised helper (here: a program standing in for the interpreter) can't make root map anyone."""
    reply = answer if isinstance(answer, str) else json.dumps(answer)
    monkeypatch.setattr(sys, "executable", stand_in_helper(root_dir, "channel.recv(65536)\n" + (
        "raise SystemExit(1)" if answer is None else f"frame({reply!r}.encode())\ntime.sleep(600)")))
    mapper = mapper_of([DOMAIN_STRIP], source="map.json")
    liar = mapper.helper_pid()
    assert liar is not None
    with pytest.raises(MappingError) as refused:
        mapper.map([ALICE])
    assert "the identity mapping on this endpoint failed" in str(refused.value)
    assert detail in refused.value.admin_detail
    assert mapper.helper_pid() is None and not status_of(liar)  # a helper that lied is ended, never asked again


def test_many_decisions_are_served_by_one_unprivileged_helper() -> None:
    """Concurrent requests (the spawner's workers) are answered in turn by the one helper the load started."""
    with closing(mapper_of([DOMAIN_STRIP], context=MappingContext(run_as="nobody"))) as mapper:
        helper = mapper.helper_pid()
        assert helper is not None
        status = status_of(helper)
        assert (status["Uid"].split()[0], status["PPid"], status["Groups"].strip()) == (
            str(pwd.getpwnam("nobody").pw_uid), str(os.getpid()), "")
        users = [f"user{n}" for n in range(40)]
        with ThreadPoolExecutor(max_workers=8) as workers:
            accounts = list(workers.map(
                lambda user: mapper.map([{**ALICE, "username": f"{user}@example.org"}]).account, users))
        assert accounts == users
        assert mapper.helper_pid() == helper
    assert not status_of(helper)  # closing the mapping ended and reaped its helper


def test_a_hung_helper_is_killed_fails_closed_and_a_fresh_one_serves_next(
        root_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_interpreter = sys.executable
    monkeypatch.setattr(sys, "executable", stand_in_helper(root_dir, "time.sleep(600)\n"))
    mapper = mapper_of([DOMAIN_STRIP], source="map.json")
    hung = mapper.helper_pid()
    assert hung is not None
    monkeypatch.setattr(root_identity, "HELPER_REQUEST_SECONDS", 0.5)
    with pytest.raises(MappingError) as refused:
        mapper.map([ALICE])
    assert "did not answer within 0.5 s; it was killed" in refused.value.admin_detail
    assert not status_of(hung)
    monkeypatch.setattr(sys, "executable", real_interpreter)
    assert mapper.map([ALICE]).account == "alice"
    assert mapper.helper_pid() not in (None, hung)
    mapper.close()


def test_a_killed_helper_is_replaced_for_the_next_decision() -> None:
    with closing(mapper_of([DOMAIN_STRIP])) as mapper:
        killed = mapper.helper_pid()
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        while status_of(killed).get("State", "Z")[0] != "Z":  # dead, not yet reaped by us
            time.sleep(0.01)
        assert mapper.map([ALICE]).account == "alice"
        assert mapper.helper_pid() not in (None, killed)
        assert not status_of(killed)


def test_a_reload_swaps_helpers_and_a_broken_one_keeps_the_old(root_dir: Path) -> None:
    path = root_dir / "identity_mapping.json"
    path.write_text(json.dumps([DOMAIN_STRIP]))
    mapping = MappingFile(path, trusted_owner_uids=frozenset({0}), context=MappingContext(run_as="nobody"))
    first, first_helper = mapping.mapper, mapping.mapper.helper_pid()
    suffixed = {"source": "{username}", "match": "(.*)@example\\.org", "output": "{0}x"}
    path.write_text(json.dumps([{**DOMAIN_STRIP, "mappings": [suffixed]}]))
    assert mapping.reload("SIGHUP").loaded
    second_helper = mapping.mapper.helper_pid()
    assert first_helper is not None and second_helper not in (None, first_helper)
    assert not status_of(first_helper)
    assert mapping.mapper.map([ALICE]).account == "alicex"
    with pytest.raises(MappingError, match="the identity mapping on this endpoint failed"):
        first.map([ALICE])  # a request that still held the old mapping: refused, no helper restarted for it
    assert first.helper_pid() is None
    path.write_text(json.dumps([{"DATA_TYPE": "nope"}]))
    outcome = mapping.reload("SIGHUP")
    assert not outcome.loaded and "unsupported DATA_TYPE" in outcome.error
    assert mapping.mapper.helper_pid() == second_helper
    assert mapping.mapper.map([ALICE]).account == "alicex"
    mapping.mapper.close()


def test_log_lines_in_a_reply_are_bounded() -> None:
    lines = [[20, "x"]] * (root_identity.MAX_LOG_LINES + 1)
    with pytest.raises(Exception, match="length <= 50"):
        root_identity.msgspec.json.decode(json.dumps({"log": lines}), type=HelperReply)



def test_root_policy_modules_load_no_mapping_engine_or_heavy_library() -> None:
    """What root imports for mapping and account policy: mep.root alone (and the mep package itself)."""
    modules = ("identity", "mapping_file", "accounts", "shadow", "pam", "session_holder", "privdrop", "audit",
               "policy_files")
    probe = (f"import sys\nfor name in {modules!r}: __import__('mep.root.' + name)\n"
             "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-I", "-c", "import json\n" + probe], check=True,
                                       capture_output=True, text=True).stdout)
    assert [m for m in loaded if m.startswith("mep") and not m.startswith("mep.root")] == ["mep"]
    heavy = {"globus_identity_mapping", "marshmallow", "jinja2", "pydantic", "click", "yaml", "zmq"}
    assert not {m.split(".")[0] for m in loaded} & heavy


def test_a_spawner_keeps_one_helper_and_swaps_it_on_reload(router_account: str) -> None:
    """In a real spawner: decisions reuse its one helper (as nobody, its child); SIGHUP swaps it; a broken file doesn't."""
    def helpers(peer: SpawnerPeer) -> list[int]:
        return sorted(set(children_of(peer.pid, mapping_helpers=True)) - set(children_of(peer.pid)))

    def decide(peer: SpawnerPeer, username: str) -> SpawnRefused:
        submitter = identity_of(username)
        refused = peer.request(submitter, peer.signer.sign(peer.claims(submitter)))
        assert isinstance(refused, SpawnRefused), refused
        return refused

    with spawner_peer([DOMAIN_STRIP], router_user=router_account) as peer:
        (helper,) = wait_for(lambda: helpers(peer), what="the spawner's mapping helper")
        assert status_of(helper)["Uid"].split()[0] == str(pwd.getpwnam("nobody").pw_uid)
        for n in range(3):
            assert "does not exist on this host" in decide(peer, f"mep-no-such-{n}@example.org").message
            assert "no local account is mapped to" in decide(peer, f"someone{n}@elsewhere.org").message
        assert helpers(peer) == [helper]
        mapping = peer.directory / "identity_mapping.json"
        mapping.write_text(json.dumps([{"DATA_TYPE": "nope"}]))
        os.kill(peer.pid, signal.SIGHUP)
        wait_for(lambda: "is broken; keeping the previous version" in peer.log(), what="the broken reload")
        assert helpers(peer) == [helper]
        mapping.write_text(json.dumps([DOMAIN_STRIP]))
        os.kill(peer.pid, signal.SIGHUP)
        wait_for(lambda: "reloaded (SIGHUP)" in peer.log(), what="the reload")
        (replacement,) = wait_for(lambda: [pid for pid in helpers(peer) if pid != helper], what="the new helper")
        assert not status_of(helper) and helpers(peer) == [replacement]
        assert "no local account is mapped to" in decide(peer, "someone@elsewhere.org").message

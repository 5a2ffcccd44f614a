"""Root's side of identity mapping: the file is evaluated by ``python -I -m mep.mapping`` as an unprivileged account.

The rules themselves are tested in-process against the engine (``test_identity_mapping``,
``test_external_mapper``); here real helper processes run: as ``nobody`` on a file only root can
read, with error types and admin details carried across, and helpers that lie, crash or hang are
refused (fail closed), never believed.
"""

from __future__ import annotations

import json
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mep.errors import ConfigurationError, MappingError, UnmappedIdentityError
from mep.root import identity as root_identity
from mep.root.identity import HelperReply, IdentityMapper, MappingContext

pytestmark = pytest.mark.root

DOMAIN_STRIP = {"DATA_TYPE": "expression_identity_mapping#1.0.0",
                "mappings": [{"source": "{username}", "match": "(.*)@example\\.org", "output": "{0}"}]}
ALICE = {"id": str(uuid.uuid4()), "username": "alice@example.org", "status": "used"}


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
    mapper = IdentityMapper.from_documents([external], context=MappingContext(run_as="nobody"))
    nobody = pwd.getpwnam("nobody").pw_uid
    assert mapper.map([ALICE]).account == f"0/{nobody}/"  # /proc/<helper>/mem is root's: not dumpable


def test_refusals_keep_their_type_and_admin_detail_across_the_process() -> None:
    mapper = IdentityMapper.from_documents([DOMAIN_STRIP], source="map.json", context=MappingContext(run_as="nobody"))
    with pytest.raises(UnmappedIdentityError) as unmapped:
        mapper.map([{**ALICE, "username": "alice@elsewhere.org"}])
    assert "no local account is mapped to alice@elsewhere.org" in str(unmapped.value)
    assert unmapped.value.admin_detail.startswith("map.json: no document maps any of")
    with pytest.raises(MappingError, match="ambiguous"):
        mapper.map([ALICE, {"id": str(uuid.uuid4()), "username": "bob@example.org", "status": "used"}])


def test_a_broken_file_is_refused_when_loaded() -> None:
    with pytest.raises(ConfigurationError, match="map.json: document 0: unsupported DATA_TYPE"):
        IdentityMapper.from_documents([{"DATA_TYPE": "nope"}], source="map.json")


def test_a_missing_or_privileged_identity_mapping_user_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="'mep-no-such-account' does not exist"):
        IdentityMapper.from_documents([DOMAIN_STRIP], context=MappingContext(run_as="mep-no-such-account"))
    with pytest.raises(ConfigurationError, match="'root' is root or in group 0"):
        IdentityMapper.from_documents([DOMAIN_STRIP], context=MappingContext(run_as="root"))


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
        (None, "exited with status 1, its answer unusable"),  # writes nothing: no answer at all
    ],
    ids=["another identity", "empty account", "unknown field", "no decision", "garbage", "crash"],
)
def test_a_helper_that_lies_or_crashes_is_refused(root_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                  answer: object, detail: str) -> None:
    """A compromised helper (here: a program standing in for the interpreter) can't make root map anyone."""
    mapper = IdentityMapper.from_documents([DOMAIN_STRIP], source="map.json")
    fake = root_dir / "python"
    reply = answer if isinstance(answer, str) else json.dumps(answer)
    fake.write_text(f"#!{shutil.which('python3', path='/usr/bin')}\n" + textwrap.dedent(f"""\
        import os, sys
        sys.stdin.read()
        {"raise SystemExit(1)" if answer is None else f"os.write(3, {reply!r}.encode())"}
        """))
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(MappingError) as refused:
        mapper.map([ALICE])
    assert "the identity mapping on this endpoint failed" in str(refused.value)
    assert detail in refused.value.admin_detail


def test_a_helper_that_hangs_is_killed_and_refused(root_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mapper = IdentityMapper.from_documents([DOMAIN_STRIP], source="map.json")
    fake = root_dir / "python"
    fake.write_text("#!/bin/sh\nexec sleep 600\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    monkeypatch.setattr(root_identity, "HELPER_STARTUP_SECONDS", 0.5)
    with pytest.raises(MappingError) as refused:
        mapper.map([ALICE])
    assert "did not answer and exit within 0.5 s" in refused.value.admin_detail


def test_log_lines_in_a_reply_are_bounded() -> None:
    lines = [[20, "x"]] * (root_identity.MAX_LOG_LINES + 1)
    with pytest.raises(Exception, match="length <= 50"):
        root_identity.msgspec.json.decode(json.dumps({"log": lines}), type=HelperReply)



def test_root_policy_modules_load_no_mapping_engine_or_heavy_library() -> None:
    """What root imports for mapping and account policy: mep.root alone (and the package's own mep.errors)."""
    modules = ("identity", "authorize", "mapping_file", "accounts", "shadow", "pam", "session_holder", "privdrop",
               "audit", "policy_files", "interpreter")
    probe = (f"import sys\nfor name in {modules!r}: __import__('mep.root.' + name)\n"
             "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-I", "-c", "import json\n" + probe], check=True,
                                       capture_output=True, text=True).stdout)
    assert [m for m in loaded if m.startswith("mep") and not m.startswith("mep.root")] == ["mep", "mep.errors"]
    heavy = {"globus_identity_mapping", "marshmallow", "jinja2", "pydantic", "click", "yaml", "zmq"}
    assert not {m.split(".")[0] for m in loaded} & heavy

"""``mep template render``: the rendered config as YAML alone on stdout, or one error line on stderr."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mep.config.manager import shipped_templates_dir

TEMPLATES = shipped_templates_dir()


def render(template: Path, schema: Path, user_config: Any = None, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "mep", "template", "render", "--template", str(template), "--schema", str(schema)]
    if user_config is not None:
        argv += ["--user-config", user_config if isinstance(user_config, str) else json.dumps(user_config)]
    return subprocess.run([*argv, *extra], capture_output=True, text=True, cwd="/")


def shipped(name: str, user_config: Any = None, *extra: str) -> subprocess.CompletedProcess:
    return render(TEMPLATES / f"{name}.yaml.j2", TEMPLATES / f"{name}.schema.json", user_config, *extra)


def assert_one_error_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr


def test_prints_the_rendered_config_as_yaml_alone() -> None:
    result = shipped("local", {"workers": 3, "idle_timeout": 60})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert yaml.safe_load(result.stdout) == {
        "engine": {"type": "process", "workers": 3, "worker_python": None, "container": None}, "idle_timeout": 60.0,
        "large_results": {"threshold_bytes": 1024 * 1024, "directory": "~/.mep/results", "retention": 7 * 24 * 3600.0},
        "task_resources": {}}


def test_slurm_dry_run_shows_the_provider_and_its_arguments() -> None:
    result = shipped("slurm", {"partition": "batch", "walltime": "00:05:00", "max_blocks": 2})
    assert result.returncode == 0, result.stderr
    engine = yaml.safe_load(result.stdout)["engine"]
    assert engine["provider"] == {"type": "SlurmProvider", "partition": "batch", "walltime": "00:05:00",
                                  "nodes_per_block": 1, "exclusive": False}
    assert (engine["type"], engine["max_blocks"], engine["encrypted"]) == ("htex", 2, True)


def test_user_option_places_that_accounts_home() -> None:
    nobody = pwd.getpwnam("nobody")
    result = shipped("local", {"python_env": "envs/x"}, "--user", "nobody")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["engine"]["worker_python"] == f"{nobody.pw_dir}/envs/x/bin/python"


def test_default_user_is_the_caller() -> None:
    me = pwd.getpwuid(os.getuid())
    result = shipped("local", {"python_env": "envs/x"})
    assert yaml.safe_load(result.stdout)["engine"]["worker_python"] == f"{me.pw_dir}/envs/x/bin/python"


@pytest.mark.parametrize(("user_config", "words"), [
    ({"workers": 0}, ["user_endpoint_config.workers: 0 is less than the minimum of 1"]),
    ({"colour": "blue"}, ["'colour' was unexpected"]),
    ("{not json", ["--user-config is not valid JSON"]),
    ("[1, 2]", ["user_endpoint_config must be a mapping"]),
])
def test_refused_options_give_one_error_line(user_config: Any, words: list[str]) -> None:
    assert_one_error_line(shipped("local", user_config), *words)


def test_unknown_account_is_one_error_line() -> None:
    assert_one_error_line(shipped("local", {}, "--user", "no-such-account-x"), "no local account named")


def test_missing_template_file_is_one_error_line(tmp_path: Path) -> None:
    assert_one_error_line(render(tmp_path / "absent.yaml.j2", TEMPLATES / "local.schema.json"),
                          "cannot read the template", "absent.yaml.j2")


@pytest.mark.parametrize(("template", "words"), [
    ("engine:\n  type: process\n{% if %}\n", ["line 3"]),
    ("engine:\n  type: process\n  workers: {{ cores }}\n", ["line 3", "'cores' is undefined"]),
    ("engine:\n  type: htex\n  provider:\n    type: SlurmProvider\n    partitions: x\n",
     ["line 5", "engine.provider.partitions", "did you mean 'partition'"]),
    ("engine:\n  type: htex\n  encrypted: false\n  provider: {type: SlurmProvider}\n",
     ["line 3", "engine.encrypted"]),
])
def test_template_failures_name_file_and_line(tmp_path: Path, template: str, words: list[str]) -> None:
    (tmp_path / "site.yaml.j2").write_text(template)
    (tmp_path / "site.schema.json").write_text('{"type": "object"}')
    result = render(tmp_path / "site.yaml.j2", tmp_path / "site.schema.json", {})
    assert_one_error_line(result, str(tmp_path / "site.yaml.j2"), *words)

"""The shipped template catalogue: every template renders into a valid config, documents its options,
and keeps the rendering guarantees (quoted values, shell quoting, no privileged knobs, errors that say
where). The htex templates' Parsl providers are checked against the providers' real signatures.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mep.config.endpoint import HtexEngine, ProcessEngine, UserEndpointConfig
from mep.config.manager import shipped_templates_dir
from mep.config.render import TemplateRenderer
from mep.errors import ConfigInvalidError

TEMPLATES = shipped_templates_dir()
CATALOGUE = {
    "local": None,
    "slurm": "SlurmProvider",
    "torque": "TorqueProvider",
    "pbspro": "PBSProProvider",
    "lsf": "LSFProvider",
    "kubernetes": "KubernetesProvider",
}
UNPROVEN = ("pbspro", "lsf", "kubernetes")
CONTEXT: dict[str, Any] = {
    "mapped_user": {"name": "alice", "uid": 1234, "gid": 1234, "home": "/home/alice", "groups": [1234],
                    "shell": "/bin/bash"},
    "user_runtime": {"python": "3.11.2", "dill": "0.4.1", "mep": "0.1.0", "platform": "Linux"},
    "endpoint": {"id": "0b5e7a4c-0000-4000-8000-000000000001", "name": "cluster"},
}

# A value for each option any shipped schema offers, within every schema's bounds.
FULL_OPTIONS: dict[str, Any] = {
    "workers": 4, "idle_timeout": 120, "python_env": "envs/analysis", "mpi": False, "partition": "batch",
    "walltime": "01:00:00", "account": "proj1", "nodes_per_block": 2, "cores_per_node": 8, "mem_per_node": 16,
    "workers_per_node": 4, "max_blocks": 3, "start_timeout": 60, "environment": {"OMP_NUM_THREADS": "4"},
    "queue": "normal", "cpus_per_node": 8, "project": "proj1", "cpu": 2, "memory": "4Gi",
}


def renderer(name: str, *, schema: dict[str, Any] | None = None) -> TemplateRenderer:
    template = TEMPLATES / f"{name}.yaml.j2"
    if schema is None:
        return TemplateRenderer(template, TEMPLATES / f"{name}.schema.json")
    return TemplateRenderer(template, Path("permissive.schema.json"), template_text=template.read_text(),
                            schema_text=json.dumps(schema))


def schema_of(name: str) -> dict[str, Any]:
    return json.loads((TEMPLATES / f"{name}.schema.json").read_text())


def header_of(name: str) -> str:
    text = (TEMPLATES / f"{name}.yaml.j2").read_text()
    assert text.startswith("{#"), f"{name}.yaml.j2 must open with a header comment"
    return text[: text.index("#}")]


@pytest.mark.parametrize("name", CATALOGUE)
def test_header_documents_every_option(name: str) -> None:
    header = header_of(name)
    for option in schema_of(name)["properties"]:
        assert re.search(rf"^\s+{option}\s", header, re.MULTILINE), f"{name}: option {option} is not documented"
    assert "mep.mapped_user" in header and "docs/templates.md" in header


@pytest.mark.parametrize("name", UNPROVEN)
def test_unproven_templates_say_so(name: str) -> None:
    assert "Proven by rendering and validation only" in header_of(name)


def test_proven_templates_name_their_tests() -> None:
    assert "tests/test_slurm.py" in header_of("slurm")
    assert "tests/test_torque.py" in header_of("torque")


@pytest.mark.parametrize("name", CATALOGUE)
def test_defaults_render_to_a_valid_config(name: str) -> None:
    config = renderer(name).render({}, **CONTEXT)
    if CATALOGUE[name] is None:
        assert isinstance(config.engine, ProcessEngine)
    else:
        assert isinstance(config.engine, HtexEngine)
        assert config.engine.provider.type == CATALOGUE[name]
        assert config.engine.encrypted is True
        assert config.engine.min_blocks == 0


@pytest.mark.parametrize("name", CATALOGUE)
def test_every_option_renders_and_passes_the_parsl_signature_check(name: str) -> None:
    # container_image and python_env exclude each other: tests/test_containers.py renders the former
    options = {option: FULL_OPTIONS[option] for option in schema_of(name)["properties"] if option in FULL_OPTIONS}
    config = renderer(name).render(options, **CONTEXT)
    assert config.idle_timeout == 120
    if "python_env" in options:
        assert config.engine.worker_python == "/home/alice/envs/analysis/bin/python"
    if isinstance(config.engine, HtexEngine):
        assert config.engine.max_blocks == 3
        assert config.engine.start_timeout == 60
        assert config.engine.workers_per_node == 4


def test_slurm_blocks_are_not_exclusive_and_multi_node_blocks_use_srun() -> None:
    single = renderer("slurm").render({}, **CONTEXT).engine
    assert single.provider.arguments["exclusive"] is False and single.launcher is None
    multi = renderer("slurm").render({"nodes_per_block": 2}, **CONTEXT).engine
    assert multi.launcher is not None and multi.launcher.type == "SrunLauncher"


def test_distinct_partitions_and_walltimes_render_distinct_configs() -> None:
    slurm = renderer("slurm")
    configs = [slurm.render(options, **CONTEXT).model_dump(mode="json") for options in
               ({"partition": "debug"}, {"partition": "batch"}, {"partition": "debug", "walltime": "00:05:00"})]
    assert len({json.dumps(config, sort_keys=True) for config in configs}) == 3


# --- rendering guarantees, with the shipped templates -------------------------------------------------

HOSTILE = [
    "debug\nexclusive: true",
    "debug # exclusive: true",
    'debug", "exclusive": true, "x": "',
    "{exclusive: true}",
    "!!bool true",
    "debug\u2028exclusive: true",
    "'; scancel -u alice; echo '",
    "$(id) `id` ${HOME}",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_a_string_stays_one_string_even_where_the_schema_checks_nothing(value: str) -> None:
    config = renderer("slurm", schema={"type": "object"}).render({"partition": value}, **CONTEXT)
    assert config.engine.provider.arguments == {"partition": value, "walltime": "00:30:00", "nodes_per_block": 1,
                                                "exclusive": False}


@pytest.mark.parametrize("value", [*HOSTILE, "a'b", "", "new\nline", "back\\slash"])
def test_environment_values_are_shell_quoted_into_worker_init(value: str) -> None:
    config = renderer("slurm").render({"environment": {"MEP_VALUE": value, "OTHER": "x"}}, **CONTEXT)
    words = shlex.split(config.engine.worker_init)
    assert words == ["export", "MEP_VALUE=" + value, "export", "OTHER=x"]


def test_the_schema_refuses_environment_names_that_are_not_shell_names() -> None:
    with pytest.raises(ConfigInvalidError, match="user_endpoint_config.environment"):
        renderer("slurm").render({"environment": {"A=$(id)": "x"}}, **CONTEXT)


@pytest.mark.parametrize("python_env", ["../../root/venv", "envs/../../../etc", "/opt/other", "a//b"])
def test_python_env_cannot_leave_the_home(python_env: str) -> None:
    with pytest.raises(ConfigInvalidError, match="python_env"):
        renderer("local").render({"python_env": python_env}, **CONTEXT)
    # Even where an admin's schema lets anything through, the model refuses a path that walks out.
    if ".." in python_env or "//" in python_env:
        with pytest.raises(ConfigInvalidError, match="worker_python: must be a normalised"):
            renderer("local", schema={"type": "object"}).render({"python_env": python_env}, **CONTEXT)


@pytest.mark.parametrize("options", [
    {"encrypted": False}, {"user": "root"}, {"run_as": "root"}, {"audit": False}, {"user_id": "0"},
    {"run_dir": "/tmp/x"}, {"address": "0.0.0.0"},
])
@pytest.mark.parametrize("name", CATALOGUE)
def test_privileged_knobs_are_not_options(name: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigInvalidError, match="Additional properties are not allowed"):
        renderer(name).render(options, **CONTEXT)


def privileged(template: str) -> str:
    """The refusal of an htex template that tries to set ``template`` in its engine."""
    text = f"engine:\n  type: htex\n  provider:\n    type: SlurmProvider\n{template}"
    with pytest.raises(ConfigInvalidError) as raised:
        TemplateRenderer(Path("admin.yaml.j2"), Path("s.json"), template_text=text, schema_text="{}").render(
            {}, **CONTEXT)
    return str(raised.value)


@pytest.mark.parametrize(("template", "field"), [
    ("  encrypted: false\n", "engine.encrypted: Input should be True"),
    ("  run_dir: /tmp/elsewhere\n", "engine.run_dir: Extra inputs are not permitted"),
    ("  user: root\n", "engine.user: Extra inputs are not permitted"),
    ("    user_id: '0'\n", "engine.provider: argument 'user_id' is not allowed here"),
    ("    launcher: {type: SrunLauncher}\n", "engine.provider: argument 'launcher' is not allowed here"),
    ("  worker_python: relative/python\n", "engine.worker_python: must be a normalised absolute path"),
])
def test_a_template_cannot_set_privileged_knobs_either(template: str, field: str) -> None:
    assert f"invalid endpoint config: {field}" in privileged(template)


# --- failures name the field, the template file and its line ---------------------------------------


def write_template(tmp_path: Path, text: str) -> TemplateRenderer:
    path = tmp_path / "site.yaml.j2"
    path.write_text(text)
    (tmp_path / "site.schema.json").write_text('{"type": "object"}')
    return TemplateRenderer(path, tmp_path / "site.schema.json")


SITE_TEMPLATE = """\
{#
  A site template; this header spans lines 1-4.
  partitions: not a key, only a comment
#}
engine:
  type: htex
  provider:
    type: {{ provider | default("SlurmProvider") }}
{% if queue is defined %}
    partitions: {{ queue }}
{% endif %}
    walltime: {{ walltime | default("00:10:00") }}
  launcher:
    type: {{ launcher | default("SrunLauncher") }}
"""


@pytest.mark.parametrize(("options", "line", "field", "words"), [
    ({"provider": "SlurmProvidr"}, 8, "engine.provider.type",
     "unknown Parsl provider 'SlurmProvidr' (did you mean 'SlurmProvider'?)"),
    ({"walltime": 10}, 12, "engine.provider.walltime", "SlurmProvider argument 'walltime': integer 10 is not of type str"),
    ({"launcher": "NoLauncher"}, 14, "engine.launcher.type", "unknown Parsl launcher 'NoLauncher'"),
    ({"provider": "TorqueProvider", "walltime": 5}, 12, "engine.provider.walltime", "is not a string"),
])
def test_parsl_argument_errors_name_field_file_and_line(tmp_path: Path, options: dict[str, Any], line: int,
                                                        field: str, words: str) -> None:
    with pytest.raises(ConfigInvalidError) as raised:
        write_template(tmp_path, SITE_TEMPLATE).render(options, **CONTEXT)
    message = str(raised.value)
    assert message.startswith(f"template {tmp_path / 'site.yaml.j2'}, line {line}: invalid endpoint config: {field}: ")
    assert words in message
    assert "Traceback" not in message


def test_unknown_argument_names_the_line_it_came_from_inside_a_block(tmp_path: Path) -> None:
    with pytest.raises(ConfigInvalidError) as raised:
        write_template(tmp_path, SITE_TEMPLATE).render({"queue": "debug"}, **CONTEXT)
    message = str(raised.value)
    assert ", line 10: invalid endpoint config: engine.provider.partitions: SlurmProvider has no argument " \
           "'partitions' (did you mean 'partition'?)" in message


def test_a_provider_missing_a_required_argument_is_refused(tmp_path: Path) -> None:
    renderer = write_template(tmp_path, "engine:\n  type: htex\n  provider:\n    type: KubernetesProvider\n")
    with pytest.raises(ConfigInvalidError) as raised:
        renderer.render({}, **CONTEXT)
    assert str(raised.value).endswith(
        "line 3: invalid endpoint config: engine.provider: KubernetesProvider needs the argument 'image'")


def test_checking_parsl_arguments_loads_neither_parsl_nor_dill_in_the_checking_process() -> None:
    script = f"""
import sys
from pathlib import Path
from mep.config.render import TemplateRenderer
from mep.errors import ConfigInvalidError
directory = Path({str(TEMPLATES)!r})
renderer = TemplateRenderer(directory / "slurm.yaml.j2", directory / "slurm.schema.json")
assert renderer.render({{}}, mapped_user={{"home": "/home/a"}}, user_runtime={{}}, endpoint={{}}).engine.type == "htex"
text = "engine:\\n  type: htex\\n  provider: {{type: SlurmProvider, partitions: x}}\\n"
try:
    TemplateRenderer(Path("t.j2"), Path("s.json"), template_text=text, schema_text="{{}}").render(
        {{}}, mapped_user={{}}, user_runtime={{}}, endpoint={{}})
except ConfigInvalidError as exc:
    assert "has no argument 'partitions'" in str(exc)
print(sorted(name for name in sys.modules if name.split(".")[0] in ("dill", "parsl")))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_model_keeps_provider_arguments_as_given() -> None:
    document = yaml.safe_load("engine:\n  type: htex\n  provider: {type: LocalProvider, cmd_timeout: 5}\n")
    config = UserEndpointConfig.model_validate(document)
    assert config.engine.provider.arguments == {"cmd_timeout": 5}
    assert config.model_dump(mode="json")["engine"]["provider"] == {"type": "LocalProvider", "cmd_timeout": 5}

"""The endpoint's fast config path: msgspec structs as strict as the model, and the account's cache of rendered configs.

The structs (``mep.endpoint.settings``) may only ever accept a subset of what
``UserEndpointConfig`` accepts, with the same values; everything else goes to
the model, so its refusals and messages stand. The cache
(``mep.endpoint.config_cache``) serves a second start of the same inputs
without rendering, and never serves what the structs refuse.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mep.config.endpoint import LargeResults, ProcessEngine, UserEndpointConfig
from mep.config.render import TemplateRenderer
from mep.endpoint.config_cache import MAX_ENTRIES, ConfigCache, cache_key
from mep.endpoint.main import rendered_config
from mep.endpoint.settings import LargeResultSettings, ProcessEndpointSettings, ProcessSettings, read_settings
from mep.errors import ConfigInvalidError, TemplateError
from mep.protocol.messages import EndpointBoot
from tests.harness import PYTHON

SHIPPED = Path(__file__).parents[1] / "templates"


@pytest.mark.parametrize(("struct", "model"), [(ProcessSettings, ProcessEngine), (LargeResultSettings, LargeResults),
                                               (ProcessEndpointSettings, UserEndpointConfig)])
def test_the_structs_have_the_models_fields_and_defaults(struct: type, model: type) -> None:
    assert struct.__struct_fields__ == tuple(model.model_fields)
    assert msgspec.to_builtins(struct()) == model().model_dump(mode="json")


def _agrees_with_the_model(document: Any) -> None:
    """What the structs accept, the model accepts with the same values; the plain shape is never left to the model."""
    fast = read_settings(document)
    try:
        model = UserEndpointConfig.model_validate(document)
    except ValueError:
        assert fast is None, f"the structs accepted {document!r}, which the model refuses"
        return
    plain = model.engine.type == "process" and model.engine.container is None and not model.task_resources
    if plain:
        assert fast is not None, f"a plain process config went to the model: {document!r}"
        assert msgspec.to_builtins(fast) == model.model_dump(mode="json")
    else:
        assert fast is None


@pytest.mark.parametrize("document", [
    {},
    {"engine": {"workers": 3}},
    {"engine": {"type": "process", "workers": 2, "worker_python": "/usr/bin/python3"}, "idle_timeout": 5},
    {"large_results": {"threshold_bytes": 0, "directory": "~/scratch/r", "retention": 60}},
    {"large_results": {"directory": "/scratch/results"}},
    # refused by both: the model's message decides
    {"engine": {"workers": "2"}}, {"engine": {"workers": True}}, {"engine": {"workers": 2.0}},
    {"engine": {"workers": 0}}, {"engine": {"workers": 1025}}, {"engine": {"workers": 1, "user": "root"}},
    {"engine": {"worker_python": "python3"}}, {"engine": {"worker_python": "/a/../b"}},
    {"engine": {"worker_python": "/a//b"}}, {"engine": None}, {"engine": []},
    {"idle_timeout": 0}, {"idle_timeout": -1.0}, {"idle_timeout": float("inf")}, {"idle_timeout": float("nan")},
    {"idle_timeout": True}, {"idle_timeout": "300"}, {"idle_timeout": 300.0, "extra": 1},
    {"large_results": {"directory": "~/../etc"}}, {"large_results": {"directory": "relative"}},
    {"large_results": {"retention": float("inf")}}, {"large_results": {"threshold_bytes": -1}},
    {"large_results": None}, {"task_resources": None}, {"task_resources": {"priority": 1}},
    {"task_resources": {"Bad-Name": 1}},
    # not the plain shape: the model's
    {"engine": {"container": {"type": "podman", "image": "localhost/mep-python:3.11"}}},
    {"engine": {"type": "htex", "provider": {"type": "LocalProvider"}}},
    {"engine": {"type": "htex", "provider": {"type": "LocalProvider"}}, "task_resources": {"priority": 5}},
])
def test_the_structs_accept_only_what_the_model_accepts(document: dict) -> None:
    _agrees_with_the_model(document)


_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 1100), st.integers(2**63, 2**65),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "process", "htex", "/usr/bin/python3", "/a/../b", "/a//b", "/a/", "rel/x", "~/r", "~/../r",
                     "~r", "/x\0y", "podman"]),
    st.lists(st.integers(), max_size=2),
)
_KEYS = st.sampled_from(["type", "workers", "worker_python", "container", "threshold_bytes", "directory",
                         "retention", "priority", "num_nodes", "user"])
_MAPPINGS = st.dictionaries(_KEYS, _VALUES, max_size=4)
_DOCUMENTS = st.dictionaries(
    st.sampled_from(["engine", "idle_timeout", "large_results", "task_resources", "account"]),
    st.one_of(_VALUES, _MAPPINGS), max_size=4)


@settings(max_examples=400, deadline=None)
@given(_DOCUMENTS)
def test_no_generated_document_makes_the_structs_and_the_model_disagree(document: dict) -> None:
    _agrees_with_the_model(document)


def test_the_endpoint_imports_neither_pydantic_nor_a_renderer_nor_parsl() -> None:
    heavy = {"pydantic", "jinja2", "jsonschema", "yaml", "parsl"}
    script = f"import sys, mep.endpoint.main; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy!r}))"
    assert subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def _boot(user_config: dict[str, Any], template: str | None = None) -> EndpointBoot:
    template_path, schema_path = SHIPPED / "local.yaml.j2", SHIPPED / "local.schema.json"
    return EndpointBoot(
        endpoint_id="e1", account="alice", router_address="ipc:///nowhere", router_public_key="", secret_key="",
        template=template_path.read_text() if template is None else template, schema=schema_path.read_text(),
        template_path=str(template_path), schema_path=str(schema_path), user_config=user_config,
        mapped_user={"name": "alice", "uid": os.getuid(), "home": "/home/alice"},
        user_runtime={"python_version": "3.11.2"}, manager_endpoint_id="0b5e7a4c-0000-4000-8000-000000000001")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))  # Path.home(): where the endpoint keeps its cache
    return tmp_path


def _configs(home: Path) -> Path:
    return home / ".mep" / "cache" / "configs"


def test_a_second_start_with_the_same_inputs_reads_the_config_from_the_cache(
        home: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mep.endpoint")
    first, refusal = rendered_config(_boot({"workers": 3}))
    assert refusal is None and "config rendered in" in caplog.text
    assert oct(_configs(home).stat().st_mode & 0o777) == "0o700"
    (entry,) = _configs(home).iterdir()
    assert oct(entry.stat().st_mode & 0o777) == "0o600"
    caplog.clear()
    second, refusal = rendered_config(_boot({"workers": 3}))
    assert refusal is None and "config read from the cache in" in caplog.text
    assert second == first and second.engine.workers == 3
    caplog.clear()
    other, _ = rendered_config(_boot({"workers": 4}))  # other options: another key, rendered
    assert "config rendered in" in caplog.text and other.engine.workers == 4
    assert len(list(_configs(home).iterdir())) == 2


def test_every_input_of_the_render_is_part_of_the_key() -> None:
    boot = _boot({"workers": 3})
    keys = {cache_key(boot)}
    for change in ({"template": boot.template + "\n"}, {"schema": boot.schema + " "}, {"user_config": {"workers": 4}},
                   {"mapped_user": {**boot.mapped_user, "home": "/home/bob"}},
                   {"user_runtime": {"python_version": "3.12.0"}}, {"manager_endpoint_id": "another"}):
        keys.add(cache_key(msgspec.structs.replace(boot, **change)))
    assert len(keys) == 7
    reordered = msgspec.structs.replace(boot, mapped_user=dict(reversed(boot.mapped_user.items())))
    assert cache_key(reordered) == cache_key(boot)


@pytest.mark.parametrize(("options", "template"), [
    ({"workers": 0}, None),  # the schema refuses it
    ({}, "engine:\n  workers: {{ 0 }}\n"),  # the model refuses the rendered config
    ({}, "engine: {{ nowhere }}\n"),  # the template fails to render
])
def test_a_refusal_is_the_renderers_own_and_is_not_cached(home: Path, options: dict, template: str | None) -> None:
    boot = _boot(options, template)
    config, refusal = rendered_config(boot)
    renderer = TemplateRenderer(Path(boot.template_path), Path(boot.schema_path), template_text=boot.template,
                                schema_text=boot.schema)
    with pytest.raises((ConfigInvalidError, TemplateError)) as direct:
        renderer.render(boot.user_config, mapped_user=boot.mapped_user, user_runtime=boot.user_runtime,
                        endpoint={"id": boot.manager_endpoint_id})
    assert type(refusal) is type(direct.value) and str(refusal) == str(direct.value)
    assert isinstance(config, ProcessEndpointSettings)  # the stand-in that answers each task with the refusal
    assert not _configs(home).exists() or not list(_configs(home).iterdir())


def test_a_container_config_is_the_models_and_is_not_cached(home: Path) -> None:
    config, refusal = rendered_config(_boot({"container_image": "localhost/mep-python:3.11"}))
    assert refusal is None and isinstance(config, UserEndpointConfig) and config.engine.container is not None
    assert not _configs(home).exists() or not list(_configs(home).iterdir())


def test_an_entry_the_structs_refuse_is_a_miss(home: Path) -> None:
    boot = _boot({"workers": 3})
    rendered_config(boot)
    entry = _configs(home) / f"{cache_key(boot)}.json"
    for tampered in ({"engine": {"workers": 0}}, {"engine": {"worker_python": "/a/../b"}},
                     {"engine": {"container": {"type": "podman", "image": "x"}}}, {"user": "root"}):
        entry.write_text(json.dumps(tampered))
        assert ConfigCache(_configs(home)).load(cache_key(boot)) is None
    entry.write_bytes(b'{"engine": {"work')  # torn
    assert ConfigCache(_configs(home)).load(cache_key(boot)) is None
    config, _ = rendered_config(boot)  # rendered again, and the entry repaired
    assert config.engine.workers == 3
    assert ConfigCache(_configs(home)).load(cache_key(boot)) == config


def test_a_directory_others_can_write_or_a_symlink_is_not_used(home: Path, tmp_path_factory) -> None:
    boot = _boot({"workers": 3})
    rendered_config(boot)
    cache = ConfigCache(_configs(home))
    assert cache.load(cache_key(boot)) is not None
    _configs(home).chmod(0o777)
    assert cache.load(cache_key(boot)) is None
    _configs(home).chmod(0o700)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    _configs(home).rename(elsewhere / "configs")
    _configs(home).symlink_to(elsewhere / "configs")
    assert cache.load(cache_key(boot)) is None
    _configs(home).unlink()
    (elsewhere / "configs" / f"{cache_key(boot)}.json").rename(elsewhere / "entry")
    _configs(home).mkdir(mode=0o700)
    (_configs(home) / f"{cache_key(boot)}.json").symlink_to(elsewhere / "entry")
    assert cache.load(cache_key(boot)) is None


def test_the_least_recently_used_entries_go_beyond_the_limit(home: Path) -> None:
    cache = ConfigCache(_configs(home))
    settings = ProcessEndpointSettings()
    for number in range(MAX_ENTRIES):
        cache.store(f"{number:064x}", settings)
        os.utime(_configs(home) / f"{number:064x}.json", (number, number))  # 0 the oldest
    assert cache.load(f"{0:064x}") == settings  # used again: now the newest
    cache.store("e" * 64, settings)
    cache.store("f" * 64, settings)
    kept = {path.stem for path in _configs(home).iterdir()}
    assert len(kept) == MAX_ENTRIES
    assert {f"{0:064x}", "e" * 64, "f" * 64} <= kept and not {f"{1:064x}", f"{2:064x}"} & kept

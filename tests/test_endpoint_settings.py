"""The endpoint reads a process-engine config with msgspec structs that mirror the pydantic models exactly."""

from __future__ import annotations

import subprocess

import msgspec
import pytest

from mep.config.endpoint import LargeResults, ProcessEngine, UserEndpointConfig
from mep.endpoint.settings import LargeResultSettings, ProcessEndpointSettings, ProcessSettings, load_config
from tests.harness import PYTHON


@pytest.mark.parametrize(("struct", "model"), [(ProcessSettings, ProcessEngine), (LargeResultSettings, LargeResults),
                                               (ProcessEndpointSettings, UserEndpointConfig)])
def test_the_structs_have_the_models_fields_and_defaults(struct: type, model: type) -> None:
    assert struct.__struct_fields__ == tuple(model.model_fields)
    defaults = msgspec.to_builtins(struct())
    assert defaults == model().model_dump(mode="json")


@pytest.mark.parametrize("document", [
    {},
    {"engine": {"workers": 3}},
    {"engine": {"type": "process", "workers": 2, "worker_python": "/usr/bin/python3"}, "idle_timeout": 5.0},
])
def test_a_dumped_process_config_reads_back_to_the_same_values(document: dict) -> None:
    dumped = UserEndpointConfig.model_validate(document).model_dump(mode="json")
    settings = load_config(dumped)
    assert isinstance(settings, ProcessEndpointSettings)
    assert msgspec.to_builtins(settings) == dumped
    assert settings.worker_python == dumped["engine"]["worker_python"]


@pytest.mark.parametrize("document", [{"engine": {"workers": "2"}}, {"engine": {"workers": 1, "user": "root"}},
                                      {"idle_timeout": 300.0, "extra": 1}])
def test_a_config_the_model_would_refuse_is_refused(document: dict) -> None:
    with pytest.raises(ValueError, match="validation error"):  # the model, which decides what is not the plain shape
        load_config(document)


def test_an_htex_config_is_read_with_the_model() -> None:
    document = {"engine": {"type": "htex", "provider": {"type": "LocalProvider"}}}
    assert load_config(document) == UserEndpointConfig.model_validate(document)


def test_the_endpoint_imports_neither_pydantic_nor_parsl() -> None:
    script = "import sys, mep.endpoint.main; print(sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'parsl'}))"
    assert subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, check=True).stdout.strip() == "[]"

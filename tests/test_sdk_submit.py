"""submit()'s hot path: a function is pickled once per function object, and plain-data arguments cheaply,
without changing what the endpoint loads (issue 12, the SDK's share)."""

from __future__ import annotations

import datetime
import gc
import subprocess
import weakref

import dill

from mep.sdk.serialize import FunctionCache, deserialize, serialize_args
from tests.harness import PYTHON

OFFSET = 1


def shifted(x: int) -> int:
    return x + OFFSET


def test_a_function_is_pickled_once_and_again_when_a_global_it_uses_is_rebound() -> None:
    global OFFSET
    cache = FunctionCache()
    body, digest = cache.serialized(shifted)
    again, same_digest = cache.serialized(shifted)
    assert again is body and same_digest == digest
    try:
        OFFSET = 100
        rebound, new_digest = cache.serialized(shifted)
    finally:
        OFFSET = 1
    assert new_digest != digest
    assert dill.loads(rebound)(1) == 101 and dill.loads(body)(1) == 2


def test_the_cache_keeps_no_function_alive_not_even_one_that_names_itself() -> None:
    cache = FunctionCache()
    namespace: dict = {}  # a notebook's or script's namespace, which the function's globals are
    exec("def countdown(n):\n    return 0 if n == 0 else countdown(n - 1)\n", namespace)
    fn = namespace["countdown"]
    body, _ = cache.serialized(fn)
    assert dill.loads(body)(3) == 0
    alive = weakref.ref(fn)
    del fn, namespace
    gc.collect()
    assert alive() is None


def test_a_redefined_function_in_a_notebook_cell_is_pickled_anew() -> None:
    cache = FunctionCache()
    namespace: dict = {}
    exec("def f():\n    return 1\n", namespace)
    first, _ = cache.serialized(namespace["f"])
    exec("def f():\n    return 2\n", namespace)
    second, _ = cache.serialized(namespace["f"])
    assert dill.loads(first)() == 1 and dill.loads(second)() == 2


SCALE = 10


def scaled(x: int) -> int:
    return x * SCALE


def test_a_function_given_new_code_is_pickled_anew_with_the_globals_the_new_code_uses() -> None:
    cache = FunctionCache()

    def changing(x: int) -> int:
        return x

    first, _ = cache.serialized(changing)
    changing.__code__ = scaled.__code__  # same function object, new code naming a global the old one didn't
    second, _ = cache.serialized(changing)
    assert dill.loads(first)(3) == 3 and dill.loads(second)(3) == 30
    global SCALE
    try:
        SCALE = 7  # the cache watches the new code's globals, not the old code's
        third, _ = cache.serialized(changing)
    finally:
        SCALE = 10
    assert dill.loads(third)(3) == 21


MAIN_CLASS_RESULT = """
import sys, dill

class Point:  # defined in __main__: dill sends it by value, and only dill's unpickler reads it back
    def __init__(self, x):
        self.x = x

sys.stdout.write(dill.dumps(Point(4)).hex())
"""


def test_results_load_as_dill_loads_them_whether_plain_data_or_dill_s_own() -> None:
    def local_function(x: int) -> int:
        return x + 1

    plain = [None, 1, "x", [1.5, b"z"], {"a": (1,)}, ValueError("boom"), type(None), range(3), len,
             datetime.date(2026, 1, 2)]
    for value in plain:
        loaded = deserialize(dill.dumps(value))
        assert loaded == value or (isinstance(value, ValueError) and loaded.args == value.args)
    assert deserialize(dill.dumps(local_function, recurse=True))(1) == 2
    made = subprocess.run([PYTHON, "-c", MAIN_CLASS_RESULT], capture_output=True, text=True, check=True, cwd="/")
    point = deserialize(bytes.fromhex(made.stdout))
    assert (type(point).__name__, point.x) == ("Point", 4)


MAIN_CLASS_ARGUMENT = """
import sys
from mep.sdk.serialize import serialize_args

class Point:  # defined in __main__: only dill can send it (by value)
    def __init__(self, x):
        self.x = x

sys.stdout.write(serialize_args((Point(3), [1, 2.5, "text", None]), {"scale": 2}).hex())
"""

LOAD_ELSEWHERE = """
import sys, dill
(point, data), kwargs = dill.loads(bytes.fromhex(sys.stdin.read()))
print(type(point).__name__, point.x, data, kwargs)
"""


def test_arguments_load_in_another_process_whether_plain_data_or_defined_in_main() -> None:
    made = subprocess.run([PYTHON, "-c", MAIN_CLASS_ARGUMENT], capture_output=True, text=True, check=True, cwd="/")
    loaded = subprocess.run([PYTHON, "-c", LOAD_ELSEWHERE], input=made.stdout, capture_output=True, text=True,
                            check=True, cwd="/")
    assert loaded.stdout.strip() == "Point 3 [1, 2.5, 'text', None] {'scale': 2}"
    plain = serialize_args((1, "a", [2.0]), {"k": (3,)})
    assert dill.loads(plain) == ((1, "a", [2.0]), {"k": (3,)})

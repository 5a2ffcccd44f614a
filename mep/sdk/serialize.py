"""Turn functions, arguments and results into bytes with dill, and back.

Only the SDK and the user endpoint import this module: the service and the
manager relay the bytes without ever loading them.

A function whose module the endpoint cannot import (a script, a notebook, a
test file, a package installed only on the laptop) must travel by value. dill
already does that for ``__main__``; for other modules outside the interpreter's
install tree we rebuild the function as if it lived in ``__main__``, with only
the globals its code names, recursively for helper functions of the same
module. Functions from installed packages (stdlib, site-packages) travel by
reference, which is smaller and keeps their behaviour exact.
"""

from __future__ import annotations

import hashlib
import platform
import sys
import sysconfig
import types
from functools import cache
from pathlib import Path
from typing import Any

import dill

import mep
from mep.protocol.messages import Runtime


def client_runtime() -> Runtime:
    return Runtime(
        python=".".join(map(str, sys.version_info[:3])),
        dill=dill.__version__,
        mep=mep.__version__,
        platform=platform.platform(),
    )


@cache
def _install_roots() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    return tuple(Path(paths[key]).resolve() for key in ("stdlib", "platstdlib", "purelib", "platlib"))


def _is_installed_module(module_name: str) -> bool:
    """True when the endpoint can be expected to import ``module_name`` itself."""
    if module_name in ("__main__", "__mp_main__") or module_name is None:
        return False
    module = sys.modules.get(module_name)
    if module is None:
        return False
    origin = getattr(module, "__file__", None)
    if origin is None:  # built-in or namespace-less: importable everywhere
        return True
    resolved = Path(origin).resolve()
    return any(resolved.is_relative_to(root) for root in _install_roots())


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _rebind_by_value(fn: types.FunctionType, clones: dict[int, types.FunctionType]) -> types.FunctionType:
    """A copy of ``fn`` living in ``__main__`` with just the globals it uses."""
    if id(fn) in clones:
        return clones[id(fn)]
    new_globals: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
    clone = types.FunctionType(fn.__code__, new_globals, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    clone.__qualname__ = fn.__qualname__
    clone.__doc__ = fn.__doc__
    clone.__dict__.update(fn.__dict__)
    clone.__module__ = "__main__"
    clones[id(fn)] = clone
    for name in _global_names(fn.__code__):
        if name not in fn.__globals__:
            continue
        value = fn.__globals__[name]
        if isinstance(value, types.FunctionType) and value.__module__ == fn.__module__:
            value = _rebind_by_value(value, clones)
        new_globals[name] = value
    return clone


def serialize_function(fn: Any) -> bytes:
    if isinstance(fn, types.FunctionType) and not _is_installed_module(fn.__module__):
        if fn.__module__ != "__main__":
            fn = _rebind_by_value(fn, {})
        return dill.dumps(fn, recurse=True)
    return dill.dumps(fn)


def function_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def serialize_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    return dill.dumps((args, kwargs))


def deserialize(payload: bytes | memoryview) -> Any:
    return dill.loads(payload)


def serialize(value: Any) -> bytes:
    return dill.dumps(value)

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

``FunctionCache`` keeps each plain function's bytes while the function lives,
so submitting it again costs a lookup, not a pickling (see its docstring for
when it pickles again).
"""

from __future__ import annotations

import hashlib
import operator
import pickle
import platform
import re
import sys
import sysconfig
import types
import weakref
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import dill

import mep
from mep.errors import SerializationError
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
    return _is_installed_file(origin)


@cache
def _is_installed_file(origin: str) -> bool:
    """Cached: resolving the path is a dozen system calls, far more than the rest of a submit."""
    resolved = Path(origin).resolve()
    return any(resolved.is_relative_to(root) for root in _install_roots())


@lru_cache(maxsize=4096)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    return tuple(sorted(names))


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


def by_value(fn: types.FunctionType) -> types.FunctionType:
    """A copy of ``fn`` that dill sends by value: a worker needs neither mep nor ``fn``'s module to run it."""
    return _rebind_by_value(fn, {})


def serialize_function(fn: Any) -> bytes:
    if isinstance(fn, types.FunctionType) and not _is_installed_module(fn.__module__):
        if fn.__module__ != "__main__":
            fn = _rebind_by_value(fn, {})
        return dill.dumps(fn, recurse=True)
    return dill.dumps(fn)


def function_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class FunctionCache:
    """A plain function's serialised bytes and hash, kept while the function object lives.

    Pickled again when anything its bytes captured has changed identity: its
    code, defaults, closure cells' contents, or the object any global name it
    uses is bound to (a notebook cell that redefines a helper or rebinds a
    constant). An object mutated in place (``DATA.append(...)``) is not seen:
    pass such data as an argument. Other callables (instances of callable
    classes, methods, partials) carry state of their own and are pickled on
    every call.
    """

    def __init__(self) -> None:
        # (global names its code uses, what it captured, body, hash): the names are kept so that a lookup
        # need not hash the code object again (that hash walks the bytecode and constants: the lookup's cost)
        self._entries: weakref.WeakKeyDictionary[
            types.FunctionType, tuple[tuple[str, ...], tuple[Any, ...], bytes, str]] = weakref.WeakKeyDictionary()

    def serialized(self, fn: Any) -> tuple[bytes, str]:
        """(body, hash) for ``fn``; raises ``SerializationError`` naming the function."""
        if not isinstance(fn, types.FunctionType):
            return _serialized(fn)
        entry = self._entries.get(fn)
        # the old names are right while the code is the same object, and a new code object fails the comparison
        if entry is not None and _same_objects(entry[1], _captured(fn, entry[0])):
            return entry[2], entry[3]
        names = _global_names(fn.__code__)
        captured = _captured(fn, names)
        body, digest = _serialized(fn)
        self._entries[fn] = (names, captured, body, digest)
        return body, digest


_ITSELF = object()  # stands for the function in what it captured, so the cache never keeps it alive
_UNBOUND = object()  # a global name the code uses but the module does not bind (a builtin, or not yet defined)


def _captured(fn: types.FunctionType, names: tuple[str, ...]) -> tuple[Any, ...]:
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(cell.cell_contents)
        except ValueError:  # a cell not yet filled
            cells.append(None)
    globals_ = fn.__globals__
    objects = [fn.__code__, fn.__defaults__, fn.__kwdefaults__, *cells,
               *[globals_.get(name, _UNBOUND) for name in names]]
    return tuple([_ITSELF if value is fn else value for value in objects])


def _same_objects(before: tuple[Any, ...], now: tuple[Any, ...]) -> bool:
    return len(before) == len(now) and all(map(operator.is_, before, now))


def _serialized(fn: Any) -> tuple[bytes, str]:
    try:
        body = serialize_function(fn)
    except Exception as exc:
        name = getattr(fn, "__qualname__", type(fn).__name__)
        raise SerializationError(f"the function {name} could not be serialised on your side: "
                                 f"{type(exc).__name__}: {exc}") from exc
    return body, function_hash(body)


def serialize_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    try:
        return _dumps_data((args, kwargs))
    except Exception as exc:
        raise SerializationError(f"the arguments could not be serialised on your side: {type(exc).__name__}: "
                                 f"{exc}") from exc


_MAIN_MODULES = (b"__main__", b"__mp_main__")


def _dumps_data(value: Any) -> bytes:
    """dill's bytes for ``value``, by the standard pickler when that gives the same: ~20x faster for plain data.

    The two differ only where dill does more: objects pickle can't handle (lambdas, closures, ...: pickle
    raises) and things defined in ``__main__``, which dill sends by value and pickle by a reference the
    endpoint can't resolve (their module name is in the bytes). Either way dill does it; ``dill.loads``
    reads both.
    """
    try:
        body = pickle.dumps(value, protocol=dill.settings["protocol"])
    except Exception:
        return dill.dumps(value)
    if any(name in body for name in _MAIN_MODULES):
        return dill.dumps(value)
    return body


# What makes dill's unpickler differ from the standard one: its find_class maps these module names, and
# an object whose class is in ``__main__`` is pointed at the class of this ``__main__``.
_DILL_READS_DIFFERENTLY = re.compile(rb"__builtin__|dill\.dill|__main__|__mp_main__")


def deserialize(payload: bytes | memoryview | BinaryIO) -> Any:
    """The value of a payload, or of a file object (a large result: unpickled as it is read, then closed).

    Bytes that name none of those modules load the same through the standard unpickler, which
    ``dill.loads`` wraps in Python code: ~20x faster for a small result (a function's or type's bytes that dill
    wrote still load: they name dill's own helpers, which pickle imports).
    """
    if isinstance(payload, bytes) and _DILL_READS_DIFFERENTLY.search(payload) is None:
        return pickle.loads(payload)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return dill.loads(payload)
    with payload:
        return dill.load(payload)


def serialize(value: Any) -> bytes:
    return dill.dumps(value)

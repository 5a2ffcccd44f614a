"""The root half stays small and in one package: what runs as root is ``mep.root``, and no more than 1,500 lines.

(a) The mep modules every ``mep.root`` module imports, followed statically
(imports inside functions included), are ``mep.root.*`` and the ``mep``
package itself, and exactly the expected set: a new root module is a
decision, made here. (b) A real ``python -I -m mep.root --help`` and an import
of the spawner load none of the libraries root has no business with.
(c) The lines of code of that set (not blank, comment or docstring) are at
most 1,500: what an auditor reads in about an hour.
"""

from __future__ import annotations

import ast
import io
import subprocess
import tokenize
from pathlib import Path

import msgspec

import mep
from mep.config.manager import ManagerConfig
from mep.root.config import RootConfig
from tests.harness import PYTHON

PACKAGE = Path(mep.__file__).parent
# Issue 9's goal is 1,500 lines of code, which the root half does not meet yet (3,629 at first, 3,360, 2,575, then
# 2,501 now: the spawner, privdrop, identity mapping and the PAM session holder are the large parts). Until it does,
# this is a ratchet: the root half may shrink, never grow; lower it with every cut, down to GOAL_ROOT_LINES.
GOAL_ROOT_LINES = 1500
MAX_ROOT_LINES = 2501
EXPECTED_ROOT_MODULES = {
    "mep", "mep.root", "mep.root.__main__", "mep.root.accounts", "mep.root.assertions", "mep.root.audit",
    "mep.root.config", "mep.root.errors", "mep.root.guard",
    "mep.root.identity", "mep.root.keys", "mep.root.logs", "mep.root.mapping_file",
    "mep.root.messages", "mep.root.pam", "mep.root.policy_files", "mep.root.privdrop", "mep.root.receive",
    "mep.root.registry", "mep.root.router_process", "mep.root.sdnotify", "mep.root.session_holder",
    "mep.root.shadow", "mep.root.spawner", "mep.root.start",
}
FOREIGN = ("jinja2", "jsonschema", "pydantic", "click", "globus_identity_mapping", "dill", "parsl")


def module_file(name: str) -> Path | None:
    path = PACKAGE.parent.joinpath(*name.split("."))
    if path.is_dir():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def mep_imports(name: str) -> set[str]:
    """The mep modules ``name`` imports anywhere in its text; for the ``mep`` package, at its top level only.

    Importing ``mep.root`` runs ``mep/__init__.py``'s top level, not the lazy imports of its ``__getattr__``.
    """
    path = module_file(name)
    assert path is not None, name
    tree = ast.parse(path.read_text())
    nodes = tree.body if name == "mep" else list(ast.walk(tree))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}"))
    modules = set()
    for dotted in found:
        parts = dotted.split(".")
        if parts[0] == "mep":  # a package's import runs each parent's __init__ too
            modules.update(".".join(parts[:end]) for end in range(1, len(parts) + 1)
                           if module_file(".".join(parts[:end])))
    return modules


def root_closure() -> set[str]:
    starts = {f"mep.root.{path.stem}" for path in (PACKAGE / "root").glob("*.py") if path.stem != "__init__"}
    seen: set[str] = set()
    todo = ["mep.root", *starts]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(mep_imports(name))
    return seen


def code_lines(path: Path) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    source = path.read_text()
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    lines: set[int] = set()
    skipped = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skipped:
            lines.update(line for line in range(token.start[0], token.end[0] + 1) if line not in docstrings)
    return len(lines)


def test_root_imports_only_its_own_package() -> None:
    closure = root_closure()
    outside = sorted(name for name in closure if name != "mep" and not name.startswith("mep.root"))
    assert not outside, f"root modules import mep modules outside mep.root: {outside}"
    assert closure == EXPECTED_ROOT_MODULES


def loaded_by(*argv: str) -> set[str]:
    probe = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_module(sys.argv[0], run_name='__main__')\n"
             "except SystemExit:\n    pass\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    result = subprocess.run([PYTHON, "-I", "-c", probe, *argv], capture_output=True, text=True, cwd="/", check=True)
    return set(result.stdout.split())


def test_root_process_loads_no_foreign_library() -> None:
    help_text = subprocess.run([PYTHON, "-I", "-m", "mep.root", "--help"], capture_output=True, text=True, cwd="/",
                               check=True).stdout
    assert "--config" in help_text and "examples:" in help_text
    for loaded in (loaded_by("mep.root", "--help"), loaded_by("mep.root.spawner")):
        assert not loaded & set(FOREIGN), f"the root process loads {sorted(loaded & set(FOREIGN))}"


def test_root_code_never_grows() -> None:
    counts = {name: code_lines(module_file(name)) for name in root_closure()}
    total = sum(counts.values())
    largest = ", ".join(f"{name} {lines}" for name, lines in sorted(counts.items(), key=lambda item: -item[1])[:5])
    assert total <= MAX_ROOT_LINES, (f"the root half has {total} lines of code, over its ratchet of {MAX_ROOT_LINES} "
                                     f"(goal {GOAL_ROOT_LINES}; largest: {largest})")

def test_root_and_admin_config_agree_on_every_option() -> None:
    """One set of option names: the root's struct and the admin's model read the same keys with the same defaults."""
    admin = {field.alias or name: field for name, field in ManagerConfig.model_fields.items()}
    root = {field.encode_name: field for field in msgspec.structs.fields(RootConfig)}
    assert set(root) == set(admin)
    for key, field in root.items():
        if field.required:
            assert admin[key].is_required(), key
        else:
            default = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
            admin_default = admin[key].get_default(call_default_factory=True)
            if hasattr(admin_default, "model_dump"):  # a section (pam, endpoint_limits): compare its options
                admin_default, default = admin_default.model_dump(), msgspec.structs.asdict(default)
            assert admin_default == default, key

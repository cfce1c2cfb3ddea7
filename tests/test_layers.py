"""The package's layers: each module imports only from its own layer or the layers below it,
and no chain of imports comes back to where it started.

LAYERS below is the one place the order is written (bottom first). A module belongs to the
layer whose name is the longest prefix of its dotted name (the package's own `__init__`,
"refilled", covers only itself). Every import counts: at module
level, inside functions (the lazy ones that keep torch out of the scheduler process) and
`importlib.import_module("...")` with a literal name; so do the module names a package's
`__init__` loads on first use (PEP 562 tables).
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "src" / "refilled"

LAYERS = [
    ("refilled",),                            # the package itself: the version and the old paths' aliases
    ("refilled.io",),                         # atomic writes, tensor-only checkpoint files
    ("refilled.data",),                       # datasets, splits, batches, on-device augmentation
    ("refilled.models",),                     # the networks and their names
    ("refilled.losses", "refilled.evaluate"),  # tensor functions of model outputs
    ("refilled.methods",),                    # one file per method, the catalog
    ("refilled.training",),                   # the step, the loop, one run, checkpoints
    ("refilled.experiments",),                # a profile and the grid of runs it needs
    ("refilled.report",),                     # tables, figures, claims, reproduction
    ("refilled.tools",),                      # bench, doctor, pin, plan, FLOPs
    ("refilled.cli", "refilled.serve"),       # `refilled <command>` (wiring only), the fork server's process
]


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__) for every module of the package."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        modules[".".join(parts)] = (path, is_package)
    return modules


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            covers = module == name or (name != "refilled" and module.startswith(name + "."))
            if covers and len(name) > best_len:
                best, best_len = index, len(name)
    return best


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, is_package: bool, known: set[str]) -> dict[str, int]:
    """The package's modules `module` imports, each with the line of its first import."""
    found: dict[str, int] = {}

    def add(name: str, line: int):
        if name == "refilled" or name.startswith("refilled."):
            found.setdefault(name, line)

    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, is_package, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                add(sub if sub in known else target, node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            add(node.args[0].value, node.lineno)
        elif (is_package and module != "refilled" and isinstance(node, ast.Constant)
              and isinstance(node.value, str) and node.value in known):
            add(node.value, node.lineno)   # a lazy-loading table's entry
    found.pop(module, None)
    return found


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, dict[str, int]]:
    modules = module_files(package_dir)
    known = set(modules)
    return {name: imports_of(name, path, is_package, known) for name, (path, is_package) in modules.items()}


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, {}):
            if succ not in graph:
                continue
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_problems(graph: dict[str, dict[str, int]]) -> list[str]:
    problems = []
    for module in sorted(graph):
        mine = layer_of(module)
        if mine is None:
            problems.append(f"{module} is in no layer: move it into a layer's folder or name it in LAYERS")
            continue
        for target, line in sorted(graph[module].items()):
            if target not in graph:
                problems.append(f"{module}:{line} imports {target}, which is no module of src/refilled")
            elif (theirs := layer_of(target)) is not None and theirs > mine:
                problems.append(f"{module}:{line} imports {target}: layer {LAYERS[theirs][0]} is above "
                                f"{LAYERS[mine][0]}")
    return problems


def test_every_module_imports_only_from_its_layer_or_below():
    assert layer_problems(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_see_function_level_imports_cycles_and_upward_imports(tmp_path):
    """A planted package: data imports the report inside a function; two data modules import
    each other; a module outside every layer; an import of a module that does not exist."""
    pkg = tmp_path / "refilled"
    for sub in ("data", "report"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("from . import b\n\ndef f():\n    from refilled.report import tables\n")
    (pkg / "data" / "b.py").write_text("def g():\n    import refilled.data.a\n")
    (pkg / "report" / "tables.py").write_text("import refilled\nimport refilled.gone\n")
    (pkg / "stray.py").write_text("")
    graph = import_graph(pkg)
    assert graph["refilled.data.a"] == {"refilled.data.b": 1, "refilled.report.tables": 4}
    assert cycles(graph) == [["refilled.data.a", "refilled.data.b"]]
    problems = layer_problems(graph)
    assert "refilled.data.a:4 imports refilled.report.tables: layer refilled.report is above refilled.data" in problems
    assert "refilled.report.tables:2 imports refilled.gone, which is no module of src/refilled" in problems
    assert "refilled.stray is in no layer: move it into a layer's folder or name it in LAYERS" in problems
    assert len(problems) == 3


def test_cycles_finds_a_three_module_ring_and_not_a_chain():
    ring = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert cycles(ring) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) == []


# ---- old module paths ----

def moved() -> dict[str, str]:
    import refilled

    return refilled._MOVED


@pytest.mark.parametrize("old", sorted(moved()))
def test_an_old_module_path_is_the_new_module_with_a_warning(old):
    new = moved()[old]
    assert not (PACKAGE_DIR.parent / (old.replace(".", "/") + ".py")).exists(), f"{old} is back as a file"
    code = (f"import sys, warnings\nwarnings.simplefilter('error')\nimport {new} as new\n"
            f"try:\n    import {old}\nexcept DeprecationWarning as w:\n    print('WARNED', w)\n"
            f"warnings.simplefilter('ignore')\nimport {old} as old\nprint(old is new, sys.modules['{old}'] is new)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [f"WARNED {old} moved to {new}; import it from there", "True True"]


def test_public_module_paths_stay():
    for name in ("refilled.losses", "refilled.evaluate", "refilled.cli"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert importlib.import_module(name).__name__ == name
    assert "refilled.losses" not in moved() and "refilled.evaluate" not in moved()


def test_the_repository_names_no_old_module_path():
    """Tests, scripts and the workflow import the new paths (the aliases are for users' code)."""
    old = "|".join(re.escape(name.split(".", 1)[1]) for name in moved())
    pattern = re.compile(rf"(?<![\w.])refilled\.({old})(?!\w)|from refilled import ({old})\b|refilled/({old})\.py\b")
    files = [*ROOT.joinpath("src").rglob("*.py"), *ROOT.joinpath("tests").glob("*.py"),
             *ROOT.joinpath("scripts").glob("*"), *ROOT.joinpath("workflow").rglob("*.smk"),
             ROOT / "Snakefile", ROOT / "dvc.yaml", ROOT / "pyproject.toml"]
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for path in files if path.is_file() and path != Path(__file__).resolve()
            and path != PACKAGE_DIR / "__init__.py"
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_python_dash_m_with_an_old_module_path_runs_the_moved_module(tmp_path):
    """`python -m refilled.flops` (as older docs and scripts write it) runs refilled.tools.flops."""
    out = subprocess.run([sys.executable, "-m", "refilled.flops", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m refilled.tools.flops")

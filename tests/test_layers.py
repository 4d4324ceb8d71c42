"""The package's layers import one way, and a plain in-process fit stays off Dask's heavy parts.

Layers, lowest first (``merf_dask/__init__.py`` documents them)::

    rank 0  core                          pure numpy
    rank 1  simulate, learners, formula
    rank 2  dask                          the Dask driver
    rank 3  io                            lakes, model directories, checkpoints, reports
    rank 4  estimator                     MERF
    rank 5  cli

A module may import any module of a lower rank, and modules of its own rank only inside its
own layer (``core.em`` may import ``core.ensemble``; ``formula`` may not import ``learners``).
``merf_dask/__init__.py`` sits between the estimator and the CLI: it may import the estimator
(and everything below), and only the CLI may import it. Every import counts: at module level,
inside functions, under ``if TYPE_CHECKING:``, relative or absolute.
"""

import ast
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

PACKAGE = "merf_dask"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: layer -> rank; a module's layer is the first component below ``merf_dask``
RANKS = {"core": 0, "simulate": 1, "learners": 1, "formula": 1, "dask": 2, "io": 3,
         "estimator": 4, "cli": 5}
#: ``merf_dask/__init__.py`` imports the estimator, so only the CLI may import it
PACKAGE_RANK = 4.5

#: Imports that break the layering today and are being removed, as (importer, imported, the
#: function holding the import). Exactly these are tolerated; any other upward import fails.
#: Delete an entry once its import is gone (the test warns when an entry no longer matches).
KNOWN_VIOLATIONS: set[tuple[str, str, str]] = set()

#: what the pure numerical core never imports
FORBIDDEN_IN_CORE = {"dask", "distributed", "fsspec", "pyarrow"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _rank(module: str) -> float:
    if module == PACKAGE:
        return PACKAGE_RANK
    return RANKS[_layer(module)]


def _known(name: str) -> str:
    """The module ``name`` refers to: itself, or its longest prefix that is a module here
    (``import merf_dask.core.em.x`` is an import of ``merf_dask.core.em``)."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


class _Imports(ast.NodeVisitor):
    """Every import of one module: (target, enclosing function, line); targets inside
    ``merf_dask`` are module names, others the top-level package's name."""

    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.scope: list[str] = []
        self.found: list[tuple[str, str, int]] = []

    def _enter(self, node):
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _enter

    def _add(self, target: str, node):
        self.found.append((target, ".".join(self.scope) or "<module>", node.lineno))

    def visit_Import(self, node):
        for alias in node.names:
            name = alias.name
            self._add(_known(name) if name.split(".")[0] == PACKAGE else name.split(".")[0],
                      node)

    def visit_ImportFrom(self, node):
        if node.level:
            package = self.module if self.is_package else self.module.rpartition(".")[0]
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - (node.level - 1)])
            if node.module:
                base = f"{base}.{node.module}"
        else:
            base = node.module
        if base.split(".")[0] != PACKAGE:
            self._add(base.split(".")[0], node)
            return
        for alias in node.names:
            # "from .core import validation" imports the module merf_dask.core.validation;
            # "from .em import run_em" imports merf_dask.core.em
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in MODULES else _known(base), node)


def _imports() -> dict[str, list[tuple[str, str, int]]]:
    found = {}
    for module, path in MODULES.items():
        visitor = _Imports(module, is_package=path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        found[module] = visitor.found
    return found


IMPORTS = _imports()


def _internal_edges():
    """(importer, imported, function, line) of every import between two merf_dask modules."""
    for importer, found in IMPORTS.items():
        for target, scope, line in found:
            if target.split(".")[0] == PACKAGE and target != importer:
                yield importer, target, scope, line


def test_every_module_belongs_to_a_layer():
    unknown = [m for m in MODULES if m != PACKAGE and _layer(m) not in RANKS]
    assert not unknown, f"give these modules a layer in RANKS (and merf_dask/__init__): {unknown}"
    assert {"merf_dask.core.em", "merf_dask.estimator", "merf_dask.io.artifacts",
            "merf_dask.dask.em", "merf_dask.cli"} <= set(MODULES)


def test_the_parser_sees_relative_absolute_and_function_level_imports():
    # a check of the checker, so that a parser bug cannot hide violations
    source = textwrap.dedent("""
        from ..core import validation
        from ..core.em import run_em
        from . import filesystem
        from .. import __version__
        import merf_dask.dask.em as dem
        import numpy.linalg
        def load_model():
            from ..estimator import MERF
            class Local:
                def method(self):
                    import distributed.client
        """)
    visitor = _Imports("merf_dask.io.artifacts", is_package=False)
    visitor.visit(ast.parse(source))
    assert [(target, scope) for target, scope, _ in visitor.found] == [
        ("merf_dask.core.validation", "<module>"), ("merf_dask.core.em", "<module>"),
        ("merf_dask.io.filesystem", "<module>"), ("merf_dask", "<module>"),
        ("merf_dask.dask.em", "<module>"), ("numpy", "<module>"),
        ("merf_dask.estimator", "load_model"), ("distributed", "load_model.Local.method")]
    # and on the package itself: its __init__ imports the estimator
    assert ("merf_dask", "merf_dask.estimator", "<module>") in {
        (a, b, scope) for a, b, scope, _ in _internal_edges()}


def test_layers_import_one_way():
    violations, tolerated = [], set()
    for importer, target, scope, line in _internal_edges():
        low, high = _rank(target), _rank(importer)
        if low < high or (low == high and _layer(target) == _layer(importer)
                          and importer != PACKAGE):
            continue
        if (importer, target, scope) in KNOWN_VIOLATIONS:
            tolerated.add((importer, target, scope))
            continue
        violations.append(f"{MODULES[importer].relative_to(ROOT.parent)}:{line} ({scope}): "
                          f"{importer} (rank {high}) imports {target} (rank {low})")
    for stale in set(KNOWN_VIOLATIONS) - tolerated:
        warnings.warn(f"KNOWN_VIOLATIONS entry {stale} no longer occurs: delete it", UserWarning)
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for importer, target, scope, _ in _internal_edges():
        if (importer, target, scope) not in KNOWN_VIOLATIONS:
            graph[importer].add(target)
    # Tarjan's strongly connected components: a component of more than one module is a cycle
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
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
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_core_imports_no_dask_distributed_fsspec_or_pyarrow():
    found = [f"{module}:{line} ({scope}) imports {target}"
             for module, imports in IMPORTS.items() if _layer(module) == "core"
             for target, scope, line in imports if target.split(".")[0] in FORBIDDEN_IN_CORE]
    assert not found, "\n".join(found)


# ------------------------------------------------- what an in-process fit imports at run time

def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


HEAVY = ("distributed", "dask.dataframe")

#: a meta-path hook that prints the stack of the first import of a heavy module, so that a
#: failure names the line that imported it
_TRACE_HEAVY = f"""
    import sys, traceback
    class _Trace:
        def find_spec(self, name, path=None, target=None):
            if name in {HEAVY!r}:
                print(f"--- import of {{name}}:", "".join(traceback.format_stack(limit=15)))
            return None
    sys.meta_path.insert(0, _Trace())
"""


def test_import_merf_dask_imports_neither_distributed_nor_dask_dataframe():
    out = _run(_TRACE_HEAVY + f"""
    import merf_dask
    print("loaded:", sorted(set({HEAVY!r}) & set(sys.modules)))
    """)
    assert "loaded: []" in out, out


@pytest.mark.parametrize("heavy", HEAVY)
def test_in_process_fit_does_not_import(heavy):
    # merf_dask is imported (and the frame built) before the check starts: this is the fit alone
    out = _run(_TRACE_HEAVY + f"""
    import warnings
    from helpers import simulate_lmm
    from merf_dask import MERF
    frame = simulate_lmm(n_clusters=20, seed=0, slope=False)
    before = {heavy!r} in sys.modules
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MERF(formula="y ~ x1 + (1 | g)", max_iterations=2, random_state=0).fit(frame)
        model.predict(frame)
    print("before:", before, "after:", {heavy!r} in sys.modules)
    """)
    assert "before: False after: False" in out, out

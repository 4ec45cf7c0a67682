"""Import rules of the package, checked on its source with ``ast`` (nothing is imported to check them).

- ``measure`` is a leaf: it imports nothing of ours (only torch, the standard library, safetensors).
- ``quantization/`` never imports ``pruning/`` or ``distillation/``.
- The module import graph is acyclic. Every ``import``/``from ... import`` counts, function-level
  (lazy) imports included, ``if TYPE_CHECKING:`` blocks excluded. ``from pkg import name`` is an edge to
  ``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``). The implicit import of a
  parent package (``a.b.c`` runs ``a/b/__init__`` first) is not an edge: it would make every package
  whose ``__init__`` re-exports its submodules a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import lightning_compress

PACKAGE = "lightning_compress"
ROOT = Path(lightning_compress.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement at any depth (functions, classes, try blocks), except under TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import in ``path``: ours resolved to modules, others as written."""
    is_package = path.name == "__init__.py"
    out: list[tuple[str, int]] = []
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
            continue
        if node.level:  # relative: resolve against this module's package
            base = name.split(".")
            base = base[: len(base) - node.level + (1 if is_package else 0)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            candidate = f"{source}.{alias.name}"
            out.append((candidate if candidate in modules else source, node.lineno))
    return out


def _ours(target: str) -> bool:
    return target == PACKAGE or target.startswith(PACKAGE + ".")


def _graph() -> dict[str, dict[str, int]]:
    """``{module: {imported module of ours: line}}``."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in _imports(name, path, modules):
            if _ours(target) and target != name:
                assert target in modules, f"{path}:{line} imports {target!r}, which is not a module of the package"
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = grey
        stack.append(node)
        for nxt in sorted(graph[node]):
            if color[nxt] == grey:
                return stack[stack.index(nxt) :] + [nxt]
            if color[nxt] == white:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        color[node] = black
        return None

    for node in sorted(graph):
        if color[node] == white:
            found = visit(node)
            if found:
                return found
    return None


def _describe_cycle(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_graph_sees_every_kind_of_import() -> None:
    """The checker itself: lazy, relative and ``from pkg import module`` imports are edges."""
    graph = _graph()
    assert "lightning_compress.measure" in graph
    # a module-level import and a submodule named in `from pkg import name`
    assert "lightning_compress.schedules" in graph["lightning_compress"]
    assert "lightning_compress.plugin" in graph["lightning_compress.report"]
    # a function-level import (ClassifierModule imports reload lazily)
    assert "lightning_compress.pruning.reload" in graph["lightning_compress.module"]


def test_find_cycle_reports_the_loop() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": 1}, "b": {}}) is None


@pytest.mark.parametrize("leaf", ["lightning_compress.measure", "lightning_compress.flop_formulas"])
def test_measure_imports_nothing_of_ours(leaf: str) -> None:
    """Measurement is a leaf: measure.py and its FLOP formulas import only torch, the standard library and
    safetensors (measure.py the formulas too)."""
    modules = _modules()
    path = modules[leaf]
    allowed = set(sys.stdlib_module_names) | {"__future__", "torch", "safetensors"}
    imports = _imports(leaf, path, modules)
    bad = [(t, line) for t, line in imports if t.split(".")[0] not in allowed and t != "lightning_compress.flop_formulas"]
    assert not bad, f"{leaf} must import only torch, the standard library and safetensors; it imports {bad}"


@pytest.mark.parametrize("forbidden", ["lightning_compress.pruning", "lightning_compress.distillation"])
def test_quantization_does_not_import(forbidden: str) -> None:
    graph = _graph()
    bad = [
        f"{name} (line {line}) imports {target}"
        for name, edges in graph.items()
        if name == "lightning_compress.quantization" or name.startswith("lightning_compress.quantization.")
        for target, line in edges.items()
        if target == forbidden or target.startswith(forbidden + ".")
    ]
    assert not bad, "; ".join(bad)


def test_no_import_cycle() -> None:
    graph = _graph()
    cycle = _find_cycle(graph)
    assert cycle is None, f"import cycle: {_describe_cycle(cycle, graph)}"


def test_report_still_exports_the_measuring_functions() -> None:
    """Users import them from ``lightning_compress.report``: the same objects as in ``measure``."""
    from lightning_compress import measure, report

    names = ("count_macs", "count_parameters", "measure_latency", "safetensors_tensors", "serialized_size")
    for name in (*names, "storage_region", "SIZE_FORMATS"):
        assert getattr(report, name) is getattr(measure, name), name
    assert set(measure.__all__) - {"device_of", "layer_input_shapes", "probe_input", "tensor_batch_axis"} <= set(report.__all__)  # helpers


def test_names_moved_by_a_split_still_import_from_their_former_module() -> None:
    """Imports and pickles that name a class or function at its home before a file was split keep working."""
    from lightning_compress.pruning import masks
    from lightning_compress.pruning.channel_masks import ChannelGroupSpec
    from lightning_compress.pruning.mask_storage import pack_mask
    from lightning_compress.quantization import lowbit
    from lightning_compress.quantization.int8_linear import Int8Linear
    from lightning_compress.quantization.lowbit_attention import _refresh_attention, convert_attention

    assert (masks.ChannelGroupSpec, masks.pack_mask) == (ChannelGroupSpec, pack_mask)
    assert (lowbit.Int8Linear, lowbit.convert_attention, lowbit._refresh_attention) == (Int8Linear, convert_attention, _refresh_attention)

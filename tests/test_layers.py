"""The package layering: every import between moecompress's packages (and top-level modules) points down this list,
so there is no package cycle and no upward arrow. Imports inside `if TYPE_CHECKING:` are left out (they run only
for type checkers); imports inside functions count like any other."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moecompress"

# Lowest first. A unit may import the units before it, never one after it.
LAYERS = [
    "errors",
    "distributed",  # expert-parallel ranks on torch.distributed
    "storage",  # tensor files, outputs, the layer store
    "formats",  # packed formats, QTensor, bit packing
    "models",  # adapters, the block view, loading and streaming
    "runtime",  # packed / factored expert modules, kernels, installing them
    "calibration",
    "quant",
    "analysis",
    "allocation",
    "training",
    "merge",
    "slim",
    "dynamic",
    "io",  # checkpoints, integrity, loading, transformers integration, export layouts
    "evaluation",
    "report",
    "hub",  # Hub export and model card: above evaluation and report
    "stages",
    "recipe",  # assembled from the registered stages
    "pipeline",
    "api",
    "cli",
    "__main__",
    "__init__",
]


def unit(module: str) -> str:
    """The layer unit of a dotted module name below moecompress: its package, or the top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = ["moecompress", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str | None = None) -> set[str]:
    """moecompress modules imported by the file at `path`, module `name` (default: its name in the package), outside
    `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in node.body
        for n in ast.walk(child)
    }
    here = (name or module_name(path)).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
            found.update(n for n in names if n.startswith("moecompress"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("moecompress"))
    return found


def arrows() -> list[tuple[str, str, str]]:
    """(importing module, its unit, imported unit) for every import that crosses units."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        for target in imports(path):
            if target != "moecompress" and unit(target) != unit(source):
                out.append((source, unit(source), unit(target)))
    return out


def test_every_unit_has_a_layer():
    units = {unit(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units <= set(LAYERS), f"place {sorted(units - set(LAYERS))} in LAYERS"


def test_no_import_points_up_the_layers():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"{m} -> {t}" for m, u, t in arrows() if rank[t] > rank[u]]
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_no_package_cycle():
    graph: dict[str, set[str]] = {}
    for _, u, t in arrows():
        graph.setdefault(u, set()).add(t)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail("package cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_check_finds_an_upward_import_and_skips_type_only_ones(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..stages import X\n"
        "from ..pipeline import compress\nfrom . import bitpack\n\ndef f():\n    from ..io.loader import load\n"
    )
    found = imports(probe, "moecompress.formats.probe")
    assert found == {"moecompress.pipeline", "moecompress.formats.bitpack", "moecompress.io.loader"}
    rank = {name: i for i, name in enumerate(LAYERS)}
    assert [t for t in found if rank[unit(t)] > rank["formats"]] != []

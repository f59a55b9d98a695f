"""The package's import graph is layered and acyclic: config -> modeling -> (convert, zero) -> (tower, hf, features)
-> (commands, launch), each module importing only its own layer or lower ones.

The graph is read from the source with `ast` (no import is executed), lazy imports inside functions included, so a
cycle hidden behind a function-level import is caught too. `importlib.import_module` strings (the package's lazy
exports, the CLI's command dispatch) are not imports of the module that names them and are not counted."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = "llava_evaclip"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# Lowest first. Names are the first component below the package; "" is the package's own __init__ (it imports the
# config and the models eagerly). `presets` is data (plain Python) below the configuration that is built from it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_compat", "_processes", "_safetensors", "presets", "tokenization"),
    ("configuration_evaclip",),
    ("modeling_evaclip", "processing", ""),
    ("convert", "zero"),
    ("tower", "hf", "features", "llava_registry"),
    ("commands", "launch", "cli", "__main__"),
)
LAYER_OF = {name: index for index, names in enumerate(LAYERS) for name in names}

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative / "__init__.py").is_file()


def _imports(path: Path, module: str) -> set[str]:
    """Every package module `module` imports, at top level or inside functions."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from . import zero` imports the submodule; `from . import __version__` the package itself.
            submodules = [f"{source}.{alias.name}" for alias in node.names if _is_module(f"{source}.{alias.name}")]
            targets = submodules or [source]
        else:
            continue
        found.update(t for t in targets if t == PACKAGE or t.startswith(PACKAGE + "."))
    found.discard(module)
    return found


GRAPH = {_module_name(path): _imports(path, _module_name(path)) for path in sorted(ROOT.rglob("*.py"))}


def _layer_key(module: str) -> str:
    return module[len(PACKAGE) + 1:].split(".")[0] if module != PACKAGE else ""


def _cycle_members() -> dict[str, list[str]]:
    """Each module on an import cycle, with one cycle through it (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, members = {}, {}, [], set(), {}

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                for member in component:
                    members[member] = sorted(component)

    for node in GRAPH:
        if node not in index:
            visit(node)
    return members


def test_graph_is_read() -> None:
    """The parser sees the imports it must see (guards against a parser that finds nothing and passes everything)."""
    assert f"{PACKAGE}.configuration_evaclip" in GRAPH[f"{PACKAGE}.modeling_evaclip"]
    assert f"{PACKAGE}.presets" in GRAPH[f"{PACKAGE}.configuration_evaclip"]  # `from . import presets`
    assert f"{PACKAGE}.tower" in GRAPH[f"{PACKAGE}.commands._common"]  # a lazy import inside a function
    assert f"{PACKAGE}.commands._common" in GRAPH[f"{PACKAGE}.commands.features"]


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in GRAPH if _layer_key(m) not in LAYER_OF)
    assert not unplaced, f"add these modules to LAYERS in {Path(__file__).name}: {unplaced}"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_module_imports_only_downward(module: str) -> None:
    layer = LAYER_OF[_layer_key(module)]
    upward = sorted(t for t in GRAPH[module] if LAYER_OF[_layer_key(t)] > layer)
    assert not upward, f"{module} (layer {layer}) imports higher layers: {upward}"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_module_is_on_no_import_cycle(module: str) -> None:
    cycle = _cycle_members().get(module)
    assert cycle is None, f"{module} is on an import cycle through {cycle}"


def test_presets_is_plain_python() -> None:
    """Preset data imports only the standard library: listing presets needs neither torch nor transformers."""
    tree = ast.parse((ROOT / "presets.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." if node.level else (node.module or "").split(".")[0])
    assert imported <= set(sys.stdlib_module_names), sorted(imported - set(sys.stdlib_module_names))

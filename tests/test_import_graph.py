"""The packages' import graphs: no cycle (module-level and function-local imports both count) and no import from
a lower layer of thinking_pixel into a higher one. Read from the source with ast; nothing is imported."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# thinking_pixel's layers, lowest first. A module belongs to the layer of its longest listed prefix and may import
# from its own layer (cycles are checked separately) and the layers below.
LAYERS = [
    # foundations: files, argument checks, presets, run-time settings, the command-line vocabulary
    ["_fileio", "_checks", "_presets", "_interrupts", "_runtime", "_arguments", "distributed"],
    # run directories, sample directories, datasets' base classes, diffusion processes, text encoders
    ["_run_dir", "_samples", "data", "diffusion", "text"],
    # the tasks' worlds and their datasets
    ["tasks"],
    # metrics and routing statistics / figures
    ["metrics", "analysis.statistics", "analysis.plots"],
    # the base models
    ["models"],
    # the method
    ["recursion"],
    # the text-to-image model (diffusers' SD3 with the recursion)
    ["text_to_image.model"],
    # loading any model, building any dataset, probing models, the training configuration
    ["checkpoints", "datasets", "analysis", "train_config"],
    # what runs: training, sampling, evaluation, analysis, the text-to-image and FrozenLake workflows, the CLI
    ["", "__main__", "cli", "train", "_train_log", "sample", "evaluate", "analyze", "text_to_image",
     "tasks.frozenlake.planner", "tasks.frozenlake.figures", "tasks.frozenlake.cli"],
]


def modules(package: str) -> dict[str, Path]:
    """Dotted name -> file, for every module of ``package`` (a package's own name for its __init__.py)."""
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_edges(package: str) -> set[tuple[str, str]]:
    """(importer, imported) for every import of a module of ``package`` inside the package, at any depth."""
    mods = modules(package)
    edges = set()
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")
                    base = base[:len(base) - node.level + is_package]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in mods else target
                           for alias in node.names]
            else:
                continue
            edges |= {(name, t) for t in targets if t in mods and t != name}
    return edges


def cycles(edges) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    """The layer of a thinking_pixel module: that of its longest matching prefix in LAYERS."""
    rel = module.removeprefix("thinking_pixel").removeprefix(".")
    best = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if rel == prefix or rel.startswith(prefix + ".") or (prefix == "" and rel == ""):
                if best is None or len(prefix) > len(best[1]):
                    best = (i, prefix)
    assert best is not None, f"{module} is in no layer of test_import_graph.LAYERS: place it there"
    return best[0]


@pytest.mark.parametrize("package", ["thinking_pixel", "tp_kernels"])
def test_no_import_cycle(package):
    assert cycles(import_edges(package)) == []


def test_every_import_goes_down_or_sideways():
    upward = sorted(f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
                    for a, b in import_edges("thinking_pixel") if layer(b) > layer(a))
    assert upward == []


def test_the_kernels_do_not_import_the_models():
    for path in modules("tp_kernels").values():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] == "thinking_pixel" for n in names), path


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
    assert layer("thinking_pixel.models.dit") < layer("thinking_pixel.recursion.layers")
    assert layer("thinking_pixel.text_to_image.model") < layer("thinking_pixel.text_to_image.sampling")
    assert layer("thinking_pixel.tasks.frozenlake.maps") < layer("thinking_pixel.tasks.frozenlake.planner")

"""Imports run one way: from the entry points down to BLIP's own facts and LAVIS. The
package's modules form layers; a module imports only from its own layer or below, the
graph has no cycle, and an import inside a function is there for a stated reason (listed
here), never to dodge a cycle. The library does not import its test fixtures."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "lavis_dlip"
# lowest first; a module's layer is that of its longest listed prefix
LAYERS = [
    ["lavis_dlip.errors", "lavis_dlip.paths", "lavis_dlip.demo_table"],
    ["lavis_dlip.renamed"],
    ["lavis_dlip.checkpoint", "lavis_dlip.runs", "lavis_dlip.process", "lavis_dlip.seeds"],
    ["lavis_dlip.run_yaml"],
    ["lavis_dlip.compat", "lavis_dlip.blip", "lavis_dlip.schema"],
    ["lavis_dlip.models", "lavis_dlip.datasets"],
    ["lavis_dlip.distill"],
    ["lavis_dlip.tasks", "lavis_dlip.runners"],
    ["lavis_dlip.registration", "lavis_dlip.config", "lavis_dlip.cli", "lavis_dlip.report", "lavis_dlip.stages",
     "lavis_dlip.kept", "lavis_dlip.export", "lavis_dlip.serve"],
    ["lavis_dlip.train", "lavis_dlip.evaluate", "lavis_dlip.cache_teacher", "lavis_dlip.demo", "lavis_dlip.study",
     "lavis_dlip.shards"],
    ["lavis_dlip.testing"],  # fixtures for tests and benchmarks: nothing in the library imports them
]
# imports inside a function, and why (none to dodge a cycle)
IN_FUNCTION = {
    ("lavis_dlip.compat", "lavis_dlip.blip.tokenizer"):
        "compat fixes torchvision before `import lavis`, which blip.tokenizer's importers import",
    ("lavis_dlip.config", "lavis_dlip"): "load_config registers the plugin before LAVIS's Config looks names up",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _layer(name: str) -> int:
    best = max(((len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
                if name == prefix or name.startswith(prefix + ".")), default=None)
    assert best is not None, f"{name} is in no layer of tests/test_imports.py"
    return best[1]


def _imports(modules: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(importer, imported module of the package, inside a function) for every import."""
    def owner(candidate: str) -> str:
        while candidate and candidate not in modules:
            candidate = candidate.rpartition(".")[0]
        return candidate

    edges = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        inside = {id(node) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for node in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            else:
                continue
            for target in {owner(t) for t in targets if t.startswith("lavis_dlip")}:
                if target and target != name:
                    edges.append((name, target, id(node) in inside))
    return edges


def test_imports_run_down_the_layers_without_cycles():
    modules = _modules()
    edges = _imports(modules)
    up = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})" for a, b, _ in edges
          if "lavis_dlip" not in (a, b) and _layer(b) > _layer(a)]
    assert not up, "imports from a lower layer to a higher one:\n" + "\n".join(up)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for a, b, _ in edges:
        if b != "lavis_dlip":
            graph[a].add(b)
    # Tarjan's strongly connected components: a component of more than one module is a cycle
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_inside_functions_are_the_listed_ones():
    inner = sorted({(a, b) for a, b, inside in _imports(_modules()) if inside})
    unlisted = [f"{a} imports {b} inside a function" for a, b in inner if (a, b) not in IN_FUNCTION]
    assert not unlisted, "\n".join(unlisted)


def test_the_library_does_not_import_its_test_fixtures():
    users = sorted({a for a, b, _ in _imports(_modules()) if b.startswith("lavis_dlip.testing")
                    and not a.startswith("lavis_dlip.testing")})
    assert not users, users

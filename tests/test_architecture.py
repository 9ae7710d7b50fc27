"""The package's layering, checked from the source: data flows one way and no import runs back up.

Layers, lowest first (docs/architecture.md): the kernel core and presentation primitives; data; models;
attacks / detectors / export; runs; report; the applications (audit, score, CLI, bench). Every ``engine`` import
in every module, including imports inside functions, must go to the same or a lower layer, the module graph must
have no cycle, and no function may import an engine module (which is how cycles used to be dodged) except the
compiled extension, loaded lazily so a failed build is reported when a kernel is first used, and what the command
line needs once a command is parsed (so ``hfc-engine --help`` and ``--version`` need not import torch).
"""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "engine"
LAYERS = [  # module-name prefixes per layer, lowest first
    ("engine._C", "engine._C_cuda", "engine.errors", "engine.fileio", "engine.html", "engine.mixture", "engine.ops",
     "engine.reference", "engine.metrics", "engine.kernels"),
    ("engine.data",),
    ("engine.models",),
    ("engine.attacks", "engine.detectors", "engine.export"),
    ("engine.runs",),
    ("engine.report",),
    ("engine.auditing", "engine.score", "engine.commands", "engine.cli", "engine.bench"),
]  # fmt: skip
LAZY_ALLOWED = {
    ("engine.ops._backend", "engine._C"),
    # the command line imports the engine once a command is parsed, so --help and --version start fast
    ("engine.cli", "engine.commands"),
    ("engine.cli", "engine.runs.executor"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ENGINE.rglob("*.py"):
        parts = path.relative_to(ENGINE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    """The engine module an import names (``from engine.<pkg> import <name>`` may name module
    ``engine.<pkg>.<name>``)."""
    if name.split(".")[:2] in (["engine", "_C"], ["engine", "_C_cuda"]):  # the compiled extensions
        return ".".join(name.split(".")[:2])
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported engine module, inside a function) for every import statement of a module."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").startswith("engine"):
                for alias in child.names:
                    found.append((_resolve(f"{child.module}.{alias.name}"), in_function))
            elif isinstance(child, ast.Import):
                found.extend((_resolve(a.name), in_function) for a in child.names if a.name.startswith("engine"))
            visit(child, inner)

    visit(tree, False)
    return [(target, local) for target, local in found if target != name]


def _layer(name: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"module {name} is in no layer of tests/test_architecture.py")


GRAPH = {name: _imports(name, path) for name, path in MODULES.items() if name != "engine"}  # engine: lazy facade


def test_every_module_has_a_layer():
    for name in GRAPH:
        _layer(name)


def test_no_import_runs_up_a_layer():
    upward = [
        f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
        for name, targets in GRAPH.items()
        for target, _ in targets
        if target != "engine" and _layer(target) > _layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_function_imports_an_engine_module():
    local = [
        f"{name} imports {target} inside a function"
        for name, targets in GRAPH.items()
        for target, inside in targets
        if inside and (name, target) not in LAZY_ALLOWED
    ]
    assert not local, "\n".join(local)


def test_the_module_graph_has_no_cycle():
    edges = {name: {t for t, _ in targets if t in GRAPH} for name, targets in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in edges:
        if node not in index:
            strongconnect(node)
    assert not cycles, f"import cycles: {cycles}"

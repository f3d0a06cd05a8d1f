"""The package's shape: imports go one way (down the layers), no import cycle, no module
reaches into another's private names, and the command line talks to the service over HTTP
only."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import ROOT

# Lower layers never import higher ones. Within a layer, modules may import each other
# (without cycles, checked below).
LAYERS = [
    ("gateway.config", "gateway.errors", "gateway.accounts", "gateway.redaction", "gateway.sync_gate",
     "gateway.signing", "gateway.metrics", "gateway.logs", "gateway.readiness"),
    ("gateway.engine",),
    ("gateway.jobs",),
    ("gateway.state",),
    ("gateway.api",),
    ("gateway.app",),
]
PACKAGES = ("gateway", "replicate_emulator", "bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in (ROOT / package).rglob("*.py")}


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it), function-level imports included."""
    found = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.append((base, [alias.name for alias in node.names]))
    return found


def layer_of(name: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    return None


def internal_graph() -> dict[str, set[str]]:
    known = modules("gateway")
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for target, names in imports_of(path):
            for candidate in [target, *(f"{target}.{n}" for n in names)]:
                if candidate in known and candidate != name:
                    graph[name].add(candidate)
    return graph


def test_the_service_has_no_import_cycle():
    graph, state, stack = internal_graph(), {}, []

    def visit(node: str) -> None:
        state[node] = "visiting"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "visiting":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_imports_only_go_down_the_layers():
    upward = []
    for name, targets in internal_graph().items():
        if name.startswith("gateway.cli") or name == "gateway":
            continue
        for target in targets:
            here, there = layer_of(name), layer_of(target)
            assert here is not None, f"{name} belongs to no layer: add it to LAYERS"
            if there is not None and there > here:
                upward.append(f"{name} imports {target}")
    assert not upward, upward


def test_the_command_line_uses_nothing_of_the_service():
    for name, path in modules("gateway").items():
        if name.startswith("gateway.cli"):
            outside = [t for t, _ in imports_of(path) if t.startswith("gateway") and not t.startswith("gateway.cli")]
            assert not outside, (name, outside)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_takes_another_modules_private_names(package):
    offenders = []
    for name, path in modules(package).items():
        for target, names in imports_of(path):
            if target.split(".")[0] in PACKAGES and target != name:
                offenders += [f"{name}: from {target} import {n}" for n in names if n.startswith("_")]
    assert not offenders, offenders

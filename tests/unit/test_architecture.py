"""DESIGN.md's rules of the house, checked on the import statements themselves."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (TYPE_CHECKING blocks and functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def sources(package: str) -> list[Path]:
    return sorted(
        p for p in (ROOT / package).rglob("*.py") if "pb" not in p.relative_to(ROOT).parts
    )


def offending(paths: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad: dict[str, list[str]] = {}
    for path in paths:
        hits = sorted(
            m
            for m in imported_modules(path)
            if any(m == f or m.startswith(f + ".") for f in forbidden)
        )
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    return bad


PROTOCOLS = ("serving.grpc", "serving.rest")


def test_protocols_take_only_the_data_plane_from_the_core() -> None:
    """Servicers, handlers and their message builders see the core through `core.dataplane`."""
    protocol_code = sources("serving/grpc") + sources("serving/rest")
    assert protocol_code, "serving/grpc and serving/rest have no modules"
    bad = {
        path: [m for m in hits if not m.startswith("serving.core.dataplane")]
        for path, hits in offending(protocol_code, ("serving.core",)).items()
    }
    assert {path: hits for path, hits in bad.items() if hits} == {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_serving_has_no_import_cycles() -> None:
    """Every module of `serving` (generated code aside), TYPE_CHECKING imports included."""
    modules = {module_name(p): p for p in sources("serving")}
    graph = {
        name: {
            m
            for m in imported_modules(path)
            if m in modules and m != name and not name.startswith(m + ".")
        }
        for name, path in modules.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_tensors_module_imports_nothing_of_the_server() -> None:
    allowed_roots = set(sys.stdlib_module_names) | {"numpy", "__future__"}
    found = imported_modules(ROOT / "serving" / "tensors.py")
    assert {m for m in found if m.split(".")[0] not in allowed_roots} == set()


@pytest.mark.parametrize(("package", "other"), [("training", "serving"), ("serving", "training")])
def test_training_and_serving_never_import_each_other(package: str, other: str) -> None:
    assert offending(sources(package), (other,)) == {}


def test_the_core_knows_nothing_of_grpc_or_http() -> None:
    core = sources("serving/core")
    assert core, "serving/core has no modules"
    forbidden = ("grpc", "aiohttp", "uvicorn", "starlette", "serving.pb", *PROTOCOLS)
    assert offending(core, forbidden) == {}

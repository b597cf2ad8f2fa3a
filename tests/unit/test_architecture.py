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


def test_servicers_and_handlers_talk_only_to_the_data_plane() -> None:
    api = sources("serving/api")
    assert api, "serving/api has no modules"
    forbidden = ("serving.repository", "serving.runtime", "serving.batching")
    assert offending(api, forbidden) == {}


def test_tensors_module_imports_nothing_of_the_server() -> None:
    allowed_roots = set(sys.stdlib_module_names) | {"numpy", "__future__"}
    found = imported_modules(ROOT / "serving" / "tensors.py")
    assert {m for m in found if m.split(".")[0] not in allowed_roots} == set()


@pytest.mark.parametrize(("package", "other"), [("training", "serving"), ("serving", "training")])
def test_training_and_serving_never_import_each_other(package: str, other: str) -> None:
    assert offending(sources(package), (other,)) == {}


def test_the_runtime_and_batcher_know_nothing_of_grpc_or_http() -> None:
    core = [
        ROOT / "serving" / f for f in ("runtime.py", "batching.py", "dataplane.py", "admission.py")
    ]
    forbidden = (
        "grpc",
        "aiohttp",
        "uvicorn",
        "starlette",
        "serving.pb",
        "serving.api",
        "serving.codec",
    )
    assert offending(core, forbidden) == {}

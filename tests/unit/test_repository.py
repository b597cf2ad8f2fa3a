"""serving.core.repository: versions found, reloaded and refused, with tiny real models."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import write_tiny_model
from serving.core.repository import State
from serving.errors import NotFound, Unavailable
from tests.helpers import repository


async def test_repository_versions_reload_and_refusal(tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "tiny" / "1" / "model.onnx", seed=1)
    states: list[tuple[str, int, State]] = []
    loading: list[str] = []

    def on_state(name: str, version: int, state: State, _: float) -> None:
        states.append((name, version, state))
        if state is State.LOADING and version == 1:
            # Checked at the moment loading begins: a tiny model loads in about a millisecond.
            try:
                repo.get("tiny")
            except Unavailable as exc:
                loading.append(str(exc))

    repo = repository(tmp_path, on_state=on_state)
    await repo.scan()
    assert loading and "no version ready yet" in loading[0]
    assert repo.get("tiny").version == 1
    with pytest.raises(NotFound, match="available models: tiny"):
        repo.get("other")

    write_tiny_model(tmp_path / "tiny" / "2" / "model.onnx", seed=2)
    await repo.scan()
    assert repo.get("tiny").version == 2 and repo.get("tiny", 1).version == 1

    (tmp_path / "tiny" / "3").mkdir()
    (tmp_path / "tiny" / "3" / "model.onnx").write_bytes(b"corrupt")
    await repo.scan()
    assert repo.get("tiny").version == 2  # the refused version never replaces the serving one
    status = {s.version: s for s in repo.statuses()["tiny"]}
    assert status[3].state is State.FAILED and "model.onnx" in status[3].reason
    with pytest.raises(NotFound, match="version 3 failed"):
        repo.get("tiny", 3)
    await repo.close()

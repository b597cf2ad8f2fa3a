"""The rollout policy file: what is accepted, what is refused and why, the atomic write."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.core import rollout
from serving.core.rollout import Bounds, Policy, PolicyError

ON_DISK = {1, 2, 3}


def test_a_full_policy_reads_back_as_written(tmp_path: Path) -> None:
    text = """
stable: 1
candidate: 2
mode: canary
canary_percent: 12.5
rollback: {after: 50, min_agreement: 0.9, max_error_rate: 0.01, max_p99_ratio: 3}
"""
    policy = rollout.parse(text, ON_DISK)
    assert policy == Policy(1, 2, "canary", 12.5, Bounds(50, 0.9, 0.01, 3.0))
    assert policy.versions == {1, 2}
    assert rollout.parse(rollout.render(policy), ON_DISK) == policy
    path = rollout.write(tmp_path, policy)
    assert path == tmp_path / "rollout.yaml"
    assert rollout.read(tmp_path, ON_DISK) == policy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollout.yaml"]  # no temp file left


def test_defaults_and_absence(tmp_path: Path) -> None:
    assert rollout.parse("stable: 2") == Policy(2, None, "shadow", 0.0, Bounds())
    assert rollout.read(tmp_path) is None
    assert rollout.render(Policy(2)).splitlines()[-1] == "stable: 2"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("stable: 1\ncandidate: 7\n", "candidate: unknown version 7 (versions on disk: 1, 2, 3)"),
        ("stable: 9\n", "stable: unknown version 9"),
        (
            "stable: 1\ncandidate: 2\ncanary_percent: 101\n",
            "canary_percent: 101 is out of range 0-100",
        ),
        ("stable: 1\ncanary_percent: -1\n", "out of range 0-100"),
        ("stable: 1\ncanary_percent: ten\n", "canary_percent: expected a number"),
        ("stable: [1\n", "not valid YAML"),
        ("- 1\n", "expected a mapping"),
        ("candidate: 2\n", "no `stable` version"),
        ("stable: 1\ncandidate: 1\n", "candidate is the stable version"),
        ("stable: 1\nmode: blue\n", "mode: 'blue' is not one of shadow, canary"),
        ("stable: 0\n", "stable: expected a version number >= 1"),
        ("stable: true\n", "stable: expected a version number >= 1"),
        ("stable: 1\ncandidat: 2\n", "unknown key candidat; allowed: stable, candidate"),
        (
            "stable: 1\nrollback: {min_agreement: 2}\n",
            "rollback.min_agreement: 2 is out of range 0-1",
        ),
        ("stable: 1\nrollback: {after: 0}\n", "rollback.after: expected a whole number >= 1"),
        (
            "stable: 1\nrollback: {max_p99_ratio: 0}\n",
            "rollback.max_p99_ratio: expected a number > 0",
        ),
        ("stable: 1\nrollback: {p99: 2}\n", "unknown key p99 under rollback"),
    ],
)
def test_a_bad_policy_says_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(PolicyError) as err:
        rollout.parse(text, ON_DISK)
    assert problem in str(err.value)


def test_a_write_that_would_not_read_back_leaves_the_old_file(tmp_path: Path) -> None:
    rollout.write(tmp_path, Policy(1))
    with pytest.raises(PolicyError):
        rollout.write(tmp_path, Policy(1, 1))
    assert rollout.read(tmp_path) == Policy(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollout.yaml"]


def test_versions_on_disk_are_folders_with_a_model_file(tmp_path: Path) -> None:
    for name in ("1", "2", "x", "0"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"")
    (tmp_path / "3").mkdir()  # no model file: not a version yet
    assert rollout.versions_on_disk(tmp_path, "model.onnx") == {1, 2}

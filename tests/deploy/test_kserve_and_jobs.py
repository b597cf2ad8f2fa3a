"""The custom resources and training jobs: KServe, the training Job, multi-worker and TFJob.

With no schema for them offline, the custom resources (ServingRuntime, InferenceService, TFJob)
get structural checks of our own and their embedded pods the core PodSpec schema; the training
Job, the indexed multi-worker Job (TF_CONFIG from the pod index) and the TFJob alternative run
the train image into the server's models volume.
"""

from __future__ import annotations

import re

import kubernetes_validate

from harness import ROOT
from serving.config import load as load_settings
from tests.deploy.deploy_helpers import (
    GRPC_PORT,
    HTTP_PORT,
    K8S_VERSIONS,
    METRICS_PORT,
    NAMESPACE,
    UID,
    Obj,
    check_metadata,
    container_port,
    entrypoint_and_cmd,
    one,
    project_version,
    run,
    selects,
    train_models_dir,
    validate_in_every_version,
)
from training.cluster import role_from_tf_config

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

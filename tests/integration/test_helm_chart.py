"""The Helm chart (helm/carousel), rendered by Helm's own engine and checked the way a cluster would.

helm-python-sdk embeds Helm's Go library, so templates, values.schema.json and `fail` run
exactly as under `helm install`. Every rendered object is validated against the Kubernetes
OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors) and RayCluster /
RayJob against KubeRay's CRD schemas (tests/integration/kuberay-crds). The remaining tests pin the
behaviour the chart promises: secure pods, token auth, MLflow wiring, storage a retried job
resumes from, and clear rejection of bad values.

Each values set is a file under helm/carousel/ci/ (plus the chart defaults) and is rendered
once per module.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "carousel"
# CI clones the repo with shared/ beside it; a developer may point elsewhere.
# KubeRay's own CRDs (Apache-2.0, LICENSE beside them), vendored so a clean clone tests offline.
CRD_DIR = Path(os.environ.get("CAROUSEL_KUBERAY_CRDS", Path(__file__).parent / "kuberay-crds"))

RELEASE = "demo"
NAMESPACE = "ml"
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest schemas on hand.
KUBE_VERSIONS = ("1.29", kubernetes_validate.latest_version())

VALUES_SETS = ["default"] + sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))

DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


# ----------------------------------------------------------------------------- rendering


def values_of(values_set: str) -> dict[str, Any]:
    if values_set == "default":
        return {}
    return helm.values_from_yaml((CHART / "ci" / f"{values_set}-values.yaml").read_text())


class Rendered:
    """The objects of one render, with the lookups the tests need.

    `values` are the effective values (chart defaults merged with the set), as Helm used them.
    """

    def __init__(self, manifests: dict[str, str], values: dict[str, Any]):
        self.notes = manifests.get("carousel/templates/NOTES.txt", "")
        self.docs: list[dict[str, Any]] = []
        for path, text in manifests.items():
            if path.endswith(".txt"):
                continue
            self.docs.extend(d for d in yaml.safe_load_all(text) if d)
        self.values = values

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.of(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
        return found[0]

    def names(self, kind: str) -> set[str]:
        return {d["metadata"]["name"] for d in self.of(kind)}

    def ray_cluster_specs(self) -> list[tuple[str, dict[str, Any]]]:
        return ray_cluster_specs(self.docs)

    def ray_pod_templates(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        return ray_pod_templates(self.docs)

    def pod_templates(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return pod_templates(self.docs)


def ray_cluster_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The standing RayCluster's spec and the cluster spec of every RayJob."""
    specs = [(f"RayCluster/{d['metadata']['name']}", d["spec"]) for d in docs if d["kind"] == "RayCluster"]
    specs += [(f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in docs if d["kind"] == "RayJob"]
    return specs


def ray_pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(where, role, template) for every head and worker group the render defines."""
    for where, spec in ray_cluster_specs(docs):
        yield f"{where} head", "head", spec["headGroupSpec"]["template"]
        for group in spec["workerGroupSpecs"]:
            yield f"{where} group {group['groupName']}", "worker", group["template"]


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod the release will run, whoever creates it."""
    for d in docs:
        if d["kind"] == "Deployment":
            yield f"Deployment/{d['metadata']['name']}", d["spec"]["template"]
    for where, _, template in ray_pod_templates(docs):
        yield where, template
    for d in docs:
        if d["kind"] == "RayJob":
            yield f"RayJob/{d['metadata']['name']} submitter", d["spec"]["submitterPodTemplate"]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def render(chart):
    renders: dict[str, Rendered] = {}

    def _render(values_set: str) -> Rendered:
        if values_set not in renders:
            renders[values_set] = render_with(chart, values_of(values_set))
        return renders[values_set]

    return _render


def render_with(chart, values: dict[str, Any]) -> Rendered:
    return Rendered(chart.render(values, name=RELEASE, namespace=NAMESPACE), chart.merge_values(values))


# ----------------------------------------------------------------------------- CRD schemas


def _forbid_unknown_fields(node: Any) -> None:
    # The API server prunes unknown fields of a structural schema silently; a typo in the
    # chart would vanish without a trace. Validate as `kubectl --validate=strict` does.
    if isinstance(node, dict):
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for child in node.values():
            _forbid_unknown_fields(child)
    elif isinstance(node, list):
        for child in node:
            _forbid_unknown_fields(child)


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    path = CRD_DIR / f"ray.io_{kind.lower()}s.yaml"
    assert path.is_file(), f"KubeRay CRD {path} not found; set CAROUSEL_KUBERAY_CRDS to the folder holding it"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(path.read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    _forbid_unknown_fields(schema)
    return jsonschema.Draft4Validator(schema)


def check_metadata(doc: dict[str, Any]) -> list[str]:
    """What the API server checks on names and labels, which neither schema covers."""
    problems = []
    name = doc["metadata"].get("name", "")
    if doc["kind"] in ("RayCluster", "RayJob", "Service"):
        # These names become Service / DNS names.
        if not DNS_1035_LABEL.match(name) or len(name) > 63:
            problems.append(f"name {name!r} is not a DNS-1035 label")
    labels = dict(doc["metadata"].get("labels") or {})
    for _, template in pod_templates([doc]):
        labels.update(template.get("metadata", {}).get("labels") or {})
    for key, value in labels.items():
        if not LABEL_KEY.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
            problems.append(f"label key {key!r} is invalid")
        if not isinstance(value, str) or not LABEL_VALUE.match(value) or len(value) > 63:
            problems.append(f"label {key}={value!r} has an invalid value")
    return problems


def validate(doc: dict[str, Any], kube_version: str) -> list[str]:
    where = f"{doc['kind']}/{doc['metadata'].get('name')}"
    if doc["apiVersion"] == "ray.io/v1":
        errors = [
            f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(doc["kind"]).iter_errors(doc)
        ]
    else:
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
            errors = []
        except kubernetes_validate.ValidationError as e:
            errors = [f"{where}: {'.'.join(map(str, e.path))}: {e.message}"]
    return errors + [f"{where}: {p}" for p in check_metadata(doc)]


# ----------------------------------------------------------------------------- helpers


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return spec["containers"] + spec.get("initContainers", [])


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def mounts_of(container: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def volumes_of(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in template["spec"].get("volumes", [])}


def secret_ref(env: dict[str, Any]) -> tuple[str, str]:
    ref = env["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def assert_secret_has(r: Rendered, name: str, key: str, existing: set[str]) -> None:
    """A referenced Secret is either one the user said exists or one the chart renders with the key."""
    if name in existing:
        return
    assert name in r.names("Secret"), f"Secret {name} is referenced but neither rendered nor configured"
    assert secret_data(r.one("Secret", name)).get(key), f"Secret {name} has no {key}"


def existing_secrets(values: dict[str, Any]) -> set[str]:
    found = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("existingSecret", "clientExistingSecret") and v:
                    found.add(v)
                walk(v)

    walk(values)
    return found


# ----------------------------------------------------------------------------- schema validation


@pytest.mark.parametrize("values_set", VALUES_SETS)
def test_every_object_validates_against_kubernetes_and_kuberay_schemas(render, values_set):
    r = render(values_set)
    assert r.docs, "the chart rendered nothing"
    errors = [err for doc in r.docs for version in KUBE_VERSIONS for err in validate(doc, version)]
    assert not errors, "\n".join(sorted(set(errors)))


def test_schema_validation_is_not_vacuous(render):
    # A validator that accepts anything would make the test above worthless.
    r = render("autoscaling")
    cluster = copy.deepcopy(r.of("RayCluster")[0])
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    messages = " ".join(validate(cluster, KUBE_VERSIONS[0]))
    assert "'two' is not of type 'integer'" in messages
    assert "securityContex" in messages

    job = copy.deepcopy(render("rayjob").one("RayJob"))
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert any("shutdownAfterJobFinishes" in e for e in validate(job, KUBE_VERSIONS[0]))

    deployment = copy.deepcopy(r.one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}
    assert validate(deployment, KUBE_VERSIONS[0])

    service = copy.deepcopy(r.one("Service"))
    service["metadata"]["name"] = "9-bad_name"
    assert any("DNS-1035" in e for e in validate(service, KUBE_VERSIONS[0]))


def test_values_schema_is_a_valid_draft7_schema(chart):
    # Helm 3 and 4 both read draft-07; a malformed keyword would be ignored, not reported.
    schema = chart.schema
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(chart.values)


@pytest.mark.parametrize("values_set", VALUES_SETS)
def test_helm_lint_passes_strict(values_set):
    report = helm.lint(CHART, values_of(values_set) or None, strict=True, namespace=NAMESPACE, kube_version="v1.29.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


def test_the_values_sets_of_the_issue_ship_in_ci():
    # Every file in ci/ is rendered above; these are the shapes the chart must support.
    assert {"cpu", "gpu", "autoscaling", "production", "rayjob", "rayjob-inline"} <= set(VALUES_SETS)


# ----------------------------------------------------------------------------- secure defaults


@pytest.mark.parametrize("values_set", VALUES_SETS)
def test_pods_run_non_root_unprivileged_and_bounded(render, values_set):
    r = render(values_set)
    templates = list(r.pod_templates())
    assert templates
    for where, template in templates:
        pod = template["spec"]
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(key), f"{where}: {key}"
        assert not any("hostPath" in v for v in pod.get("volumes", [])), where
        for c in containers(template):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc.get("privileged", False) is False, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc.get("runAsUser", psc["runAsUser"]) > 0, (where, c["name"])
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), (where, c["name"], bound)


@pytest.mark.parametrize("values_set", VALUES_SETS)
def test_service_account_tokens_mount_only_where_the_autoscaler_needs_them(render, values_set):
    r = render(values_set)
    autoscaling = r.values["ray"]["autoscaling"]["enabled"]
    for sa in r.of("ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False, sa["metadata"]["name"]
    for where, template in r.pod_templates():
        wants_token = autoscaling and where.endswith(" head")
        assert template["spec"]["automountServiceAccountToken"] is wants_token, where
        assert template["spec"]["serviceAccountName"] in r.names("ServiceAccount"), where


@pytest.mark.parametrize("values_set", VALUES_SETS)
def test_only_cluster_ip_services(render, values_set):
    r = render(values_set)
    for svc in r.of("Service"):
        assert svc["spec"]["type"] == "ClusterIP", svc["metadata"]["name"]
    for where, spec in r.ray_cluster_specs():
        # KubeRay creates the head Service (and, if asked, an Ingress) from these.
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", where
        assert spec["headGroupSpec"]["enableIngress"] is False, where
    assert not r.of("Ingress")


@pytest.mark.parametrize("values_set", VALUES_SETS)
def test_ray_pods_get_writable_emptydirs_on_a_read_only_root(render, values_set):
    r = render(values_set)
    for where, _, template in r.ray_pod_templates():
        (ray,) = template["spec"]["containers"]
        mounts, volumes = mounts_of(ray), volumes_of(template)
        for path in ("/tmp", "/tmp/ray", "/dev/shm"):
            assert "emptyDir" in volumes[mounts[path]], (where, path)
        # KubeRay reuses a volume of this name for the autoscaler's log sharing.
        assert mounts["/tmp/ray"] == "ray-logs", where
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"], where


@pytest.mark.parametrize("values_set", VALUES_SETS)
def test_ray_pods_rescan_logs_as_carousel_cluster_up_does(render, values_set):
    from carousel.cluster.local import QUIET_LOG_MONITOR

    r = render(values_set)
    for where, _, template in r.ray_pod_templates():
        (ray,) = template["spec"]["containers"]
        env = env_of(ray)
        assert {k: env[k]["value"] for k in QUIET_LOG_MONITOR} == QUIET_LOG_MONITOR, where


def test_extra_env_replaces_the_charts_log_monitor_setting(chart):
    r = render_with(chart, {"ray": {"extraEnv": [{"name": "LOG_NAME_UPDATE_INTERVAL_S", "value": "5"}]}})
    for where, _, template in r.ray_pod_templates():
        (ray,) = template["spec"]["containers"]
        names = [e["name"] for e in ray["env"]]
        assert names.count("LOG_NAME_UPDATE_INTERVAL_S") == 1, where
        assert env_of(ray)["LOG_NAME_UPDATE_INTERVAL_S"]["value"] == "5", where
        assert env_of(ray)["RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"]["value"] == "0", where


@pytest.mark.parametrize("values_set", VALUES_SETS)
def test_network_policy_admits_only_the_release_the_operator_and_the_ingress_namespace(render, values_set):
    r = render(values_set)
    policy = r.one("NetworkPolicy")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/part-of": "carousel"}
    assert "Ingress" in policy["spec"]["policyTypes"]
    # The policy protects only pods it selects: every pod of the release must carry the labels.
    for where, template in r.pod_templates():
        labels = template["metadata"]["labels"]
        assert selector.items() <= labels.items(), where

    operator_ns = r.values["networkPolicy"]["kuberayOperator"]["namespace"]
    ingress_ns = r.values["networkPolicy"]["ingressNamespace"]
    admitted_namespaces = set()
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits every source"
        for peer in rule["from"]:
            if "namespaceSelector" not in peer:
                assert peer["podSelector"]["matchLabels"] == selector
                continue
            ns = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            admitted_namespaces.add(ns)
            ports = {p["port"] for p in rule["ports"]}
            if ns == operator_ns:
                assert ports == {8265}, "the operator needs the dashboard API only"
                assert peer["podSelector"]["matchLabels"]
            else:
                assert ns == ingress_ns and ports == {8265, r.one("Service")["spec"]["ports"][0]["port"]}
    assert admitted_namespaces == {operator_ns} | ({ingress_ns} if ingress_ns else set())


def test_network_policy_ingress_namespace_is_optional(render):
    assert render("production").values["networkPolicy"]["ingressNamespace"] == "ingress-nginx"
    assert len(render("production").one("NetworkPolicy")["spec"]["ingress"]) == 3
    assert len(render("default").one("NetworkPolicy")["spec"]["ingress"]) == 2


# ----------------------------------------------------------------------------- Ray cluster


@pytest.mark.parametrize("values_set", VALUES_SETS)
def test_ray_token_authentication_is_on_with_a_known_secret(render, values_set):
    r = render(values_set)
    existing = existing_secrets(r.values)
    specs = r.ray_cluster_specs()
    assert specs
    for where, spec in specs:
        auth = spec["authOptions"]
        assert auth["mode"] == "token", where
        assert_secret_has(r, auth["secretName"], "auth_token", existing)
        if auth["secretName"] not in existing:
            assert len(secret_data(r.one("Secret", auth["secretName"]))["auth_token"]) >= 32
    for where, template in r.pod_templates():
        for c in containers(template):
            assert env_of(c).get("RAY_AUTH_MODE", {}).get("value", "token") == "token", where


def test_image_and_ray_version_come_from_values(chart, render):
    r = render("default")
    app_version = chart.metadata["appVersion"]
    images = {c["image"] for _, t in r.pod_templates() for c in containers(t)}
    assert images == {f"ghcr.io/carousel-lstm/carousel:{app_version}"}
    assert all(spec["rayVersion"] == "2.60.0" for _, spec in r.ray_cluster_specs())

    pinned = render_with(chart, {"image": {"repository": "registry.local/carousel", "tag": "0.2.0"},
                                 "ray": {"version": "2.61.1"}, "job": {"enabled": True, "specFile": "jobs/lm-kjv-small.yaml"}})
    images = {c["image"] for _, t in pinned.pod_templates() for c in containers(t)}
    assert images == {"registry.local/carousel:0.2.0"}
    assert {spec["rayVersion"] for _, spec in pinned.ray_cluster_specs()} == {"2.61.1"}


def test_gpu_groups_request_gpus_and_land_on_gpu_nodes(render):
    r = render("gpu")
    groups = {g["groupName"]: g for g in r.one("RayCluster")["spec"]["workerGroupSpecs"]}
    wanted = {g["name"]: g for g in r.values["ray"]["workerGroups"]}
    assert set(groups) == set(wanted) == {"cpu", "gpu"}
    for name, group in groups.items():
        (worker,) = group["template"]["spec"]["containers"]
        gpus = wanted[name]["gpus"]
        if gpus:
            assert worker["resources"]["limits"]["nvidia.com/gpu"] == gpus
            assert worker["resources"]["requests"]["nvidia.com/gpu"] == gpus
            assert group["template"]["spec"]["nodeSelector"] == wanted[name]["nodeSelector"]
            assert group["template"]["spec"]["tolerations"] == wanted[name]["tolerations"]
        else:
            assert "nvidia.com/gpu" not in worker["resources"]["limits"]
            assert "nodeSelector" not in group["template"]["spec"]
        shm = volumes_of(group["template"])["shared-mem"]["emptyDir"]
        assert shm["sizeLimit"] == wanted[name]["sharedMemory"]
        assert env_of(worker)["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["value"] == "1"
    head = r.one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_autoscaling_scales_each_group_between_its_bounds(render):
    r = render("autoscaling")
    spec = r.one("RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert options["idleTimeoutSeconds"] == 120 and options["upscalingMode"] == "Conservative"
    sc = options["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
    assert {"cpu", "memory"} <= set(options["resources"]["limits"])
    # The sidecar writes its logs into the head's shared /tmp/ray volume.
    head = spec["headGroupSpec"]["template"]
    autoscaler_mounts = {m["mountPath"]: m["name"] for m in options["volumeMounts"]}
    assert autoscaler_mounts["/tmp/ray"] == "ray-logs" and autoscaler_mounts["/tmp"] in volumes_of(head)
    assert "ray-logs" in volumes_of(head)
    for group, wanted in zip(spec["workerGroupSpecs"], r.values["ray"]["workerGroups"], strict=True):
        assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (
            wanted["minReplicas"], wanted["replicas"], wanted["maxReplicas"])


def test_without_autoscaling_groups_stay_at_replicas(render):
    spec = render("default").one("RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in spec
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"] == 2


# ----------------------------------------------------------------------------- storage


@pytest.mark.parametrize("values_set", ["default", "gpu", "rayjob"])
def test_shared_rwx_volume_is_mounted_in_every_ray_pod(render, values_set):
    r = render(values_set)
    (claim,) = [p for p in r.of("PersistentVolumeClaim") if p["spec"]["accessModes"] == ["ReadWriteMany"]]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for where, _, template in r.ray_pod_templates():
        (ray,) = template["spec"]["containers"]
        volume = volumes_of(template)[mounts_of(ray)["/mnt/carousel"]]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], where


def test_object_store_storage_replaces_the_volume_with_credentials(render):
    r = render("production")
    assert not r.of("PersistentVolumeClaim"), "production keeps MLflow and training data in object stores"
    for where, _, template in r.ray_pod_templates():
        (ray,) = template["spec"]["containers"]
        env = env_of(ray)
        assert "/mnt/carousel" not in mounts_of(ray), where
        assert secret_ref(env["AWS_ACCESS_KEY_ID"]) == ("carousel-s3", "AWS_ACCESS_KEY_ID"), where
        assert secret_ref(env["AWS_SECRET_ACCESS_KEY"]) == ("carousel-s3", "AWS_SECRET_ACCESS_KEY"), where
        assert env["AWS_ENDPOINT_URL"]["value"] == "https://minio.storage.svc:9000", where


# ----------------------------------------------------------------------------- MLflow


def mlflow_env(r: Rendered) -> dict[str, dict[str, Any]]:
    (container,) = r.one("Deployment")["spec"]["template"]["spec"]["containers"]
    return env_of(container)


@pytest.mark.parametrize("values_set", VALUES_SETS)
def test_mlflow_runs_basic_auth_with_its_store_from_a_secret(render, values_set):
    r = render(values_set)
    existing = existing_secrets(r.values)
    (container,) = r.one("Deployment")["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["command"] + container["args"])
    assert "mlflow server --app-name basic-auth" in command
    env = env_of(container)
    assert_secret_has(r, *secret_ref(env["MLFLOW_BACKEND_STORE_URI"]), existing)
    assert_secret_has(r, *secret_ref(env["MLFLOW_AUTH_ADMIN_USERNAME"]), existing)
    assert_secret_has(r, *secret_ref(env["MLFLOW_AUTH_ADMIN_PASSWORD"]), existing)
    # The auth app refuses to start without a fixed key for its CSRF tokens.
    assert_secret_has(r, *secret_ref(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]), existing)
    # Probes must hit the one path that needs neither a login nor an allowed Host header.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"


def test_quick_start_mlflow_keeps_sqlite_and_artifacts_on_its_volume(render):
    r = render("default")
    env = mlflow_env(r)
    store = secret_data(r.one("Secret", secret_ref(env["MLFLOW_BACKEND_STORE_URI"])[0]))
    template = r.one("Deployment")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    (mount,) = [m for m in container["volumeMounts"] if "persistentVolumeClaim" in volumes_of(template)[m["name"]]]
    claim = volumes_of(template)[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert r.one("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Both the sqlite file and the artifacts must be on the volume, not in the pod's emptyDir.
    assert store["backend-store-uri"].startswith(f"sqlite:///{mount['mountPath']}/")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith(f"{mount['mountPath']}/")
    assert r.one("Deployment")["spec"]["strategy"]["type"] == "Recreate"


def test_production_mlflow_uses_external_postgres_and_s3(render):
    r = render("production")
    env = mlflow_env(r)
    assert secret_ref(env["MLFLOW_BACKEND_STORE_URI"]) == ("mlflow-db", "backend-store-uri")
    assert secret_ref(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == ("mlflow-admin", "password")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"] == "s3://ml-prod/mlflow-artifacts"
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "https://minio.storage.svc:9000"
    assert secret_ref(env["AWS_SECRET_ACCESS_KEY"]) == ("carousel-s3", "AWS_SECRET_ACCESS_KEY")
    # No chart-made copies of what the user keeps in existing Secrets: only generated keys.
    assert r.names("Secret") == {f"{RELEASE}-carousel-ray-auth", f"{RELEASE}-carousel-mlflow-server"}
    assert "mlflow.ml.example.com" in env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")


@pytest.mark.parametrize("values_set", VALUES_SETS)
def test_ray_pods_log_to_the_mlflow_service_and_mlflow_accepts_them(render, values_set):
    from mlflow.server.security_utils import is_allowed_host_header

    r = render(values_set)
    existing = existing_secrets(r.values)
    service = r.one("Service")
    port = service["spec"]["ports"][0]["port"]
    uri = f"http://{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}"
    allowed = mlflow_env(r)["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    for where, _, template in r.ray_pod_templates():
        (ray,) = template["spec"]["containers"]
        env = env_of(ray)
        assert env["MLFLOW_TRACKING_URI"]["value"] == uri, where
        assert_secret_has(r, *secret_ref(env["MLFLOW_TRACKING_USERNAME"]), existing)
        assert_secret_has(r, *secret_ref(env["MLFLOW_TRACKING_PASSWORD"]), existing)
    # MLflow's own DNS-rebinding guard must accept the in-cluster URL and a port-forward,
    # and still refuse a stranger.
    assert is_allowed_host_header(allowed, uri.removeprefix("http://"))
    assert is_allowed_host_header(allowed, f"localhost:{port}")
    assert not is_allowed_host_header(allowed, "attacker.example.com")
    assert not is_allowed_host_header(allowed, f"{service['metadata']['name']}.attacker.example.com")


def _http(port: int, path: str, host: str, *, method: str = "GET", body: bytes | None = None,
          auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    headers = {"Host": host}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    if body is not None and method == "POST":
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.integration
def test_mlflow_container_command_serves_with_auth_host_checks_and_artifacts_on_its_volume(chart, tmp_path):
    """Runs the Deployment's own command and env (Secrets resolved from the render) as a local process."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth] (Flask-WTF)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    r = render_with(chart, {"mlflow": {"port": port, "workers": 1}})
    template = r.one("Deployment")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    # The pod's volumes become directories; paths in env values and Secrets follow them.
    mounts = {m["mountPath"]: tmp_path / m["name"] for m in container["volumeMounts"]}
    for local in mounts.values():
        local.mkdir()

    def localize(value: str) -> str:
        for path, local in mounts.items():
            for prefix in ("", "sqlite:///"):
                if value == prefix + path or value.startswith(prefix + path + "/"):
                    return prefix + str(local) + value[len(prefix + path):]
        return value

    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "LANG": "C.UTF-8"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = localize(item["value"])
            continue
        name, key = secret_ref(item)
        data = secret_data(r.one("Secret", name))
        if key in data:
            env[item["name"]] = localize(data[key])
        else:
            assert item["valueFrom"]["secretKeyRef"].get("optional"), f"{name} lacks {key}"
    admin = (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    service_host = f"{r.one('Service')['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}"

    log = tmp_path / "mlflow.log"
    with log.open("wb") as out:
        server = subprocess.Popen(container["command"] + container["args"], env=env, cwd=tmp_path,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"MLflow exited:\n{log.read_text()[-3000:]}"
            try:
                # kubelet probes by pod IP: /health must pass without login or a known Host.
                if _http(port, "/health", f"10.0.0.7:{port}")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"MLflow never became healthy:\n{log.read_text()[-3000:]}"
            time.sleep(1)

        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert _http(port, search, service_host)[0] == 401
        assert _http(port, search, "attacker.example.com", auth=admin)[0] == 403
        status, body = _http(port, "/api/2.0/mlflow/experiments/create", service_host, method="POST",
                             body=json.dumps({"name": "carousel-lm"}).encode(), auth=admin)
        assert status == 200, body
        status, body = _http(port, "/api/2.0/mlflow-artifacts/artifacts/probe/hello.txt", service_host,
                             method="PUT", body=b"hello", auth=admin)
        assert status == 200, body
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    # The run store and the artifact both landed on the volume, not in the pod's scratch space.
    (volume,) = [local for path, local in mounts.items() if path != "/tmp"]
    assert (volume / "artifacts" / "probe" / "hello.txt").read_bytes() == b"hello"
    assert (volume / "mlflow.db").is_file()
    assert (mounts["/tmp"] / "basic_auth.ini").is_file()


# ----------------------------------------------------------------------------- RayJob


def test_external_mlflow_replaces_the_tracking_server(chart):
    r = render_with(chart, {"mlflow": {"enabled": False, "trackingUri": "https://mlflow.corp.example:443",
                                       "auth": {"clientExistingSecret": "mlflow-bot"}}})
    assert not r.of("Deployment") and not r.of("Service")
    assert not any(p["spec"]["accessModes"] == ["ReadWriteOnce"] for p in r.of("PersistentVolumeClaim"))
    errors = [err for doc in r.docs for err in validate(doc, KUBE_VERSIONS[-1])]
    assert not errors, errors
    for where, _, template in r.ray_pod_templates():
        env = env_of(template["spec"]["containers"][0])
        assert env["MLFLOW_TRACKING_URI"]["value"] == "https://mlflow.corp.example:443", where
        assert secret_ref(env["MLFLOW_TRACKING_PASSWORD"]) == ("mlflow-bot", "password"), where


def test_no_rayjob_unless_enabled(render):
    r = render("default")
    assert not r.of("RayJob") and not r.of("ConfigMap")
    assert r.of("RayCluster")


@pytest.mark.parametrize("values_set", ["rayjob", "rayjob-inline"])
def test_rayjob_runs_the_spec_and_cleans_up(render, values_set):
    r = render(values_set)
    job = r.one("RayJob")
    wanted = r.values["job"]
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] == wanted["backoffLimit"]
    assert spec["ttlSecondsAfterFinished"] == wanted["ttlSecondsAfterFinished"]
    assert spec.get("activeDeadlineSeconds", 0) == wanted["activeDeadlineSeconds"]

    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["carousel", "train", "/etc/carousel/job/job.yaml"]
    overrides = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")
    # Checkpoints go on the volume every retry's fresh cluster mounts, so a retry resumes.
    assert overrides["run.storage_path"] == "/mnt/carousel/runs"
    assert overrides["data.path"] == "/mnt/carousel/data/kjv-bpe"
    for key, value in wanted["overrides"].items():
        assert overrides[key] == str(value)

    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]
    (ray,) = head["spec"]["containers"]
    config_map = volumes_of(head)[mounts_of(ray)["/etc/carousel/job"]]["configMap"]["name"]
    text = r.one("ConfigMap", config_map)["data"]["job.yaml"]
    if wanted["specFile"]:
        expected = yaml.safe_load((CHART / wanted["specFile"]).read_text())
    else:
        expected = wanted["spec"]
    assert yaml.safe_load(text) == expected
    assert job["metadata"]["annotations"]["checksum/job-spec"]


def test_rayjob_alone_needs_no_standing_cluster(render):
    r = render("rayjob")
    assert not r.of("RayCluster")
    assert r.one("RayJob")["metadata"]["name"] == f"{RELEASE}-carousel-kjv-small"


@pytest.mark.parametrize("values_set", ["rayjob", "rayjob-inline"])
def test_rayjob_spec_and_overrides_pass_carousels_own_spec_loader(render, values_set):
    # The contract with the package: what the entrypoint hands `carousel train` must load.
    config = pytest.importorskip("carousel.config")
    r = render(values_set)
    job = r.one("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    raw = yaml.safe_load(r.one("ConfigMap")["data"]["job.yaml"])
    spec = config.spec_from_dict(config.apply_overrides(raw, overrides))
    assert spec.run.storage_path == "/mnt/carousel/runs"
    assert spec.data.path == "/mnt/carousel/data/kjv-bpe"


@pytest.mark.parametrize("path", sorted((CHART / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_chart_job_specs_are_valid_carousel_specs(path):
    config = pytest.importorskip("carousel.config")
    assert config.load_spec(path).name == path.stem


def test_rayjob_on_object_storage_points_data_and_runs_at_the_bucket(chart):
    values = values_of("production")
    values["job"] = {"enabled": True, "specFile": "jobs/lm-kjv-small.yaml", "runsPath": "checkpoints"}
    r = render_with(chart, values)
    argv = shlex.split(r.one("RayJob")["spec"]["entrypoint"])
    assert {"run.storage_path=s3://ml-prod/carousel/checkpoints", "data.path=s3://ml-prod/carousel/data/kjv-bpe"} <= set(argv)
    errors = [err for doc in r.docs for err in validate(doc, KUBE_VERSIONS[-1])]
    assert not errors, errors


def test_tune_runs_the_spec_without_train_overrides(chart):
    r = render_with(chart, {"job": {"enabled": True, "command": "tune", "specYaml": "name: sweep\n"}})
    assert shlex.split(r.one("RayJob")["spec"]["entrypoint"]) == ["carousel", "tune", "/etc/carousel/job/job.yaml"]
    assert yaml.safe_load(r.one("ConfigMap")["data"]["job.yaml"]) == {"name": "sweep"}


# ----------------------------------------------------------------------------- bad values


BAD_VALUES = [
    pytest.param({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy", id="pull-policy"),
    pytest.param({"podSecurity": {"runAsUser": 0}}, "runAsUser", id="root-user"),
    pytest.param({"ray": {"workerGroups": [{"name": "cpu", "replicas": "two", "sharedMemory": "1Gi",
                                            "resources": {"requests": {"cpu": 1, "memory": "1Gi"},
                                                          "limits": {"cpu": 1, "memory": "1Gi"}}}]}},
                 "replicas", id="replicas-type"),
    pytest.param({"ray": {"workerGroups": [{"name": "cpu", "replicas": 1, "sharedMemory": "1Gi",
                                            "resources": {"requests": {"cpu": 1, "memory": "1Gi"}}}]}},
                 "limits", id="no-limits"),
    pytest.param({"ray": {"head": {"resources": {"requests": {"cpu": "lots", "memory": "1Gi"},
                                                 "limits": {"cpu": 1, "memory": "1Gi"}}}}},
                 "cpu", id="bad-quantity"),
    pytest.param({"ray": {"workerGroups": []}}, "workerGroups", id="no-workers"),
    pytest.param({"storage": {"type": "objectStore"}}, "uri", id="object-store-without-uri"),
    pytest.param({"storage": {"type": "nfs"}}, "type", id="storage-type"),
    pytest.param({"mlflow": {"enabled": False}}, "trackingUri", id="no-tracking"),
    pytest.param({"mlflow": {"backendStore": {"uri": "oracle://x"}}}, "uri", id="backend-scheme"),
    pytest.param({"job": {"command": "serve"}}, "command", id="job-command"),
    pytest.param({"job": {"name": "Big_Job"}}, "name", id="job-name"),
    pytest.param({"replicas": 3}, "replicas", id="unknown-key"),
    pytest.param({"ray": {"version": "2.51.0"}}, "needs Ray 2.52.0 or newer", id="ray-without-token-auth"),
    pytest.param({"ray": {"autoscaling": {"enabled": True},
                          "workerGroups": [{"name": "cpu", "replicas": 1, "minReplicas": 3, "maxReplicas": 2,
                                            "sharedMemory": "1Gi",
                                            "resources": {"requests": {"cpu": 1, "memory": "1Gi"},
                                                          "limits": {"cpu": 1, "memory": "1Gi"}}}]}},
                 "minReplicas (3) is greater than maxReplicas (2)", id="min-over-max"),
    pytest.param({"ray": {"workerGroups": [
        {"name": "cpu", "replicas": 1, "sharedMemory": "1Gi",
         "resources": {"requests": {"cpu": 1, "memory": "1Gi"}, "limits": {"cpu": 1, "memory": "1Gi"}}}] * 2}},
        "used twice", id="duplicate-group"),
    pytest.param({"job": {"enabled": True}}, "exactly one of job.spec, job.specFile or job.specYaml", id="job-no-spec"),
    pytest.param({"job": {"enabled": True, "specFile": "jobs/missing.yaml"}}, "not a non-empty file", id="job-missing-file"),
    pytest.param({"job": {"enabled": True, "specYaml": "seed: 1\n"}}, "has no `name`", id="job-spec-unnamed"),
    pytest.param({"job": {"enabled": True, "specYaml": "name: [\n"}}, "not valid YAML", id="job-spec-broken"),
    pytest.param({"job": {"enabled": True, "command": "tune", "specYaml": "name: t\n",
                          "overrides": {"train.lr": 1}}}, "train` only", id="tune-overrides"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES)
def test_bad_values_are_rejected_with_a_clear_message(chart, values, message):
    with pytest.raises(helm.HelmError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(caught.value)


# ----------------------------------------------------------------------------- NOTES.txt


def test_notes_tell_how_to_reach_the_uis_and_submit_jobs(render):
    r = render("default")
    ray_svc = f"{r.one('RayCluster')['metadata']['name']}-head-svc"
    assert f"port-forward svc/{ray_svc} 8265:8265" in r.notes
    assert f"port-forward svc/{r.one('Service')['metadata']['name']} 5000:5000" in r.notes
    token_secret = r.one("RayCluster")["spec"]["authOptions"]["secretName"]
    assert f"get secret {token_secret} -o jsonpath='{{.data.auth_token}}'" in r.notes
    assert "ray job submit --address http://localhost:8265" in r.notes
    assert "--set job.enabled=true" in r.notes

    job = render("rayjob")
    assert f"get rayjob {job.one('RayJob')['metadata']['name']}" in job.notes
    assert "port-forward svc/" + ray_svc not in job.notes

"""deploy/k8s: each overlay renders with `kubectl kustomize` (offline), its core objects validate against the
Kubernetes API schemas (kubernetes-validate, strict: no unknown fields), its RayCluster and ServiceMonitor
against the schemas of their CRDs (tests/deploy/schemas, from KubeRay and the Prometheus Operator), and the
pieces fit together: commands, settings, secrets, selectors, ports and the network policy."""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_files import DEPLOY, check_ray_start, resolve_align_command

from services.settings import Settings

SCHEMAS = Path(__file__).parent / "schemas"
OVERLAYS = ["cpu", "gpu"]
CRDS = {("ray.io/v1", "RayCluster"): "raycluster.ray.io_v1.yaml",
        ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com_v1.yaml"}
PATH_SETTINGS = {"ALIGN_CACHE_DIR", "ALIGN_HOME"}  # read by align.paths, not by Settings
SECRET_KEYS = {"database-url", "report-secret", "api-key", "ray-auth-token"}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the overlays")


@cache
def render(overlay: str) -> tuple[dict, ...]:
    result = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(docs, kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "RayCluster":
        groups = [doc["spec"]["headGroupSpec"], *doc["spec"].get("workerGroupSpecs", [])]
        return [group["template"]["spec"] for group in groups]
    if doc["kind"] in ("Deployment", "Job"):
        return [doc["spec"]["template"]["spec"]]
    return []


def containers(docs) -> list[dict]:
    return [c for doc in docs for spec in pod_specs(doc) for c in spec["containers"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_against_the_kubernetes_schemas(overlay):
    version = kubernetes_validate.latest_version()
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "Job", "NetworkPolicy",
            "RayCluster", "ServiceMonitor"} <= kinds
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        assert doc["metadata"].get("namespace", "align") == "align"
        kubernetes_validate.validate(doc, version, strict=True)
    for ray_cluster in find(docs, "RayCluster"):  # its pod templates are core PodTemplateSpecs
        groups = [ray_cluster["spec"]["headGroupSpec"], *ray_cluster["spec"]["workerGroupSpecs"]]
        for group in groups:
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": group["template"]}, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_validate_against_their_crd_schemas(overlay):
    for (api_version, kind), file in CRDS.items():
        schema = yaml.safe_load((SCHEMAS / file).read_text())
        (doc,) = [d for d in render(overlay) if (d["apiVersion"], d["kind"]) == (api_version, kind)]
        jsonschema.validate(doc, schema)


def test_the_crd_schemas_catch_mistakes():
    schema = yaml.safe_load((SCHEMAS / CRDS[("ray.io/v1", "RayCluster")]).read_text())
    (cluster,) = find(render("gpu"), "RayCluster")
    for mistake in ({"enableInTreeAutoscaler": True}, {"workerGroupSpecs": [{"groupName": "g"}]},
                    {"headGroupSpec": {"template": {}, "rayStartParams": {"num-cpus": 0}}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**cluster, "spec": {**cluster["spec"], **mistake}}, schema)


def test_gpu_overlay_has_an_autoscaled_gpu_worker_group_and_cpu_has_none():
    (gpu,) = find(render("gpu"), "RayCluster", "align-ray")
    assert gpu["spec"]["enableInTreeAutoscaling"] is True
    (group,) = gpu["spec"]["workerGroupSpecs"]
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] > 1
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert worker["image"].endswith("-gpu")
    (cpu,) = find(render("cpu"), "RayCluster", "align-ray")
    assert all("nvidia.com/gpu" not in str(c["resources"]) for c in containers([cpu]))
    assert all(c["image"].endswith("-cpu") for c in containers(render("cpu")))
    import ray

    assert gpu["spec"]["rayVersion"] == ray.__version__, "the RayCluster's Ray is the image's"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_settings_and_secrets_are_real(overlay):
    docs = render(overlay)
    (config,) = find(docs, "ConfigMap", "align-config")
    settings = {f"ALIGN_{name.upper()}" for name in Settings.model_fields} | PATH_SETTINGS
    roles = {}
    for container in containers(docs):
        if "command" in container:
            assert container["command"][0] == "align"
            roles[container["name"]] = resolve_align_command(container["command"][1:])
        names = {e["name"] for e in container.get("env", [])}
        for ref in container.get("envFrom", []):
            assert ref["configMapRef"]["name"] == "align-config"
            names |= set(config["data"])
        assert {n for n in names if n.startswith("ALIGN_")} <= settings, "every ALIGN_ variable is a setting"
        for env in container.get("env", []):
            secret = env.get("valueFrom", {}).get("secretKeyRef")
            if secret:
                assert secret["name"] == "align-secrets" and secret["key"] in SECRET_KEYS
    assert roles == {"migrate": ["db", "upgrade"], "api": ["serve"], "dispatcher": ["dispatcher"]}
    (cluster,) = find(docs, "RayCluster")
    for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        # KubeRay turns each key into a `ray start --key=value` flag.
        check_ray_start([f"--{key}={value}" for key, value in group["rayStartParams"].items()])
    (api,) = find(docs, "Deployment", "align-api")
    api_env = {e["name"] for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"ALIGN_DATABASE_URL", "ALIGN_REPORT_SECRET"} <= api_env
    (dispatcher,) = find(docs, "Deployment", "align-dispatcher")
    assert dispatcher["spec"]["replicas"] >= 2
    dispatcher_env = {e["name"] for e in dispatcher["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"ALIGN_DATABASE_URL", "ALIGN_REPORT_SECRET", "RAY_AUTH_TOKEN"} <= dispatcher_env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_addresses_selectors_and_ports_fit_together(overlay):
    docs = render(overlay)
    (config,) = find(docs, "ConfigMap", "align-config")
    (cluster,) = find(docs, "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    # KubeRay names the head's Service <cluster>-head-svc and publishes the head container's ports on it.
    address = re.fullmatch(r"http://([\w-]+):(\d+)", config["data"]["ALIGN_RAY_ADDRESS"])
    assert address.group(1) == f"{cluster['metadata']['name']}-head-svc"
    assert {"name": "dashboard", "containerPort": int(address.group(2))} in head["ports"]
    (service,) = find(docs, "Service", "align-api")
    (api,) = find(docs, "Deployment", "align-api")
    assert config["data"]["ALIGN_PUBLIC_URL"] == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in api["spec"]["template"]["spec"]["containers"][0]["ports"]}
    env = {e["name"]: e.get("value") for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert container_ports[service["spec"]["ports"][0]["targetPort"]] == int(env["ALIGN_PORT"])
    assert {p["name"] for p in service["spec"]["ports"]} >= {"http"}


def selects(selector: dict, labels: dict) -> bool:
    """Whether a LabelSelector (matchLabels, matchExpressions with In) selects ``labels``."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_service_monitor_scrapes_the_api_and_every_dispatcher(overlay):
    """The dispatchers run apart from the API (align serve --no-dispatcher), so their lease renewals, rescues
    and failed attempts are only in their own /metrics, on ALIGN_METRICS_PORT."""
    docs = render(overlay)
    (monitor,) = find(docs, "ServiceMonitor")
    scraped = set()
    for service in find(docs, "Service"):
        if not selects(monitor["spec"]["selector"], service["metadata"]["labels"]):
            continue
        for deployment in find(docs, "Deployment"):
            template = deployment["spec"]["template"]
            if not selects({"matchLabels": service["spec"]["selector"]}, template["metadata"]["labels"]):
                continue
            (container,) = template["spec"]["containers"]
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            env = {e["name"]: e.get("value") for e in container["env"]}
            for endpoint in monitor["spec"]["endpoints"]:
                (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]] or [None]
                if port is None:
                    continue
                assert endpoint["path"] == "/metrics"
                assert ports[port["targetPort"]] == int(env.get("ALIGN_METRICS_PORT") or env["ALIGN_PORT"])
                if "ALIGN_METRICS_PORT" in env:
                    assert env["ALIGN_METRICS_HOST"] == "0.0.0.0", "reachable from outside the pod"
                scraped.add(container["command"][1])
    assert scraped == {"serve", "dispatcher"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_dashboard_and_gcs_are_closed_outside_the_namespace(overlay):
    docs = render(overlay)
    (cluster,) = find(docs, "RayCluster")
    policies = [p for p in find(docs, "NetworkPolicy")
                if p["spec"]["podSelector"].get("matchLabels") == {"ray.io/cluster": cluster["metadata"]["name"]}]
    assert policies, "a policy selects the Ray pods (KubeRay labels them ray.io/cluster=<name>)"
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            assert peers, "a rule without `from` admits every source"
            same_namespace = all(set(peer) == {"podSelector"} for peer in peers)
            ports = {p["port"] for p in rule.get("ports", [])}
            assert same_namespace or (ports and not ports & {6379, 8265, "gcs-server", "dashboard"}), rule


def test_docs_create_the_secret_the_manifests_reference():
    docs = (DEPLOY.parent / "docs" / "deploy.md").read_text()
    created = set(re.findall(r"--from-literal=([\w-]+)=", docs))
    assert created == SECRET_KEYS
    assert "kubectl -n align create secret generic align-secrets" in docs

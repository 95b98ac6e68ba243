"""The cluster manifests: the RayService holds exactly serve_config.yaml and passes KubeRay's CRD schema."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.make_rayservice import render
from serve_app.run import SERVE_ENV

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT.parent / "shared" / "kuberay"


def _crd_schema(name: str, version: str = "v1") -> dict:
    path = CRDS / name
    if not path.is_file():
        pytest.skip(f"{path} is not here (KubeRay v1.7.0 CRDs); CI has it")
    crd = yaml.safe_load(path.read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


def test_rayservice_is_generated_from_serve_config() -> None:
    committed = (ROOT / "cluster" / "rayservice.yaml").read_text()
    assert committed == render(), "run .venv/bin/python cluster/make_rayservice.py and commit the result"
    manifest = yaml.safe_load(committed)
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def test_rayservice_passes_the_kuberay_crd_schema() -> None:
    manifest = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    jsonschema.validate(manifest, _crd_schema("ray.io_rayservices.yaml"))
    spec = manifest["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert group["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/-/healthz"


def test_the_gcs_keeps_its_state_in_the_redis_of_redis_yaml() -> None:
    from cluster.make_rayservice import render_redis

    committed = (ROOT / "cluster" / "redis.yaml").read_text()
    assert committed == render_redis(), "run .venv/bin/python cluster/make_rayservice.py and commit the result"
    ft = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"][
        "gcsFaultToleranceOptions"]
    redis = {d["kind"]: d for d in yaml.safe_load_all(committed)}
    service, deployment = redis["Service"], redis["Deployment"]
    assert ft["redisAddress"] == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert service["spec"]["type"] == "ClusterIP"  # never exposed
    secret = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": secret}} in container["env"]
    assert "--requirepass" in container["command"][-1] and "--appendonly yes" in container["command"][-1]
    claim = deployment["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert redis["PersistentVolumeClaim"]["metadata"]["name"] == claim


def test_schema_validation_catches_a_broken_manifest() -> None:
    manifest = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, _crd_schema("ray.io_rayservices.yaml"))


def test_the_cluster_embedded_in_the_service_passes_the_raycluster_crd() -> None:
    manifest = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "waterbirds"},
               "spec": manifest["spec"]["rayClusterConfig"]}
    jsonschema.validate(cluster, _crd_schema("ray.io_rayclusters.yaml"))


def test_launcher_config_has_a_cpu_head_and_gpu_workers() -> None:
    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["gpu_workers"]["min_workers"] >= 1 and types["gpu_workers"]["max_workers"] >= 2
    assert any('pip install ".[serve,batch]"' in c for c in config["setup_commands"])
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
    head = " ".join(config["head_start_ray_commands"])
    assert "RAY_REDIS_ADDRESS=" in head and "--redis-password=" in head  # GCS fault tolerance
    assert "RAY_gcs_rpc_server_reconnect_timeout_s=600" in " ".join(config["worker_start_ray_commands"])


def test_every_way_of_starting_ray_sets_the_serving_settings_of_make_serve() -> None:
    """serve_app/run.py's SERVE_ENV is the one place they are written; the KubeRay manifest is generated from it
    (above), the launcher's start commands and the local multi-node cluster are checked against it here."""
    settings = [f"{name}={value}" for name, value in SERVE_ENV.items() if name != "RAY_SERVE_HAPROXY_BINARY_PATH"]
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    starts = {"the launcher's head": " ".join(launcher["head_start_ray_commands"]),
              "the launcher's workers": " ".join(launcher["worker_start_ray_commands"]),
              "cluster/local.sh": (ROOT / "cluster" / "local.sh").read_text()}
    for where, commands in starts.items():
        words = set(commands.split())
        missing = [setting for setting in settings if setting not in words]
        assert not missing, f"{where} starts Ray without {missing}"
        assert "RAY_SERVE_HAPROXY_BINARY_PATH=" in commands, where
    pod = {e["name"]: e.get("value") for e in yaml.safe_load(render())["spec"]["rayClusterConfig"]["headGroupSpec"]
           ["template"]["spec"]["containers"][0]["env"]}
    assert all(pod[name] == value for name, value in SERVE_ENV.items() if name != "RAY_SERVE_HAPROXY_BINARY_PATH")

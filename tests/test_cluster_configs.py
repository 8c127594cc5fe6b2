"""cluster_configs/: every `ray up` config is valid against the JSON schema shipped inside the installed ray package
(raw, and after Ray fills in its provider defaults, as `ray up` does), and sets up what this project needs (a CPU
head, GPU workers within autoscaling bounds, the project installed, token auth, the dashboard on loopback); the
KubeRay manifests have the structure the RayCluster/RayJob CRDs expect; the runtime_env is one Ray accepts."""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "cluster_configs"
RAY_UP = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "runtime_env.yaml")


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_are_ray_up_configs_for_aws_gcp_and_on_prem():
    assert {p.stem for p in RAY_UP} >= {"aws", "gcp", "onprem"}
    assert {load(p)["provider"]["type"] for p in RAY_UP} >= {"aws", "gcp", "local"}


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.stem)
def test_ray_up_config_is_valid_against_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(path)
    jsonschema.validate(config, ray_schema())
    filled = prepare_config(copy.deepcopy(config))   # what `ray up` does before validating: provider defaults merged
    validate_config(filled)
    assert filled["max_workers"] >= 1


def test_the_schema_catches_a_misspelt_key():
    config = load(CONFIGS / "aws.yaml")
    config["available_node_types"]["worker.gpu"]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(config, ray_schema())


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.stem)
def test_ray_up_config_sets_up_this_project(path):
    config = load(path)
    mounts = config["file_mounts"]
    for part in ("orchestrator", "jobs", "pyproject.toml", "README.md"):   # what `pip install -e` needs
        assert mounts.get(f"~/moe-orchestrator/{part}") == f"./{part}" and (REPO / part).exists()
    assert "." not in mounts.values(), "not the whole tree: ray up hashes it (.venv, runs/) on every call"
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token", "the token reaches every node"
    setup = " && ".join(config["setup_commands"] + config.get("head_setup_commands", [])
                        + config.get("worker_setup_commands", []))
    assert "-e ~/moe-orchestrator" in setup and "torch==2.13.0" in setup
    import ray

    assert f'ray[default]=={ray.__version__}' in setup, "nodes run the Ray this client has"
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "--dashboard-host=127.0.0.1" in head, "dashboard and job server on the head's loopback only"
    assert "0.0.0.0" not in head + workers
    assert "RAY_JOB_STOP_WAIT_TIME_S=" in head, "ray job stop leaves time for the final checkpoint"
    if config["provider"]["type"] != "local":
        types = config["available_node_types"]
        head_type = types[config["head_node_type"]]
        assert not head_type["resources"].get("GPU"), "a CPU head"
        gpu = [t for name, t in types.items() if name != config["head_node_type"]]
        assert gpu and all(t["resources"].get("GPU", 0) >= 1 for t in gpu), "GPU workers, resources declared"
        # the workers write checkpoint shards to object storage: they need their own cloud identity
        assert all("IamInstanceProfile" in t["node_config"] or "serviceAccounts" in t["node_config"] for t in gpu)
        assert all(0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in gpu)


def _check_cluster_spec(spec: dict) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    (container,) = head["template"]["spec"]["containers"]
    stop_wait = int({e["name"]: e["value"] for e in container["env"]}["RAY_JOB_STOP_WAIT_TIME_S"])
    assert head["template"]["spec"]["terminationGracePeriodSeconds"] > stop_wait
    assert container["name"] == "ray-head" and "nvidia.com/gpu" not in container["resources"]["limits"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["dashboard"] == 8265
    assert {e["name"]: e["value"] for e in container["env"]}["RAY_JOB_STOP_WAIT_TIME_S"]
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (worker,) = group["template"]["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert worker["image"] == container["image"]


def test_kuberay_raycluster_manifest():
    doc = load(CONFIGS / "kuberay" / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])   # a DNS-1035 label
    _check_cluster_spec(doc["spec"])


def test_kuberay_rayjob_manifest():
    doc = load(CONFIGS / "kuberay" / "rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python -m jobs.train --config /home/ray/moe-orchestrator/jobs/configs/gpu.yaml")
    assert "checkpoint.dir=s3://" in spec["entrypoint"], "checkpoints outlive the pods"
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    _check_cluster_spec(spec["rayClusterSpec"])
    cluster = load(CONFIGS / "kuberay" / "raycluster.yaml")["spec"]
    assert spec["rayClusterSpec"]["headGroupSpec"] == cluster["headGroupSpec"], "the cluster of raycluster.yaml"


def test_dockerfile_installs_the_project_on_the_same_ray():
    import ray

    text = (CONFIGS / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu$", text, re.M)
    assert re.search(r"^RUN pip install .*torch==2\.13\.0 \.(\s|$)", text, re.M)
    image = load(CONFIGS / "kuberay" / "raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "/home/ray/moe-orchestrator" in text and image["image"].endswith("moe-orchestrator:0.1.0")


def test_runtime_env_is_one_ray_accepts():
    from ray.runtime_env import RuntimeEnv

    env = load(CONFIGS / "runtime_env.yaml")
    RuntimeEnv(**env)   # raises on unknown fields or wrong types
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1" and "runs/" in env["excludes"]


def test_job_configs_named_by_the_cluster_configs_load():
    from orchestrator.config import load_config

    cfg = load_config(REPO / "jobs" / "configs" / "gpu.yaml")
    assert cfg.cluster.use_gpu and cfg.cluster.num_devices > 1 and cfg.train.mixed_precision == "bf16"
    assert os.path.exists(REPO / "jobs" / "configs" / "gpu.yaml")

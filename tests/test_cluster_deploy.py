"""The deployment files of the cluster, checked without a cluster: the KubeRay manifest
(deploy/kuberay/rayservice.yaml) field by field against the RayService CRD fields it uses
(names, types, required keys), its Serve config against Ray Serve's own schema, its
cluster.toml and docs/cluster.toml against avatard's config, and the systemd units'
commands against the CLI. Nothing here was run on Kubernetes or systemd."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML checks the KubeRay manifest")
ray = pytest.importorskip("ray", reason="the cluster extra is not installed")

from avatard.cluster.config import cluster_config, load_cluster_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"


def _here(toml_text: str, folder: Path) -> str:
    """`toml_text` with its Ditto weights folder replaced by `folder`: the config check
    wants the folder to exist where it runs (it is on the GPU hosts, not here)."""
    table = tomllib.loads(toml_text)
    ditto = table["node"]["engines"]["options"]["ditto"]
    return toml_text.replace(f'"{ditto["weights"]}"', json.dumps(str(folder)))


def _documents() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]
    by_kind = {d["kind"]: d for d in docs}
    assert sorted(by_kind) == ["ConfigMap", "RayService"], sorted(by_kind)
    return by_kind


def _str_map(value: object, where: str) -> dict[str, str]:
    # KubeRay's rayStartParams is map[string]string: a bare number or bool is refused.
    assert isinstance(value, dict), f"{where}: a map"
    for key, item in value.items():
        assert isinstance(key, str) and isinstance(item, str), f"{where}.{key}: a string"
    return value


def _pod_containers(template: dict, where: str) -> list[dict]:
    containers = template["spec"]["containers"]
    assert isinstance(containers, list) and containers, f"{where}: containers"
    for c in containers:
        assert isinstance(c["name"], str) and isinstance(c["image"], str), where
        limits, requests = c["resources"]["limits"], c["resources"]["requests"]
        assert isinstance(limits, dict) and isinstance(requests, dict), where
    return containers


def _mounts(template: dict) -> dict[str, str]:
    """mountPath -> the ConfigMap or claim behind it."""
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    out = {}
    for c in template["spec"]["containers"]:
        for m in c.get("volumeMounts", []):
            volume = volumes[m["name"]]  # a mount names a declared volume
            source = volume.get("configMap", {}).get("name") or m["name"]
            out[m["mountPath"]] = source
    return out


def test_the_rayservice_uses_the_crd_fields_with_their_types(tmp_path):
    docs = _documents()
    service = docs["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    assert isinstance(service["metadata"]["name"], str)
    spec = service["spec"]
    assert set(spec) <= {"serveConfigV2", "rayClusterConfig", "upgradeStrategy"}
    assert isinstance(spec["serveConfigV2"], str)  # a YAML document inside a string
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__  # the version the extra pins
    assert isinstance(cluster["enableInTreeAutoscaling"], bool)
    head = cluster["headGroupSpec"]
    params = _str_map(head["rayStartParams"], "headGroupSpec.rayStartParams")
    _pod_containers(head["template"], "headGroupSpec")
    groups = cluster["workerGroupSpecs"]
    assert isinstance(groups, list) and groups
    for group in groups:
        assert isinstance(group["groupName"], str)
        counts = [group[k] for k in ("minReplicas", "replicas", "maxReplicas")]
        assert all(isinstance(n, int) and not isinstance(n, bool) for n in counts), counts
        assert counts == sorted(counts), counts
        _str_map(group["rayStartParams"], f"{group['groupName']}.rayStartParams")
        for c in _pod_containers(group["template"], group["groupName"]):
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            # Kubernetes requires an extended resource's request to equal its limit.
            assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"]
    # The head offers the ingress's custom resource in KubeRay's quoted-JSON form.
    resources = json.loads(json.loads(params["resources"]))
    toml_text = _here(docs["ConfigMap"]["data"]["cluster.toml"], tmp_path)
    config = cluster_config(tomllib.loads(toml_text))
    assert config.ingress_resource in resources
    # Enough GPU pods for max_nodes node replicas.
    gpus = sum(
        group["maxReplicas"] * int(c["resources"]["limits"]["nvidia.com/gpu"])
        for group in groups
        for c in group["template"]["spec"]["containers"]
    )
    assert gpus >= config.max_nodes * config.gpus_per_node


def test_the_serve_config_passes_serves_schema_and_names_avatards_builder(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    docs = _documents()
    spec = docs["RayService"]["spec"]
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    (app,) = serve_config.applications
    module, _, name = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), name)
    # The builder's config file is the ConfigMap, mounted in every pod.
    config_path = Path(app.args["config"])
    cluster = spec["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]:
        assert _mounts(template)[str(config_path.parent)] == docs["ConfigMap"]["metadata"]["name"]
    # The builder builds the app from the ConfigMap's cluster.toml.
    local = tmp_path / config_path.name
    local.write_text(_here(docs["ConfigMap"]["data"][config_path.name], tmp_path))
    application = builder({"config": str(local)})
    assert type(application).__name__ == "Application"
    from avatard.daemon.config import ConfigError

    with pytest.raises(ConfigError, match="args.colour"):
        builder({"colour": 1})


def test_the_sample_cluster_toml_is_a_valid_config(tmp_path):
    sample = tmp_path / "cluster.toml"
    sample.write_text(_here((ROOT / "docs" / "cluster.toml").read_text(), tmp_path))
    config = load_cluster_config(sample)
    assert config.autoscaling and config.ingress_resource == "ingress"


@pytest.mark.parametrize(
    "unit", ["ray-head.service", "ray-worker.service", "avatard-cluster.service"]
)
def test_the_systemd_units_run_commands_that_exist(unit):
    text = (ROOT / "systemd" / unit).read_text()
    for section in ("[Unit]", "[Service]", "[Install]"):
        assert section in text, f"{unit}: {section}"
    exec_start = text.split("ExecStart=", 1)[1].split("\n# ", 1)[0].replace("\\\n", " ")
    words = exec_start.split()
    if words[0].endswith("/avatard"):
        help_text = subprocess.run(
            [sys.executable, "-m", "avatard.daemon.cli", *words[1:3], "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        for word in words[3:]:
            if word.startswith("--"):
                assert word.split("=")[0] in help_text, f"{unit}: {word}"
    else:
        assert words[0].endswith("/ray") and words[1] == "start" and "--block" in words

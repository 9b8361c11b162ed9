"""cluster/: every spec parses, says what the job relies on, and validates against its schema.

* RayJob / RayCluster: KubeRay v1.7.0's CRD schemas (``tests/data/kuberay``, see its README),
  made strict the way ``kubectl --validate=strict`` is: an unknown field is an error (the API
  server would silently drop it).
* Ray cluster-launcher YAML: the schema shipped in the ray package (``ray-schema.json``) and
  Ray's own ``validate_config``.
* CronJob: its shell script is run here with a stand-in ``kubectl`` to check the RayJob it
  creates (dated name and paths, same cluster as ``rayjob.yaml``, valid against the CRD).

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/integration/test_cluster_specs.py``.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import os
import re
import shlex

import jsonschema
import pytest
import yaml

from hubert_ray.cli import extract
from hubert_ray.core.config import ExtractConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER = os.path.join(ROOT, "cluster")
CRDS = os.path.join(ROOT, "tests", "data", "kuberay")


def _docs(name: str) -> list[dict]:
    with open(os.path.join(CLUSTER, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _one(name: str, kind: str) -> dict:
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


with open(os.path.join(ROOT, "pyproject.toml")) as _f:
    _PYPROJECT = _f.read()


def _ray_version_prefix() -> str:
    return re.search(r'"ray\[[a-z,]+\]>=(\d+\.\d+)', _PYPROJECT).group(1)  # "2.60"


IMAGE = "registry.example.com/hubert-ray:" + re.search(
    r'^version = "([^"]+)"', _PYPROJECT, re.M
).group(1)


def _strict(schema):
    """A copy where objects with listed properties reject unknown ones."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache  # built once a session, shared with tests/integration
def _crd_validator(plural: str) -> jsonschema.Draft7Validator:
    with gzip.open(os.path.join(CRDS, f"ray.io_{plural}.yaml.gz"), "rt") as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: 4x
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is not in the CRD
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def rayjob_validator():
    return _crd_validator("rayjobs")


def _errors(validator, doc) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
        for e in validator.iter_errors(doc)
    ]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpus(group: dict) -> int:
    res = _containers(group)[0].get("resources", {})
    return int(res.get("limits", {}).get("nvidia.com/gpu", 0))


def _check_cluster_spec(spec: dict) -> None:
    """What the job relies on in a RayClusterSpec."""
    assert spec["rayVersion"].startswith(_ray_version_prefix() + ".")
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # decode never lands on the head
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = [g for g in groups.values() if _gpus(g) >= 1]
    cpu_only = [g for g in groups.values() if _gpus(g) == 0]
    assert gpu and cpu_only
    for g in cpu_only:
        res = _containers(g)[0]["resources"]
        assert not any("gpu" in k for part in res.values() for k in part)
        assert int(res["limits"]["cpu"]) >= 8  # decode capacity per node
    for g in gpu:  # requests == limits for the GPU (extended resources must match)
        res = _containers(g)[0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    images = {
        c["image"] for g in [head, *groups.values()] for c in g["template"]["spec"]["containers"]
    }
    assert images == {IMAGE}


def test_every_yaml_parses():
    names = sorted(n for n in os.listdir(CLUSTER) if n.endswith((".yaml", ".yml")))
    assert names == ["cluster-launcher.yaml", "cronjob.yaml", "raycluster.yaml", "rayjob.yaml"]
    for name in names:
        assert _docs(name)


def test_rayjob(rayjob_validator):
    job = _one("rayjob.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["hubert-ray", "extract"]  # the command the image installs
    args = extract.build_parser().parse_args(argv[2:])
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    _check_cluster_spec(spec["rayClusterSpec"])
    # The --config file is the ConfigMap mounted into the head (the driver runs there).
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = head["containers"][0]["volumeMounts"]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    assert os.path.dirname(args.config) == mount["mountPath"]
    assert volume["configMap"]["name"] == _one("rayjob.yaml", "ConfigMap")["metadata"]["name"]
    assert _errors(rayjob_validator, job) == []


def test_rayjob_config_is_a_valid_job_config(tmp_path):
    cm = _one("rayjob.yaml", "ConfigMap")
    path = tmp_path / "job.yaml"
    path.write_text(cm["data"]["job.yaml"])
    values = extract.load_config_file(str(path))
    cfg = ExtractConfig(**values)  # validates every option
    assert cfg.manifest.startswith("s3://") and cfg.output.startswith("s3://")


def test_crd_validation_catches_mistakes(rayjob_validator):
    job = _one("rayjob.yaml", "RayJob")
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = True  # typo: would be dropped silently
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "eight"
    errors = _errors(rayjob_validator, bad)
    assert any("shutdownAfterJobFinish" in e for e in errors)
    assert any("replicas" in e for e in errors)


def test_raycluster():
    rc = _one("raycluster.yaml", "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(rc["spec"])
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    assert _errors(_crd_validator("rayclusters"), rc) == []


def test_cluster_launcher():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    (cfg,) = _docs("cluster-launcher.yaml")
    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as f:
        jsonschema.validate(cfg, json.load(f))
    validate_config(prepare_config(copy.deepcopy(cfg)))
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].startswith(("p", "g"))]
    cpu = [t for t in types.values() if t["node_config"]["InstanceType"].startswith("c")]
    assert gpu and cpu and all(t["max_workers"] >= 1 for t in gpu + cpu)
    assert cfg["docker"]["image"] == IMAGE
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2


def test_dockerfile_installs_the_package():
    with open(os.path.join(CLUSTER, "Dockerfile")) as f:
        text = f.read()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{_ray_version_prefix()}.")
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    for path in ("pyproject.toml", "hubert_ray", "jobs"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, re.M)
    assert "pip install --no-cache-dir ." in text
    assert "hubert-ray extract --help" in text  # the build checks the installed command
    assert f"-t {IMAGE} ." in text
    with open(os.path.join(CLUSTER, "Dockerfile.dockerignore")) as f:
        allowed = {ln[1:].rstrip("/") for ln in f.read().split() if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "hubert_ray", "jobs"}


def test_entrypoints_use_the_command_the_image_installs():
    """The specs run `hubert-ray extract`: the console script pyproject.toml declares, which
    the image has because it pip-installs the package (not editable, not from a mount)."""
    assert re.search(
        r'^\[project\.scripts\]\nhubert-ray = "hubert_ray\.cli\.main:main"$', _PYPROJECT, re.M
    )
    with open(os.path.join(CLUSTER, "Dockerfile")) as f:
        assert re.search(r"pip install --no-cache-dir \.\s", f.read())
    cron = _one("cronjob.yaml", "ConfigMap")["data"]["rayjob.yaml"]
    entrypoints = [
        _one("rayjob.yaml", "RayJob")["spec"]["entrypoint"],
        yaml.safe_load(cron)["spec"]["entrypoint"],
    ]
    for entrypoint in entrypoints:
        assert shlex.split(entrypoint)[:2] == ["hubert-ray", "extract"], entrypoint
    for name in ("cluster-launcher.yaml", "raycluster.yaml", "rayjob.yaml", "cronjob.yaml"):
        with open(os.path.join(CLUSTER, name)) as f:
            assert "python -m jobs." not in f.read(), name


def test_cronjob_spec():
    cron = _one("cronjob.yaml", "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    role = _one("cronjob.yaml", "Role")
    assert pod["serviceAccountName"] == _one("cronjob.yaml", "ServiceAccount")["metadata"]["name"]
    assert {"create", "delete", "get"} <= set(role["rules"][0]["verbs"])
    assert role["rules"][0]["resources"] == ["rayjobs"]

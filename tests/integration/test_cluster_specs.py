"""cluster/: every spec parses, says what the job relies on, and validates against its schema.

* RayJob / RayCluster: KubeRay v1.7.0's CRD schemas (``tests/data/kuberay``, see its README),
  made strict the way ``kubectl --validate=strict`` is: an unknown field is an error (the API
  server would silently drop it).
* Ray cluster-launcher YAML: the schema shipped in the ray package (``ray-schema.json``) and
  Ray's own ``validate_config``.
* CronJob: its shell script is run here with a stand-in ``kubectl`` to check the RayJob it
  creates (dated name and paths, same cluster as ``rayjob.yaml``, valid against the CRD).

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/unit/test_cluster_specs.py``.
"""

from __future__ import annotations

import datetime
import os
import shlex
import stat
import subprocess

import pytest
import yaml

from hubert_ray.cli import extract
from tests.unit.test_cluster_specs import _crd_validator, _errors, _one

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def rayjob_validator():
    return _crd_validator("rayjobs")  # cached: the one tests/unit built


def _run_cronjob(tmp_path, status: str = "", overwrite: str = "0") -> tuple[int, str, list]:
    """Run the CronJob's script with a stand-in kubectl; return (rc, output, created docs)."""
    cron = _one("cronjob.yaml", "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    template = tmp_path / "rayjob.yaml"
    template.write_text(_one("cronjob.yaml", "ConfigMap")["data"]["rayjob.yaml"])
    created = tmp_path / "created.yaml"
    calls = tmp_path / "calls.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        f'case "$1" in get) printf "%s" "{status}" ;; create) cat > {created} ;; esac\n'
    )
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    env = {e["name"]: e["value"] for e in container["env"]}
    env.update(TEMPLATE=str(template), OVERWRITE=overwrite)
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(container["command"], env=env, capture_output=True, text=True, timeout=30)
    docs = list(yaml.safe_load_all(created.read_text())) if created.exists() else []
    return proc.returncode, proc.stdout + proc.stderr + calls.read_text(), docs


def test_cronjob_creates_a_date_partitioned_rayjob(tmp_path, rayjob_validator):
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    rc, log, docs = _run_cronjob(tmp_path)
    assert rc == 0, log
    (job,) = docs
    assert job["metadata"]["name"] == f"hubert-features-{today}"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["hubert-ray", "extract"]
    args = extract.build_parser().parse_args(argv[2:])
    assert args.output == f"s3://my-bucket/features/dt={today}"
    assert args.manifest == f"s3://my-bucket/manifests/dt={today}/manifest.parquet"
    assert not args.overwrite
    assert f"delete rayjob hubert-features-{today}" in log
    assert _errors(rayjob_validator, job) == []
    # Same cluster, options and lifecycle as the one-off rayjob.yaml.
    one_off = _one("rayjob.yaml", "RayJob")
    for key in set(one_off["spec"]) | set(job["spec"]):
        if key != "entrypoint":
            assert job["spec"][key] == one_off["spec"][key], key
    assert (
        args.config
        == extract.build_parser().parse_args(shlex.split(one_off["spec"]["entrypoint"])[2:]).config
    )


def test_cronjob_rerun_same_date_same_path(tmp_path):
    """A rerun targets the same RayJob name and path; it never starts a second copy."""
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        runs.append(_run_cronjob(tmp_path / name)[2])
    assert len(runs[0]) == 1 and runs[0] == runs[1]
    rc, log, docs = _run_cronjob(tmp_path, status="Running")
    assert rc == 0 and docs == [] and "not starting another" in log
    _, _, (forced,) = _run_cronjob(tmp_path, status="Complete", overwrite="1")
    assert shlex.split(forced["spec"]["entrypoint"])[-1] == "--overwrite"

"""Multi-node placement and exactness on a local ``ray.cluster_utils.Cluster``.

Head (0 CPUs) + one node with a fake GPU + two CPU-only nodes, running ``extract.run`` on the
synthetic WenetSpeech corpus. Runs ``tests/integration/multinode_run.py`` in a subprocess: a
Cluster cannot share a process with the session's local Ray (``ray_session``), which runs the
single-node reference runs here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hubert_ray import read_features
from hubert_ray.corpus import manifest, wenetspeech

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _reference(job: dict, out: str) -> dict:
    """The report's job on plain single-node local Ray (the session's), model on CPU: the
    uninterrupted run the cluster's output must equal."""
    from hubert_ray.backend import extract
    from hubert_ray.core.config import ExtractConfig

    summary = extract.run(ExtractConfig(output=out, num_gpus=0, num_cpu_actors=1, **job))
    return {k: v for k, v in summary.items() if k != "config"}


@pytest.fixture(scope="module")
def report(ray_session, wenetspeech_corpus, tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode")
    recordings = []  # training L + the three evaluation sets: 5 recordings
    for subset in ("L", "DEV", "TEST_NET", "TEST_MEETING"):
        path = str(work / f"{subset}.parquet")
        wenetspeech.prepare(wenetspeech_corpus, subset, path)
        recordings += manifest.read_manifest(path)
    manifest_uri = str(work / "manifest.parquet")
    manifest.write_canonical(recordings, manifest_uri)

    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tests", "integration", "multinode_run.py"),
            manifest_uri,
            tiny_model,
            str(work),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("MULTINODE_REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    rep = json.loads(lines[-1].split(" ", 1)[1])
    rep["work"] = str(work)
    rep["segment_ids"] = [s.segment_id for r in recordings for s in r.segments]
    rep["single"] = _reference(rep["job"], str(work / "single"))
    return rep


def test_decode_runs_on_cpu_only_nodes_and_the_model_on_the_gpu_node(report):
    nodes, trace = report["nodes"], report["trace"]
    decode_nodes = set(trace["decode"])
    assert set(nodes["cpu"]) <= decode_nodes  # both CPU-only nodes decoded
    assert nodes["head"] not in decode_nodes  # the head has no CPUs to offer
    assert sum(trace["decode"].values()) >= 3  # blocks cut at recording boundaries
    assert trace["model"] == {nodes["gpu"]: 1}  # one model actor, on the GPU node
    assert report["multi"]["device"] == "gpu" and report["multi"]["model_actors"] == 1


def test_every_segment_exactly_once(report):
    for run in ("multi", "single"):
        s = report[run]
        assert s["segments_total"] == s["segments_ok"] == len(report["segment_ids"])
        assert s["segments_missing"] == s["segments_duplicated"] == s["segments_failed"] == 0


def test_features_equal_a_single_node_run(report):
    for layer in (1, 2):
        multi = read_features(os.path.join(report["work"], "multi"), layer=layer)
        single = read_features(os.path.join(report["work"], "single"), layer=layer)
        assert sorted(multi) == sorted(single) == sorted(report["segment_ids"])
        for sid, a in multi.items():
            b = single[sid]
            assert a.shape == b.shape and a.dtype == np.float16
            # Same FP32 compute on CPU; batches may differ (exact batching: ~1e-6), then
            # float16 storage: allow a few float16 ulps.
            np.testing.assert_allclose(a.astype(np.float32), b, rtol=4e-3, atol=4e-3)


@pytest.fixture(scope="module")
def removal_report(ray_session, corpus, tiny_model, tmp_path_factory):
    """The synthetic corpus 6 times over under distinct ids (258 segments, 180 recordings),
    run while one CPU-only decode node is removed (``tests/integration/node_removal_run.py``)."""
    work = tmp_path_factory.mktemp("node-removal")
    root = os.path.dirname(corpus)
    with open(corpus) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    manifest_uri = str(work / "manifest.jsonl")
    with open(manifest_uri, "w") as f:
        for k in range(6):
            for rec in lines:
                rid = rec.get("id") or os.path.splitext(os.path.basename(rec["audio"]))[0]
                new = {"id": f"c{k}-{rid}", "audio": os.path.join(root, rec["audio"])}
                if "segments" in rec:
                    new["segments"] = [{**s, "id": f"c{k}-{s['id']}"} for s in rec["segments"]]
                f.write(json.dumps(new) + "\n")
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    script = os.path.join(ROOT, "tests", "integration", "node_removal_run.py")
    proc = subprocess.run(
        [sys.executable, script, manifest_uri, tiny_model, str(work)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("NODE_REMOVAL_REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    rep = json.loads(lines[-1].split(" ", 1)[1])
    rep["work"] = str(work)
    rep["segment_ids"] = [
        s.segment_id for r in manifest.read_manifest(manifest_uri) for s in r.segments
    ]
    rep["reference"] = _reference(rep["job"], str(work / "reference"))
    return rep


def _ids(out: str, directory: str) -> list[str]:
    import pyarrow.parquet as pq

    path = os.path.join(out, directory)
    if not os.path.isdir(path):
        return []
    return pq.read_table(path, columns=["segment_id"]).column("segment_id").to_pylist()


def test_removing_a_decode_node_mid_run_loses_and_duplicates_nothing(removal_report):
    rep = removal_report
    # The node really went away mid-run, after the first part and before the end.
    assert rep["removal"]["parts_before"] >= 1 and not rep["removed_node_alive_after"]
    removed = rep["removal"]["node"]
    assert rep["decode_runs"].get(removed, 0) >= 1  # it had decoded blocks before it went
    # Ray recovered by itself: decode tasks lost with the node (running, or whose outputs were
    # in its object store) were re-executed elsewhere, no resume needed.
    assert rep["recovered_by"] == "ray", rep["first_error"]
    assert sum(rep["decode_runs"].values()) > rep["decode_blocks"]
    s, ref = rep["removed"], rep["reference"]
    assert s["segments_total"] == len(rep["segment_ids"]) == 258
    assert s["segments_missing"] == s["segments_duplicated"] == s["segments_unexpected"] == 0
    assert s["segments_ok"] == ref["segments_ok"]
    assert s["errors_by_reason"] == ref["errors_by_reason"]
    out = os.path.join(rep["work"], "removed")
    written = _ids(out, "features") + _ids(out, "errors")
    assert sorted(written) == sorted(rep["segment_ids"])  # every segment exactly once
    ref_out = os.path.join(rep["work"], "reference")
    assert sorted(_ids(out, "errors")) == sorted(_ids(ref_out, "errors"))


def test_features_after_node_removal_equal_an_uninterrupted_run(removal_report):
    out, ref_out = (os.path.join(removal_report["work"], d) for d in ("removed", "reference"))
    for layer in (1, 2):
        got, want = read_features(out, layer=layer), read_features(ref_out, layer=layer)
        assert sorted(got) == sorted(want)
        for sid, a in got.items():
            assert a.shape == want[sid].shape and a.dtype == np.float16
            # As test_features_equal_a_single_node_run: batches may differ, FP32 on CPU.
            np.testing.assert_allclose(a.astype(np.float32), want[sid], rtol=4e-3, atol=4e-3)

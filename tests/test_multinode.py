"""Multi-node placement and exactness on a local ``ray.cluster_utils.Cluster``.

Head (0 CPUs) + one node with a fake GPU + two CPU-only nodes, running ``pipeline.run`` on the
synthetic WenetSpeech corpus. Runs ``tests/multinode_run.py`` in a subprocess: a Cluster cannot
share a process with the session's local Ray (``ray_session``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hubert_ray import manifest, read_features, wenetspeech

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(wenetspeech_corpus, tiny_model, tmp_path_factory):
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
            os.path.join(ROOT, "tests", "multinode_run.py"),
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

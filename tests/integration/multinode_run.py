"""Run the job on a local multi-node Ray cluster; print a JSON report.

    python tests/integration/multinode_run.py MANIFEST MODEL_DIR WORK_DIR

Launched by ``tests/integration/test_multinode.py`` in its own process:
``ray.cluster_utils.Cluster`` cannot share a process with the test session's ``ray.init``. The
cluster is a head with no CPUs (like a real head that only schedules), one node with a (fake)
GPU and 1 CPU, and two CPU-only nodes with 2 CPUs each. The model actor asks for ``num_gpus=1``
and falls back to CPU inside (no CUDA here). ``HUBERT_RAY_TRACE_DIR`` makes every decode task
and model actor record its node id (``hubert_ray.backend.context.trace``); workers inherit it
from this process. The test runs the reference (the same job on single-node local Ray) itself,
on the session's shared Ray: one Ray start fewer.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import sys
import time


def _trace(trace_dir: str) -> dict[str, collections.Counter]:
    out: dict[str, collections.Counter] = {}
    for path in glob.glob(os.path.join(trace_dir, "*.txt")):
        stage = os.path.basename(path).split("-", 1)[0]
        with open(path) as f:
            out.setdefault(stage, collections.Counter()).update(f.read().split())
    return out


def main(manifest_uri: str, model: str, work: str) -> dict:
    trace_dir = os.path.join(work, "trace")
    os.makedirs(trace_dir, exist_ok=True)
    os.environ["HUBERT_RAY_TRACE_DIR"] = trace_dir  # before any raylet starts
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.pop("RAY_ADDRESS", None)

    import ray
    from ray.cluster_utils import Cluster

    from hubert_ray.backend import extract
    from hubert_ray.core.config import ExtractConfig

    common = dict(object_store_memory=100 * 2**20, include_dashboard=False)
    t0 = time.time()
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, **common))
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1, **common)
    cpu_nodes = [cluster.add_node(num_cpus=2, **common) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.time() - t0
    nodes = {
        "head": cluster.head_node.node_id,
        "gpu": gpu_node.node_id,
        "cpu": [n.node_id for n in cpu_nodes],
    }

    cfg = dict(
        manifest=manifest_uri,
        model=model,
        layers="1,2",
        batch_size=8,
        decode_batch_size=6,
        rows_per_file=16,
        decode_memory_mb=256,
    )
    t1 = time.time()
    multi = extract.run(ExtractConfig(output=os.path.join(work, "multi"), **cfg))
    multi_s = time.time() - t1
    ray.shutdown()
    cluster.shutdown()
    trace = _trace(trace_dir)

    # The reference (the same job on plain single-node local Ray) runs in the test session, on
    # its shared local Ray: the job's options go back with the report.
    return {
        "job": cfg,
        "nodes": nodes,
        "trace": {stage: dict(c) for stage, c in trace.items()},
        "multi": {k: v for k, v in multi.items() if k != "config"},
        "seconds": {"cluster_start": round(started, 1), "multi": multi_s},
    }


if __name__ == "__main__":
    report = main(*sys.argv[1:4])
    print("MULTINODE_REPORT " + json.dumps(report, default=str))

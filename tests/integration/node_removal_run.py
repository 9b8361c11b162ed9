"""Remove a CPU-only decode node mid-run on a local multi-node Ray cluster; print a JSON report.

    python tests/integration/node_removal_run.py MANIFEST MODEL_DIR WORK_DIR

Launched by ``tests/integration/test_multinode.py`` in its own process (a
``ray.cluster_utils.Cluster`` cannot share a process with the test session's ``ray.init``). The
cluster is the one of ``tests/integration/multinode_run.py``: a head with no CPUs, a node with a
(fake) GPU and 1 CPU for the model actor, and two CPU-only decode nodes with 2 CPUs each. A
thread removes the first CPU-only node as soon as the first part file appears under
``WORK_DIR/removed/features``. If the job still completes, Ray recovered by itself (task retries
+ lineage reconstruction of the lost decode outputs); if it raises, the same job is rerun into
the same output on the remaining nodes (resume) and the report says so (``recovered_by``). The
reference, the same job on plain single-node local Ray uninterrupted (``WORK_DIR/reference``),
is run by the test itself on the session's shared Ray.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import threading
import time


def main(manifest_uri: str, model: str, work: str) -> dict:
    from hubert_ray.testing.faults import DELAY_ENV

    trace_dir = os.path.join(work, "trace")
    os.makedirs(trace_dir, exist_ok=True)
    os.environ["HUBERT_RAY_TRACE_DIR"] = trace_dir  # decode tasks record their node id
    # Model calls 0.1 s slower (a slow device; hubert_ray.testing.faults): the removal lands
    # mid-run with decoded blocks still waiting, on any machine.
    os.environ[DELAY_ENV] = "0.1"
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.pop("RAY_ADDRESS", None)

    import ray
    from multinode_run import _trace
    from ray.cluster_utils import Cluster

    from hubert_ray.backend import dataset, extract
    from hubert_ray.core.config import ExtractConfig
    from hubert_ray.corpus import manifest

    common = dict(object_store_memory=100 * 2**20, include_dashboard=False)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, **common))
    cluster.add_node(num_cpus=1, num_gpus=1, **common)
    cpu_nodes = [cluster.add_node(num_cpus=2, **common) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    cfg = dict(
        manifest=manifest_uri,
        model=model,
        layers="1,2",
        batch_size=8,
        decode_batch_size=6,
        rows_per_file=16,
        decode_memory_mb=256,
    )
    out = os.path.join(work, "removed")
    removal: dict = {}
    done = threading.Event()

    def remove_when_first_part_appears() -> None:
        t0 = time.time()
        while not done.is_set() and time.time() - t0 < 120:
            parts = glob.glob(os.path.join(out, "features", "*.parquet"))
            if parts:
                removal["parts_before"] = len(parts)
                removal["node"] = cpu_nodes[0].node_id
                cluster.remove_node(cpu_nodes[0])
                removal["at_s"] = round(time.time() - t0, 2)
                return
            time.sleep(0.05)

    remover = threading.Thread(target=remove_when_first_part_appears, daemon=True)
    t1 = time.time()
    remover.start()
    recovered_by, first_error = "ray", None
    try:
        summary = extract.run(ExtractConfig(output=out, **cfg))
    except Exception as exc:  # Ray could not recover: resume into the same output
        first_error = f"{type(exc).__name__}: {exc}"[:2000]
        done.set()
        remover.join()
        recovered_by = "resume"
        summary = extract.run(ExtractConfig(output=out, **cfg))
    done.set()
    remover.join()
    run_s = time.time() - t1
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    ray.shutdown()
    cluster.shutdown()
    os.environ.pop("HUBERT_RAY_TRACE_DIR")
    os.environ.pop(DELAY_ENV)
    trace = _trace(trace_dir)
    recordings = manifest.read_manifest(manifest_uri)
    sizes = {
        "recordings": len(recordings),
        "segments": sum(len(r.segments) for r in recordings),
    }
    per_task = dataset.recordings_per_task(ExtractConfig(output="-", **cfg), sizes)
    # Blocks of whole recordings the decode tasks get (fewer tasks if Ray bundles small ones).
    blocks = -(-sizes["recordings"] // per_task)

    # The reference runs in the test session, on its shared local Ray (one Ray start fewer).
    return {
        "job": cfg,
        "removal": removal,
        "removed_node_alive_after": removal.get("node") in alive,
        "recovered_by": recovered_by,
        # Decode task executions per node; more than ``decode_blocks`` = re-executed tasks.
        "decode_runs": dict(trace.get("decode", {})),
        "decode_blocks": blocks,
        "cpu_nodes": [n.node_id for n in cpu_nodes],
        "first_error": first_error,
        "removed": {k: v for k, v in summary.items() if k != "config"},
        "seconds": {"removed_run": round(run_s, 1)},
    }


if __name__ == "__main__":
    report = main(*sys.argv[1:4])
    print("NODE_REMOVAL_REPORT " + json.dumps(report, default=str))

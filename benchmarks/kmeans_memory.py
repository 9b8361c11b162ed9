"""Peak memory of ``hubert-ray kmeans learn`` against the size of the feature dataset:

    python -m benchmarks.kmeans_memory [--hidden 768] [--sample-hours 0.05] [--k 100] \
        [--steps sample,learn] [--data DIR] [--backend auto|torch|sklearn]

Writes feature datasets in the job's layout (``<dir>/features/part-*.parquet``, float16
``layer_9``, segments of 4-16 s, random values, 500 rows per part) holding 10x and 100x the
sample's frames, then, each in a fresh subprocess: (a) the sample alone
(``hubert_ray.units.sampling.sample_features``) and (b) the whole ``learn`` (sample + k-means with
``--backend``, ``auto`` by default, + the centroid file; docs/performance.md's figures were
taken with MiniBatchKMeans and fairseq's parameters). Prints the process's peak RSS
(``ru_maxrss``, which includes what its imports touched on the way), its peak RSS during the
step (sampled every 5 ms), the RSS after its imports, and the sample's own size: bounded by the
sample means the peak does not grow from 10x to 100x.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = r"""
import json, resource, sys, time
import numpy as np, torch, sklearn.cluster  # imports first: their RSS is the baseline
from hubert_ray.units import kmeans
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
base = rss_mib()
import threading
during = [base]
stop = threading.Event()
def watch():  # peak RSS during the step, sampled every 5 ms (no import transients)
    while not stop.is_set():
        during.append(rss_mib())
        stop.wait(0.005)
watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
mode, ds, out, backend = sys.argv[1], sys.argv[2], sys.argv[5], sys.argv[6]
hours, k = float(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
if mode == "sample":
    sample, info = kmeans.sample_features(ds, 9, int(hours * 3600 * 50), seed=0)
    frames, nbytes = len(sample), sample.nbytes
else:
    prov = kmeans.learn(ds, 9, k, hours, out, seed=0, backend=backend)
    frames, nbytes = prov["sample"]["frames"], prov["sample"]["frames"] * prov["hidden_size"] * 4
stop.set()
watcher.join()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps({"base": base, "peak": peak, "during": max(during), "frames": frames,
      "sample_mib": nbytes / 2**20, "seconds": time.perf_counter() - t0}))
"""


def write_dataset(root: str, frames: int, hidden: int, seed: int = 0) -> tuple[int, int]:
    """Feature parts holding about ``frames`` frames; returns (frames, bytes on disk)."""
    import pyarrow as pa

    from hubert_ray.dataset import output
    from hubert_ray.stages.extractor import features_array

    rng = np.random.default_rng(seed)
    done = seg = 0
    while done < frames:
        lengths = rng.integers(200, 800, 500)
        lengths = lengths[np.cumsum(lengths) <= frames - done + 800][: max(1, len(lengths))]
        n = len(lengths)
        total = int(lengths.sum())
        values = rng.standard_normal((total, hidden), dtype=np.float32).astype(np.float16)
        ids = [f"seg{seg + i:08d}" for i in range(n)]
        table = pa.table(
            {
                "segment_id": ids,
                "recording_id": [f"rec{(seg + i) // 20:07d}" for i in range(n)],
                "start_s": [0.0] * n,
                "end_s": (lengths / 50).tolist(),
                "num_frames": pa.array(lengths, pa.int32()),
                "layer_9": features_array(values, lengths.tolist(), [True] * n, "float16"),
                "model": ["synthetic"] * n,
                "model_revision": ["0000000000000000"] * n,
            }
        )
        output.write_part(table, os.path.join(root, "features"), {"layers": [9]})
        done += total
        seg += n
    size = sum(
        os.path.getsize(os.path.join(root, "features", f))
        for f in os.listdir(os.path.join(root, "features"))
    )
    return done, size


def dataset_size(root: str) -> tuple[int, int]:
    import pyarrow.parquet as pq

    directory = os.path.join(root, "features")
    files = [os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".parquet")]
    frames = sum(
        int(pq.read_table(f, columns=["num_frames"]).column(0).to_numpy().sum()) for f in files
    )
    return frames, sum(os.path.getsize(f) for f in files)


def run(mode: str, ds: str, hours: float, k: int, out: str, backend: str = "auto") -> dict:
    from benchmarks.trees import run_json

    return run_json(CHILD, mode, ds, str(hours), str(k), out, backend)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--sample-hours", type=float, default=0.05)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--factors", default="10,100", help="dataset sizes, in samples")
    p.add_argument("--steps", default="sample,learn", help="sample and/or learn")
    p.add_argument("--backend", default="auto", help="learn's k-means backend (auto)")
    p.add_argument("--work", default=None, help="directory for temporary files (default: tmp)")
    p.add_argument(
        "--data",
        default=None,
        help="keep the datasets in DATA/x<factor> and reuse them on the next run",
    )
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    sample_frames = int(args.sample_hours * 3600 * 50)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        print(
            "| dataset | frames | on disk, MiB | step | sample frames | sample, MiB "
            "| RSS after imports, MiB | peak RSS (ru_maxrss), MiB | peak RSS during the step "
            "(sampled), MiB | during - imports, MiB | seconds |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for factor in [int(f) for f in args.factors.split(",")]:
            ds = os.path.join(args.data or work, f"x{factor}")
            marker = os.path.join(ds, ".complete")
            if os.path.exists(marker):
                frames, size = dataset_size(ds)
            else:
                t0 = time.perf_counter()
                frames, size = write_dataset(ds, factor * sample_frames, args.hidden)
                open(marker, "w").close()
                print(f"(wrote {ds} in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            for mode in args.steps.split(","):
                r = run(
                    mode,
                    ds,
                    args.sample_hours,
                    args.k,
                    os.path.join(work, "km.safetensors"),
                    args.backend,
                )
                print(
                    f"| {factor}x sample | {frames:,} | {size / 2**20:,.0f} | {mode} "
                    f"| {r['frames']:,} | {r['sample_mib']:.1f} | {r['base']:.0f} "
                    f"| {r['peak']:.0f} | {r['during']:.0f} | {r['during'] - r['base']:.0f} "
                    f"| {r['seconds']:.1f} |",
                    flush=True,
                )
            if not args.data:
                import shutil

                shutil.rmtree(ds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

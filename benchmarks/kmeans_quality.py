"""k-means quality, time and memory: scikit-learn MiniBatchKMeans (fairseq's parameters)
against the torch k-means (k-means++ + Lloyd) on the same sample:

    python -m benchmarks.kmeans_quality [--k 40] [--per-cluster 1000] [--dim 768] \
        [--device cpu|cuda] [--json PATH]

The sample is a synthetic HuBERT-like feature set: a Gaussian mixture of ``--k`` components
whose means lie in a ``--rank``-dimensional subspace of ``--dim`` dimensions (features of a
layer have a low effective dimension), with uneven weights (Dirichlet) and per-component noise
scales (0.7-1.3), about ``--per-cluster`` frames per component, float32. It is written once
to a ``.npy`` file; each backend then runs in a fresh subprocess that loads it, learns K
centroids with seed 0, and computes the inertia on the whole sample with
``hubert_ray.units.kmeans.inertia`` (the same code for both). Printed side by side: inertia per
frame, the ratio torch / scikit-learn (the goal: <= 1.01), the learning's wall seconds, the
process's peak RSS (``ru_maxrss``) and the RSS after loading the sample.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = r"""
import json, resource, sys, time
import numpy as np, torch, sklearn.cluster  # imports first: their RSS is in the baseline
from hubert_ray.units import kmeans
from hubert_ray.units import kmeans_torch
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
backend, path, k, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
params = json.loads(sys.argv[5])
sample = np.load(path)
base = rss_mib()
t0 = time.perf_counter()
if backend == "torch":
    c, algo = kmeans_torch.learn_torch(sample, k, 0, device, **params)
    if device == "cuda":
        torch.cuda.synchronize()
else:
    c, algo = kmeans.learn_sklearn(sample, k, 0, **params)
seconds = time.perf_counter() - t0
total = kmeans.inertia(sample, c, device)
out = {"inertia": total, "frames": len(sample), "seconds": seconds, "base_mib": base,
       "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
       "algorithm": algo}
if device == "cuda":
    out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
print("RESULT " + json.dumps(out))
"""


def mixture(k: int, per_cluster: int, dim: int, rank: int, spread: float, seed: int = 0):
    """Frames [about k * per_cluster, dim] float32 and the true means [k, dim]."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, dim)).astype(np.float32)
    means = (rng.standard_normal((k, rank)).astype(np.float32) * spread) @ basis
    counts = rng.multinomial(k * per_cluster, rng.dirichlet(np.full(k, 2.0)))
    labels = np.repeat(np.arange(k), counts)
    scale = rng.uniform(0.7, 1.3, k).astype(np.float32)
    x = rng.standard_normal((labels.size, dim), dtype=np.float32)
    x *= scale[labels, None]
    x += means[labels]
    return x[rng.permutation(labels.size)], means


def run(backend: str, path: str, k: int, device: str, params: dict) -> dict:
    from benchmarks.trees import run_json

    return run_json(CHILD, backend, path, str(k), device, json.dumps(params))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=40, help="clusters (and mixture components)")
    p.add_argument("--per-cluster", type=int, default=1000, help="frames per component")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--rank", type=int, default=32, help="dimension of the means' subspace")
    p.add_argument("--spread", type=float, default=0.4, help="std of the means' coordinates")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch's device")
    p.add_argument("--n-init", type=int, default=None, help="both backends (default: 20)")
    p.add_argument("--backends", default="sklearn,torch")
    p.add_argument("--work", default=None, help="directory for the sample (default: tmp)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    params = {} if args.n_init is None else {"n_init": args.n_init}
    x, means = mixture(args.k, args.per_cluster, args.dim, args.rank, args.spread)
    sys.path.insert(0, ROOT)
    from hubert_ray.units import kmeans

    truth = kmeans.inertia(x, means)
    results = {}
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        path = os.path.join(work, "sample.npy")
        np.save(path, x)
        size_mib = x.nbytes / 2**20
        del x
        for backend in args.backends.split(","):
            device = args.device if backend == "torch" else "cpu"
            results[backend] = run(backend, path, args.k, device, params)
    frames = next(iter(results.values()))["frames"]
    ref = results.get("sklearn", {}).get("inertia")
    print(
        f"sample: {frames:,} frames x {args.dim} (float32, {size_mib:.0f} MiB), K = {args.k}; "
        f"inertia per frame of the true means: {truth / frames:.2f}"
    )
    print(
        "| backend | device | n_init | inertia / frame | / scikit-learn | seconds "
        "| peak RSS, MiB | RSS with the sample loaded, MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results.values():
        ratio = f"{r['inertia'] / ref:.4f}" if ref else "-"
        print(
            f"| {r['algorithm']['name']} | {r['algorithm']['device']} "
            f"| {r['algorithm']['params']['n_init']} | {r['inertia'] / frames:.2f} | {ratio} "
            f"| {r['seconds']:.1f} | {r['peak_mib']:.0f} | {r['base_mib']:.0f} |"
        )
    if args.json:
        doc = {
            "args": vars(args),
            "frames": frames,
            "sample_mib": size_mib,
            "true_means_inertia": truth,
            "results": results,
            "torch_over_sklearn": (results["torch"]["inertia"] / ref)
            if ref and "torch" in results
            else None,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

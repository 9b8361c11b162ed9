"""k-means in torch, on the sample's device: k-means++ initialisation, then full-batch Lloyd.

The learn sample is bounded (``hubert_ray.units.sampling.sample_features``) and is meant to fit in
the memory of the device that clusters it, so every iteration sees every frame: Lloyd on the whole
sample reaches a lower inertia than scikit-learn's MiniBatchKMeans with fairseq's parameters
on the same sample (``python -m benchmarks.kmeans_quality``, docs/units.md).

- **Initialisation**: greedy k-means++ (scikit-learn's ``_kmeans_plusplus``: ``2 + ln K``
  candidates per centre, the one that lowers the potential most is kept) on ``init_size``
  frames drawn without replacement (30,000 by default: MiniBatchKMeans's ``3 * batch_size``
  with fairseq's ``batch_size``). Candidates are drawn by inverse CDF (``searchsorted`` on the
  cumulative potential in float64) from uniforms made by a CPU generator seeded with the seed:
  the random stream is the same on every device, and the loop never waits for the device.
- **Lloyd**: distances by the ``||x||^2 - 2 x.c + ||c||^2`` expansion in float32, in blocks of
  ``rows`` frames (memory: the sample, four bytes per frame for each of ``||x||^2``, the
  distance to the nearest centroid and the label, and one ``[rows, K]`` block). New centroids
  are the means of their frames; a cluster left empty takes the frame farthest from its
  centroid (branch-free, as scikit-learn relocates). On CUDA the sums are a one-hot matmul (an
  ``index_add_`` of floats uses atomics there, whose order varies from run to run); on the CPU
  ``index_add_``, which is sequential. Counts are integer ``bincount``s.
- **Convergence**: each iteration's inertia (of the centroids it started from) and number of
  changed labels stay on the device; every :data:`CHECK_EVERY` iterations one small copy to
  the host decides: stop when no label changed or the inertia fell by less than ``tol`` (a
  fraction) over the last iteration, else at ``max_iter``.
- **Several inits**: ``n_init`` runs (initialisation + Lloyd), each from its own part of the
  seeded stream; the run of least inertia is kept.

Deterministic for a seed on a given device and thread count (float32 reductions may differ
between devices). Matmuls run at full float32 precision (TF32 off while learning).

torch is imported inside the functions (``import hubert_ray`` stays light).
"""

from __future__ import annotations

import math
import time

import numpy as np

# What the torch backend runs with unless told otherwise.
TORCH_PARAMS = {
    "init": "k-means++",
    "n_init": 20,  # fairseq's n_init; each is a full Lloyd run here
    "max_iter": 100,
    "tol": 1e-4,
    "init_size": 30_000,
}
ROWS = 16_384  # frames per distance block: a [16384, 500] float32 block is 33 MB
CHECK_EVERY = 4  # Lloyd iterations between two looks at the convergence figures


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ValueError for ``cuda``
    without one."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA is not available to torch here; use --device cpu or auto")
    return device


def _kmeans_pp(x, x_sq, k: int, uniforms, first):
    """Greedy k-means++ on ``x`` [n, D]; ``uniforms`` [k, trials] float64 on x's device,
    ``first`` a one-element index tensor. No host synchronisation."""
    import torch

    n, dim = x.shape
    centers = torch.empty(k, dim, dtype=x.dtype, device=x.device)
    centers[0:1] = x.index_select(0, first)
    closest = (x_sq - 2 * (x @ centers[0]) + x_sq.index_select(0, first)).clamp_(min=0)
    for c in range(1, k):
        cum = torch.cumsum(closest, 0, dtype=torch.float64)
        cand = torch.searchsorted(cum, uniforms[c] * cum[-1]).clamp_(max=n - 1)
        xc = x.index_select(0, cand)  # [trials, D]
        d = torch.addmm(x_sq[:, None], x, xc.t(), beta=1.0, alpha=-2.0)
        d.add_(x_sq.index_select(0, cand)[None, :]).clamp_(min=0)
        d = torch.minimum(d, closest[:, None])
        best = d.sum(0, dtype=torch.float64).argmin().view(1)
        closest = d.index_select(1, best).squeeze(1)
        centers[c : c + 1] = xc.index_select(0, best)
    return centers


def _assign_pass(x, x_sq, c, labels, mind, rows: int, sums=None, counts=None, onehot=None):
    """One pass over ``x``: labels and squared distance to the nearest of ``c`` per frame
    (written into ``labels``/``mind``), the number of changed labels (a device tensor), and,
    if ``sums`` is given, the per-cluster sums and counts of the frames (``onehot``: sums by
    one-hot matmul; by default off the CPU only)."""
    import torch

    k = c.shape[0]
    c_sq = (c * c).sum(1)
    ct = c.t()
    changed = torch.zeros((), dtype=torch.int64, device=x.device)
    onehot_sums = x.device.type != "cpu" if onehot is None else onehot
    for s in range(0, x.shape[0], rows):
        xb = x[s : s + rows]
        d = torch.addmm(c_sq, xb, ct, beta=1.0, alpha=-2.0)
        dmin, lab = d.min(dim=1)
        lab = lab.to(torch.int32)
        mind[s : s + rows] = (dmin + x_sq[s : s + rows]).clamp_(min=0)
        changed += (lab != labels[s : s + rows]).sum()
        labels[s : s + rows] = lab
        if sums is not None:
            if onehot_sums:
                onehot = torch.zeros_like(d).scatter_(1, lab[:, None].long(), 1.0)
                sums.addmm_(onehot.t(), xb)
            else:
                sums.index_add_(0, lab, xb)
            counts += torch.bincount(lab, minlength=k)
    return changed


def _lloyd(x, x_sq, c, max_iter: int, tol: float, rows: int):
    """Lloyd from centroids ``c``; returns (centroids, inertia, iterations, converged)."""
    import torch

    n, dim = x.shape
    k = c.shape[0]
    dev = x.device
    labels = torch.full((n,), -1, dtype=torch.int32, device=dev)
    mind = torch.empty(n, dtype=torch.float32, device=dev)
    hist = torch.zeros(max_iter, dtype=torch.float64, device=dev)
    moved = torch.zeros(max_iter, dtype=torch.int64, device=dev)
    sums = torch.empty(k, dim, dtype=torch.float32, device=dev)
    counts = torch.empty(k, dtype=torch.int64, device=dev)
    far_n = min(k, n)
    it, converged = 0, False
    while it < max_iter:
        sums.zero_()
        counts.zero_()
        moved[it] = _assign_pass(x, x_sq, c, labels, mind, rows, sums, counts)
        hist[it] = mind.sum(dtype=torch.float64)
        # New centroids: means; an empty cluster takes the next farthest frame.
        empty = counts == 0
        rank = (torch.cumsum(empty, 0) - 1).clamp_(min=0, max=far_n - 1)
        far = mind.topk(far_n).indices.index_select(0, rank)
        means = sums / counts.clamp(min=1).to(sums.dtype)[:, None]
        c = torch.where(empty[:, None], x.index_select(0, far), means)
        it += 1
        if it % CHECK_EVERY == 0 or it == max_iter:
            h = hist[:it].cpu().numpy()  # the one synchronisation of these iterations
            m = moved[:it].cpu().numpy()
            last = it - 1
            if m[last] == 0 or (last > 0 and h[last - 1] - h[last] < tol * h[last]):
                converged = True
                break
    # The inertia of the centroids returned (one more pass, no sums).
    _assign_pass(x, x_sq, c, labels, mind, rows)
    return c, mind.sum(dtype=torch.float64), it, converged


def learn_torch(
    sample: np.ndarray,
    k: int,
    seed: int = 0,
    device: str = "cpu",
    rows: int = ROWS,
    **params,
) -> tuple[np.ndarray, dict]:
    """k-means of ``sample`` [N, D] float32 on ``device`` (see the module doc); returns the
    centroids [k, D] float32 and the algorithm's description for the provenance."""
    import torch

    p = {**TORCH_PARAMS, **params}
    unknown = set(p) - set(TORCH_PARAMS)
    if unknown:
        raise ValueError(f"unknown torch k-means parameter(s): {sorted(unknown)}")
    if p["init"] != "k-means++":
        raise ValueError(f"init={p['init']!r}: only 'k-means++' is implemented")
    n_init, max_iter = int(p["n_init"]), int(p["max_iter"])
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init={n_init} and max_iter={max_iter} must be >= 1")
    n = sample.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of frames ({n})")
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        need = sample.nbytes + n * 16 + rows * k * 8 + k * sample.shape[1] * 12
        if need > free:
            raise ValueError(
                f"the sample needs ~{need / 2**30:.1f} GiB on {dev}, {free / 2**30:.1f} GiB "
                "are free; use fewer --sample-hours or --device cpu"
            )
    t0 = time.perf_counter()
    matmul_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: centroids are float32 means
    try:
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32)).to(dev)
            x_sq = torch.cat([(b * b).sum(1) for b in x.split(rows)])  # no [N, D] temporary
            gen = torch.Generator().manual_seed(int(seed))
            init_size = min(n, max(int(p["init_size"]), 3 * k))
            trials = 2 + int(math.log(k))
            runs = []
            best = None
            for _ in range(n_init):
                sub = torch.randperm(n, generator=gen)[:init_size].sort().values.to(dev)
                uniforms = torch.rand(k, trials, generator=gen, dtype=torch.float64).to(dev)
                first = torch.randint(init_size, (1,), generator=gen).to(dev)
                c0 = _kmeans_pp(
                    x.index_select(0, sub), x_sq.index_select(0, sub), k, uniforms, first
                )
                c, inertia, iters, converged = _lloyd(x, x_sq, c0, max_iter, p["tol"], rows)
                value = float(inertia)  # one synchronisation per run
                runs.append({"inertia": value, "iterations": iters, "converged": converged})
                if best is None or value < best[0]:
                    best = (value, c, len(runs) - 1)
            centroids = best[1].cpu().numpy().astype(np.float32)
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    algo = {
        "name": "hubert_ray.kmeans_torch (k-means++ + Lloyd)",
        "backend": "torch",
        "device": dev.type,
        "device_name": name,
        "version": torch.__version__,
        "params": {**p, "init_size": init_size},
        "runs": runs,
        "best_run": best[2],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return centroids, algo

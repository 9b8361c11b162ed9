"""Learning k-means on a sample of an existing feature dataset, without Ray: the backend
(torch or scikit-learn) and device choice, the learning, and the inertia every backend is
judged by; :func:`learn` writes the centroid file with its provenance.

The rest of the units workflow lives beside it and is re-exported here, where callers find it:
reading the feature dataset (:mod:`~hubert_ray.units.features`), sampling it
(:mod:`~hubert_ray.units.sampling`), assigning it (:mod:`~hubert_ray.units.assign`) and
reading and exporting units (:mod:`~hubert_ray.units.export`).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from hubert_ray.core.errors import ConfigError
from hubert_ray.units import centroids as units
from hubert_ray.units.assign import UNIT_TYPE, UNITS_DIR, assign_part
from hubert_ray.units.export import export_fairseq, read_units, unit_layers, units_directory
from hubert_ray.units.features import (
    FRAME_RATE_HZ,
    READ_BATCH_ROWS,
    READ_BUFFER_BYTES,
    dataset_info,
    features_dir,
    open_parquet,
    part_files,
)
from hubert_ray.units.sampling import frame_counts, frame_indices, sample_features

__all__ = [  # learning, and the names callers use from the modules beside it
    "BACKENDS",
    "CPU_BACKEND",
    "DEVICES",
    "FAIRSEQ_PARAMS",
    "FRAME_RATE_HZ",
    "READ_BATCH_ROWS",
    "READ_BUFFER_BYTES",
    "UNITS_DIR",
    "UNIT_TYPE",
    "assign_part",
    "choose_backend",
    "dataset_info",
    "export_fairseq",
    "features_dir",
    "frame_counts",
    "frame_indices",
    "inertia",
    "learn",
    "learn_sklearn",
    "open_parquet",
    "part_files",
    "read_units",
    "sample_features",
    "unit_layers",
    "units_directory",
]

log = logging.getLogger(__name__)

# fairseq examples/hubert/simple_kmeans/learn_kmeans.py defaults.
FAIRSEQ_PARAMS = {
    "init": "k-means++",
    "max_iter": 100,
    "batch_size": 10_000,
    "tol": 0.0,
    "max_no_improvement": 100,
    "n_init": 20,
    "reassignment_ratio": 0.0,
}
BACKENDS = ("auto", "torch", "sklearn")
DEVICES = ("auto", "cpu", "cuda")
# What ``backend="auto"`` runs on the CPU (on CUDA: torch). torch: a lower inertia than
# MiniBatchKMeans with fairseq's parameters on the same sample, in less time and memory
# (benchmarks/kmeans_quality.py, docs/units.md).
CPU_BACKEND = "torch"


def inertia(sample: np.ndarray, centroids: np.ndarray, device: str = "cpu") -> float:
    """Sum over the sample of the squared distance to the nearest centroid (float64 sum of
    float32 distances computed in row blocks on ``device``; the same for every backend)."""
    import torch

    dev = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    c, c_sq = units.prepare(centroids, dev)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    with torch.no_grad():
        for s in range(0, x.shape[0], units.ASSIGN_ROWS):
            xb = x[s : s + units.ASSIGN_ROWS].to(dev)
            d = torch.addmm(c_sq, xb, c.t(), beta=1.0, alpha=-2.0).amin(dim=1)
            total += (d + (xb * xb).sum(1)).clamp(min=0).sum(dtype=torch.float64)
    return float(total)


def choose_backend(backend: str = "auto", device: str = "auto", params=()) -> tuple[str, str]:
    """(backend, device) that ``learn`` runs: ``device`` auto is CUDA when torch sees a GPU;
    ``backend`` auto is torch on CUDA and :data:`CPU_BACKEND` on the CPU. ConfigError (naming
    the option) for an unknown value, CUDA without a GPU, scikit-learn on CUDA, or a parameter
    the chosen backend does not have."""
    from hubert_ray.units import kmeans_torch

    if backend not in BACKENDS:
        raise ConfigError(f"{backend!r} is not one of {', '.join(BACKENDS)}", field="backend")
    if device not in DEVICES:
        raise ConfigError(f"{device!r} is not one of {', '.join(DEVICES)}", field="device")
    try:
        device = kmeans_torch.resolve_device(device)
    except ValueError as exc:
        raise ConfigError(str(exc), field="device") from None
    if backend == "auto":
        backend = "torch" if device == "cuda" else CPU_BACKEND
    if backend == "sklearn" and device == "cuda":
        raise ConfigError(
            "scikit-learn runs on the CPU only; use --backend torch (or auto) for CUDA",
            field="backend",
        )
    allowed = set(FAIRSEQ_PARAMS if backend == "sklearn" else kmeans_torch.TORCH_PARAMS)
    for name in params:
        if name not in allowed:
            raise ConfigError(
                f"{name} is not a parameter of the {backend} backend "
                f"(it has {', '.join(sorted(allowed))})",
                field=name,
            )
    return backend, device


def learn_sklearn(sample: np.ndarray, k: int, seed: int = 0, **params) -> tuple[np.ndarray, dict]:
    """scikit-learn MiniBatchKMeans (fairseq's parameters unless overridden)."""
    import sklearn
    from sklearn.cluster import MiniBatchKMeans

    p = {**FAIRSEQ_PARAMS, **params}
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, compute_labels=False, **p)
    km.fit(sample)
    algo = {
        "name": "sklearn.cluster.MiniBatchKMeans",
        "backend": "sklearn",
        "device": "cpu",
        "version": sklearn.__version__,
        "params": p,
        "n_steps": int(getattr(km, "n_steps_", 0)),
    }
    return km.cluster_centers_.astype(np.float32), algo


def learn(
    features: str,
    layer: int,
    k: int,
    sample_hours: float,
    out: str,
    seed: int = 0,
    storage_options=None,
    backend: str = "auto",
    device: str = "auto",
    **params,
) -> dict:
    """Sample, learn (``backend`` on ``device``, see :func:`choose_backend`), write the
    centroid file; returns its provenance."""
    if not 1 <= k <= units.MAX_K:
        raise ValueError(f"k={k} is invalid; allowed: 1..{units.MAX_K}")
    backend, device = choose_backend(backend, device, params)
    sample, info = sample_features(
        features, layer, int(round(sample_hours * 3600 * FRAME_RATE_HZ)), seed, storage_options
    )
    if sample.shape[0] < k:
        raise ValueError(f"the sample has {sample.shape[0]} frames, fewer than k={k}")
    log.info(
        "sample: %d frames of layer %d in %.1f s", len(sample), layer, info["sample"]["seconds"]
    )
    t0 = time.perf_counter()
    if backend == "torch":
        from hubert_ray.units import kmeans_torch

        centroids, algo = kmeans_torch.learn_torch(sample, k, seed, device, **params)
    else:
        centroids, algo = learn_sklearn(sample, k, seed, **params)
    algo["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("k-means: %s on %s, %.1f s", backend, device, algo["seconds"])
    total = inertia(sample, centroids, device)
    prov = {
        "model": info["model"],
        "model_revision": info["model_revision"],
        "layer": layer,
        "features_dtype": info["storage_dtype"],
        "compute_dtype": info["compute_dtype"],
        "sample": info["sample"],
        "seed": seed,
        "inertia": total,
        "inertia_per_frame": total / len(sample),
        "algorithm": algo,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    units.save(out, centroids, prov, storage_options)
    return units.read_provenance(out, storage_options)

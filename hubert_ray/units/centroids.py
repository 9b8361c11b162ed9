"""Discrete units: k-means centroid files, nearest-centroid assignment, run-length form.

A centroid file is a safetensors file holding one tensor ``centroids`` [K, hidden] (float32)
and, in its header metadata under :data:`META_KEY`, the provenance as JSON: model, model
revision, layer, hidden size, K, the features' dtype, the sample it was learned on, the seed,
the inertia, the algorithm and its parameters. Reading the provenance needs the header only
(:func:`read_provenance`), so the driver checks a centroid file against the job before any
work starts.

Assignment is ``argmin_k ||x - c_k||^2`` computed as ``argmin_k (||c_k||^2 - 2 x.c_k)`` in
float32 on the features' device (``||x||^2`` is the same for every k). A frame whose two
nearest centroids are closer than float32 rounding can tell apart (a *near tie*,
:func:`near_ties`) may get either id; every other frame gets the exact nearest centroid.

numpy only at import; torch is imported inside the functions that use it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from hubert_ray.core.errors import ConfigError

META_KEY = "hubert_ray.kmeans"
FORMAT = "hubert_ray.kmeans/1"
TENSOR = "centroids"
MAX_K = 65_536  # ids are stored as uint16
# Rows per assignment matmul: bounds the [rows, K] distance block (16384 x 500 float32 = 33 MB).
ASSIGN_ROWS = 16_384
# Near tie: the two smallest squared distances differ by less than this fraction of
# ||x||^2 + ||c||^2 (the magnitude float32 rounding errors of the expansion scale with).
NEAR_TIE_REL = 1e-5


@dataclass(frozen=True)
class Codebook:
    """Centroids [K, hidden] float32 and their provenance (a dict, see the module doc)."""

    centroids: np.ndarray
    provenance: dict

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def layer(self) -> int:
        return int(self.provenance["layer"])

    @property
    def sha(self) -> str:
        """Short hash of the centroid values (identifies the codebook in ``_job.json``)."""
        return centroid_sha(self.centroids)


def centroid_sha(centroids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(centroids, np.float32).tobytes()).hexdigest()[:16]


def to_bytes(centroids: np.ndarray, provenance: dict) -> bytes:
    """Serialise a centroid file (safetensors with the provenance in its metadata)."""
    from safetensors.numpy import save

    c = np.ascontiguousarray(centroids, dtype=np.float32)
    if c.ndim != 2 or not 1 <= c.shape[0] <= MAX_K:
        raise ValueError(f"centroids must be [K, hidden] with 1 <= K <= {MAX_K}; got {c.shape}")
    prov = {
        "format": FORMAT,
        **provenance,
        "k": int(c.shape[0]),
        "hidden_size": int(c.shape[1]),
        "centroids_sha": centroid_sha(c),
    }
    return save({TENSOR: c}, metadata={META_KEY: json.dumps(prov, sort_keys=True)})


def save(path: str, centroids: np.ndarray, provenance: dict, storage_options=None) -> str:
    """Write a centroid file to a local path or URL; returns ``path``."""
    from hubert_ray.io import storage

    data = to_bytes(centroids, provenance)
    fs, p = storage.filesystem(path, storage_options)
    if not storage.is_remote(path):
        import os

        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    storage.with_retries(fs.pipe_file, p, data)
    return path


def _header(data: bytes, name: str) -> dict:
    if len(data) < 8:
        raise ConfigError(f"{name!r} is not a centroid file (too short)", field="units")
    size = int.from_bytes(data[:8], "little")
    try:
        return json.loads(data[8 : 8 + size])
    except ValueError:
        raise ConfigError(
            f"{name!r} is not a centroid file (no safetensors header)", field="units"
        ) from None


def _provenance_of(header: dict, name: str) -> dict:
    meta = header.get("__metadata__") or {}
    if META_KEY not in meta or TENSOR not in header:
        raise ConfigError(
            f"{name!r} is not a centroid file written by `hubert-ray kmeans learn` "
            f"(no {META_KEY!r} metadata or no {TENSOR!r} tensor)",
            field="units",
        )
    prov = json.loads(meta[META_KEY])
    missing = [k for k in ("layer", "hidden_size", "k", "model_revision") if k not in prov]
    if missing:
        raise ConfigError(f"centroid file {name!r} lacks provenance {missing}", field="units")
    return prov


def read_provenance(path: str, storage_options=None) -> dict:
    """The provenance of a centroid file, reading its header only."""
    from hubert_ray.io import storage

    fs, p = storage.filesystem(path, storage_options)
    if not fs.exists(p):
        raise ConfigError(f"centroid file {path!r} does not exist", field="units")
    with fs.open(p, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < size < 1 << 24:
            raise ConfigError(f"{path!r} is not a centroid file (bad header size)", field="units")
        return _provenance_of(_header(head + f.read(size), path), path)


def from_bytes(data: bytes, name: str = "<bytes>") -> Codebook:
    from safetensors.numpy import load

    prov = _provenance_of(_header(data, name), name)
    centroids = load(data)[TENSOR].astype(np.float32, copy=False)
    if centroids.shape != (prov["k"], prov["hidden_size"]):
        raise ConfigError(
            f"centroid file {name!r}: tensor {centroids.shape} != provenance "
            f"(k={prov['k']}, hidden_size={prov['hidden_size']})",
            field="units",
        )
    return Codebook(centroids, prov)


def load(path: str, storage_options=None) -> Codebook:
    """Read a centroid file (local path or URL)."""
    from hubert_ray.io import storage

    fs, p = storage.filesystem(path, storage_options)
    if not fs.exists(p):
        raise ConfigError(f"centroid file {path!r} does not exist", field="units")
    return from_bytes(storage.with_retries(fs.cat_file, p), path)


def check_codebook(
    prov: dict,
    name: str,
    *,
    model_revision: str | None = None,
    hidden_size: int | None = None,
    layers=None,
    layer: int | None = None,
) -> None:
    """Refuse a centroid file that does not fit the job (ConfigError naming the mismatch)."""
    problems = []
    if model_revision is not None and prov["model_revision"] != model_revision:
        problems.append(
            f"model revision {prov['model_revision']!r} != the model's {model_revision!r}"
        )
    if hidden_size is not None and int(prov["hidden_size"]) != int(hidden_size):
        problems.append(f"hidden size {prov['hidden_size']} != the model's {hidden_size}")
    if layer is not None and int(prov["layer"]) != int(layer):
        problems.append(f"layer {prov['layer']} != {layer}")
    if layers is not None and int(prov["layer"]) not in layers:
        problems.append(f"layer {prov['layer']} is not among --layers {list(layers)}")
    if problems:
        raise ConfigError(
            f"centroid file {name!r} does not fit this job: " + "; ".join(problems),
            field="units",
        )


def check_files(
    uris,
    *,
    layers,
    hidden_size: int | None,
    model_revision: str | None,
    storage_options=None,
) -> list[dict]:
    """Check a job's centroid files from their headers (ConfigError naming file and mismatch;
    at most one file per layer); returns ``{layer, k, centroids_sha, file}`` per file."""
    found: dict[int, str] = {}
    books = []
    for uri in uris:
        prov = read_provenance(uri, storage_options)
        check_codebook(
            prov, uri, model_revision=model_revision, hidden_size=hidden_size, layers=layers
        )
        layer = int(prov["layer"])
        if layer in found:
            raise ConfigError(
                f"centroid files {found[layer]!r} and {uri!r} are both for layer {layer}; "
                "give one per layer",
                field="units",
            )
        found[layer] = uri
        books.append(
            {
                "layer": layer,
                "k": int(prov["k"]),
                "centroids_sha": prov.get("centroids_sha"),
                "file": uri,
            }
        )
    return sorted(books, key=lambda b: b["layer"])


# -- assignment (torch) -----------------------------------------------------------------------
def prepare(centroids, device=None):
    """``(centroids [K, H] float32, ||c||^2 [K])`` as torch tensors on ``device``."""
    import torch

    c = torch.as_tensor(
        np.asarray(centroids, dtype=np.float32) if isinstance(centroids, np.ndarray) else centroids
    )
    c = c.to(device=device, dtype=torch.float32)
    return c, (c * c).sum(dim=1)


def assign(features, centroids, c_sq=None, rows: int = ASSIGN_ROWS):
    """Nearest-centroid ids (torch int32 [N], stored as uint16: K <= 65536) of ``features``
    [N, H] (any float dtype, any device; computed in float32 on that device; int32 because
    CUDA kernels for uint16 tensors are few). ``centroids``: a [K, H] array or tensor, or the
    pair :func:`prepare` returns with ``c_sq``."""
    import torch

    if c_sq is None or not isinstance(centroids, torch.Tensor):
        centroids, c_sq = prepare(centroids, features.device)
    elif centroids.device != features.device:
        centroids, c_sq = centroids.to(features.device), c_sq.to(features.device)
    n = features.shape[0]
    out = torch.empty(n, dtype=torch.int32, device=features.device)
    ct = centroids.t()
    for s in range(0, n, rows):
        x = features[s : s + rows].to(torch.float32)
        d = torch.addmm(c_sq, x, ct, beta=1.0, alpha=-2.0)  # ||c||^2 - 2 x.c
        out[s : s + rows] = d.argmin(dim=1)
    return out


def assign_numpy(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """:func:`assign` for host arrays: uint16 ids [N]."""
    import torch

    x = np.ascontiguousarray(features)
    if not x.flags.writeable:  # torch warns on read-only arrays (e.g. Arrow buffers)
        x = x.copy()
    return assign(torch.from_numpy(x), centroids).numpy().astype(np.uint16)


def sq_distances(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Exact squared distances [N, K] in float64 (reference for tests and tie counting)."""
    x = np.asarray(features, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    return ((x * x).sum(1, keepdims=True) - 2 * x @ c.T + (c * c).sum(1)[None, :]).clip(min=0)


def near_ties(features: np.ndarray, centroids: np.ndarray, rel: float = NEAR_TIE_REL):
    """Boolean [N]: frames whose two nearest centroids' squared distances (float64) differ by
    less than ``rel * (||x||^2 + ||c_nearest||^2)``: the only frames where float32 assignment
    may pick the other one."""
    d = sq_distances(features, centroids)
    if d.shape[1] < 2:
        return np.zeros(d.shape[0], dtype=bool)
    two = np.partition(d, 1, axis=1)[:, :2]
    x2 = (np.asarray(features, np.float64) ** 2).sum(1)
    c2 = (np.asarray(centroids, np.float64) ** 2).sum(1)[d.argmin(1)]
    return (two[:, 1] - two[:, 0]) < rel * (x2 + c2)


def unit_flip_rate(reduced, fp32, centroids) -> float:
    """Share of frames whose unit differs between ``reduced`` features (any dtype) and the
    FP32 reference ``fp32`` of the same frames [N, H]."""
    a = assign_numpy(np.asarray(reduced, dtype=np.float32), centroids)
    b = assign_numpy(np.asarray(fp32, dtype=np.float32), centroids)
    return float((a != b).mean()) if a.size else 0.0


def run_length(units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deduplicated units and their durations in frames: ``[5,5,7,7,7,5]`` ->
    ``([5,7,5], [2,3,1])``."""
    u = np.asarray(units)
    if u.size == 0:
        return u[:0], np.zeros(0, dtype=np.int32)
    starts = np.flatnonzero(np.concatenate(([True], u[1:] != u[:-1])))
    durations = np.diff(np.append(starts, u.size)).astype(np.int32)
    return u[starts], durations


def run_length_rows(values: np.ndarray, lengths) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`run_length` of many rows at once: ``values`` holds the rows' ids back to back
    (row i: the next ``lengths[i]``). Returns the deduplicated ids and their durations, back
    to back, and each row's number of runs (runs never cross rows)."""
    u = np.asarray(values)
    lengths = np.asarray(lengths, dtype=np.int64)
    change = np.ones(u.size, dtype=bool)
    if u.size:
        change[1:] = u[1:] != u[:-1]
        starts_of_rows = np.cumsum(lengths) - lengths
        change[starts_of_rows[lengths > 0]] = True
    starts = np.flatnonzero(change)
    durations = np.diff(np.append(starts, u.size)).astype(np.int32)
    counts = np.zeros(len(lengths), dtype=np.int64)
    nonempty = lengths > 0
    if nonempty.any():
        counts[nonempty] = np.add.reduceat(change, (np.cumsum(lengths) - lengths)[nonempty])
    return u[starts], durations, counts

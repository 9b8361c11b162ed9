"""Units from an existing feature dataset, without Ray: a bounded, deterministic sample for
learning k-means, the learning itself, assigning one Parquet part, and fairseq export.

Sampling (:func:`sample_features`) never loads the dataset. Two column-projected passes read
the parts batch by batch (``pyarrow.parquet.ParquetFile.iter_batches`` with a bounded read
buffer):

1. ``segment_id`` and ``num_frames`` only: every segment's sample size is fixed here, and
   segments that contribute frames are given their place in the sample (sorted by a hash of
   seed and segment id, so the sample's order does not depend on how parts were cut).
2. ``segment_id``, ``num_frames`` and ``layer_<L>``: the chosen frames are copied (as float32)
   straight into one preallocated array.

The sample is *systematic within every segment*: with rate ``p = sample frames / dataset
frames``, segment ``s`` of ``n`` frames contributes the frames ``i`` where
``floor((i + 1) p + u_s) > floor(i p + u_s)``, ``u_s`` in [0, 1) a hash of the seed and the
segment id. So every recording (and every segment) contributes its share of frames, within
one frame per segment, spread evenly over its duration (neighbouring frames are nearly
duplicates). Peak memory: the sample, one decoded record batch, and 16 bytes per contributing
segment (``benchmarks/kmeans_memory.py`` measures it at 10x and 100x the dataset size).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hubert_ray.core.errors import ConfigError
from hubert_ray.dataset import output
from hubert_ray.io import storage
from hubert_ray.units import centroids as units

log = logging.getLogger(__name__)

FRAME_RATE_HZ = 50  # HuBERT frames per second of audio (320-sample hop at 16 kHz)
READ_BATCH_ROWS = 16  # rows per decoded record batch (reading one costs ~5x its size)
READ_BUFFER_BYTES = 8 << 20  # Parquet read buffer: a column chunk is streamed, not read whole
# Record batches are decoded on the calling thread (use_threads=False): one feature column is
# read at a time, and Arrow's reader threads would hold more batches' buffers at once.
UNITS_DIR = "units"
UNIT_TYPE = pa.list_(pa.uint16())
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
_KEEP_COLUMNS = ("segment_id", "recording_id", "start_s", "end_s", "num_frames")


def features_dir(uri: str) -> str:
    u = uri.rstrip("/")
    return u if u.endswith(output.FEATURES_DIR) else storage.join(u, output.FEATURES_DIR)


def part_files(directory: str, storage_options=None) -> tuple[object, list[str]]:
    """(filesystem, sorted part paths) of one dataset directory."""
    return output.part_files(directory, storage_options)


def open_parquet(fs, path: str) -> pq.ParquetFile:
    return pq.ParquetFile(fs.open(path, "rb"), buffer_size=READ_BUFFER_BYTES, pre_buffer=False)


def dataset_info(uri: str, layer: int, storage_options=None) -> dict:
    """What a feature dataset holds for ``layer``: hidden size, storage dtype, model and
    revision, the layers stored (from the first part); ValueError if ``layer`` is absent."""
    fs, files = part_files(features_dir(uri), storage_options)
    if not files:
        raise ValueError(f"{uri!r} holds no feature parts under {output.FEATURES_DIR}/")
    pf = open_parquet(fs, files[0])
    schema = pf.schema_arrow
    layers = sorted(int(n.split("_", 1)[1]) for n in schema.names if n.startswith("layer_"))
    if layer not in layers:
        raise ValueError(f"layer {layer} is not stored in {uri!r}; stored layers: {layers}")
    typ = schema.field(f"layer_{layer}").type
    first = pf.read_row_group(0, columns=["model", "model_revision"]).slice(0, 1).to_pylist()
    row = first[0] if first else {}
    meta = json.loads((schema.metadata or {}).get(output.META_KEY, b"{}"))
    return {
        "hidden_size": typ.value_type.list_size,
        "storage_dtype": "float16" if typ.value_type.value_type == pa.float16() else "float32",
        "model": row.get("model"),
        "model_revision": row.get("model_revision"),
        "layers": layers,
        "compute_dtype": meta.get("config", {}).get("dtype"),
        "parts": len(files),
    }


def _phase(seed: int, segment_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per segment: a 64-bit sort key and the phase u in [0, 1), both from hash(seed, id)."""
    keys = np.empty(len(segment_ids), dtype=np.uint64)
    for i, sid in enumerate(segment_ids):
        h = hashlib.blake2b(f"{seed}\0{sid}".encode(), digest_size=8).digest()
        keys[i] = int.from_bytes(h, "big")
    return keys, (keys >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def frame_counts(num_frames: np.ndarray, phase: np.ndarray, rate: float) -> np.ndarray:
    """Frames each segment contributes at ``rate``: ``floor(n p + u)`` (exact: ``u < 1``)."""
    if rate >= 1:
        return num_frames.astype(np.int64)
    return np.floor(num_frames * rate + phase).astype(np.int64)


def frame_indices(n: int, u: float, rate: float) -> np.ndarray:
    """The frames of one segment of ``n`` frames in the systematic sample (see module doc)."""
    if rate >= 1:
        return np.arange(n)
    pos = np.floor(np.arange(n + 1) * rate + u)
    return np.flatnonzero(pos[1:] > pos[:-1])


def sample_features(
    uri: str,
    layer: int,
    sample_frames: int,
    seed: int = 0,
    storage_options=None,
) -> tuple[np.ndarray, dict]:
    """A deterministic, recording-stratified sample of about ``sample_frames`` frames of
    ``layer`` as float32 [n, hidden], and a description of it (see the module doc)."""
    t0 = time.perf_counter()
    info = dataset_info(uri, layer, storage_options)
    fs, files = part_files(features_dir(uri), storage_options)
    # Pass 1: segment ids and frame counts only.
    total_frames = 0
    segments = 0
    recordings: set[str] = set()
    for path in files:
        pf = open_parquet(fs, path)
        for batch in pf.iter_batches(
            batch_size=65_536, columns=["segment_id", "recording_id", "num_frames"]
        ):
            n = batch.column("num_frames").to_numpy(zero_copy_only=False)
            total_frames += int(n.sum())
            segments += batch.num_rows
            recordings.update(batch.column("recording_id").unique().to_pylist())
    if total_frames == 0:
        raise ValueError(f"{uri!r} holds no frames")
    rate = min(1.0, sample_frames / total_frames)
    keys_list, counts_list = [], []
    for path in files:
        pf = open_parquet(fs, path)
        for batch in pf.iter_batches(batch_size=65_536, columns=["segment_id", "num_frames"]):
            keys, phase = _phase(seed, batch.column("segment_id").to_pylist())
            counts = frame_counts(
                batch.column("num_frames").to_numpy(zero_copy_only=False), phase, rate
            )
            keep = counts > 0
            keys_list.append(keys[keep])
            counts_list.append(counts[keep])
    keys = np.concatenate(keys_list) if keys_list else np.zeros(0, np.uint64)
    counts = np.concatenate(counts_list) if counts_list else np.zeros(0, np.int64)
    del keys_list, counts_list
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    del order
    if keys.size > 1 and (keys[1:] == keys[:-1]).any():
        raise ValueError(f"{uri!r}: duplicate segment ids (or a 64-bit hash collision)")
    offsets = np.zeros(keys.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    total = int(offsets[-1])
    sample = np.empty((total, info["hidden_size"]), dtype=np.float32)
    filled = np.zeros(keys.size, dtype=bool)
    # Pass 2: copy the chosen frames into their places.
    col = f"layer_{layer}"
    for path in files:
        pf = open_parquet(fs, path)
        for batch in pf.iter_batches(
            batch_size=READ_BATCH_ROWS, columns=["segment_id", "num_frames", col], use_threads=False
        ):
            ids = batch.column("segment_id").to_pylist()
            bkeys, phase = _phase(seed, ids)
            n = batch.column("num_frames").to_numpy(zero_copy_only=False)
            want = frame_counts(n, phase, rate)
            if not (want > 0).any():
                continue
            arr = batch.column(col)
            flat, offs = _flat_frames(arr, info["hidden_size"])
            for i in np.flatnonzero(want > 0):
                at = int(np.searchsorted(keys, bkeys[i]))
                rows = flat[offs[i] : offs[i + 1]]
                pick = frame_indices(len(rows), float(phase[i]), rate)
                sample[offsets[at] : offsets[at + 1]] = rows[pick]
                filled[at] = True
    if not filled.all():
        raise ValueError(f"{uri!r} changed while it was sampled ({(~filled).sum()} segments)")
    desc = {
        "features": uri,
        "method": "systematic within every segment, phase = hash(seed, segment id)",
        "rate": rate,
        "frames": total,
        "frames_requested": int(sample_frames),
        "hours": round(total / FRAME_RATE_HZ / 3600, 4),
        "segments": int(keys.size),
        "segments_total": segments,
        "recordings_total": len(recordings),
        "dataset_frames": total_frames,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return sample, {**info, "sample": desc}


def _flat_frames(arr: pa.Array | pa.ChunkedArray, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """[frames, hidden] view of a ``list<fixed_size_list<half|float, H>>`` array and the row
    offsets into it (nulls have no frames)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    offsets = arr.offsets.to_numpy()
    inner = arr.values  # FixedSizeListArray, possibly sliced
    start = inner.offset
    values = inner.values.to_numpy(zero_copy_only=False)
    flat = values[start * hidden : (start + len(inner)) * hidden].reshape(-1, hidden)
    return flat, offsets - offsets[0]


# -- learning ---------------------------------------------------------------------------------
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


# -- assigning an existing dataset, one part at a time ---------------------------------------
def assign_part(
    src: str, dst_dir: str, codebook: units.Codebook, storage_options=None, device: str = "cpu"
) -> dict:
    """Units of every row of one feature part, written as ``<dst_dir>/<same name>`` (whole or
    absent: temporary name + rename, or one upload). Reads batch by batch."""
    import torch

    layer = codebook.layer
    fs, path = storage.filesystem(src, storage_options)
    pf = open_parquet(fs, path)
    cols = [c for c in (*_KEEP_COLUMNS, "model", "model_revision") if c in pf.schema_arrow.names]
    dev = torch.device(device)
    c, c_sq = units.prepare(codebook.centroids, dev)
    tables, frames = [], 0
    for batch in pf.iter_batches(
        batch_size=READ_BATCH_ROWS, columns=[*cols, f"layer_{layer}"], use_threads=False
    ):
        flat, offs = _flat_frames(batch.column(f"layer_{layer}"), codebook.hidden)
        ids = units.assign(torch.from_numpy(np.ascontiguousarray(flat)).to(dev), c, c_sq)
        ids = ids.cpu().numpy().astype(np.uint16)
        frames += len(ids)
        valid = batch.column(f"layer_{layer}").is_valid()
        col = pa.ListArray.from_arrays(
            pa.array(offs.astype(np.int32)),
            pa.array(ids, pa.uint16()),
            mask=pc.invert(valid),
        )
        t = pa.Table.from_batches([batch.select(cols)]).append_column(f"units_{layer}", col)
        tables.append(t)
    table = pa.concat_tables(tables) if tables else None
    if table is None:
        return {"part": os.path.basename(path), "rows": 0, "frames": 0}
    meta = {"units": {str(layer): codebook.provenance}, "source": src}
    output.write_part(
        table, dst_dir, meta, storage_options, key=os.path.basename(path)[len("part-") : -8]
    )
    return {"part": os.path.basename(path), "rows": table.num_rows, "frames": frames}


# -- reading units and fairseq export ---------------------------------------------------------
def units_directory(uri: str, storage_options=None) -> str:
    """The directory holding unit parts: ``<uri>/units`` (``jobs.kmeans assign``) or
    ``<uri>/features`` (units written by ``jobs.extract --units``), or ``uri`` itself."""
    fs, path = storage.filesystem(uri, storage_options)
    for sub in (UNITS_DIR, output.FEATURES_DIR):
        if fs.exists(f"{path.rstrip('/')}/{sub}"):
            return storage.join(uri, sub)
    return uri


def unit_layers(schema: pa.Schema) -> list[int]:
    import re

    return sorted(int(m.group(1)) for n in schema.names if (m := re.fullmatch(r"units_(\d+)", n)))


def read_units(uri: str, layer: int | None = None, storage_options=None) -> pa.Table:
    """``segment_id``, ``num_frames`` and ``units_<layer>`` of a units dataset (the highest
    unit layer by default), as one Arrow table."""
    directory = units_directory(uri, storage_options)
    fs, files = part_files(directory, storage_options)
    if not files:
        raise ValueError(f"{uri!r} holds no unit parts")
    layers = unit_layers(pq.read_schema(files[0], filesystem=fs))
    if not layers:
        raise ValueError(f"{uri!r} holds no units_<layer> columns")
    if layer is None:
        layer = layers[-1]
    if layer not in layers:
        raise ValueError(f"units of layer {layer} are not stored in {uri!r}; stored: {layers}")
    names = pq.read_schema(files[0], filesystem=fs).names
    cols = [c for c in ("segment_id", "start_s", "end_s", "num_frames") if c in names]
    return pq.ParquetDataset(files, filesystem=fs).read(columns=[*cols, f"units_{layer}"])


def export_fairseq(
    units_uri: str,
    manifest_uri: str,
    prefix: str,
    layer: int | None = None,
    skip_missing: bool = False,
    storage_options=None,
) -> dict:
    """Write fairseq's label layout for the manifest's segments, in the manifest's order:

    - ``<prefix>.tsv``: the audio root directory, then ``<audio path>\\t<samples>`` per segment
      (fairseq's manifest; the path is the recording's audio, relative to the root),
    - ``<prefix>.km``: the segment's units, space-separated, one line per segment,
    - ``<prefix>.ids``: ``<segment id>\\t<start_s>\\t<end_s>`` per segment (which part of the
      recording each line is).

    Rows are matched by segment id (never by position). A manifest segment without units
    (an error row, or not written) is an error unless ``skip_missing`` (then its line is left
    out of all three files)."""
    from hubert_ray.corpus import manifest

    segs = manifest.read_segments(manifest_uri, storage_options)
    table = read_units(units_uri, layer, storage_options)
    col = [c for c in table.column_names if c.startswith("units_")][0]
    ids = table.column("segment_id")
    if pc.count_distinct(ids).as_py() != len(ids):
        raise ValueError(f"{units_uri!r} holds a segment more than once")
    idx = pc.index_in(segs.column("segment_id"), value_set=ids)
    missing_n = idx.null_count
    if idx.null_count:
        missing = segs.filter(pc.is_null(idx)).column("segment_id")
        if not skip_missing:
            raise ValueError(
                f"{idx.null_count} manifest segment(s) have no units in {units_uri!r} "
                f"(e.g. {missing.slice(0, 3).to_pylist()}); --skip-missing leaves them out"
            )
        keep = pc.is_valid(idx)
        segs, idx = segs.filter(keep), idx.filter(keep)
    rows = table.column(col).take(idx)
    # The times the job decoded (a manifest's open end is resolved there).
    starts = table.column("start_s").take(idx).to_pylist()
    ends = table.column("end_s").take(idx).to_pylist()
    paths = segs.column("audio_uri").to_pylist()
    sids = segs.column("segment_id").to_pylist()
    root = ""
    if paths and not any(storage.is_remote(x) for x in paths):
        root = os.path.commonpath(paths)
        if len(set(paths)) == 1:
            root = os.path.dirname(root)
    fs, p = storage.filesystem(prefix, storage_options)
    if not storage.is_remote(prefix):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    n = len(paths)
    with (
        fs.open(p + ".tsv", "w") as tsv,
        fs.open(p + ".km", "w") as km,
        fs.open(p + ".ids", "w") as idf,
    ):
        tsv.write((root or "/") + "\n")
        for s in range(0, n, 4096):
            chunk = rows.slice(s, 4096).combine_chunks()
            offs = chunk.offsets.to_numpy()
            vals = chunk.values.to_numpy(zero_copy_only=False)
            lines_km, lines_tsv, lines_ids = [], [], []
            for j in range(len(chunk)):
                i = s + j
                lines_km.append(" ".join(map(str, vals[offs[j] : offs[j + 1]].tolist())))
                rel = os.path.relpath(paths[i], root) if root else paths[i]
                samples = int(round((ends[i] - starts[i]) * 16000))
                lines_tsv.append(f"{rel}\t{samples}")
                lines_ids.append(f"{sids[i]}\t{starts[i]}\t{ends[i]}")
            km.write("".join(x + "\n" for x in lines_km))
            tsv.write("".join(x + "\n" for x in lines_tsv))
            idf.write("".join(x + "\n" for x in lines_ids))
    return {"segments": n, "missing_skipped": missing_n, "root": root, "layer": col[6:]}

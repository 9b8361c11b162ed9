"""A bounded, deterministic sample of one layer's frames for learning k-means, without Ray
and without loading the dataset (:func:`sample_features`).

Three column-projected passes read the parts batch by batch
(``pyarrow.parquet.ParquetFile.iter_batches`` with a bounded read buffer):

1. ``segment_id``, ``recording_id`` and ``num_frames``: the dataset's size, which fixes the
   sampling rate.
2. ``segment_id`` and ``num_frames``: every segment's sample size is fixed here, and
   segments that contribute frames are given their place in the sample (sorted by a hash of
   seed and segment id, so the sample's order does not depend on how parts were cut).
3. ``segment_id``, ``num_frames`` and ``layer_<L>``: the chosen frames are copied (as float32)
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
import time

import numpy as np

from hubert_ray.units.features import (
    FRAME_RATE_HZ,
    READ_BATCH_ROWS,
    dataset_info,
    features_dir,
    flat_frames,
    open_parquet,
    part_files,
)


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
    total_frames, segments, recordings = _dataset_size(fs, files)
    if total_frames == 0:
        raise ValueError(f"{uri!r} holds no frames")
    rate = min(1.0, sample_frames / total_frames)
    keys, offsets = _places(fs, files, seed, rate, uri)
    sample = _copy_frames(fs, files, layer, info["hidden_size"], seed, rate, keys, offsets, uri)
    total = int(offsets[-1])
    desc = {
        "features": uri,
        "method": "systematic within every segment, phase = hash(seed, segment id)",
        "rate": rate,
        "frames": total,
        "frames_requested": int(sample_frames),
        "hours": round(total / FRAME_RATE_HZ / 3600, 4),
        "segments": int(keys.size),
        "segments_total": segments,
        "recordings_total": recordings,
        "dataset_frames": total_frames,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return sample, {**info, "sample": desc}


def _dataset_size(fs, files: list[str]) -> tuple[int, int, int]:
    """Pass 1: the dataset's frames, segments and recordings."""
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
    return total_frames, segments, len(recordings)


def _places(
    fs, files: list[str], seed: int, rate: float, uri: str
) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2: the sort keys of the segments that contribute frames, in sample order, and the
    offsets of their frames in the sample ([segments + 1])."""
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
    return keys, offsets


def _copy_frames(
    fs,
    files: list[str],
    layer: int,
    hidden: int,
    seed: int,
    rate: float,
    keys: np.ndarray,
    offsets: np.ndarray,
    uri: str,
) -> np.ndarray:
    """Pass 3: the chosen frames of ``layer``, each segment's at its place in the sample."""
    sample = np.empty((int(offsets[-1]), hidden), dtype=np.float32)
    filled = np.zeros(keys.size, dtype=bool)
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
            flat, offs = flat_frames(arr, hidden)
            for i in np.flatnonzero(want > 0):
                at = int(np.searchsorted(keys, bkeys[i]))
                rows = flat[offs[i] : offs[i + 1]]
                pick = frame_indices(len(rows), float(phase[i]), rate)
                sample[offsets[at] : offsets[at + 1]] = rows[pick]
                filled[at] = True
    if not filled.all():
        raise ValueError(f"{uri!r} changed while it was sampled ({(~filled).sum()} segments)")
    return sample

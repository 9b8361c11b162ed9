"""When the feature parts of an output appeared and how much audio each holds: the run
report's throughput over time. Each part counts at its file's modification time (local mtime /
S3 ``LastModified``: when the part became visible)."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import os

import numpy as np
import pyarrow.parquet as pq

from hubert_ray.dataset import output
from hubert_ray.io import storage


def _mtime(info: dict) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(key)
        if isinstance(v, dt.datetime):
            return v.timestamp()
        if isinstance(v, (int, float)):
            return float(v)
    return None


def part_progress(
    output_uri: str, storage_options: dict | None = None
) -> list[tuple[float, float]]:
    """``(time the part appeared, seconds of audio in it)`` per feature part file, by time."""
    fs, path = storage.filesystem(storage.join(output_uri, output.FEATURES_DIR), storage_options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    infos = [
        i
        for i in fs.find(path, detail=True).values()
        if i["name"].endswith(".parquet") and not os.path.basename(i["name"]).startswith(".")
    ]

    def one(info):
        t = _mtime(info)
        cols = pq.read_table(info["name"], columns=["start_s", "end_s"], filesystem=fs)
        dur = np.asarray(cols.column("end_s")) - np.asarray(cols.column("start_s"))
        return (t, float(dur.sum()))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, infos))
    return sorted((t, s) for t, s in got if t is not None)


def job_start(output_uri: str, summary: dict, storage_options, first_part: float) -> float:
    """When the job started: the summary's write time minus its wall time (else first part)."""
    fs, path = storage.filesystem(output_uri, storage_options)
    try:
        t = _mtime(fs.info(f"{path.rstrip('/')}/{output.SUMMARY_FILE}"))
    except (FileNotFoundError, OSError):
        t = None
    if t is None or "wall_seconds" not in summary:
        return first_part
    return min(t - float(summary["wall_seconds"]), first_part)


def throughput_series(progress: list[tuple[float, float]], start: float, bins: int = 20):
    """Binned x-realtime (audio seconds written per wall second) and cumulative audio hours
    over minutes since ``start``."""
    if not progress:
        return [], [], []
    end = progress[-1][0]
    span = max(end - start, 1e-6)
    width = span / bins
    audio = np.zeros(bins)
    for t, s in progress:
        audio[min(int((t - start) / width), bins - 1)] += s
    xs = [(i + 1) * width / 60 for i in range(bins)]
    return xs, list(audio / width), list(np.cumsum(audio) / 3600)

"""The canonical manifest as the job's tasks read it: its footer (validated? how many
recordings and segments), its row groups, the mean segment duration, recordings expanded into
segment rows, and a checked segment table written as a validated canonical manifest.

Imports neither torch nor Ray.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hubert_ray.corpus.manifest import (
    CANONICAL_SCHEMA,
    SEGMENT_SCHEMA,
    VALIDATED_KEY,
    _resolve_within,
    stamp,
)
from hubert_ray.io import storage


def manifest_info(uri: str, storage_options: dict | None = None) -> dict | None:
    """``{"recordings", "segments", "row_groups"}`` of a validated canonical manifest, from its
    footer alone; ``None`` for any other file (not Parquet, not canonical, not validated)."""
    fs, path = storage.filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            meta = pf.metadata
    except (pa.ArrowException, OSError, ValueError):
        return None
    if VALIDATED_KEY not in (schema.metadata or {}):
        return None
    for field in CANONICAL_SCHEMA:
        if field.name not in schema.names or not schema.field(field.name).type.equals(field.type):
            return None
    leaf = next(
        i
        for i in range(meta.num_columns)
        if meta.schema.column(i).path.startswith("segments.")
        and meta.schema.column(i).path.endswith(".segment_id")
    )
    segments = sum(meta.row_group(g).column(leaf).num_values for g in range(meta.num_row_groups))
    return {
        "recordings": meta.num_rows,
        "segments": int(segments),
        "row_groups": meta.num_row_groups,
    }


MANIFEST_COLUMNS = ["recording_id", "audio_uri", "segments"]


def row_group_sizes(uri: str, storage_options: dict | None = None) -> list[int]:
    """Recordings in each row group of a canonical manifest (its footer only)."""

    def read() -> list[int]:
        fs, path = storage.filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]

    return storage.with_retries(read)


def read_row_group(uri: str, group: int, storage_options: dict | None = None) -> pa.Table:
    """One row group of a canonical manifest (its recording rows; retried while the storage
    fails transiently)."""

    def read() -> pa.Table:
        fs, path = storage.filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).read_row_group(group, columns=MANIFEST_COLUMNS)

    return storage.with_retries(read)


MEAN_SAMPLE_GROUPS = 4


def mean_segment_seconds(
    uri: str, row_groups: int, storage_options: dict | None = None
) -> float | None:
    """Mean segment duration of a canonical manifest, from up to :data:`MEAN_SAMPLE_GROUPS`
    row groups spread over the file (a sample: it sizes model calls, whose audio the model
    actors bound exactly); ``None`` for a manifest without segments."""
    if row_groups <= 0:
        return None
    picks = sorted(set(np.linspace(0, row_groups - 1, MEAN_SAMPLE_GROUPS).round().astype(int)))
    total, count = 0.0, 0
    for g in picks:
        flat = read_row_group(uri, int(g), storage_options).column("segments").combine_chunks()
        flat = flat.flatten()
        total += float(pc.sum(pc.subtract(flat.field("end_s"), flat.field("start_s"))).as_py() or 0)
        count += len(flat)
    return total / count if count else None


def expand(recordings: pa.Table, base_dir: str) -> pa.Table:
    """Canonical manifest rows as segment rows (:data:`SEGMENT_SCHEMA`), recording by
    recording in manifest order; relative audio paths resolved against ``base_dir`` (the
    manifest's directory), as :func:`hubert_ray.corpus.manifest.read_segments` does."""
    segs = recordings.column("segments").combine_chunks()
    if isinstance(segs, pa.ChunkedArray):
        segs = segs.chunk(0) if segs.num_chunks else pa.array([], segs.type)
    flat = segs.flatten()
    audio = [
        _resolve_within(base_dir, a.strip()) for a in recordings.column("audio_uri").to_pylist()
    ]
    owner = pc.list_parent_indices(segs)
    return pa.table(
        {
            "segment_id": flat.field("segment_id"),
            "recording_id": recordings.column("recording_id").combine_chunks().take(owner),
            "audio_uri": pa.array(audio, pa.string()).take(owner),
            "start_s": flat.field("start_s"),
            "end_s": flat.field("end_s"),
        },
        schema=SEGMENT_SCHEMA,
    )


def manifest_dir(uri: str) -> str:
    """The directory relative audio paths of a manifest resolve against."""
    return storage.parent(uri)


def write_validated(table: pa.Table, uri: str, storage_options: dict | None = None) -> None:
    """A validated segment table (:data:`SEGMENT_SCHEMA`, each recording's rows contiguous, as
    :func:`hubert_ray.corpus.manifest.read_segments` returns) written as a validated canonical
    manifest: how a JSONL / TSV / unmarked Parquet manifest reaches the job's tasks."""
    rec = table.column("recording_id").combine_chunks()
    n = len(rec)
    change = np.asarray(pc.not_equal(rec.slice(1), rec.slice(0, n - 1)), bool) if n > 1 else []
    starts = np.concatenate([[0], np.flatnonzero(change) + 1]).astype(np.int32)
    offsets = pa.array(np.append(starts, n).astype(np.int32))
    struct = pa.StructArray.from_arrays(
        [
            table.column("segment_id").combine_chunks(),
            table.column("start_s").combine_chunks(),
            table.column("end_s").combine_chunks(),
        ],
        fields=list(CANONICAL_SCHEMA.field("segments").type.value_type),
    )
    idx = pa.array(starts)
    canonical = pa.table(
        {
            "recording_id": rec.take(idx),
            "audio_uri": table.column("audio_uri").combine_chunks().take(idx),
            "duration_s": pa.nulls(len(starts), pa.float64()),
            "segments": pa.ListArray.from_arrays(
                offsets, struct, type=CANONICAL_SCHEMA.field("segments").type
            ),
        },
        schema=CANONICAL_SCHEMA.with_metadata(stamp()),
    )
    fs, path = storage.filesystem(uri, storage_options)
    if not storage.is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(canonical, f, row_group_size=10_000)

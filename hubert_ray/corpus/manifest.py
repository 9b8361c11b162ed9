"""Speech-corpus manifests: read JSONL / Parquet / fairseq TSV, validate, write canonical Parquet.

Every input format becomes a list of :class:`Recording` objects. All records are validated
before anything runs; every problem found (up to :data:`MAX_LISTED` listed) is reported in ONE
:class:`ManifestError`, each as ``<source>:<line>: field '<path>': <value and what is expected>``
so a user can fix the whole manifest in one go.

Formats (chosen by file extension):

* ``.jsonl`` / ``.ndjson`` / ``.json`` -- JSON Lines, one recording per line::

      {"id": "rec1", "audio": "a/rec1.flac", "duration_s": 3.2,
       "segments": [{"id": "rec1-0", "start_s": 0.0, "end_s": 2.5}, ...]}

  ``id`` is optional (default: the audio basename without extension). ``segments`` is optional
  (default: one whole-file segment whose id is the recording id). In a segment, ``id`` is
  optional (default ``<recording_id>-<index>``), ``start_s`` is required and ``end_s`` must be
  present but may be ``null`` (= to the end of the audio): requiring both keys means a typo such
  as ``"end": 2.5`` is an error instead of silently becoming a whole-file segment. Unknown keys
  are ignored. Blank lines are skipped.
* ``.parquet`` -- the same columns as JSONL, or the canonical format written by
  :func:`write_canonical` (detected by its column names). The "line" is the 1-based row number.
* ``.tsv`` -- fairseq: the first line is the root directory, then ``relative_path<TAB>num_samples``
  per line (16 kHz samples). The recording id is the relative path without its extension.

Relative audio paths (and a relative fairseq root) resolve against the manifest's directory;
absolute paths and URLs pass unchanged. All I/O goes through fsspec, so ``s3://`` and
``file://`` manifests work like local paths. This module imports neither torch nor Ray.

This module is the public API (schemas, reading, writing); the per-format readers are
:mod:`hubert_ray.corpus.formats`, the records and their validation
:mod:`hubert_ray.corpus.records`.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hubert_ray.core.errors import ManifestError
from hubert_ray.corpus.formats import (
    ALLOWED_EXTENSIONS,
    JSONL_EXTENSIONS,
    PARQUET_EXTENSIONS,
    TSV_EXTENSIONS,
    extension,
    records,
)
from hubert_ray.corpus.records import (
    MAX_LISTED,
    Recording,
    Segment,
    _parse_record,
    _Problems,
    _resolve_within,
    _source_name,
)
from hubert_ray.io import storage

__all__ = [  # the public API (some of it defined in formats and records)
    "ALLOWED_EXTENSIONS",
    "CANONICAL_SCHEMA",
    "JSONL_EXTENSIONS",
    "MAX_LISTED",
    "PARQUET_EXTENSIONS",
    "SEGMENT_SCHEMA",
    "SEGMENT_STRUCT",
    "TSV_EXTENSIONS",
    "VALIDATED_KEY",
    "Recording",
    "Segment",
    "canonical_table",
    "read_manifest",
    "read_segments",
    "segment_table",
    "stamp",
    "write_canonical",
]

VALIDATED_KEY = b"hubert_ray.validated"
"""Parquet metadata key of a canonical manifest whose every rule (unique ids, valid times,
non-empty segment lists) was checked when it was written (``hubert-ray prepare``)."""


def stamp(metadata: dict | None = None) -> dict:
    """Parquet key-value metadata marking a canonical manifest as validated."""
    out = {k: v for k, v in (metadata or {}).items()}
    out[VALIDATED_KEY.decode()] = json.dumps({"format_version": 1})
    return out


SEGMENT_STRUCT = pa.struct(
    [
        pa.field("segment_id", pa.string(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=True),
    ]
)
CANONICAL_SCHEMA = pa.schema(
    [
        pa.field("recording_id", pa.string(), nullable=False),
        pa.field("audio_uri", pa.string(), nullable=False),
        pa.field("duration_s", pa.float64(), nullable=True),
        pa.field(
            "segments", pa.list_(pa.field("item", SEGMENT_STRUCT, nullable=False)), nullable=False
        ),
    ]
)
"""One row per recording: what :func:`write_canonical` writes."""

SEGMENT_SCHEMA = pa.schema(
    [
        pa.field("segment_id", pa.string(), nullable=False),
        pa.field("recording_id", pa.string(), nullable=False),
        pa.field("audio_uri", pa.string(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=True),
    ]
)
"""One row per segment (null ``end_s`` = to the end of the audio): :func:`segment_table`."""


def read_manifest(uri: str, storage_options: dict | None = None) -> list[Recording]:
    """Read and validate a manifest in any supported format; raise one :class:`ManifestError`."""
    ext = extension(uri)
    if ext not in ALLOWED_EXTENSIONS:
        raise ManifestError(
            f"manifest {uri}: unknown extension {ext or '(none)'!r}; allowed: "
            + ", ".join(ALLOWED_EXTENSIONS)
        )
    fs, path = storage.filesystem(uri, storage_options)
    try:
        exists = fs.isfile(path)
    except OSError as exc:  # permissions, unreachable bucket, ...
        raise ManifestError(f"manifest {uri}: cannot be read ({exc})") from exc
    if not exists:
        raise ManifestError(f"manifest {uri}: file does not exist")

    problems = _Problems(uri, _source_name(uri))
    problems = _Problems(uri, _source_name(uri))
    base_dir = storage.parent(uri)
    seen_recordings: dict[str, int] = {}
    seen_segments: dict[str, int] = {}
    recordings: list[Recording] = []

    with fs.open(path, "rb") as f:
        for line, keys, obj in records(ext, f, problems, base_dir):
            rec = _parse_record(obj, line, keys, base_dir, problems, seen_recordings, seen_segments)
            if rec is not None:
                recordings.append(rec)

    if not problems.count and not recordings:
        problems.add(None, "no recordings; expected at least one")
    problems.raise_if_any()
    return recordings


def read_segments(uri: str, storage_options: dict | None = None) -> pa.Table:
    """The manifest's segment rows (:data:`SEGMENT_SCHEMA`, as :func:`segment_table` of
    :func:`read_manifest`), validated the same way.

    A canonical Parquet manifest (what ``hubert-ray prepare`` writes, e.g. from WenetSpeech.json) is
    read and checked column-wise with Arrow, without a Python object per segment: at
    WenetSpeech scale (14.6 M segments) the per-segment path cost the driver 71–73 s, this
    one 8–13 s (docs/performance.md). Any other format, or a canonical file that fails a check,
    goes through :func:`read_manifest`, which reports every problem by line."""
    if extension(uri) in PARQUET_EXTENSIONS:
        table = _canonical_segments(uri, storage_options)
        if table is not None:
            return table
    return segment_table(read_manifest(uri, storage_options))


def _canonical_segments(uri: str, storage_options: dict | None) -> pa.Table | None:
    """Column-wise :func:`read_segments` of a canonical Parquet manifest; ``None`` when the
    file is not canonical or breaks any rule (the caller then takes the reporting path)."""
    recs = _read_canonical(uri, storage_options)
    if recs is None:
        return None
    rec_id = recs.column("recording_id").combine_chunks()
    audio = recs.column("audio_uri").combine_chunks()
    segs = recs.column("segments").combine_chunks()
    duration = (
        recs.column("duration_s").combine_chunks()
        if "duration_s" in recs.column_names
        else pa.nulls(len(recs), pa.float64())
    )
    if len(recs) == 0 or segs.null_count or rec_id.null_count or audio.null_count:
        return None
    flat = segs.flatten()
    if flat.null_count:  # a null segment
        return None
    seg_id = flat.field("segment_id")
    start, end = flat.field("start_s"), flat.field("end_s")
    if _breaks_a_rule(rec_id, audio, segs, seg_id, start, end, duration):
        return None
    base_dir = storage.parent(uri)
    resolved = pa.array(
        [_resolve_within(base_dir, a.strip()) for a in audio.to_pylist()], pa.string()
    )
    owner = pc.list_parent_indices(segs)
    return pa.table(
        {
            "segment_id": seg_id,
            "recording_id": rec_id.take(owner),
            "audio_uri": resolved.take(owner),
            "start_s": start,
            "end_s": end,
        },
        schema=SEGMENT_SCHEMA,
    )


def _read_canonical(uri: str, storage_options: dict | None) -> pa.Table | None:
    """The canonical columns of the file, or ``None`` if it is not readable Parquet with
    exactly the canonical column types (what :func:`write_canonical` writes): no casts whose
    leniency (bool -> float, ...) the reporting path would not share."""
    fs, path = storage.filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            columns = [c for c in CANONICAL_SCHEMA.names if c in schema.names]
            if not {"recording_id", "audio_uri", "segments"} <= set(columns):
                return None
            for c in columns:
                if not schema.field(c).type.equals(CANONICAL_SCHEMA.field(c).type):
                    return None
            return pf.read(columns=columns)
    except (pa.ArrowException, OSError):
        return None


def _breaks_a_rule(
    rec_id: pa.Array,
    audio: pa.Array,
    segs: pa.Array,
    seg_id: pa.Array,
    start: pa.Array,
    end: pa.Array,
    duration: pa.Array,
) -> bool:
    """Whether the canonical columns break any rule :func:`read_manifest` checks: an empty
    segment list, a blank id or audio, invalid seconds, ``end_s <= start_s``, a duplicate id."""
    d = duration.to_numpy(zero_copy_only=False)
    end_np = end.to_numpy(zero_copy_only=False)
    return bool(
        (pc.list_value_length(segs).to_numpy() == 0).any()
        or _blank(rec_id)
        or _blank(audio)
        or _blank(seg_id)
        or _bad_seconds(start, allow_null=False)
        or _bad_seconds(end, allow_null=True)
        or (d[~np.isnan(d)] <= 0).any()
        or _bad_seconds(duration, allow_null=True)
        or (end_np <= start.to_numpy(zero_copy_only=False)).any()  # NaN (null end) compares False
        or pc.count_distinct(rec_id).as_py() != len(rec_id)
        or pc.count_distinct(seg_id).as_py() != len(seg_id)
    )


def _blank(ids: pa.Array) -> bool:
    """Any null or whitespace-only string."""
    return bool(ids.null_count) or bool(pc.any(pc.equal(pc.utf8_trim_whitespace(ids), "")).as_py())


def _bad_seconds(x: pa.Array, allow_null: bool) -> bool:
    """Any value that is not finite and >= 0 (or null, unless ``allow_null``)."""
    v = x.to_numpy(zero_copy_only=False)  # nulls become NaN
    valid = ~np.asarray(x.is_null()) if x.null_count else np.ones(len(v), bool)
    if not allow_null and not valid.all():
        return True
    return not (np.isfinite(v[valid]).all() and (v[valid] >= 0).all())


def canonical_table(recordings: Iterable[Recording]) -> pa.Table:
    """Recordings as a :data:`CANONICAL_SCHEMA` table (one row per recording)."""
    recordings = list(recordings)
    return pa.Table.from_pydict(
        {
            "recording_id": [r.recording_id for r in recordings],
            "audio_uri": [r.audio_uri for r in recordings],
            "duration_s": [r.duration_s for r in recordings],
            "segments": [
                [
                    {"segment_id": s.segment_id, "start_s": s.start_s, "end_s": s.end_s}
                    for s in r.segments
                ]
                for r in recordings
            ],
        },
        schema=CANONICAL_SCHEMA,
    )


def write_canonical(
    recordings: Iterable[Recording],
    uri: str,
    storage_options: dict | None = None,
    metadata: dict[str, str] | None = None,
    rows_per_group: int = 10_000,
    segments_per_group: int = 50_000,
    validated: bool = False,
) -> None:
    """Write recordings as canonical Parquet (:data:`CANONICAL_SCHEMA`, one row per recording).

    ``recordings`` may be a generator: it is consumed and written in row groups of at most
    ``rows_per_group`` recordings or about ``segments_per_group`` segments, so a streamed corpus
    is never held in memory whole. ``metadata`` goes into the file's key-value metadata.
    ``validated`` (the caller checked every rule, as :func:`read_manifest` does) marks the file
    so the job reads it without checking it again on its driver (``hubert_ray.corpus.canonical``).
    """
    if validated:
        metadata = stamp(metadata)
    schema = CANONICAL_SCHEMA.with_metadata(metadata) if metadata else CANONICAL_SCHEMA
    fs, path = storage.filesystem(uri, storage_options)
    if not storage.is_remote(uri):
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f, pq.ParquetWriter(f, schema) as writer:
        batch: list[Recording] = []
        n_segments = 0
        for rec in recordings:
            batch.append(rec)
            n_segments += len(rec.segments)
            if len(batch) >= rows_per_group or n_segments >= segments_per_group:
                writer.write_table(canonical_table(batch))
                batch, n_segments = [], 0
        if batch:
            writer.write_table(canonical_table(batch))


def segment_table(recordings: list[Recording]) -> pa.Table:
    """Exploded segment rows (:data:`SEGMENT_SCHEMA`) in recording order, segments contiguous."""
    cols: dict[str, list] = {name: [] for name in SEGMENT_SCHEMA.names}
    for r in recordings:
        for s in r.segments:
            cols["segment_id"].append(s.segment_id)
            cols["recording_id"].append(r.recording_id)
            cols["audio_uri"].append(r.audio_uri)
            cols["start_s"].append(s.start_s)
            cols["end_s"].append(s.end_s)
    return pa.Table.from_pydict(cols, schema=SEGMENT_SCHEMA)

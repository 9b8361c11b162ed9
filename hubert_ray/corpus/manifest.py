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
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hubert_ray.core.config import SAMPLE_RATE_HZ
from hubert_ray.core.errors import ESCAPED_URI_PREFIX, ManifestError
from hubert_ray.io import storage

MAX_LISTED = 20
JSONL_EXTENSIONS = (".jsonl", ".ndjson", ".json")
PARQUET_EXTENSIONS = (".parquet",)
TSV_EXTENSIONS = (".tsv",)
ALLOWED_EXTENSIONS = JSONL_EXTENSIONS + PARQUET_EXTENSIONS + TSV_EXTENSIONS

VALIDATED_KEY = b"hubert_ray.validated"
"""Parquet metadata key of a canonical manifest whose every rule (unique ids, valid times,
non-empty segment lists) was checked when it was written (``jobs.prepare``)."""


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


@dataclass(frozen=True)
class Segment:
    segment_id: str
    start_s: float
    end_s: float | None  # None = to the end of the audio (whole-file segment)


@dataclass(frozen=True)
class Recording:
    recording_id: str
    audio_uri: str  # absolute path or URL (relative paths already resolved)
    segments: tuple[Segment, ...]
    duration_s: float | None = None


@dataclass(frozen=True)
class _Keys:
    """Column / key names of one input flavour."""

    recording_id: str
    audio: str
    segment_id: str
    id_required: bool  # canonical rows must carry their ids; raw ones may derive them


_RAW = _Keys(recording_id="id", audio="audio", segment_id="id", id_required=False)
_CANONICAL = _Keys(
    recording_id="recording_id", audio="audio_uri", segment_id="segment_id", id_required=True
)


class _Problems:
    """Collects validation problems; keeps the first :data:`MAX_LISTED` messages."""

    def __init__(self, uri: str, source: str) -> None:
        self.uri = uri
        self.source = source
        self.messages: list[str] = []
        self.count = 0

    def add(self, line: int | None, message: str, field: str | None = None) -> None:
        self.count += 1
        if len(self.messages) < MAX_LISTED:
            where = self.source if line is None else f"{self.source}:{line}"
            what = message if field is None else f"field {field!r}: {message}"
            self.messages.append(f"{where}: {what}")

    def raise_if_any(self) -> None:
        if not self.count:
            return
        lines = list(self.messages)
        if self.count > len(lines):
            lines.append(f"... and {self.count - len(lines)} more")
        noun = "problem" if self.count == 1 else "problems"
        raise ManifestError(
            f"manifest {self.uri} has {self.count} {noun}:\n" + "\n".join(f"  {m}" for m in lines)
        )


# --------------------------------------------------------------------------------------------
# Public API


def read_manifest(uri: str, storage_options: dict | None = None) -> list[Recording]:
    """Read and validate a manifest in any supported format; raise one :class:`ManifestError`."""
    ext = _extension(uri)
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
    base_dir = storage.parent(uri)
    seen_recordings: dict[str, int] = {}
    seen_segments: dict[str, int] = {}
    recordings: list[Recording] = []

    with fs.open(path, "rb") as f:
        if ext in JSONL_EXTENSIONS:
            records = _jsonl_records(f, problems)
        elif ext in PARQUET_EXTENSIONS:
            records = _parquet_records(f, problems)
        else:
            records = _tsv_records(f, problems, base_dir)
        for line, keys, obj in records:
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

    A canonical Parquet manifest (what ``jobs.prepare`` writes, e.g. from WenetSpeech.json) is
    read and checked column-wise with Arrow, without a Python object per segment: at
    WenetSpeech scale (14.6 M segments) the per-segment path cost the driver 71–73 s, this
    one 8–13 s (docs/performance.md). Any other format, or a canonical file that fails a check,
    goes through :func:`read_manifest`, which reports every problem by line."""
    if _extension(uri) in PARQUET_EXTENSIONS:
        table = _canonical_segments(uri, storage_options)
        if table is not None:
            return table
    return segment_table(read_manifest(uri, storage_options))


def _canonical_segments(uri: str, storage_options: dict | None) -> pa.Table | None:
    """Column-wise :func:`read_segments` of a canonical Parquet manifest; ``None`` when the
    file is not canonical or breaks any rule (the caller then takes the reporting path)."""
    fs, path = storage.filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            columns = [c for c in CANONICAL_SCHEMA.names if c in schema.names]
            # exactly the canonical column types (what write_canonical writes): no casts whose
            # leniency (bool -> float, ...) the reporting path would not share
            if not {"recording_id", "audio_uri", "segments"} <= set(columns):
                return None
            for c in columns:
                if not schema.field(c).type.equals(CANONICAL_SCHEMA.field(c).type):
                    return None
            recs = pf.read(columns=columns)
    except (pa.ArrowException, OSError):
        return None
    rec_id = recs.column("recording_id").combine_chunks()
    audio = recs.column("audio_uri").combine_chunks()
    segs = recs.column("segments").combine_chunks()
    duration = (
        recs.column("duration_s").combine_chunks()
        if "duration_s" in columns
        else pa.nulls(len(recs), pa.float64())
    )
    if len(recs) == 0 or segs.null_count or rec_id.null_count or audio.null_count:
        return None
    flat = segs.flatten()
    if flat.null_count:  # a null segment
        return None
    seg_id = flat.field("segment_id")
    start, end = flat.field("start_s"), flat.field("end_s")

    def blank(ids: pa.Array) -> bool:  # any null or whitespace-only string
        return bool(ids.null_count) or bool(
            pc.any(pc.equal(pc.utf8_trim_whitespace(ids), "")).as_py()
        )

    def bad_seconds(x: pa.Array, allow_null: bool) -> bool:
        v = x.to_numpy(zero_copy_only=False)  # nulls become NaN
        valid = ~np.asarray(x.is_null()) if x.null_count else np.ones(len(v), bool)
        if not allow_null and not valid.all():
            return True
        return not (np.isfinite(v[valid]).all() and (v[valid] >= 0).all())

    d = duration.to_numpy(zero_copy_only=False)
    end_np = end.to_numpy(zero_copy_only=False)
    if (
        (pc.list_value_length(segs).to_numpy() == 0).any()
        or blank(rec_id)
        or blank(audio)
        or blank(seg_id)
        or bad_seconds(start, allow_null=False)
        or bad_seconds(end, allow_null=True)
        or (d[~np.isnan(d)] <= 0).any()
        or bad_seconds(duration, allow_null=True)
        or (end_np <= start.to_numpy(zero_copy_only=False)).any()  # NaN (null end) compares False
        or pc.count_distinct(rec_id).as_py() != len(rec_id)
        or pc.count_distinct(seg_id).as_py() != len(seg_id)
    ):
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


# --------------------------------------------------------------------------------------------
# Format readers: each yields (line, keys, record dict) and reports its own syntax problems.

_Record = tuple[int, _Keys, dict]


def _jsonl_records(f: Any, problems: _Problems) -> Iterator[_Record]:
    for line_no, raw in enumerate(f, start=1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.add(line_no, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.add(
                line_no,
                f"invalid JSON ({exc.msg} at column {exc.colno}); "
                "expected one JSON object per line (JSON Lines)",
            )
            continue
        if not isinstance(obj, dict):
            problems.add(
                line_no,
                f"a JSON {_json_type(obj)} is not a recording; expected a JSON object per line",
            )
            continue
        yield line_no, _RAW, obj


def _parquet_records(f: Any, problems: _Problems) -> Iterator[_Record]:
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as exc:
        problems.add(None, f"not a readable Parquet file ({exc})")
        return
    names = set(pf.schema_arrow.names)
    if {"recording_id", "audio_uri", "segments"} <= names:
        keys = _CANONICAL
    elif "audio" in names:
        keys = _RAW
    else:
        problems.add(
            None,
            f"columns {sorted(names)}; expected 'audio' (optional 'id', 'segments', 'duration_s') "
            "or the canonical 'recording_id', 'audio_uri', 'segments', 'duration_s'",
        )
        return
    wanted = [c for c in (keys.recording_id, keys.audio, "segments", "duration_s") if c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=8192, columns=wanted):
        for obj in batch.to_pylist():
            row += 1
            yield row, keys, obj


def _tsv_records(f: Any, problems: _Problems, base_dir: str) -> Iterator[_Record]:
    root: str | None = None
    for line_no, raw in enumerate(f, start=1):
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            problems.add(line_no, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
            if line_no == 1:
                return
            continue
        if line_no == 1:
            text = text.lstrip("\ufeff").strip()
            if not text:
                problems.add(1, "the first line must be the audio root directory; it is empty")
                return
            root = storage.resolve(base_dir, text)
            continue
        if not text.strip():
            continue
        parts = text.split("\t")
        if len(parts) != 2:
            problems.add(
                line_no,
                f"{len(parts)} tab-separated fields in {text!r}; "
                "expected relative_path<TAB>num_samples",
            )
            continue
        rel, num = parts[0].strip(), parts[1].strip()
        if not rel:
            problems.add(line_no, "empty path; expected a path relative to the root", field="path")
            continue
        try:
            n = int(num)
        except ValueError:
            n = 0
        if n <= 0:
            problems.add(
                line_no,
                f"num_samples={num!r} is invalid; expected a positive integer "
                f"(samples at {SAMPLE_RATE_HZ} Hz)",
                field="num_samples",
            )
            continue
        assert root is not None
        yield (
            line_no,
            _RAW,
            {
                "id": posixpath.splitext(rel)[0],
                "audio": _resolve_within(root, rel),
                "duration_s": n / SAMPLE_RATE_HZ,
            },
        )


# --------------------------------------------------------------------------------------------
# Record validation (shared by every format)


def _parse_record(
    obj: dict,
    line: int,
    keys: _Keys,
    base_dir: str,
    problems: _Problems,
    seen_recordings: dict[str, int],
    seen_segments: dict[str, int],
) -> Recording | None:
    before = problems.count

    audio = obj.get(keys.audio)
    if not isinstance(audio, str) or not audio.strip():
        what = "missing" if audio is None else f"{audio!r} is invalid"
        problems.add(line, f"{what}; expected a non-empty audio path or URL", field=keys.audio)
        audio_uri = None
    else:
        audio_uri = _resolve_within(base_dir, audio.strip())

    rec_id = obj.get(keys.recording_id)
    if rec_id is None and not keys.id_required:
        rec_id = _derive_id(audio_uri) if audio_uri else None
        if audio_uri and not rec_id:
            problems.add(
                line,
                f"cannot derive a recording id from audio {audio_uri!r}; "
                "expected an explicit non-empty id",
                field=keys.recording_id,
            )
    elif not isinstance(rec_id, str) or not rec_id.strip():
        what = "missing" if rec_id is None else f"{rec_id!r} is invalid"
        problems.add(line, f"{what}; expected a non-empty string", field=keys.recording_id)
        rec_id = None

    duration = obj.get("duration_s")
    if duration is not None:
        duration = _number(duration, "duration_s", line, problems, positive=True)

    duplicate_recording = False
    if rec_id is not None:
        if rec_id in seen_recordings:
            duplicate_recording = True
            problems.add(
                line,
                f"duplicate recording id {rec_id!r} (first at "
                f"line {seen_recordings[rec_id]}); expected unique ids",
                field=keys.recording_id,
            )
        else:
            seen_recordings[rec_id] = line

    segments = _parse_segments(obj.get("segments"), rec_id, line, keys, problems)

    if not duplicate_recording and segments is not None:
        for i, seg in enumerate(segments):
            if seg.segment_id in seen_segments:
                field = "segments"
                if obj.get("segments") is not None:
                    field = f"segments[{i}].{keys.segment_id}"
                problems.add(
                    line,
                    f"duplicate segment id {seg.segment_id!r} (first at "
                    f"line {seen_segments[seg.segment_id]}); expected segment ids "
                    "unique across the manifest",
                    field=field,
                )
            else:
                seen_segments[seg.segment_id] = line

    if problems.count != before or rec_id is None or audio_uri is None or segments is None:
        return None
    return Recording(
        recording_id=rec_id, audio_uri=audio_uri, segments=tuple(segments), duration_s=duration
    )


def _parse_segments(
    value: Any, rec_id: str | None, line: int, keys: _Keys, problems: _Problems
) -> list[Segment] | None:
    if value is None:
        if keys.id_required:
            problems.add(line, "missing; expected a list of segments", field="segments")
            return None
        return [Segment(rec_id, 0.0, None)] if rec_id is not None else None
    if not isinstance(value, list):
        problems.add(
            line,
            f"a {_json_type(value)} is invalid; expected a list of {{id, start_s, end_s}} objects",
            field="segments",
        )
        return None
    if not value:
        problems.add(
            line,
            "an empty list; expected at least one segment "
            "(omit 'segments' for one whole-file segment)",
            field="segments",
        )
        return None
    out: list[Segment] = []
    ok = True
    for i, seg in enumerate(value):
        prefix = f"segments[{i}]"
        if not isinstance(seg, dict):
            problems.add(
                line,
                f"a {_json_type(seg)} is invalid; expected an object {{id, start_s, end_s}}",
                field=prefix,
            )
            ok = False
            continue
        seg_id = seg.get(keys.segment_id)
        if seg_id is None and not keys.id_required:
            seg_id = f"{rec_id}-{i}" if rec_id is not None else None
        elif not isinstance(seg_id, str) or not seg_id.strip():
            what = "missing" if seg_id is None else f"{seg_id!r} is invalid"
            problems.add(
                line, f"{what}; expected a non-empty string", field=f"{prefix}.{keys.segment_id}"
            )
            ok = False
        start: float | None = None
        if "start_s" not in seg or seg["start_s"] is None:
            problems.add(
                line, "missing; expected a number of seconds >= 0", field=f"{prefix}.start_s"
            )
        else:
            start = _number(seg["start_s"], f"{prefix}.start_s", line, problems)
        end: float | None = None
        end_ok = True
        if "end_s" not in seg:
            problems.add(
                line,
                "missing; expected a number of seconds > start_s, or null for the end of the audio",
                field=f"{prefix}.end_s",
            )
            end_ok = False
        elif seg["end_s"] is not None:
            end = _number(seg["end_s"], f"{prefix}.end_s", line, problems)
            end_ok = end is not None
        if start is not None and end is not None and end <= start:
            problems.add(
                line, f"end_s={end!r} must be > start_s={start!r}", field=f"{prefix}.end_s"
            )
            end_ok = False
        if seg_id is None or start is None or not end_ok:
            ok = False
            continue
        out.append(Segment(seg_id, start, end))
    return out if ok else None


def _number(
    value: Any, field: str, line: int, problems: _Problems, positive: bool = False
) -> float | None:
    """A finite float >= 0 (> 0 when ``positive``), or None after reporting the problem."""
    name = field.rsplit(".", 1)[-1]
    expected = "a number of seconds " + ("> 0" if positive else ">= 0")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.add(line, f"{name}={value!r} is not a number; expected {expected}", field=field)
        return None
    x = float(value)
    if not math.isfinite(x):
        problems.add(line, f"{name}={value!r} is not finite; expected {expected}", field=field)
        return None
    if x < 0 or (positive and x == 0):
        problems.add(line, f"{name}={value!r} must be {'> 0' if positive else '>= 0'}", field=field)
        return None
    return x


# --------------------------------------------------------------------------------------------
# Small helpers


def _resolve_within(base_dir: str, path: str) -> str:
    """``path`` resolved against ``base_dir``; a relative path whose normalised form leaves
    ``base_dir`` (``../../etc/passwd``) becomes ``path-escape://<path>``, which the decode
    stage reports as ``path_escape`` error rows instead of reading it. Absolute paths and URLs
    are the manifest author's explicit choice and pass unchanged."""
    if "://" in path or path.startswith("/"):
        return path
    resolved = storage.resolve(base_dir, path)
    root = base_dir.rstrip("/") + "/"
    if not resolved.startswith(root):
        return ESCAPED_URI_PREFIX + path
    return resolved


def _extension(uri: str) -> str:
    name = posixpath.basename(uri.split("://", 1)[-1].split("?", 1)[0].rstrip("/"))
    return posixpath.splitext(name)[1].lower()


def _source_name(uri: str) -> str:
    """How problem lines name the manifest: the basename (the full URI is in the header)."""
    return posixpath.basename(uri.split("://", 1)[-1].rstrip("/")) or uri


def _derive_id(audio_uri: str) -> str:
    name = posixpath.basename(audio_uri.split("://", 1)[-1].split("?", 1)[0].rstrip("/"))
    return posixpath.splitext(name)[0]


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__

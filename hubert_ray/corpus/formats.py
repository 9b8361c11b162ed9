"""The manifest formats, chosen by file extension: JSON Lines, Parquet (raw or canonical
columns) and fairseq TSV. Each reader yields ``(line, keys, record dict)`` and reports its
own syntax problems; :mod:`hubert_ray.corpus.records` validates the records."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hubert_ray.core.config import SAMPLE_RATE_HZ
from hubert_ray.corpus.records import (
    _CANONICAL,
    _RAW,
    _json_type,
    _Keys,
    _Problems,
    _resolve_within,
)
from hubert_ray.io import storage

JSONL_EXTENSIONS = (".jsonl", ".ndjson", ".json")
PARQUET_EXTENSIONS = (".parquet",)
TSV_EXTENSIONS = (".tsv",)
ALLOWED_EXTENSIONS = JSONL_EXTENSIONS + PARQUET_EXTENSIONS + TSV_EXTENSIONS

_Record = tuple[int, _Keys, dict]


def extension(uri: str) -> str:
    """The lower-case extension of the URI's file name (``.jsonl``), ``""`` if none."""
    name = posixpath.basename(uri.split("://", 1)[-1].split("?", 1)[0].rstrip("/"))
    return posixpath.splitext(name)[1].lower()


def records(ext: str, f: Any, problems: _Problems, base_dir: str) -> Iterator[_Record]:
    """The records of an open manifest file of extension ``ext`` (one of the allowed)."""
    if ext in JSONL_EXTENSIONS:
        return _jsonl_records(f, problems)
    if ext in PARQUET_EXTENSIONS:
        return _parquet_records(f, problems)
    return _tsv_records(f, problems, base_dir)


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

"""Output dataset: Parquet part files, the summary pass, and a Ray-free reader.

Layout under ``<output>/``::

    features/part-*.parquet   one row per segment (README: Output), run config in metadata
    errors/part-*.parquet     one row per failed segment: segment_id, recording_id, stage,
                              reason, message, transient
    retried/part-*.parquet    error rows a later run took out of errors/ to retry (transient)
    _summary.json             counts, errors by reason, audio seconds, wall time, x-realtime
    _runs.json                one entry per run into this output: audio seconds it wrote, wall

Part files appear whole: local files are written under a temporary name and renamed; remote
ones are written to a local temporary file and uploaded with one PUT (multipart when large),
which object stores make visible only when the upload completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hubert_ray.core.errors import ERROR_COLUMNS, TRANSIENT_COLUMN, TRANSIENT_REASONS
from hubert_ray.io import storage

FEATURES_DIR = "features"
ERRORS_DIR = "errors"
PRECISION_DIR = "precision"
PRECISION_FIELDS = (
    "layer",
    "checked_dtype",
    "cos_mean",
    "cos_min",
    "rel_l2",
    "max_abs",
    "action",
    "unit_flip_rate",  # null where the layer has no centroids
)
RETRIED_DIR = "retried"
SUMMARY_FILE = "_summary.json"
RUNS_FILE = "_runs.json"
SUCCESS_FILE = "_SUCCESS"  # empty; written right after _summary.json (completion marker)
JOB_FILE = "_job.json"  # the run's identity (model, layers, dtypes), written before work starts
# <actor_id>.json: each model actor's precision record (self-test, checks, escalation), written
# when the actor starts and whenever the record changes.
ACTORS_DIR = "actors"
META_KEY = b"hubert_ray.run"
ERROR_SCHEMA = pa.schema(
    [*((c, pa.string()) for c in ERROR_COLUMNS), (TRANSIENT_COLUMN, pa.bool_())]
)
_MODEL_ERROR_FIELDS = ("error_stage", "error_reason", "error_message")


def split_block(block: pa.Table) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Split model-stage output into (features rows, error rows, precision-check rows)."""
    failed = block.column("error_reason").is_valid()
    ok = block.drop_columns([*_MODEL_ERROR_FIELDS, "precision"])
    if block.column("error_reason").null_count < block.num_rows:  # else: no copy of features
        ok = ok.filter(pc.invert(failed))
    bad = block.filter(failed)
    errs = pa.table(
        {
            "segment_id": bad.column("segment_id"),
            "recording_id": bad.column("recording_id"),
            "stage": bad.column("error_stage"),
            "reason": bad.column("error_reason"),
            "message": bad.column("error_message"),
            TRANSIENT_COLUMN: transient(bad.column("error_reason")),
        },
        schema=ERROR_SCHEMA,
    )
    checked = block.filter(block.column("precision").is_valid())
    lists = checked.column("precision").combine_chunks()
    repeat = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    idx = pa.array(np.repeat(np.arange(checked.num_rows), repeat))
    flat = lists.flatten()
    cols = {
        "segment_id": checked.column("segment_id").take(idx),
        "recording_id": checked.column("recording_id").take(idx),
        "num_frames": checked.column("num_frames").take(idx),
        "written_dtype": checked.column("compute_dtype").take(idx),
    }
    cols.update({name: flat.field(name) for name in PRECISION_FIELDS})
    return ok, errs, pa.table(cols)


def part_slices(table: pa.Table, max_rows: int, max_bytes: int) -> list[tuple[int, int]]:
    """``(start, length)`` slices of ``table`` with at most ``max_rows`` rows and, past its
    first row, at most ``max_bytes`` of feature values each (frames x hidden x layers x dtype
    size: a row of ``--layers all`` holds 25 times what a row of one layer does)."""
    sizes = np.zeros(table.num_rows, dtype=np.int64)
    for name in table.column_names:
        if name.startswith("layer_"):
            col = table.column(name)
            item = col.type.value_type.list_size * col.type.value_type.value_type.bit_width // 8
            sizes += pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64) * (
                item
            )
    slices, start, total = [], 0, 0
    for i, size in enumerate(sizes.tolist()):
        if i > start and (i - start >= max_rows or total + size > max_bytes):
            slices.append((start, i - start))
            start, total = i, 0
        total += size
    if table.num_rows > start:
        slices.append((start, table.num_rows - start))
    return slices


def transient(reasons) -> pa.Array:
    """The ``transient`` column for error rows of these reasons (:data:`TRANSIENT_REASONS`)."""
    return pc.is_in(reasons, pa.array(sorted(TRANSIENT_REASONS), pa.string()))


def part_key(segment_ids) -> str:
    """A part file's name key from the segment ids it holds: writing the same rows again (a
    retried write task) replaces the same file instead of adding a duplicate."""
    digest = hashlib.sha256()
    for sid in segment_ids:
        digest.update(str(sid).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def parquet_options(schema: pa.Schema) -> dict:
    """``pq.write_table`` options: dictionary encoding and min/max statistics for the flat
    columns only. For the feature columns (one leaf value per feature, ~38,000 per audio
    second at 768 dims) both are pure cost: with them, one core wrote 768-dim float16 features
    ~3.5x slower and read them back 3-6x slower (``benchmarks/write_rate.py``), and no reader
    filters on feature values. Nested columns keep Parquet's default snappy compression and
    plain encoding."""
    flat = [f.name for f in schema if not pa.types.is_nested(f.type)]
    return {"use_dictionary": flat, "write_statistics": flat}


# Rows per record batch handed to the Parquet writer: it builds its repetition/definition levels
# per batch (one per feature value): one batch of 2,000 rows wrote ~2x slower than batches of
# 16-256 rows (docs/performance.md). Splitting a table into batches copies nothing.
WRITE_BATCH_ROWS = 64


def write_part(
    table: pa.Table,
    directory: str,
    metadata: dict | None,
    storage_options: dict | None = None,
    key: str | None = None,
) -> str:
    """Write ``table`` as one Parquet file in ``directory``; returns its URL. With ``key`` the
    name is ``part-<key>.parquet`` (deterministic: a rewrite replaces it), else random."""
    table = pa.Table.from_batches(table.to_batches(WRITE_BATCH_ROWS), table.schema)  # no copy
    if metadata:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), META_KEY: json.dumps(metadata).encode()}
        )
    name = f"part-{key or uuid.uuid4().hex}.parquet"
    fs, path = storage.filesystem(directory, storage_options)
    final = f"{path.rstrip('/')}/{name}"
    if storage.is_remote(directory):
        # Serialise locally, then upload in one PUT (or a multipart upload, completed last): the
        # object appears whole or not at all. (Writing through ``fs.open(..., "wb")`` would
        # upload whatever was buffered if the Parquet writer failed half-way.)
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix=".hubert-ray-part-", suffix=".parquet")
        os.close(fd)
        try:
            pq.write_table(table, tmp, **parquet_options(table.schema))
            storage.with_retries(fs.put_file, tmp, final)
        finally:
            os.remove(tmp)
    else:
        os.makedirs(path, exist_ok=True)
        tmp = f"{path.rstrip('/')}/.{name}.tmp"
        storage.with_retries(pq.write_table, table, tmp, **parquet_options(table.schema))
        os.replace(tmp, final)
    return storage.join(directory, name)


def part_files(directory: str, storage_options: dict | None) -> tuple[object, list[str]]:
    fs, path = storage.filesystem(directory, storage_options)
    # Other processes wrote these files: a listing this process cached (s3fs) may predate them.
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return fs, []
    if fs.isfile(path):
        return fs, [path]
    files = sorted(
        p
        for p in fs.find(path)
        if p.endswith(".parquet") and not os.path.basename(p).startswith(".")
    )
    return fs, files


def read_part(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    """One part file (retried while the storage fails transiently). Through ``ParquetFile``:
    ``pq.read_table`` keeps ~3 KiB per file read in the process (measured: 32 MiB after 10,000
    parts), which a driver reading every part of a 100 M-segment output would accumulate."""

    def read() -> pa.Table:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).read(columns=columns)

    return storage.with_retries(read)


def read_table(
    directory: str,
    columns: list[str] | None = None,
    storage_options: dict | None = None,
    filters=None,
) -> pa.Table | None:
    """All part files of one output directory as a table (``None`` if there are none)."""
    fs, files = part_files(directory, storage_options)
    if not files:
        return None
    return pq.ParquetDataset(files, filesystem=fs, filters=filters).read(columns=columns)


def run_metadata(uri: str, storage_options: dict | None = None) -> dict:
    """The run config stored in the features files' Parquet metadata."""
    fs, files = part_files(storage.join(uri, FEATURES_DIR), storage_options)
    if not files:
        return {}
    meta = pq.read_schema(files[0], filesystem=fs).metadata or {}
    return json.loads(meta.get(META_KEY, b"{}"))


def read_features(
    uri: str, segment_ids=None, layer: int | None = None, storage_options: dict | None = None
) -> dict[str, np.ndarray]:
    """Features of a finished job as ``{segment_id: array[num_frames, hidden]}`` (float16 or
    float32 as stored). ``uri`` is the job's output directory (or its ``features/`` dir or one
    Parquet file); ``layer`` defaults to the highest layer stored. Needs no Ray.
    """
    directory = (
        uri
        if uri.rstrip("/").endswith((FEATURES_DIR, ".parquet"))
        else storage.join(uri, FEATURES_DIR)
    )
    if not uri.rstrip("/").endswith(".parquet") and directory != uri:
        fs, path = storage.filesystem(uri, storage_options)
        if fs.exists(path) and not fs.exists(f"{path.rstrip('/')}/{SUMMARY_FILE}"):
            warnings.warn(
                f"{uri} has no {SUMMARY_FILE}: the job has not finished; "
                "the dataset may be incomplete",
                stacklevel=2,
            )
    fs, files = part_files(directory, storage_options)
    if not files:
        return {}
    names = pq.read_schema(files[0], filesystem=fs).names
    layers = sorted(int(n.split("_", 1)[1]) for n in names if n.startswith("layer_"))
    if not layers:
        raise KeyError(
            f"{uri} stores no features (written with --store units); "
            "read its units with hubert_ray.read_units"
        )
    if layer is None:
        layer = layers[-1]
    if layer not in layers:
        raise KeyError(f"layer {layer} not stored; available: {layers}")
    filters = None
    if segment_ids is not None:
        filters = [("segment_id", "in", list(segment_ids))]
    table = pq.ParquetDataset(files, filesystem=fs, filters=filters).read(
        columns=["segment_id", f"layer_{layer}"]
    )
    out: dict[str, np.ndarray] = {}
    ids = table.column("segment_id").to_pylist()
    col = table.column(f"layer_{layer}").combine_chunks()
    hidden = col.type.value_type.list_size
    offsets = col.offsets.to_numpy()
    flat = col.values.values.to_numpy(zero_copy_only=False).reshape(-1, hidden)
    for i, sid in enumerate(ids):
        out[sid] = flat[offsets[i] : offsets[i + 1]]
    return out


def actor_reports(uri: str, storage_options: dict | None = None) -> list[dict]:
    """The model actors' precision records under ``<uri>/actors`` (every run's), by start."""
    fs, path = storage.filesystem(storage.join(uri, ACTORS_DIR), storage_options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    reports = []
    for name in sorted(fs.find(path)):
        if name.endswith(".json"):
            with fs.open(name, "r") as f:
                reports.append(json.load(f))
    return reports


def suspect_segment_ids(
    uri: str, reports: list[dict], storage_options: dict | None = None
) -> pa.Array:
    """Feature rows written in a reduced dtype by model actors that later escalated to FP32
    (their sampled checks breached systematically): computed before the actor stopped trusting
    its dtype. ``--recompute-suspect`` recomputes them."""
    escalated = {r["actor_id"]: r["requested_dtype"] for r in reports if r.get("escalated")}
    if not escalated:
        return pa.array([], pa.string())
    feats = read_table(
        storage.join(uri, FEATURES_DIR),
        ["segment_id", "actor_id", "compute_dtype"],
        storage_options,
        filters=[("actor_id", "in", sorted(escalated))],
    )
    if feats is None or feats.num_rows == 0:
        return pa.array([], pa.string())
    requested = pa.array([escalated[a] for a in feats.column("actor_id").to_pylist()])
    keep = pc.equal(feats.column("compute_dtype"), requested)
    return feats.column("segment_id").filter(keep).combine_chunks()


def drop_segments(directory: str, segment_ids, storage_options: dict | None = None) -> int:
    """Rewrite the part files of ``directory`` without the rows of ``segment_ids``; returns
    how many rows were dropped. Each affected part is replaced by a part of its remaining rows
    (written first, named by their ids) and then deleted: a crash in between leaves both, and
    running the same drop again converges (the same new part, then the delete)."""
    drop = pa.array(list(segment_ids), pa.string())
    fs, files = part_files(directory, storage_options)
    dropped = 0
    for name in files:
        ids = pq.read_table(name, columns=["segment_id"], filesystem=fs).column("segment_id")
        hit = pc.is_in(ids, drop)
        n = pc.sum(hit).as_py() or 0
        if not n:
            continue
        table = pq.read_table(name, filesystem=fs)
        kept = table.filter(pc.invert(hit))
        if kept.num_rows:
            meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"null"))
            key = part_key(kept.column("segment_id").to_pylist())
            write_part(kept.replace_schema_metadata(None), directory, meta, storage_options, key)
        storage.with_retries(fs.rm, name)
        dropped += n
    return dropped


def value_counts(values) -> dict:
    """``{value: occurrences}`` of an Arrow array or chunked array (column-wise)."""
    vc = pc.value_counts(values)
    return dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True))


def _transient_mask(table: pa.Table) -> pa.Array:
    """Which error rows are transient: the ``transient`` column, or (parts written before it
    existed) their reason."""
    if TRANSIENT_COLUMN in table.column_names:
        return pc.fill_null(table.column(TRANSIENT_COLUMN), False)
    return transient(table.column("reason"))


def retry_transient_errors(uri: str, storage_options: dict | None = None) -> int:
    """Take the transient error rows out of ``<uri>/errors`` so this run decodes their segments
    again; returns how many. Part by part: the rows go to ``<uri>/retried`` first (a part of
    the same name), then the error part is rewritten without them (same name: replaced whole)
    or removed. A kill in between leaves both; the next run moves the rows again (replacing
    the same retried part), so no row is lost or counted twice."""
    fs, files = part_files(storage.join(uri, ERRORS_DIR), storage_options)
    moved = 0
    for path in files:
        table = read_part(fs, path)
        mask = _transient_mask(table)
        n = int(pc.sum(mask).as_py() or 0)
        if not n:
            continue
        key = os.path.basename(path)[len("part-") : -len(".parquet")]
        meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}")) or None
        plain = table.replace_schema_metadata(None)
        write_part(plain.filter(mask), storage.join(uri, RETRIED_DIR), meta, storage_options, key)
        rest = plain.filter(pc.invert(mask))
        if rest.num_rows:
            write_part(rest, storage.join(uri, ERRORS_DIR), meta, storage_options, key)
        else:
            storage.with_retries(fs.rm, path)
        moved += n
    return moved

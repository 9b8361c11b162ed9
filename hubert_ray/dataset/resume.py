"""What an output already holds, per recording: the pieces that let the job's driver resume a
corpus it never holds.

* :class:`DoneIndex` lists, per recording, how many rows ``features/`` and ``errors/`` hold for
  it and in which part files: one small row per recording (the driver holds this, never a
  segment id).
* :func:`todo_segments` (a task over manifest rows) expands recordings into segment rows and
  drops the segments already written: a recording with as many rows as segments is skipped
  without reading anything; one with some rows has its ids read from its own part files.
* :func:`check_segments` (a task over manifest rows) counts, for the summary, which of its
  recordings' segments are written once, missing or written twice.

Imports neither torch nor Ray.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hubert_ray.corpus.canonical import expand
from hubert_ray.dataset import output
from hubert_ray.io import storage


@dataclass(frozen=True)
class DoneIndex:
    """Rows already in an output, per recording: ``table`` has ``recording_id``, ``rows``
    (feature and error rows for it) and ``parts`` (indices into ``files``, the part files
    holding them). One small row per recording; no segment id."""

    uri: str
    files: tuple[str, ...]
    table: pa.Table

    @property
    def rows(self) -> int:
        return int(pc.sum(self.table.column("rows")).as_py() or 0) if self.table.num_rows else 0

    def lookup(self, recording_ids: pa.Array) -> tuple[np.ndarray, list]:
        """Per recording id: rows written (0 if none) and the part indices holding them."""
        pos = pc.index_in(recording_ids, value_set=self.table.column("recording_id"))
        rows = np.zeros(len(recording_ids), np.int64)
        parts: list = [()] * len(recording_ids)
        valid = np.asarray(pos.is_valid())
        if valid.any():
            idx = pos.filter(pos.is_valid())
            rows[valid] = self.table.column("rows").take(idx).to_numpy()
            got = self.table.column("parts").take(idx).to_pylist()
            for k, i in enumerate(np.flatnonzero(valid)):
                parts[i] = got[k]
        return rows, parts


INDEX_THREADS = 8
INDEX_CHUNK = 512  # part files whose per-part tables are combined at once
_PAIRS = pa.schema([("recording_id", pa.string()), ("rows", pa.int64()), ("part", pa.int32())])
_EMPTY_INDEX = pa.schema(
    [("recording_id", pa.string()), ("rows", pa.int64()), ("parts", pa.list_(pa.int32()))]
)


def done_part_files(uri: str, storage_options: dict | None = None) -> list[str]:
    """Every part file under ``features/`` and ``errors/`` of the output ``uri``, in the order
    a :class:`DoneIndex`'s part indices refer to."""
    files: list[str] = []
    for sub in (output.FEATURES_DIR, output.ERRORS_DIR):
        files.extend(output.part_files(storage.join(uri, sub), storage_options)[1])
    return files


def index_parts(
    uri: str, files: list[str], lo: int, hi: int, storage_options: dict | None = None
) -> pa.Table:
    """Parts ``files[lo:hi]`` as ``recording_id, rows, part`` (one row per part and recording
    it holds), read a few at a time (threads: latency-bound on object storage). A range of
    parts is one task of the job's index (:func:`combine_index` joins the ranges)."""
    fs, _ = storage.filesystem(uri, storage_options)

    def per_part(i: int) -> pa.Table:
        t = output.read_part(fs, files[i], ["recording_id"])
        g = t.group_by("recording_id").aggregate([("recording_id", "count")])
        return pa.table(
            {
                "recording_id": g.column("recording_id"),
                "rows": g.column("recording_id_count").cast(pa.int64()),
                "part": pa.array(np.full(g.num_rows, i, np.int32)),
            }
        )

    chunks = []
    with ThreadPoolExecutor(INDEX_THREADS) as pool:
        for c in range(lo, hi, INDEX_CHUNK):  # bounded: one chunk's tables at a time
            chunk = list(pool.map(per_part, range(c, min(hi, c + INDEX_CHUNK))))
            chunks.append(pa.concat_tables(chunk).combine_chunks())
    if not chunks:
        return _PAIRS.empty_table()
    return _compact(pa.concat_tables(chunks))


def combine_index(uri: str, files: list[str], ranges: list[pa.Table]) -> DoneIndex:
    """The :class:`DoneIndex` of ``files`` from the tables :func:`index_parts` made of them."""
    if not files:
        return DoneIndex(uri, (), _EMPTY_INDEX.empty_table())
    pairs = pa.concat_tables(ranges)
    table = pairs.group_by("recording_id").aggregate([("rows", "sum"), ("part", "list")])
    table = pa.table(
        {
            "recording_id": table.column("recording_id"),
            "rows": table.column("rows_sum"),
            "parts": table.column("part_list").cast(pa.list_(pa.int32())),
        }
    )
    return DoneIndex(uri, tuple(files), _compact(table))


def build_done_index(uri: str, storage_options: dict | None = None) -> DoneIndex:
    """Read the ``recording_id`` column of every part under ``features/`` and ``errors/``
    (a few threads) into a :class:`DoneIndex`, in this process; the job builds it in Ray
    tasks instead (``hubert_ray.backend.checks.done_index``), keeping it and the part list off
    its driver."""
    files = done_part_files(uri, storage_options)
    return combine_index(uri, files, [index_parts(uri, files, 0, len(files), storage_options)])


def _compact(table: pa.Table) -> pa.Table:
    """``table`` in fresh contiguous buffers (an IPC round trip). The aggregation's columns
    are slices of larger buffers, and pickling a slice (how Ray ships the index to every task)
    copies its whole parent buffer: at 100 M segments the index pickled to 105 MiB, not ~10."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return pa.ipc.open_stream(sink.getvalue()).read_all()


def written_ids(
    index: DoneIndex, recording_ids: list[str], parts: list, storage_options: dict | None
) -> pa.Table:
    """``segment_id, recording_id`` of every row the output holds for ``recording_ids`` (whose
    part indices are ``parts``), read from those parts only."""
    by_part: dict[int, list[str]] = {}
    for rid, ps in zip(recording_ids, parts, strict=True):
        for p in ps:
            by_part.setdefault(p, []).append(rid)
    fs, _ = storage.filesystem(index.uri, storage_options)
    tables = []
    for p, rids in sorted(by_part.items()):
        t = output.read_part(fs, index.files[p], ["segment_id", "recording_id"])
        t = t.filter(pc.is_in(t.column("recording_id"), pa.array(rids, pa.string())))
        tables.append(t)
    if not tables:
        return pa.table({"segment_id": pa.array([], pa.string()), "recording_id": []})
    return pa.concat_tables(tables, promote_options="permissive")


def todo_segments(
    batch: pa.Table, base_dir: str, index: DoneIndex | None, storage_options: dict | None = None
) -> pa.Table:
    """Task: canonical manifest rows → the segment rows still to do (:data:`SEGMENT_SCHEMA`).
    A recording with as many rows written as it has segments is skipped unread; one with some
    rows written has them read from its part files and dropped by id."""
    if not isinstance(batch, pa.Table):
        batch = pa.table(batch)
    if index is None or not index.table.num_rows or batch.num_rows == 0:
        return expand(batch, base_dir)
    rec_ids = batch.column("recording_id").combine_chunks()
    n_segs = pc.list_value_length(batch.column("segments").combine_chunks()).to_numpy()
    rows, parts = index.lookup(rec_ids)
    whole = rows >= n_segs  # every segment written: skipped without reading its ids
    keep = batch.filter(pa.array(~whole))
    segs = expand(keep, base_dir)
    partial = np.flatnonzero((rows > 0) & ~whole)
    if partial.size:
        ids = rec_ids.to_pylist()
        done = written_ids(
            index, [ids[i] for i in partial], [parts[i] for i in partial], storage_options
        )
        segs = segs.filter(pc.invert(pc.is_in(segs.column("segment_id"), done.column(0))))
    return segs


CHECK_SCHEMA = pa.schema(
    [
        ("segments", pa.int64()),
        ("written", pa.int64()),
        ("duplicated", pa.int64()),
        ("unexpected", pa.int64()),
    ]
)


def check_segments(
    batch: pa.Table, index: DoneIndex, storage_options: dict | None = None
) -> pa.Table:
    """Task for the summary: one row of counts for these manifest recordings: their segments,
    how many of those the output holds, ids it holds more than once, and rows it holds under
    these recordings' ids that are not among their segments."""
    if not isinstance(batch, pa.Table):
        batch = pa.table(batch)
    rec_ids = batch.column("recording_id").combine_chunks()
    segs = batch.column("segments").combine_chunks()
    manifest_ids = segs.flatten().field("segment_id")
    rows, parts = index.lookup(rec_ids)
    have = np.flatnonzero(rows > 0)
    written = written_ids(
        index,
        [rec_ids[int(i)].as_py() for i in have],
        [parts[i] for i in have],
        storage_options,
    ).column("segment_id")
    vc = pc.value_counts(written) if len(written) else None
    distinct = vc.field("values") if vc is not None else pa.array([], pa.string())
    duplicated = int(pc.sum(pc.greater(vc.field("counts"), 1)).as_py() or 0) if vc else 0
    found = int(pc.sum(pc.is_in(manifest_ids, distinct)).as_py() or 0)
    return pa.table(
        {
            "segments": [len(manifest_ids)],
            "written": [found],
            "duplicated": [duplicated],
            "unexpected": [len(distinct) - found],
        },
        schema=CHECK_SCHEMA,
    )


def unexpected_recordings(index: DoneIndex, manifest_uri: str, storage_options) -> int:
    """Rows the output holds under recording ids the manifest does not have (read column-wise
    from the manifest: one id per recording)."""
    if not index.table.num_rows:
        return 0
    fs, path = storage.filesystem(manifest_uri, storage_options)
    known = []
    with fs.open(path, "rb") as f:
        for b in pq.ParquetFile(f).iter_batches(columns=["recording_id"], batch_size=65536):
            known.append(b.column(0))
    known_ids = pa.chunked_array(known, pa.string()).combine_chunks() if known else None
    if known_ids is None:
        return index.rows
    stray = pc.invert(pc.is_in(index.table.column("recording_id"), known_ids))
    return int(pc.sum(index.table.column("rows").filter(stray)).as_py() or 0)

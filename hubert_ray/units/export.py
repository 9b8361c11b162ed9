"""Reading a units dataset (``units_<L>`` columns, from ``hubert-ray kmeans assign`` or
``hubert-ray extract --units``) and exporting it as fairseq's label files, without Ray."""

from __future__ import annotations

import os
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hubert_ray.dataset import output
from hubert_ray.io import storage
from hubert_ray.units.assign import UNITS_DIR
from hubert_ray.units.features import part_files


def units_directory(uri: str, storage_options=None) -> str:
    """The directory holding unit parts: ``<uri>/units`` (``hubert-ray kmeans assign``) or
    ``<uri>/features`` (units written by ``hubert-ray extract --units``), or ``uri`` itself."""
    fs, path = storage.filesystem(uri, storage_options)
    for sub in (UNITS_DIR, output.FEATURES_DIR):
        if fs.exists(f"{path.rstrip('/')}/{sub}"):
            return storage.join(uri, sub)
    return uri


def unit_layers(schema: pa.Schema) -> list[int]:
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
    segs, idx, missing_n = _match(segs, table, units_uri, skip_missing)
    rows = table.column(col).take(idx)
    # The times the job decoded (a manifest's open end is resolved there).
    starts = table.column("start_s").take(idx).to_pylist()
    ends = table.column("end_s").take(idx).to_pylist()
    paths = segs.column("audio_uri").to_pylist()
    sids = segs.column("segment_id").to_pylist()
    root = _audio_root(paths)
    _write(prefix, storage_options, root, rows, paths, sids, starts, ends)
    return {"segments": len(paths), "missing_skipped": missing_n, "root": root, "layer": col[6:]}


def _match(
    segs: pa.Table, table: pa.Table, units_uri: str, skip_missing: bool
) -> tuple[pa.Table, pa.Array, int]:
    """The manifest segments kept, the row of each in ``table`` (by segment id) and how many
    were left out for having no units (only with ``skip_missing``; else ValueError)."""
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
    return segs, idx, missing_n


def _audio_root(paths: list[str]) -> str:
    """The local directory the audio paths are written relative to (``""``: none, as written)."""
    root = ""
    if paths and not any(storage.is_remote(x) for x in paths):
        root = os.path.commonpath(paths)
        if len(set(paths)) == 1:
            root = os.path.dirname(root)
    return root


def _write(
    prefix: str,
    storage_options,
    root: str,
    rows: pa.ChunkedArray,
    paths: list[str],
    sids: list[str],
    starts: list[float],
    ends: list[float],
) -> None:
    """``<prefix>.tsv``, ``.km`` and ``.ids``, one line per segment (see :func:`export_fairseq`)."""
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

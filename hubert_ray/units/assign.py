"""Assigning an existing feature dataset one part at a time, without Ray: each row's frames of
the codebook's layer become its nearest centroids, written as a units part (``units_<L>``,
:data:`UNIT_TYPE`) beside the row's ids and times. torch is imported inside the function."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hubert_ray.dataset import output
from hubert_ray.io import storage
from hubert_ray.units import centroids as units
from hubert_ray.units.features import READ_BATCH_ROWS, flat_frames, open_parquet

UNITS_DIR = "units"  # where ``hubert-ray kmeans assign`` writes the unit parts, under its output
UNIT_TYPE = pa.list_(pa.uint16())
_KEEP_COLUMNS = ("segment_id", "recording_id", "start_s", "end_s", "num_frames")


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
        flat, offs = flat_frames(batch.column(f"layer_{layer}"), codebook.hidden)
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

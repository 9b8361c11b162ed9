"""A feature dataset as the units code reads it, without Ray: where its parts are, opening one
for streamed reads, what it holds for a layer, and a feature column as one [frames, hidden]
array."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hubert_ray.dataset import output
from hubert_ray.io import storage

FRAME_RATE_HZ = 50  # HuBERT frames per second of audio (320-sample hop at 16 kHz)
READ_BATCH_ROWS = 16  # rows per decoded record batch (reading one costs ~5x its size)
READ_BUFFER_BYTES = 8 << 20  # Parquet read buffer: a column chunk is streamed, not read whole
# Record batches are decoded on the calling thread (use_threads=False): one feature column is
# read at a time, and Arrow's reader threads would hold more batches' buffers at once.


def features_dir(uri: str) -> str:
    u = uri.rstrip("/")
    return u if u.endswith(output.FEATURES_DIR) else storage.join(u, output.FEATURES_DIR)


def part_files(directory: str, storage_options=None) -> tuple[object, list[str]]:
    """(filesystem, sorted part paths) of one dataset directory."""
    return output.part_files(directory, storage_options)


def open_parquet(fs, path: str) -> pq.ParquetFile:
    return pq.ParquetFile(fs.open(path, "rb"), buffer_size=READ_BUFFER_BYTES, pre_buffer=False)


def dataset_info(uri: str, layer: int, storage_options=None) -> dict:
    """What a feature dataset holds for ``layer``: hidden size, storage dtype, model and
    revision, the layers stored (from the first part); ValueError if ``layer`` is absent."""
    fs, files = part_files(features_dir(uri), storage_options)
    if not files:
        raise ValueError(f"{uri!r} holds no feature parts under {output.FEATURES_DIR}/")
    pf = open_parquet(fs, files[0])
    schema = pf.schema_arrow
    layers = sorted(int(n.split("_", 1)[1]) for n in schema.names if n.startswith("layer_"))
    if layer not in layers:
        raise ValueError(f"layer {layer} is not stored in {uri!r}; stored layers: {layers}")
    typ = schema.field(f"layer_{layer}").type
    first = pf.read_row_group(0, columns=["model", "model_revision"]).slice(0, 1).to_pylist()
    row = first[0] if first else {}
    meta = json.loads((schema.metadata or {}).get(output.META_KEY, b"{}"))
    return {
        "hidden_size": typ.value_type.list_size,
        "storage_dtype": "float16" if typ.value_type.value_type == pa.float16() else "float32",
        "model": row.get("model"),
        "model_revision": row.get("model_revision"),
        "layers": layers,
        "compute_dtype": meta.get("config", {}).get("dtype"),
        "parts": len(files),
    }


def flat_frames(arr: pa.Array | pa.ChunkedArray, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """[frames, hidden] view of a ``list<fixed_size_list<half|float, H>>`` array and the row
    offsets into it (nulls have no frames)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    offsets = arr.offsets.to_numpy()
    inner = arr.values  # FixedSizeListArray, possibly sliced
    start = inner.offset
    values = inner.values.to_numpy(zero_copy_only=False)
    flat = values[start * hidden : (start + len(inner)) * hidden].reshape(-1, hidden)
    return flat, offsets - offsets[0]

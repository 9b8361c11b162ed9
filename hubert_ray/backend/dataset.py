"""The Ray dataset of the extraction: manifest recordings (read by Ray tasks) → the segments
not yet written → decode tasks → model actors."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import pyarrow as pa

from hubert_ray.backend import metrics
from hubert_ray.backend.actor import ModelActor
from hubert_ray.backend.context import MAX_PROCESS_DEATHS, trace
from hubert_ray.backend.placement import Placement, stage_args
from hubert_ray.core.config import ExtractConfig
from hubert_ray.corpus import canonical
from hubert_ray.dataset import resume

log = logging.getLogger("hubert_ray")

_DECODERS: dict[str, object] = {}


def _decode(batch: pa.Table, config) -> pa.Table:
    """Task UDF: one DecodeStage per worker process (keeps its last-recording cache)."""
    from hubert_ray.corpus.audio import DecodeStage

    trace("decode")

    # The whole config, storage options included (its repr leaves them out).
    key = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    if key not in _DECODERS:
        _DECODERS.clear()
        _DECODERS[key] = DecodeStage(config)
    t0 = time.perf_counter()
    out = _DECODERS[key](batch)
    metrics.record_decode(time.perf_counter() - t0)
    return out


# Most expanding tasks (and so input blocks) of a run: Ray's per-block overhead made 5,000
# blocks take 14.2 s on 2 CPUs, and WenetSpeech cut into 128-segment blocks would be 50,000
# (docs/performance.md). Larger corpora get larger blocks; a decode task still decodes batches
# of ``decode_batch_size`` segments.
MAX_INPUT_BLOCKS = 2_000


def _read_manifest(batch: pa.Table, uri: str, storage_options: dict) -> pa.Table:
    """Task UDF: these row groups of the canonical manifest (its recording rows), read through
    the job's storage layer so its retries are counted (Ray's own Parquet reader's are not)."""
    return pa.concat_tables(
        canonical.read_row_group(uri, int(g), storage_options)
        for g in batch.column("row_group").to_pylist()
    )


def manifest_blocks(cfg: ExtractConfig, manifest_uri: str, info: dict, per_block: int):
    """The manifest's recording rows (read by Ray's tasks, a row group each) in blocks of
    ``per_block`` recordings: a streaming repartition, without which a row group's task would
    give one large block (i.e. one decode task for ~50,000 segments)."""
    import ray

    groups = ray.data.from_items([{"row_group": g} for g in range(info["row_groups"])])
    return groups.map_batches(
        _read_manifest,
        fn_kwargs={"uri": manifest_uri, "storage_options": cfg.storage_options},
        batch_size=1,
        batch_format="pyarrow",
        max_retries=MAX_PROCESS_DEATHS,
    ).repartition(target_num_rows_per_block=per_block)


def _todo(batch: pa.Table, base_dir: str, index, storage_options: dict) -> pa.Table:
    """Task UDF: manifest recordings → their segments not yet in the output."""
    return resume.todo_segments(batch, base_dir, resolve(index), storage_options)


def resolve(index):
    """A done index passed to a task as an object reference (``checks.done_index``), fetched."""
    import ray

    return ray.get(index) if isinstance(index, ray.ObjectRef) else index


def recordings_per_task(cfg: ExtractConfig, info: dict) -> int:
    """Manifest recordings per expanding task: about ``decode_batch_size`` segments, more for
    very large corpora (at most :data:`MAX_INPUT_BLOCKS` tasks)."""
    per_rec = max(1.0, info["segments"] / max(1, info["recordings"]))
    rows = max(cfg.decode_batch_size, -(-info["segments"] // MAX_INPUT_BLOCKS))
    return max(1, int(round(rows / per_rec)))


def build_manifest_dataset(
    cfg: ExtractConfig,
    manifest_uri: str,
    info: dict,
    index,
    placement: Placement,
    device=None,
):
    """manifest recordings (read by Ray) → segments still to do → decode → model actors."""
    ds = manifest_blocks(cfg, manifest_uri, info, recordings_per_task(cfg, info))
    ds = ds.map_batches(
        _todo,
        fn_kwargs={
            "base_dir": canonical.manifest_dir(manifest_uri),
            "index": index,
            "storage_options": cfg.storage_options,
        },
        batch_size=recordings_per_task(cfg, info),
        batch_format="pyarrow",
        max_retries=MAX_PROCESS_DEATHS,
    )
    ds = ds.map_batches(_decode, **stage_args("decode", cfg, placement))
    args = stage_args("model", cfg, placement, device)
    return ds.map_batches(ModelActor, **args)

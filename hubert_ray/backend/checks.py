"""Work over the written output in Ray tasks: the done index (resume), the summary's counts,
the completeness check against the manifest."""

from __future__ import annotations

import logging

from hubert_ray.backend.context import MAX_PROCESS_DEATHS
from hubert_ray.backend.dataset import recordings_per_task, resolve
from hubert_ray.core.config import ExtractConfig
from hubert_ray.corpus import canonical
from hubert_ray.dataset import resume
from hubert_ray.dataset.summary import summarize_parts

log = logging.getLogger("hubert_ray")


INDEX_PARTS_PER_TASK = 2_000
"""Part files each task of :func:`done_index` reads (25 tasks for the 50,000 parts of a
100 M-segment output)."""


def done_index(cfg: ExtractConfig):
    """``(ref, rows)``: a :class:`~hubert_ray.dataset.resume.DoneIndex` of
    ``cfg.output`` built by Ray tasks (one lists the part files, one per
    :data:`INDEX_PARTS_PER_TASK` parts reads their recording ids, one combines) and left in the
    object store, where the tasks that expand or check the manifest get it; and the rows it
    counts. The driver holds neither the index nor the part list
    (at 100 M segments its peak grew by ~200 MiB building them itself)."""
    import ray

    opts = cfg.storage_options
    remote = {"num_cpus": 1, "max_retries": MAX_PROCESS_DEATHS}
    files, count = ray.remote(num_returns=2, **remote)(_list_parts).remote(cfg.output, opts)
    count = ray.get(count)
    read = ray.remote(**remote)(_index_range)
    ranges = [
        read.remote(cfg.output, files, lo, min(count, lo + INDEX_PARTS_PER_TASK), opts)
        for lo in range(0, count, INDEX_PARTS_PER_TASK)
    ]
    combine = ray.remote(num_returns=2, **remote)(_combine_index)
    index, rows = combine.remote(cfg.output, files, *ranges)
    return index, ray.get(rows)


def _list_parts(uri: str, storage_options: dict) -> tuple[list[str], int]:
    """Task of :func:`done_index`: the part files, and their number."""
    files = resume.done_part_files(uri, storage_options)
    return files, len(files)


def _index_range(uri: str, files: list, lo: int, hi: int, storage_options: dict):
    """Task of :func:`done_index`: parts ``lo..hi`` per recording."""
    return resume.index_parts(uri, files, lo, hi, storage_options)


def _combine_index(uri: str, files: list, *ranges) -> tuple:
    """Task of :func:`done_index`: the index, and its rows."""
    index = resume.combine_index(uri, files, list(ranges))
    return index, index.rows


def summarize_output(cfg: ExtractConfig) -> dict:
    """:func:`~hubert_ray.dataset.summary.summarize_parts` of ``cfg.output`` in a task (it lists and
    reads every part file: at 100 M segments the driver's peak grew ~40 MiB doing it itself)."""
    import ray

    return ray.get(
        ray.remote(num_cpus=1, max_retries=MAX_PROCESS_DEATHS)(summarize_parts).remote(
            cfg.output, cfg.storage_options
        )
    )


def mean_segment_seconds(cfg: ExtractConfig, manifest_uri: str, info: dict) -> float | None:
    """The manifest's mean segment duration from a few of its row groups (a task: a row group
    of a large manifest holds millions of segments); ``None`` when unknown (then the model's
    calls are sized by the default rows)."""
    import ray

    if cfg.batch_size:  # rows set by the user: not needed
        return None
    task = ray.remote(num_cpus=1, max_retries=MAX_PROCESS_DEATHS)(canonical.mean_segment_seconds)
    return ray.get(task.remote(manifest_uri, info["row_groups"], cfg.storage_options))


CHECK_TASKS = 256
"""Most tasks of the summary's check: each reads the ids of its recordings from their part
files, so fewer, larger tasks read a part shared by neighbouring recordings fewer times."""


def check_output(cfg: ExtractConfig, manifest_uri: str, info: dict) -> dict:
    """Missing, duplicated and unexpected segments of the output against the manifest, in Ray
    tasks (each reads its recordings' ids from their part files); the driver holds one row per
    recording."""
    index, _ = done_index(cfg)
    per_task = max(recordings_per_task(cfg, info), -(-info["recordings"] // CHECK_TASKS))
    counts = _check_counts(cfg, manifest_uri, index, per_task)
    import ray

    task = ray.remote(num_cpus=1, max_retries=MAX_PROCESS_DEATHS)(_unexpected)
    stray = ray.get(task.remote(index, manifest_uri, cfg.storage_options))
    return {
        "segments_total": counts["segments"],
        "segments_missing": counts["segments"] - counts["written"],
        "segments_duplicated": counts["duplicated"],
        "segments_unexpected": counts["unexpected"] + stray,
    }


# Tasks the summary's check splits a manifest row group (10,000 recordings) into: each reads
# the whole row group, so more slices spread it over more CPUs at the price of reading it again.
CHECK_SLICES_PER_ROW_GROUP = 4


def _check_counts(cfg: ExtractConfig, manifest_uri: str, index, per_task: int) -> dict:
    """The summary's counts over the whole manifest: plain Ray tasks over slices of the
    manifest's row groups (at least ``per_task`` recordings each; a Ray Data pipeline for the
    same work cost seconds of start-up per run), summed as they finish; the driver holds a few
    integers per task."""
    import ray

    opts = cfg.storage_options
    task = ray.remote(num_cpus=1, max_retries=MAX_PROCESS_DEATHS)(_check_slice)
    if not isinstance(index, ray.ObjectRef):
        index = ray.put(index)  # once, not with every task
    refs = []
    for g, n in enumerate(canonical.row_group_sizes(manifest_uri, opts)):
        slices = min(-(-n // per_task), CHECK_SLICES_PER_ROW_GROUP)
        size = -(-n // max(1, slices))
        refs += [
            task.remote(manifest_uri, g, lo, min(n, lo + size), index, opts)
            for lo in range(0, n, size)
        ]
    keys = ("segments", "written", "duplicated", "unexpected")
    totals = dict.fromkeys(keys, 0)
    while refs:
        done, refs = ray.wait(refs, num_returns=len(refs), timeout=1.0)
        for counts in ray.get(done):
            for k in keys:
                totals[k] += counts[k]
    return totals


def _check_slice(uri: str, group: int, lo: int, hi: int, index, storage_options: dict) -> dict:
    """Task of :func:`_check_counts`: recordings ``lo..hi`` of row group ``group``."""
    rows = canonical.read_row_group(uri, group, storage_options).slice(lo, hi - lo)
    return resume.check_segments(rows, resolve(index), storage_options).to_pylist()[0]


def _unexpected(index, manifest_uri: str, storage_options: dict) -> int:
    """Task of :func:`check_output` (it reads every recording id of the manifest): rows under
    recordings the manifest lacks."""
    return resume.unexpected_recordings(index, manifest_uri, storage_options)

"""The job driver's memory at corpus scale: a rerun over a finished output of N segments.

    python -m benchmarks.driver_scale --segments 14600000 --json PATH [--per-recording 292]

Generates a validated canonical manifest (what ``hubert-ray prepare`` writes; 14.6 M segments is
WenetSpeech L) of N segments in recordings of ``--per-recording`` segments, and a finished
output holding one feature row per segment (the columns the driver and the summary read, no
features; parts of 2,000 rows, the job's ``rows_per_file``). Then, in a fresh process with
its own local Ray, runs what the job's driver does on a rerun: read the manifest's footer,
take transient errors out for retry, index what the output holds per recording (Ray tasks,
``checks.done_index``), run the tasks
that expand the manifest (every segment already written: nothing to do), stream the summary
and run its per-recording check; and reports that process's peak resident memory
(``ru_maxrss``; Ray's worker processes are separate) and the wall seconds of each step.
``--json`` writes the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, resource, sys, time
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
import ray
ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
from hubert_ray.dataset import output
from hubert_ray.backend import checks
from hubert_ray.backend import dataset
from hubert_ray.backend import extract
from hubert_ray.backend import placement
from hubert_ray.corpus import canonical
from hubert_ray.core.config import ExtractConfig

manifest, out = sys.argv[1], sys.argv[2]
cfg = ExtractConfig(manifest=manifest, model="-", output=out, num_gpus=0)
times = {}
peaks = {}
def peak():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
peaks["ray_started"] = peak()
t = time.perf_counter()
uri, table = extract.job_manifest(cfg)
info = canonical.manifest_info(uri)
assert table is None, "expected a validated canonical manifest"
times["manifest_footer"] = time.perf_counter() - t
peaks["manifest_footer"] = peak()
t = time.perf_counter()
retried = output.retry_transient_errors(out)
index, rows = checks.done_index(cfg)
times["done_index"] = time.perf_counter() - t
peaks["done_index"] = peak()
assert rows == info["segments"], (rows, info)
t = time.perf_counter()
placement = placement.Placement(1, False, cfg.model_config("cpu"), 16)
per_task = dataset.recordings_per_task(cfg, info)
todo = dataset.manifest_blocks(cfg, uri, info, per_task).map_batches(
    dataset._todo,
    fn_kwargs={"base_dir": canonical.manifest_dir(uri), "index": index, "storage_options": {}},
    batch_size=per_task,
    batch_format="pyarrow",
).count()
times["resume_expand"] = time.perf_counter() - t
peaks["resume_expand"] = peak()
assert todo == 0, todo
del index
t = time.perf_counter()
summary = checks.summarize_output(cfg)
times["summary_stream"] = time.perf_counter() - t
peaks["summary_stream"] = peak()
t = time.perf_counter()
summary.update(checks.check_output(cfg, uri, info))
times["summary_check"] = time.perf_counter() - t
peaks["summary_check"] = peak()
assert summary["segments_missing"] == summary["segments_duplicated"] == 0, summary
assert summary["segments_ok"] == info["segments"], summary
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps({
    "segments": info["segments"], "recordings": info["recordings"],
    "driver_peak_rss_mib": round(peak, 1),
    "seconds": {k: round(v, 1) for k, v in times.items()},
    "peak_rss_mib_after": peaks,
}))
"""


def _chunk(args: tuple) -> object:
    """Recordings ``g .. g+999``: their manifest rows (returned) and their feature parts
    (written), built column-wise (no Python object per segment)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from hubert_ray.corpus.manifest import CANONICAL_SCHEMA
    from hubert_ray.dataset import output

    g, n_rec, n_segments, per, feats, rows_per_part = args
    seg_type = CANONICAL_SCHEMA.field("segments").type
    recs = np.arange(g, min(n_rec, g + 1000))
    counts = np.minimum(per, n_segments - recs * per)
    rec_ids = pc.binary_join_element_wise(
        "Y", pc.utf8_lpad(pa.array(recs).cast(pa.string()), 7, "0"), ""
    )
    owner = np.repeat(np.arange(len(recs)), counts)
    within = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
    rec_of_seg = rec_ids.take(pa.array(owner))
    seg_ids = pc.binary_join_element_wise(
        rec_of_seg, pc.utf8_lpad(pa.array(within).cast(pa.string()), 5, "0"), "_S"
    )
    start = within * 3.0
    end = start + 2.5
    struct = pa.StructArray.from_arrays(
        [seg_ids, pa.array(start), pa.array(end)], fields=list(seg_type.value_type)
    )
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    audio = pc.binary_join_element_wise(
        "s3://corpus/audio/train/youtube/B00000/", rec_ids, ".opus", ""
    )
    n = owner.size
    rows = pa.table(
        {
            "segment_id": seg_ids,
            "recording_id": rec_of_seg,
            "start_s": pa.array(start),
            "end_s": pa.array(end),
            "num_frames": pa.array(np.full(n, 124, np.int32)),
            "compute_dtype": pa.array(["float16"]).take(pa.array(np.zeros(n, int))),
            "fallback_reason": pa.nulls(n, pa.string()),
        }
    )
    for k in range(0, n, rows_per_part):  # the job's parts: rows_per_file rows each
        pq.write_table(
            rows.slice(k, rows_per_part),
            os.path.join(feats, f"part-{g:08d}-{k:07d}.parquet"),
            **output.parquet_options(rows.schema),
        )
    return pa.table(
        [
            rec_ids,
            audio,
            pa.array(counts * 3.0),
            pa.ListArray.from_arrays(offsets, struct, type=seg_type),
        ],
        schema=CANONICAL_SCHEMA,
    )


def make_inputs(work: str, n_segments: int, per: int, rows_per_part: int = 2000) -> tuple[str, str]:
    """A validated canonical manifest and a finished output's feature parts, made by one
    process per CPU, chunks of 1,000 recordings."""
    from concurrent.futures import ProcessPoolExecutor

    import pyarrow.parquet as pq

    from hubert_ray.corpus.manifest import CANONICAL_SCHEMA, stamp
    from hubert_ray.dataset import output

    path = os.path.join(work, "manifest.parquet")
    feats = os.path.join(work, "out", output.FEATURES_DIR)
    os.makedirs(feats, exist_ok=True)
    n_rec = -(-n_segments // per)
    jobs = [(g, n_rec, n_segments, per, feats, rows_per_part) for g in range(0, n_rec, 1000)]
    schema = CANONICAL_SCHEMA.with_metadata(stamp())
    with ProcessPoolExecutor(os.cpu_count()) as pool, pq.ParquetWriter(path, schema) as w:
        for table in pool.map(_chunk, jobs):
            w.write_table(table.replace_schema_metadata(schema.metadata))
    return path, os.path.join(work, "out")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--segments", type=int, default=14_600_000)
    p.add_argument("--per-recording", type=int, default=292)
    p.add_argument("--json", help="write the result (JSON) to this file")
    p.add_argument("--workdir", help="where to generate the inputs (default: a temp dir)")
    p.add_argument("--inputs", help="keep the generated inputs in this directory; reused if there")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="driver-scale-", dir=args.workdir) as tmp:
        work = args.inputs or tmp
        t = time.perf_counter()
        path, out = os.path.join(work, "manifest.parquet"), os.path.join(work, "out")
        if not os.path.exists(path):
            path, out = make_inputs(work, args.segments, args.per_recording)
        gen = time.perf_counter() - t
        from benchmarks.trees import run_json

        result = run_json(CHILD, path, out)
        result["generate_seconds"] = round(gen, 1)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

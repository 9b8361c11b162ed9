"""What the job's driver does before and after the Ray stages, at corpus scale, for source
trees side by side in one run:

    python -m benchmarks.driver_scale --recordings 50000 --segments-per-recording 292 \\
        --trees OLD_TREE NEW_TREE

Generates a canonical Parquet manifest (what ``jobs.prepare`` writes from WenetSpeech.json;
50,000 x 292 = 14.6 M segments is WenetSpeech's size) and a finished output holding one feature
row per segment (ids and the columns the summary reads; no features), then times, in a fresh
process per tree: manifest -> segment table, decode blocks, the resume skip (every segment
already written) and the final summary; prints wall seconds per step and the process's peak
resident memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from benchmarks.trees import run_in_tree

CHILD = r"""
import resource, sys, time
import pyarrow as pa
import pyarrow.compute as pc
from hubert_ray import manifest, output
from hubert_ray.pipeline import segment_blocks

path, out = sys.argv[1], sys.argv[2]
times = {}
t = time.perf_counter()
if hasattr(manifest, "read_segments"):
    segments = manifest.read_segments(path)
else:  # a tree from before read_segments
    segments = manifest.segment_table(manifest.read_manifest(path))
times["manifest"] = time.perf_counter() - t
t = time.perf_counter()
blocks = segment_blocks(segments, 128)
times["blocks"] = time.perf_counter() - t
t = time.perf_counter()
done = output.done_segment_ids(out)
done = done if isinstance(done, (pa.Array, pa.ChunkedArray)) else pa.array(list(done))
todo = segments.filter(pc.invert(pc.is_in(segments.column("segment_id"), done)))
times["resume_skip"] = time.perf_counter() - t
t = time.perf_counter()
ids = segments.column("segment_id")
if not hasattr(manifest, "read_segments"):  # that tree's summarize (and run) took a list
    ids = ids.to_pylist()
summary = output.summarize(out, ids)
times["summary"] = time.perf_counter() - t
assert summary["segments_missing"] == 0 and todo.num_rows == 0, summary
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print("RESULT", segments.num_rows, len(blocks), *(f"{times[k]:.1f}" for k in times), f"{peak:.2f}")
"""


def make_inputs(work: str, n_rec: int, per: int) -> tuple[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hubert_ray import output
    from hubert_ray.manifest import CANONICAL_SCHEMA

    path = os.path.join(work, "manifest.parquet")
    feats = os.path.join(work, "out", output.FEATURES_DIR)
    os.makedirs(feats)
    with pq.ParquetWriter(path, CANONICAL_SCHEMA) as w:
        for g in range(0, n_rec, 1000):
            recs = range(g, min(n_rec, g + 1000))
            rec_ids = [f"Y{r:07d}" for r in recs]
            segs = [
                [
                    {"segment_id": f"{rid}_S{s:05d}", "start_s": s * 3.0, "end_s": s * 3.0 + 2.5}
                    for s in range(per)
                ]
                for rid in rec_ids
            ]
            audio = [f"s3://corpus/audio/train/youtube/B00000/{rid}.opus" for rid in rec_ids]
            duration = [per * 3.0] * len(rec_ids)
            w.write_table(pa.table([rec_ids, audio, duration, segs], schema=CANONICAL_SCHEMA))
            ids = [s["segment_id"] for row in segs for s in row]
            n = len(ids)
            pq.write_table(
                pa.table(
                    {
                        "segment_id": ids,
                        "start_s": [0.0] * n,
                        "end_s": [2.5] * n,
                        "num_frames": pa.array([124] * n, pa.int32()),
                        "compute_dtype": ["float16"] * n,
                        "fallback_reason": pa.array([None] * n, pa.string()),
                    }
                ),
                os.path.join(feats, f"part-{g:08d}.parquet"),
            )
    return path, os.path.join(work, "out")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recordings", type=int, default=50_000)
    p.add_argument("--segments-per-recording", type=int, default=292)
    p.add_argument("--trees", nargs="+", required=True)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="driver-scale-") as work:
        path, out = make_inputs(work, args.recordings, args.segments_per_recording)
        print(
            "| tree | segments | decode blocks | manifest s | blocks s | resume skip s "
            "| summary s | peak RSS GiB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for tree in args.trees:
            try:
                fields = run_in_tree(tree, CHILD, path, out)
            except RuntimeError as exc:
                print(f"| {tree} | failed: {str(exc).strip().splitlines()[-1:]} |")
                continue
            print(f"| {tree} | " + " | ".join(fields) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

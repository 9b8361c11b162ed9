"""How fast one core writes and reads chinese-hubert-base-sized feature parts.

    python -m benchmarks.write_rate [--rows 2000] [--layers 1] [--repeats 3] [--call-rows 256]
        [--batch-rows 2000,256,16] [--dir DIR]

At the GPU goal (20,000x realtime per GPU) a model actor emits ~1.5 GB/s of float16 features
(50 frames x 768 values x 2 bytes per audio second), and every byte goes through a write task's
Parquet encoder on a CPU core. This times, in one process (one core) and side by side:

* ``split``: ``output.split_block``, what the sink does to a model-stage block first;
* ``write_default``: ``pq.write_table`` with pyarrow's defaults (what the job did before);
* ``write_part``: ``output.write_part`` (the job's options: ``output.parquet_options``, record
  batches of ``output.WRITE_BATCH_ROWS`` rows); ``write_part_batch<N>``: N rows per batch;
* ``read_*``: ``pq.read_table`` of either file.

The table is what a write task gets: model-call outputs of 256 rows concatenated. Rows follow
the WenetSpeech-like mixed lengths of ``benchmarks.benchmark`` (mean 2.5 s); features are random
normal values (float16 mantissas do not compress, like real features). Prints
x-realtime per core (audio seconds per wall second) of each of ``--repeats`` alternating
rounds, and the ratios of the best.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.workloads import SR, make_lengths, numbers  # noqa: E402
from hubert_ray.core.chunking import num_frames  # noqa: E402
from hubert_ray.dataset import output  # noqa: E402
from hubert_ray.model.engine import Result  # noqa: E402
from hubert_ray.stages.extractor import assemble, features_array  # noqa: E402

HIDDEN = 768


def model_block(rows: int, layers: list[int], seed: int = 0) -> tuple[pa.Table, float]:
    """A model-stage output block as the actor returns it (all rows OK); its audio seconds."""
    lengths = make_lengths(2.5, True, rows * 2.5 * 1.2, seed)[:rows]
    frames = [num_frames(n) for n in lengths]
    rng = np.random.default_rng(seed)
    columns = {
        f"layer_{k}": features_array(
            rng.standard_normal((sum(frames), HIDDEN), dtype=np.float32).astype(np.float16),
            frames,
            [True] * rows,
            "float16",
        )
        for k in layers
    }
    ids = [f"Y{i:010d}_{i:06d}" for i in range(rows)]
    batch = pa.table(
        {
            "segment_id": ids,
            "recording_id": [s[:11] for s in ids],
            "start_s": [0.0] * rows,
            "end_s": [n / SR for n in lengths],
            "error_stage": pa.nulls(rows, pa.string()),
            "error_reason": pa.nulls(rows, pa.string()),
            "error_message": pa.nulls(rows, pa.string()),
        }
    )
    res = Result(
        features={},
        frames=frames,
        valid=[True] * rows,
        compute_dtype=["float16"] * rows,
        fallback=[None] * rows,
        precision=[None] * rows,
        errors={},
    )
    identity = {"model": "chinese-hubert-base", "model_revision": "0123456789abcdef"}
    block = assemble(batch, columns, frames, res, {**identity, "actor_id": "a"})
    return block, sum(lengths) / SR


def sink_block(rows: int, layers: list[int], call_rows: int = 256) -> tuple[pa.Table, float]:
    """What a write task gets: model-call outputs of ``call_rows`` rows (the job's default
    call size for one layer) concatenated; its audio seconds."""
    parts = [
        model_block(min(call_rows, rows - start), layers, seed=start)
        for start in range(0, rows, call_rows)
    ]
    return pa.concat_tables([b for b, _ in parts]), sum(a for _, a in parts)


def write_batches(rows: int, table: pa.Table, directory: str) -> None:
    """``output.write_part`` with ``rows`` rows per record batch instead of the job's."""
    default, output.WRITE_BATCH_ROWS = output.WRITE_BATCH_ROWS, rows
    try:
        output.write_part(table, directory, {"k": 1}, key="y")
    finally:
        output.WRITE_BATCH_ROWS = default


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2000, help="segments per part (the job's default)")
    p.add_argument("--layers", type=int, default=1, help="stored layers (feature columns)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--call-rows",
        type=int,
        default=256,
        help="rows per model call in the table (its chunks; default 256, the job's)",
    )
    p.add_argument(
        "--batch-rows",
        default="",
        help="extra write_part rows with these rows per record batch, e.g. 2000,256,16",
    )
    p.add_argument(
        "--dir",
        default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where to write (default: a memory file system when there is one, so disk "
        "write-back does not blur the encoder's CPU cost)",
    )
    args = p.parse_args(argv)
    layers = list(range(12 - args.layers + 1, 13))
    block, audio_s = sink_block(args.rows, layers, args.call_rows)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ok = output.split_block(block)[0]
        old, new = os.path.join(tmp, "default.parquet"), os.path.join(tmp, "new")
        new_file = os.path.join(new, "part-x.parquet")
        steps = {
            "split": lambda: output.split_block(block),
            "write_default": lambda: pq.write_table(ok, old),
            "write_part": lambda: output.write_part(ok, new, {"k": 1}, key="x"),
            **{
                f"write_part_batch{n}": functools.partial(write_batches, n, ok, new)
                for n in numbers(args.batch_rows, int)
            },
            "read_default": lambda: pq.read_table(old),
            "read_part": lambda: pq.read_table(new_file),
        }
        for _ in range(args.repeats):  # the steps alternate: drifts hit both alike
            for name, fn in steps.items():
                times.setdefault(name, []).append(timed(fn))
        sizes = {"default": os.path.getsize(old), "part": os.path.getsize(new_file)}
        column = f"layer_{layers[-1]}"
        assert pq.read_table(new_file).column(column).equals(ok.column(column))
    rates = {k: [round(audio_s / t) for t in v] for k, v in times.items()}
    best = {k: max(v) for k, v in rates.items()}
    result = {
        "rows": args.rows,
        "call_rows": args.call_rows,
        "layers": layers,
        "audio_s": round(audio_s, 1),
        "feature_mb": round(sum(ok.column(f"layer_{k}").nbytes for k in layers) / 1e6, 1),
        "dir": args.dir or tempfile.gettempdir(),
        "x_realtime_per_core": rates,
        "file_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()},
        "ratios_of_best": {
            "write_part / write_default": round(best["write_part"] / best["write_default"], 2),
            "read_part / read_default": round(best["read_part"] / best["read_default"], 2),
        },
        "pyarrow": pa.__version__,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

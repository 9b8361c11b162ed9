"""How fast one core writes and reads chinese-hubert-base-sized feature parts (issue #8).

    python benchmarks/write_rate.py [--rows 2000] [--layers 1] [--repeats 3]

At the GPU goal (20,000x realtime per GPU) a model actor emits ~1.5 GB/s of float16 features
(50 frames x 768 values x 2 bytes per audio second), and every byte goes through a write task's
Parquet encoder on a CPU core. This times, in one process (one core) and side by side:

* ``split``: ``output.split_block``, what the sink does to a model-stage block first;
* ``write_default``: ``pq.write_table`` with pyarrow's defaults (what the job did before);
* ``write_part``: ``output.write_part`` (the job's options: ``output.parquet_options``);
* ``read_*``: ``pq.read_table`` of either file.

Rows follow the WenetSpeech-like mixed lengths of ``jobs.benchmark`` (mean 2.5 s); features
are random normal values (float16 mantissas do not compress, like real features). Prints
x-realtime per core (audio seconds per wall second) and ratios, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hubert_ray import output  # noqa: E402
from hubert_ray.chunking import num_frames  # noqa: E402
from hubert_ray.extractor import HubertStage, features_array  # noqa: E402
from jobs.benchmark import SR, make_lengths  # noqa: E402

HIDDEN = 768


def model_block(rows: int, layers: list[int], seed: int = 0) -> tuple[pa.Table, float]:
    """A model-stage output block as the actor returns it (all rows OK); its audio seconds."""
    lengths = make_lengths(2.5, True, rows * 2.5 * 1.2, seed)[:rows]
    frames = [num_frames(n) for n in lengths]
    rng = np.random.default_rng(seed)
    columns = {
        k: features_array(
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
    stage = SimpleNamespace(  # what HubertStage._assemble reads of the stage
        layers=layers,
        model_name="chinese-hubert-base",
        revision="0123456789abcdef",
        config=SimpleNamespace(storage_dtype="float16"),
    )
    block = HubertStage._assemble(
        stage, batch, columns, frames, {i: "float16" for i in range(rows)}, set(), {}, [None] * rows
    )
    return block, sum(lengths) / SR


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2000, help="segments per part (the job's default)")
    p.add_argument("--layers", type=int, default=1, help="stored layers (feature columns)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    layers = list(range(12 - args.layers + 1, 13))
    block, audio_s = model_block(args.rows, layers)
    with tempfile.TemporaryDirectory() as tmp:
        ok = output.split_block(block)[0]
        old, new = os.path.join(tmp, "default.parquet"), os.path.join(tmp, "new")
        times = {
            "split": best_of(args.repeats, lambda: output.split_block(block)),
            "write_default": best_of(args.repeats, lambda: pq.write_table(ok, old)),
            "write_part": best_of(
                args.repeats, lambda: output.write_part(ok, new, {"k": 1}, key="x")
            ),
        }
        new_file = os.path.join(new, "part-x.parquet")
        times["read_default"] = best_of(args.repeats, lambda: pq.read_table(old))
        times["read_part"] = best_of(args.repeats, lambda: pq.read_table(new_file))
        sizes = {"default": os.path.getsize(old), "part": os.path.getsize(new_file)}
        assert (
            pq.read_table(new_file)
            .column(f"layer_{layers[-1]}")
            .equals(ok.column(f"layer_{layers[-1]}"))
        )
    rates = {k: round(audio_s / v) for k, v in times.items()}
    result = {
        "rows": args.rows,
        "layers": layers,
        "audio_s": round(audio_s, 1),
        "feature_mb": round(sum(ok.column(f"layer_{k}").nbytes for k in layers) / 1e6, 1),
        "x_realtime_per_core": rates,
        "file_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()},
        "ratios": {
            "write_part / write_default": round(rates["write_part"] / rates["write_default"], 2),
            "read_part / read_default": round(rates["read_part"] / rates["read_default"], 2),
        },
        "pyarrow": pa.__version__,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

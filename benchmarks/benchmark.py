"""Throughput / memory / precision benchmark: the seed recipe vs our actor path vs the pipeline.

    python -m benchmarks.benchmark [--device auto|cpu|cuda] [--arch tiny|base] [--model DIR]
        [--seconds 60] [--utt-seconds 10,mixed] [--batch-size 256] [--skip-pipeline] [--out DIR]

Measured side by side in one run, for each utterance-length distribution:

* ``seed_*``: the seed article's recipe: ``HubertModel.from_pretrained(dir)`` (``.half()`` on
  GPU; on CPU the model as-is in float32 *and* a ``.half()`` attempt), one utterance at a time,
  ``model(x).last_hidden_state`` under ``torch.no_grad()``, no padding, no chunking;
* ``plain_fp32_b1``: a plain FP32 loop (batch 1, ``inference_mode``) — the FP32 reference;
* ``stock_<dtype>_b<N>``: stock transformers batched as a user would (``.half()`` on GPU, N
  utterances in data order zero-padded to the longest, no attention mask): exact on equal
  lengths only, its error column shows what padding does otherwise;
* ``actor_<dtype>_b<B>``: :class:`hubert_ray.stages.extractor.ModelStage` called on pre-decoded
  batches in ``DECODED_SCHEMA`` (model only: exact padded batching, chunking, NaN guard);
* ``loop_<dtype>_b<B>`` / ``pipeline_<dtype>_b<B>``: the same generated corpus written as FLAC,
  once through a plain single-process loop (``DecodeStage`` then ``ModelStage``, no Ray, no
  Parquet writing) and once through the job (``hubert_ray.backend``) on local Ray (both timed end to
  end, model load included; Ray is started and warmed up before).

Each row reports x-realtime (audio seconds / wall seconds, after warm-up: a short input, then
one untimed pass over the same inputs when affordable, see ``Bench.timed``), peak memory
(GPU: ``torch.cuda.max_memory_allocated`` during the row, weights included; CPU: peak resident
set size sampled every 5 ms from ``/proc/self/statm`` minus the RSS at the row's start, i.e.
the row's working memory without the weights already loaded; n/a for the pipeline, whose model
runs in another process) and the relative L2 error ``sqrt(sum|a-b|^2 / sum|b|^2)`` of the last
layer's features vs the FP32 batch-1 reference on the same inputs (for chunked paths: the
reference run on the same chunks). Nothing is downloaded: ``--arch base`` is
``HubertConfig()`` (the chinese-hubert-base architecture) with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback

import numpy as np

from benchmarks.measure import Bench
from benchmarks.paths import (
    _first_line,
    chunked_reference,
    measure_pipeline,
    run_actor,
    run_stock,
    start_ray,
)
from benchmarks.tables import _loadavg, device_name, markdown, ratios, versions
from benchmarks.workloads import ARCHS, make_lengths, make_model, make_raw, numbers, parse_dists
from hubert_ray.core.stage_config import COMPILE_MODES, compute_dtype

SR = 16_000
MIXED_MIN_S, MIXED_MAX_S = 0.3, 20.0


# -- main -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.benchmark", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--arch",
        choices=ARCHS,
        default="tiny",
        help="random-weight model to generate (benchmarks.workloads.make_model): tiny, small "
        "(4 x 256), base6 (6 x 384), base (chinese-hubert-base's architecture), large "
        "(chinese-hubert-large's)",
    )
    p.add_argument("--model", help="use this save_pretrained directory instead of --arch")
    p.add_argument("--seconds", type=float, default=60.0, help="audio per measurement (s)")
    p.add_argument(
        "--utt-seconds",
        default="10,mixed",
        help="distributions: fixed lengths in s and/or mixed[:MEAN] (gamma, mean "
        "2.5 s, 0.3-20 s: WenetSpeech-like); default 10,mixed",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="rows per actor call (default 256, the job's default for one stored layer)",
    )
    p.add_argument(
        "--batch-sizes",
        default=None,
        help="extra actor batch sizes (FP16 on GPU, FP32 on CPU) to sweep (default 1,16,64 on "
        "GPU, none on CPU); "
        "below 64 rows the micro-batch budget is that many chunks",
    )
    p.add_argument(
        "--micro-batch-costs",
        default=None,
        help="extra actor rows (FP16 on GPU, FP32 on CPU) at these micro_batch_cost_seconds, "
        "e.g. 4,16,64 "
        "(default none: the rows use the job's default for the device)",
    )
    p.add_argument(
        "--dtypes",
        default=None,
        help="dtypes of the actor rows at --batch-size (default float32,float16,bfloat16, plus "
        "int8 on CPU; float16 is slow on most CPUs)",
    )
    p.add_argument(
        "--stock-batch",
        type=int,
        default=64,
        help="rows per forward of the stock-transformers batched row (stock_<dtype>_b<N>: "
        "zero-padded, no mask, as a user would batch; default 64; 0 or 1: no such row)",
    )
    p.add_argument("--chunk-seconds", type=float, default=10.0)
    p.add_argument(
        "--pipeline-dtype",
        default="auto",
        help="dtype of the loop/pipeline rows (auto: float16 GPU, float32 CPU)",
    )
    p.add_argument(
        "--pipeline-seconds",
        type=float,
        default=None,
        help="audio in the pipeline corpus per distribution (default --seconds)",
    )
    p.add_argument(
        "--pipeline-cpus-per-actor",
        type=float,
        default=None,
        help="CPU pipeline: Ray CPUs reserved by the model actor (default: the job's)",
    )
    p.add_argument(
        "--max-row-seconds",
        type=float,
        default=120.0,
        help="stop a timed row after this wall time (x-realtime from what ran)",
    )
    p.add_argument(
        "--min-row-seconds",
        type=float,
        default=2.0,
        help="repeat a short timed row in whole passes until this wall time (default 2)",
    )
    p.add_argument(
        "--pad-multiples",
        default="",
        help="extra actor rows (FP16 on GPU, FP32 on CPU) padding micro-batches to multiples "
        "of these seconds, e.g. 0,0.25 (default none: the job's default for the device)",
    )
    p.add_argument(
        "--compile-modes",
        default="",
        help="extra actor rows (FP16 on GPU, FP32 on CPU) with the forward torch.compiled in "
        "these modes, e.g. default,reduce-overhead (default none)",
    )
    p.add_argument(
        "--pipeline-calls",
        default="",
        help="extra pipeline rows with these calls in flight per model actor, e.g. 1,2 "
        "(default none: the job's default only)",
    )
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out", help="writes results.json and results.md here")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    import torch

    try:  # no "Loading weights" progress bars per model load
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    device = (
        "cuda"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    cuda = device == "cuda"
    dists = parse_dists(args.utt_seconds)
    sweep = (
        numbers(args.batch_sizes, int)
        if args.batch_sizes is not None
        else ([1, 16, 64] if cuda else [])
    )
    costs = numbers(args.micro_batch_costs, float)
    pads = numbers(args.pad_multiples, float)
    compiles = numbers(args.compile_modes, str.strip)
    dtypes = ["float32", "float16", "bfloat16"] + ([] if cuda else ["int8"])
    if args.dtypes is not None:
        dtypes = numbers(args.dtypes, str.strip)
    if set(compiles) - set(COMPILE_MODES[1:]):
        print(f"error: --compile-modes: one of {', '.join(COMPILE_MODES[1:])}", file=sys.stderr)
        return 2
    pdtype = compute_dtype(args.pipeline_dtype, cuda)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="hubert-bench-")
    bench = Bench(args, device)
    t_start = time.time()
    load_start = _loadavg()
    try:
        if args.model:
            model_dir = os.path.abspath(args.model)
        else:
            model_dir = make_model(args.arch, os.path.join(work, f"{args.arch}-hubert"))
        with open(os.path.join(model_dir, "config.json")) as f:
            n_layers = json.load(f).get("num_hidden_layers", 12)
        chunk_samples = int(round(args.chunk_seconds * SR))
        inputs_meta = {}
        sweep_dt = compute_dtype("auto", cuda)
        bench_b = args.max_row_seconds
        prepared = []  # (dist, items, FP32 references) for the actor rows
        for d_i, (dist, secs, mixed) in enumerate(dists):
            from hubert_ray.core.signal import normalise

            lengths = make_lengths(secs, mixed, args.seconds, args.seed + d_i)
            raw = make_raw(lengths, seed=args.seed * 100_000 + d_i * 10_000)
            items = [normalise(x) for x in raw]
            inputs_meta[dist] = {
                "items": len(items),
                "audio_s": sum(lengths) / SR,
                "mean_s": float(np.mean(lengths)) / SR,
                "max_s": max(lengths) / SR,
            }
            print(f"[bench] {dist}: {inputs_meta[dist]}", flush=True)
            # 2. plain FP32 batch-1 loop: the reference (never cut short by the time budget)
            refs = run_stock(
                bench, model_dir, items, None, dist, "plain_fp32_b1", "plain", "float32", None
            )
            if refs is None:
                raise RuntimeError("the FP32 reference loop failed")
            # 1. the seed recipe
            run_stock(
                bench, model_dir, items, refs, dist, "seed_fp16_b1", "seed", "float16", bench_b
            )
            if not cuda:
                run_stock(
                    bench, model_dir, items, refs, dist, "seed_fp32_b1", "seed", "float32", bench_b
                )
            if args.stock_batch > 1:  # stock transformers batched, as a user would
                name = f"stock_{sweep_dt}_b{args.stock_batch}"
                run_stock(
                    bench, model_dir, items, refs, dist, name, "stock", sweep_dt, bench_b,
                    batch=args.stock_batch,
                )  # fmt: skip
            prepared.append((dist, items, refs))
        # 3. our actor path on pre-decoded batches, after every stock row: once a CPU engine
        # has run its forwards at once in a process, a two-thread forward there uses about one
        # core (docs/performance.md)
        for dist, items, refs in prepared:
            cref = chunked_reference(model_dir, device, items, refs, chunk_samples)
            for dt in dtypes:
                run_actor(bench, model_dir, items, cref, dist, dt, args.batch_size, bench_b)
            for b in sweep:
                if b != args.batch_size:
                    run_actor(bench, model_dir, items, cref, dist, sweep_dt, b, bench_b)
            # variants of the default row, in the device's default dtype
            variants = [{"cost_s": c} for c in costs] + [{"pad_s": p} for p in pads]
            variants += [{"overlap": False}, {"null_model": True}]
            variants += [{"compile_mode": m} for m in compiles]  # last: compiling takes long
            for variant in variants:
                run_actor(
                    bench,
                    model_dir,
                    items,
                    cref,
                    dist,
                    sweep_dt,
                    args.batch_size,
                    bench_b,
                    **variant,
                )
            del refs, cref
            bench.release()
        del prepared

        # 4. pipeline on local Ray vs a plain single-process loop, same FLAC corpus
        if not args.skip_pipeline:
            ray = start_ray(cuda)
            try:
                for d_i, (dist, secs, mixed) in enumerate(dists):
                    try:
                        measure_pipeline(bench, model_dir, work, d_i, dist, secs, mixed, pdtype)
                    except Exception as exc:  # record it and carry on with the other rows
                        traceback.print_exc()
                        done = {r["name"] for r in bench.rows if r["dist"] == dist}
                        for path in ("loop", "pipeline"):
                            name = f"{path}_{pdtype}_b{args.batch_size}"
                            if name not in done:
                                bench.add(
                                    dist=dist,
                                    name=name,
                                    path=path,
                                    dtype=pdtype,
                                    batch_size=args.batch_size,
                                    status="failed",
                                    note=f"{type(exc).__name__}: {_first_line(exc)}",
                                )
            finally:
                ray.shutdown()

        result = {
            "meta": {
                "command": shlex.join(["python", "-m", "benchmarks.benchmark", *argv]),
                "device": device,
                "device_name": device_name(cuda),
                "arch": "model dir " + args.model if args.model else args.arch,
                "num_hidden_layers": n_layers,
                "layer": n_layers,
                "versions": versions(),
                "cpu_count": os.cpu_count(),
                "torch_threads": bench.torch_threads,
                "batch_size": args.batch_size,
                "batch_size_sweep": sweep,
                "chunk_seconds": args.chunk_seconds,
                "pipeline_dtype": pdtype,
                "distributions": [d[0] for d in dists],
                "inputs": inputs_meta,
                "memory_metric": (
                    "torch.cuda.max_memory_allocated during the row (MiB, weights included)"
                    if cuda
                    else "peak RSS sampled every 5 ms from /proc/self/statm minus RSS at the "
                    "row's start, over warm-up and timed passes (MiB: the row's working memory; "
                    "weights loaded before are not counted, except in the loop row, which "
                    "times its model load)"
                ),
                "pipeline_warmup_wall_s": bench.pipeline_warmup_s
                and round(bench.pipeline_warmup_s, 2),
                "total_wall_s": round(time.time() - t_start, 1),
                "load_average_start_end": [load_start, _loadavg()],
            },
            "rows": bench.rows,
            "ratios": ratios(bench.rows, args.batch_size, pdtype),
        }
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = markdown(result)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"[bench] wrote {args.out}/results.json and results.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the sampled FP32 rechecks cost the model engine, side by side in one run:

    python -m benchmarks.audit_cost [--device cpu|cuda] [--arch small] [--seconds 600]
        [--rates 0.01,0.1] [--json PATH]

WenetSpeech-like mixed lengths (mean 2.5 s), calls of ``--rows`` rows, the reduced dtype
(float16 on CUDA, bfloat16 on CPU). One engine per sample rate plus one with the rechecks off,
their calls interleaved (a busy machine slows all of them alike). Per rate: the rows checked,
the engines' wall seconds against the one without checks (ratio), and the rechecks' share of
the device time as the engine measures it (``audit_device_s`` against ``forward_device_s``:
the figure the job's summary reports as ``precision.audit_device_share``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="small")
    p.add_argument("--seconds", type=float, default=600.0, help="audio per engine")
    p.add_argument("--rows", type=int, default=64, help="rows per call")
    p.add_argument("--rates", default="0.01,0.1", help="sample rates (comma separated)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch

    from benchmarks.workloads import make_lengths, make_model, make_raw, numbers
    from hubert_ray.core.config import ModelConfig, PrecisionConfig
    from hubert_ray.core.signal import normalise
    from hubert_ray.model.engine import Engine

    dtype = "float16" if args.device == "cuda" else "bfloat16"
    lengths = make_lengths(2.5, True, args.seconds, seed=0)
    audio = [normalise(x) for x in make_raw(lengths, seed=0)]
    ids = [f"seg-{i:06d}" for i in range(len(audio))]
    rates = numbers(args.rates, float)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(args.arch, os.path.join(tmp, args.arch))
        engines = {}
        for rate in [0.0, *rates]:
            # limits no segment reaches: the cost of checking is measured, not of fallbacks
            checks = PrecisionConfig(
                precision_sample_rate=rate, precision_warn=1.0, precision_limit=1.0
            )
            config = ModelConfig(
                model_uri=model, layers="last", dtype=dtype, device=args.device, precision=checks
            )
            engines[rate] = Engine(config, model, self_test=False)
        for engine in engines.values():  # warm-up call (not counted)
            engine.run(ids[: args.rows], audio[: args.rows])
            for key in ("forward_device_s", "audit_device_s"):
                engine.stats[key] = 0.0
        wall = dict.fromkeys(engines, 0.0)
        checked = dict.fromkeys(engines, 0)
        for lo in range(0, len(ids), args.rows):
            for rate, engine in engines.items():
                t0 = time.perf_counter()
                res = engine.run(ids[lo : lo + args.rows], audio[lo : lo + args.rows])
                if args.device == "cuda":
                    torch.cuda.synchronize()
                wall[rate] += time.perf_counter() - t0
                checked[rate] += sum(1 for m in res.precision if m)
    base = wall[0.0]
    rows = []
    for rate, engine in engines.items():
        fwd, audit = engine.stats["forward_device_s"], engine.stats["audit_device_s"]
        rows.append(
            {
                "sample_rate": rate,
                "segments_checked": checked[rate],
                "wall_s": round(wall[rate], 2),
                "wall_vs_no_checks": round(wall[rate] / base, 3),
                "audit_device_share": round(audit / (fwd + audit), 4) if fwd + audit else 0.0,
            }
        )
    result = {
        "device": args.device,
        "arch": args.arch,
        "dtype": dtype,
        "segments": len(ids),
        "audio_s": round(sum(lengths) / 16_000, 1),
        "rows_per_call": args.rows,
        "rates": rows,
    }
    print("| sample rate | checked | wall s | vs no checks | recheck share of device time |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['sample_rate']:g} | {r['segments_checked']} | {r['wall_s']} "
            f"| {r['wall_vs_no_checks']} | {r['audit_device_share']:.2%} |"
        )
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What precision assurance costs a model actor: the self-test (seconds, once per actor) and
the positional convolution in FP32 (per forward), side by side in one run.

    python -m benchmarks.self_test_cost --device cpu --arch base --dtypes bfloat16,float16

Prints one JSON object: per dtype, the self-test's seconds and result, and the forward time of
a padded batch with the positional convolution in the compute dtype vs in FP32 (ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def forward_seconds(nets: dict, xs, device, dtype, iters: int) -> dict:
    """Best forward time of each of ``nets`` on the same padded batch, the variants
    interleaved round by round (a busy machine slows all of them alike)."""
    import torch

    from hubert_ray.core.chunking import pad_batch

    pad, lengths = pad_batch(xs)
    x = torch.from_numpy(pad).to(device)
    x = x.to(getattr(torch, dtype)) if dtype in ("float16", "bfloat16") else x
    best = dict.fromkeys(nets, float("inf"))
    for round_ in range(iters + 1):  # round 0 warms up
        for key, net in nets.items():
            t0 = time.perf_counter()
            net(x, lengths, (net.num_hidden_layers,))
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                best[key] = min(best[key], time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.workloads import ARCHS, make_model
    from hubert_ray.core.config import ModelConfig
    from hubert_ray.core.selftest import calibration_signals
    from hubert_ray.model.encoder import load_model
    from hubert_ray.model.engine import Engine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="base", choices=ARCHS)
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--batch", type=int, default=4, help="padded items per timed forward")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model = make_model(args.arch, os.path.join(tempfile.mkdtemp(), args.arch))
    xs = calibration_signals(10.0)[: args.batch]
    result = {"device": args.device, "arch": args.arch, "torch": torch.__version__, "rows": []}
    for dtype in args.dtypes.split(","):
        cfg = ModelConfig(model_uri=model, dtype=dtype, device=args.device)
        engine = Engine(cfg, model)
        st = engine.self_test_report
        nets = {pos: load_model(model, device, dtype, fp32_pos_conv=pos) for pos in (False, True)}
        times = forward_seconds(nets, xs, device, dtype, args.iters)
        row = {
            "dtype": dtype,
            "self_test_seconds": st["seconds"],
            "self_test_audio_seconds": st["audio_seconds"],
            "self_test_worst_rel_l2": st["worst_rel_l2"],
            "self_test_action": st["action"],
            "forward_s_pos_conv_compute_dtype": round(times[False], 4),
            "forward_s_pos_conv_fp32": round(times[True], 4),
            "fp32_pos_conv_cost_ratio": round(times[True] / times[False], 3),
        }
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

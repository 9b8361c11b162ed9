"""The first conv layer's masked GroupNorm: one stock call per item (the previous way) against
:func:`hubert_ray.model.encoder.masked_group_norm` (a fixed handful of launches), side by side.

    python -m benchmarks.group_norm [--device cpu|cuda] [--batches 8,32,64] [--seconds 10]

chinese-hubert-base's first layer (512 channels, 512 groups, 3,200 steps per second), items of
mixed lengths (half to all of ``--seconds``). Per batch size: the operators each way runs
(top-level ``aten::`` calls in ``torch.profiler`` that are not views: on CUDA about one
kernel launch each), the best time of ``--iters``, and
the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import json
import time

# Operators that make a view or wrap a host value: no kernel.
VIEWS = {
    "aten::unsqueeze",
    "aten::view",
    "aten::slice",
    "aten::select",
    "aten::lift_fresh",
    "aten::detach_",
    "aten::expand",
    "aten::alias",
    "aten::as_strided",
}


def per_item(h, lengths, norm):
    """The previous masked GroupNorm: the stock kernel on each item's valid steps."""
    import torch.nn.functional as F

    args = (norm.num_groups, norm.weight, norm.bias, norm.eps)
    for i, n in enumerate(lengths):
        if n > 0:
            h[i, :, :n] = F.group_norm(h[i : i + 1, :, :n], *args)[0]
        h[i, :, max(n, 0) :] = 0
    return h


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", default="8,32,64")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from hubert_ray.model.encoder import masked_group_norm

    device = torch.device(args.device)
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(512, 512).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    t = int(args.seconds * 3200)
    rows = []
    for b in [int(v) for v in args.batches.split(",")]:
        lengths = [int(t * (0.5 + 0.5 * i / max(1, b - 1))) for i in range(b)]
        x = torch.randn(b, 512, t, device=device) + 0.3
        row = {"batch": b}
        outs = {}
        for name, fn in (("per_item", per_item), ("batched", masked_group_norm)):
            best = float("inf")
            with torch.inference_mode():
                for _ in range(args.iters + 1):
                    h = x.clone()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    outs[name] = fn(h, lengths, norm)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - t0)
                h = x.clone()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    fn(h, lengths, norm)
            ops = sum(
                1
                for e in prof.events()
                if e.name.startswith("aten::") and e.cpu_parent is None and e.name not in VIEWS
            )
            row[f"{name}_ms"] = round(best * 1e3, 2)
            row[f"{name}_aten_ops"] = ops
        row["max_abs_diff"] = float((outs["per_item"] - outs["batched"]).abs().max())
        rows.append(row)
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

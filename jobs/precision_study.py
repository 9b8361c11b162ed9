"""Measure reduced-precision error per layer and what keeping LayerNorms in FP32 buys.

    python -m jobs.precision_study [--device cuda] [--arch base|tiny] [--model DIR] [--out DIR]

For each compute dtype (float16, bfloat16; int8 on CPU) with and without FP32 LayerNorms, runs
the same inputs through :class:`hubert_ray.model.ExactHubert` and compares every layer with the
FP32 run (relative L2 over each utterance, then mean and max; minimum per-frame cosine), and
times the forward at one batch size (x realtime). Writes ``precision.json`` and
``precision.md``. ``--arch base`` is ``HubertConfig()`` (chinese-hubert-base's architecture)
with random weights unless ``--model`` names a real checkpoint; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

from hubert_ray.chunking import pad_batch


def build_model(arch: str, root: str) -> str:
    from hubert_ray.synth import make_tiny_model

    if arch == "tiny":
        return make_tiny_model(os.path.join(root, "tiny"))
    import torch
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    path = os.path.join(root, "base-random")
    HubertModel(HubertConfig()).eval().save_pretrained(path, safe_serialization=True)
    return path


def inputs(n: int, seconds: float, seed: int = 0) -> list[np.ndarray]:
    from hubert_ray.audio import normalise
    from hubert_ray.synth import synth_signal

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        dur = seconds if i % 2 == 0 else float(rng.uniform(1.0, seconds))
        out.append(normalise(synth_signal(dur, 16000, 1, seed=seed + i)[:, 0]))
    return out


def run(net, xs, layers, device, dtype):
    import torch

    pad, lengths = pad_batch(xs)
    t = torch.from_numpy(pad).to(device)
    if dtype in ("float16", "bfloat16"):
        t = t.to(getattr(torch, dtype))
    out, fl = net(t, lengths, layers)
    return {k: [out[k][i, : fl[i]].float().cpu().numpy() for i in range(len(xs))] for k in out}


def timed(net, xs, device, dtype, iters: int) -> float:
    """Seconds per forward of the padded batch, last layer only, no copy to the host."""
    import torch

    pad, lengths = pad_batch(xs)
    t = torch.from_numpy(pad).to(device)
    if dtype in ("float16", "bfloat16"):
        t = t.to(getattr(torch, dtype))
    top = (net.num_hidden_layers,)
    net(t, lengths, top)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        net(t, lengths, top)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main(argv: list[str] | None = None) -> int:
    import torch

    from hubert_ray.model import load_hubert
    from hubert_ray.precision import compare

    p = argparse.ArgumentParser(prog="python -m jobs.precision_study")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--arch", default="tiny", choices=["tiny", "base"])
    p.add_argument("--model", help="a real checkpoint directory instead of random weights")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default="precision_out")
    args = p.parse_args(argv)

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    root = tempfile.mkdtemp(prefix="hubert-prec-")
    model_dir = args.model or build_model(args.arch, root)
    ref_net = load_hubert(model_dir, device, "float32")
    layers = tuple(range(ref_net.num_hidden_layers + 1))
    xs = inputs(args.batch, args.seconds)
    audio_s = sum(len(x) for x in xs) / 16000
    ref = run(ref_net, xs, layers, device, "float32")
    results = [
        {
            "dtype": "float32",
            "fp32_norms": False,
            "x_realtime": audio_s / timed(ref_net, xs, device, "float32", args.iters),
        }
    ]
    del ref_net
    variants = [("float16", False), ("float16", True), ("bfloat16", False), ("bfloat16", True)]
    if not use_cuda:
        variants.append(("int8", False))
    for dtype, fp32_norms in variants:
        try:
            net = load_hubert(model_dir, device, dtype, fp32_norms=fp32_norms)
            got = run(net, xs, layers, device, dtype)
            sec = timed(net, xs, device, dtype, args.iters)
        except Exception as e:  # e.g. an op without a CPU half kernel
            results.append({"dtype": dtype, "fp32_norms": fp32_norms, "error": repr(e)[:200]})
            continue
        per_layer = {}
        for k in layers:
            m = [compare(got[k][i], ref[k][i]) for i in range(len(xs))]
            per_layer[str(k)] = {
                "rel_l2_mean": float(np.mean([x["rel_l2"] for x in m])),
                "rel_l2_max": float(np.max([x["rel_l2"] for x in m])),
                "cos_min": float(np.min([x["cos_min"] for x in m])),
            }
        results.append(
            {
                "dtype": dtype,
                "fp32_norms": fp32_norms,
                "x_realtime": audio_s / sec,
                "layers": per_layer,
            }
        )
        del net
    meta = {
        "device": torch.cuda.get_device_name() if use_cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "arch": args.arch,
        "model": args.model or "random weights",
        "batch": args.batch,
        "seconds": args.seconds,
        "audio_seconds": audio_s,
        "command": "python -m jobs.precision_study " + " ".join(argv or sys.argv[1:]),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "precision.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    last = str(layers[-1])
    mid = str(layers[len(layers) // 2])
    lines = [
        f"device: {meta['device']}; arch: {args.arch} ({meta['model']}); batch {args.batch}, "
        f"up to {args.seconds:g} s; torch {torch.__version__}",
        "",
        f"| dtype | FP32 LayerNorms | x realtime | rel. error layer {mid} (mean / max) "
        f"| rel. error layer {last} (mean / max) | min cosine layer {last} |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['dtype']} | {r['fp32_norms']} | failed: {r['error']} | | | |")
        elif "layers" not in r:
            lines.append(f"| float32 | – | {r['x_realtime']:,.0f} | reference | reference | 1 |")
        else:
            a, b = r["layers"][mid], r["layers"][last]
            lines.append(
                f"| {r['dtype']} | {r['fp32_norms']} | {r['x_realtime']:,.0f} | "
                f"{a['rel_l2_mean']:.2e} / {a['rel_l2_max']:.2e} | "
                f"{b['rel_l2_mean']:.2e} / {b['rel_l2_max']:.2e} | {b['cos_min']:.5f} |"
            )
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "precision.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure reduced-precision error per layer and what keeping LayerNorms in FP32 buys.

    python -m benchmarks.precision_study [--device cuda] [--arch base|tiny] [--model DIR]
        [--out DIR]

For each compute dtype (float16, bfloat16; int8 on CPU) with and without FP32 LayerNorms, runs
the same inputs through ``model.encoder.ExactEncoder`` and compares every layer with the
FP32 run (relative L2 over each utterance, then mean and max; minimum per-frame cosine), times
the forward at one batch size (x realtime) and splits its time into the conv frontend, the
projection with the positional convolution, and the transformer layers. Writes
``precision.json`` and ``precision.md``. ``--arch base`` is ``HubertConfig()``
(chinese-hubert-base's architecture) with random weights unless ``--model`` names a real
checkpoint; nothing is downloaded.
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

from benchmarks.workloads import ARCHS, make_model, numbers
from hubert_ray.core.chunking import pad_batch


def inputs(n: int, seconds: float, seed: int = 0) -> list[np.ndarray]:
    from hubert_ray.core.signal import normalise, synth_signal

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        dur = seconds if i % 2 == 0 else float(rng.uniform(1.0, seconds))
        out.append(normalise(synth_signal(dur, 16000, 1, seed=seed + i)[:, 0]))
    return out


def padded(xs, device, dtype):
    """The utterances as one zero-padded batch on ``device`` in ``dtype``, and their lengths."""
    import torch

    pad, lengths = pad_batch(xs)
    t = torch.from_numpy(pad).to(device)
    if dtype in ("float16", "bfloat16"):
        t = t.to(getattr(torch, dtype))
    return t, lengths


def run(net, xs, layers, device, dtype):
    t, lengths = padded(xs, device, dtype)
    out, fl = net(t, lengths, layers)
    return {k: [out[k][i, : fl[i]].float().cpu().numpy() for i in range(len(xs))] for k in out}


def timed(net, xs, device, dtype, iters: int) -> float:
    """Seconds per forward of the padded batch, last layer only, no copy to the host."""
    import torch

    t, lengths = padded(xs, device, dtype)
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


PHASES = (
    "conv 1 + GroupNorm + GELU",
    "convs 2-7",
    "projection + positional conv",
    "transformer layers",
)


def phase_split(net, xs, device, dtype, iters: int) -> dict:
    """Where one forward's time goes: ms per forward in each of :data:`PHASES` (boundaries
    marked by module hooks with CUDA events on a GPU, so nothing waits in between; wall clock
    on a CPU). Same inputs and layers as :func:`timed`."""
    import torch

    cuda = device.type == "cuda"
    marks: list = []

    def mark(*_):
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append(ev)
        else:
            marks.append(time.perf_counter())

    first = net._time_norm.conv if net._time_norm is not None else net._convs[0]
    layers = net.model.encoder.layers[: net.num_hidden_layers]
    hooks = [
        first.register_forward_pre_hook(mark),
        net._convs[0].register_forward_pre_hook(mark),
        net._convs[-1].register_forward_hook(mark),
        layers[0].register_forward_pre_hook(mark),
        layers[-1].register_forward_hook(mark),
    ]
    t, lengths = padded(xs, device, dtype)
    top = (net.num_hidden_layers,)
    try:
        net(t, lengths, top)  # warm-up
        marks.clear()
        for _ in range(iters):
            net(t, lengths, top)
        if cuda:
            torch.cuda.synchronize()
    finally:
        for h in hooks:
            h.remove()
    if len(marks) != 5 * iters:  # a wrapped model that skips one of the hooked modules
        raise RuntimeError(f"{len(marks)} phase marks for {iters} forwards, expected 5 each")
    ms = [0.0] * 4
    for i in range(iters):
        m = marks[5 * i : 5 * i + 5]
        for k in range(4):
            ms[k] += m[k].elapsed_time(m[k + 1]) if cuda else 1e3 * (m[k + 1] - m[k])
    total = sum(ms)
    return {name: {"ms": v / iters, "share": v / total} for name, v in zip(PHASES, ms, strict=True)}


def main(argv: list[str] | None = None) -> int:
    import torch

    from hubert_ray.core.precision import compare
    from hubert_ray.model.encoder import load_model

    p = argparse.ArgumentParser(prog="python -m benchmarks.precision_study")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--arch", default="tiny", choices=ARCHS)
    p.add_argument("--model", help="a real checkpoint directory instead of random weights")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument(
        "--dtypes",
        default=None,
        help="reduced dtypes to compare with FP32, e.g. float16 (default float16,bfloat16, "
        "plus int8 on CPU; float16 is slow on most CPUs)",
    )
    p.add_argument("--out", default="precision_out")
    args = p.parse_args(argv)

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    root = tempfile.mkdtemp(prefix="hubert-prec-")
    model_dir = args.model or make_model(args.arch, os.path.join(root, args.arch))
    ref_net = load_model(model_dir, device, "float32")
    layers = tuple(range(ref_net.num_hidden_layers + 1))
    xs = inputs(args.batch, args.seconds)
    audio_s = sum(len(x) for x in xs) / 16000
    ref = run(ref_net, xs, layers, device, "float32")
    results = [
        {
            "dtype": "float32",
            "fp32_norms": False,
            "x_realtime": audio_s / timed(ref_net, xs, device, "float32", args.iters),
            "phases": phase_split(ref_net, xs, device, "float32", args.iters),
        }
    ]
    del ref_net
    dtypes = ["float16", "bfloat16"] + ([] if use_cuda else ["int8"])
    if args.dtypes is not None:
        dtypes = numbers(args.dtypes, str.strip)
    variants = [(d, norms) for d in dtypes for norms in (False, True) if d != "int8" or not norms]
    for dtype, fp32_norms in variants:
        try:
            net = load_model(model_dir, device, dtype, fp32_norms=fp32_norms)
            got = run(net, xs, layers, device, dtype)
            sec = timed(net, xs, device, dtype, args.iters)
            phases = None if fp32_norms else phase_split(net, xs, device, dtype, args.iters)
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
                "phases": phases,
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
        "command": "python -m benchmarks.precision_study " + " ".join(argv or sys.argv[1:]),
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
    lines += [
        "",
        "Where the forward's time goes (ms per forward, share; "
        f"{sum(len(x) for x in xs) / 16000:.0f} s of audio in {len(xs)} padded rows):",
        "",
        "| dtype | " + " | ".join(PHASES) + " |",
        "|---|" + "---|" * len(PHASES),
    ]
    for r in results:
        if r.get("phases"):
            cells = [f"{r['phases'][n]['ms']:.1f} ({r['phases'][n]['share']:.0%})" for n in PHASES]
            lines.append(f"| {r['dtype']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "precision.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

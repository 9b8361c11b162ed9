"""Cost of assigning units in the model stage, against the forward it sits next to:

    python -m benchmarks.units_cost [--device cpu|cuda] [--k 500] [--rows 4] [--repeats 3]

chinese-hubert-base's architecture (random weights), ``--rows`` x 10 s rows, layer 9 stored
(float16 storage, the default). Times (best of ``--repeats``): one model-stage call without
units; the same call with a ``--k`` centroid file for layer 9; and the assignment alone
(``hubert_ray.units.centroids.assign`` on the call's frames, on the device). Prints the assignment's
share of the faster of the two calls (the goal: at most 2 % of the forward at K = 500).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", type=int, default=500)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default=None, help="compute dtype (default: float16 on CUDA)")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch

    from benchmarks.workloads import decoded_table, make_model, make_raw
    from hubert_ray.core.config import ModelConfig, PrecisionConfig
    from hubert_ray.core.signal import normalise
    from hubert_ray.model.encoder import model_revision
    from hubert_ray.stages.extractor import ModelStage
    from hubert_ray.units import centroids as units

    cuda = args.device == "cuda"
    dtype = args.dtype or ("float16" if cuda else "float32")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def best(fn) -> float:
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    with tempfile.TemporaryDirectory() as work:
        model = make_model("base", os.path.join(work, "base"))
        rng = np.random.default_rng(0)
        km = units.save(
            os.path.join(work, "km.safetensors"),
            rng.standard_normal((args.k, 768)).astype(np.float32),
            {"model": "base", "model_revision": model_revision(model), "layer": 9},
        )
        table = decoded_table([normalise(x) for x in make_raw([160_000] * args.rows, 0)], "bench")
        common = dict(
            model_uri=model,
            layers="9",
            dtype=dtype,
            device=args.device,
            precision=PrecisionConfig(precision_sample_rate=0.0),
        )
        plain = ModelStage(ModelConfig(**common))
        with_units = ModelStage(ModelConfig(**common, units=(km,), store="both"))
        plain(table), with_units(table)  # warm-up
        t_plain = best(lambda: plain(table))
        t_units = best(lambda: with_units(table))
        out = with_units(table)
        frames = sum(out.column("num_frames").to_pylist())
        feats = torch.randn(frames, 768, device=args.device).to(torch.float16)
        c, c_sq = units.prepare(units.load(km).centroids, torch.device(args.device))
        t_assign = best(lambda: units.assign(feats, c, c_sq))
        print(
            "| device | compute dtype | rows x 10 s | frames | K | stage call, s "
            "| with units, s | assignment alone, s | assignment / call |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        print(
            f"| {args.device} | {dtype} | {args.rows} | {frames} | {args.k} | {t_plain:.3f} "
            f"| {t_units:.3f} | {t_assign:.4f} | {100 * t_assign / min(t_plain, t_units):.2f} % |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

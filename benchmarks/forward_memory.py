"""Peak memory of one model call of ``--rows`` x 10 s rows (chinese-hubert-base's architecture,
random weights, float32 on CPU), for source trees side by side:

    python -m benchmarks.forward_memory --trees OLD_TREE NEW_TREE [--rows 16]

Each tree runs in its own subprocess (that tree first on ``PYTHONPATH``): ``ModelStage`` on CPU,
one call, peak resident set size above the RSS before the call (sampled every 5 ms, as the
benchmark's CPU rows do). A target bounds an actor's GPU memory at the chosen batch
(default: 64 x 10 s per forward); on CPU the same activations are float32, twice their FP16
size, so this shows what a change does to the forward's peak, not the GPU's number.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from benchmarks.trees import run_in_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = r"""
import sys
sys.path.append(sys.argv[3])  # this repository's benchmarks; the tree's own hubert_ray first
from benchmarks.measure import PeakMemory
from benchmarks.workloads import decoded_table, make_raw
from hubert_ray.core.signal import normalise
from hubert_ray.core.config import ModelConfig
from hubert_ray.stages.extractor import ModelStage
model, rows = sys.argv[1], int(sys.argv[2])
table = decoded_table([normalise(x) for x in make_raw([160000] * rows, 0)], "m")
stage = ModelStage(ModelConfig(model_uri=model, dtype="float32", device="cpu"))
with PeakMemory(False) as mem:
    stage(table)
print(f"RESULT {mem.peak_mib:.0f}")
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", nargs="+", required=True, help="source trees to compare")
    p.add_argument("--rows", type=int, default=16, help="10 s rows in the call")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    from benchmarks.workloads import make_model

    with tempfile.TemporaryDirectory() as work:
        model = make_model("base", os.path.join(work, "base"))
        print("| tree | rows x 10 s | peak RSS above the start, MiB |\n|---|---|---|")
        for tree in args.trees:
            try:
                (peak,) = run_in_tree(tree, CHILD, model, str(args.rows), ROOT)
            except RuntimeError as exc:
                print(exc, file=sys.stderr)
                return 1
            print(f"| {os.path.abspath(tree)} | {args.rows} | {peak} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

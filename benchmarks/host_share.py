"""The model actor's own work per call, with the model replaced by ``NullHubert`` (zero
features of the right shapes), for two source trees side by side in one run:

    python -m benchmarks.host_share --trees OLD_TREE NEW_TREE [--arch tiny] [--repeats 2]

Each tree runs in its own subprocess (imports come from that tree), alternately, on the same
generated WenetSpeech-like mixed batch of ~256 rows; prints ms per call and x-realtime. On a CPU
the "device" work (zero outputs, casts, copies) runs on the host too, so this is an upper bound
of the host's share; on a GPU it is the host's share itself.
"""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks.trees import run_in_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = r"""
import os, sys, tempfile, time
import torch
# NullHubert and the input generators from this repository's benchmarks (a tree being compared
# may predate them; its own hubert_ray comes first on the path)
sys.path.append(sys.argv[4])
from benchmarks.paths import NullHubert
from benchmarks.workloads import decoded_table, make_lengths, make_model, make_raw
from hubert_ray.core.signal import normalise
from hubert_ray.core.config import ModelConfig
from hubert_ray.stages.extractor import ModelStage

arch, device, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
work = tempfile.mkdtemp()
model = make_model(arch, os.path.join(work, "m"))
lengths = make_lengths(2.5, True, 256 * 2.3, 0)[:256]
batch = decoded_table([normalise(x) for x in make_raw(lengths, 0)], "x")
stage = ModelStage(ModelConfig(model_uri=model, layers="last", dtype="float16" if device ==
    "cuda" else "float32", device=device))
stage.engine.net = NullHubert(stage.engine.net, 768)
stage.engine.audit = False
stage.engine.hidden = 768  # chinese-hubert-base's output size, whatever --arch computes
stage(batch)
t0 = time.perf_counter()
for _ in range(calls):
    stage(batch)
if device == "cuda":
    torch.cuda.synchronize()
wall = (time.perf_counter() - t0) / calls
audio = sum(lengths) / 16000
print(f"RESULT {batch.num_rows} {audio:.1f} {wall * 1e3:.2f} {audio / wall:.0f}")
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", nargs="+", required=True, help="source trees to compare")
    p.add_argument("--arch", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    print("| tree | rows | audio s | ms per call | x realtime |\n|---|---|---|---|---|")
    for _ in range(args.repeats):
        for tree in args.trees:
            rows, audio, ms, xrt = run_in_tree(
                tree, CHILD, args.arch, args.device, str(args.calls), ROOT
            )
            print(f"| {tree} | {rows} | {audio} | {ms} | {xrt} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

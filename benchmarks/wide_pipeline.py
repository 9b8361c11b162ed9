"""The whole pipeline around a model that is cheap but as wide as chinese-hubert-base, for
source trees side by side:

    python -m benchmarks.wide_pipeline --trees OLD_TREE NEW_TREE [--seconds 7200] [--repeats 2]

On a GPU node the model is fast and every stage around it (decode, the actor's own work, moving
features through the object store, Parquet writing) needs to keep up with ~1.5 GB/s of float16
features per GPU at the 20,000x goal. The tiny test model's 32-dim features hide that cost;
this runs ``extract.run`` on local Ray with a random HuBERT of hidden size 768 whose compute is
small (8 conv channels, no transformer layer: the stored layer is 0), on one generated corpus of
WenetSpeech-like mixed-length FLAC, once per tree per repeat (alternating, each in a fresh
process with its own local Ray, that tree first on ``PYTHONPATH``). Prints the wall time of
``extract.run`` (model load included) and x-realtime.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from benchmarks.trees import run_in_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = r"""
import os, sys, time
import ray
manifest, model, out = sys.argv[1:4]
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
from hubert_ray.backend import extract
from hubert_ray.core.config import ExtractConfig
cfg = ExtractConfig(manifest=manifest, model=model, output=out, num_gpus=0)
t = time.perf_counter()
summary = extract.run(cfg, overwrite=True)
wall = time.perf_counter() - t
assert summary["segments_missing"] == summary["segments_duplicated"] == 0, summary
print(f"RESULT {summary['segments_ok']} {summary['audio_seconds']:.1f} {wall:.2f} "
      f"{summary['audio_seconds'] / wall:.0f} {summary.get('object_store_spilled_mib')}")
"""

WIDE = dict(
    hidden_size=768,  # chinese-hubert-base's output size
    num_hidden_layers=0,  # layers="last" stores layer 0 (the encoder input)
    num_attention_heads=1,
    intermediate_size=8,
    conv_dim=(8,) * 7,
    num_conv_pos_embeddings=2,
    num_conv_pos_embedding_groups=768,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", nargs="+", required=True, help="source trees to compare")
    p.add_argument("--seconds", type=float, default=7200.0, help="audio in the corpus")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    from benchmarks.workloads import make_lengths, make_raw, write_corpus
    from hubert_ray.testing.synth import make_tiny_model

    work = tempfile.mkdtemp(prefix="wide-pipeline-")
    model = make_tiny_model(os.path.join(work, "wide-hubert"), **WIDE)
    lengths = make_lengths(2.5, True, args.seconds, 0)
    manifest = write_corpus(os.path.join(work, "corpus"), make_raw(lengths, 0), "mixed")
    print(f"{len(lengths)} segments, {sum(lengths) / 16000:.0f} s of FLAC; {os.cpu_count()} CPUs")
    print("| tree | segments | audio s | wall s | x realtime | spilled MiB |")
    print("|---|---|---|---|---|---|")
    for _ in range(args.repeats):
        for tree in args.trees:
            try:
                fields = run_in_tree(tree, CHILD, manifest, model, os.path.join(work, "out"))
            except RuntimeError as exc:
                print(exc, file=sys.stderr)
                return 1
            print(f"| {os.path.abspath(tree)} | " + " | ".join(fields) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

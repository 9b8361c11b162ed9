"""Discrete units from a feature dataset written by ``hubert-ray extract``.

    hubert-ray kmeans learn --features OUT --layer L --k K --sample-hours H \
        --output km.safetensors
    hubert-ray kmeans assign --features OUT --km km.safetensors --output UNITS
    hubert-ray kmeans export --units UNITS --manifest M --output PREFIX

``learn`` reads a deterministic, recording-stratified sample of one layer (memory bounded by the
sample, never the dataset), runs k-means (torch: k-means++ and Lloyd, on the GPU when there
is one, else on the CPU; or ``--backend sklearn``: scikit-learn MiniBatchKMeans with fairseq's
simple_kmeans parameters) and writes the centroids with their provenance. ``assign`` writes
the units of every segment of a feature dataset as a Ray job (one task per part; a rerun
resumes).
``export`` writes fairseq's label layout (``.tsv`` + ``.km``, plus ``.ids``) in the manifest's
order. Bad input exits 2 with a message naming the option; missing segments in ``export`` exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from hubert_ray.core.errors import ConfigError, ManifestError


def _json_option(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        msg = f"not valid JSON ({exc.msg}); expected an object"
        raise argparse.ArgumentTypeError(msg) from None


def build_parser() -> argparse.ArgumentParser:
    from hubert_ray.units.kmeans import BACKENDS, DEVICES

    p = argparse.ArgumentParser(prog="hubert-ray kmeans", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--storage-options", type=_json_option, default=None, help="fsspec options as JSON"
    )

    learn = sub.add_parser("learn", parents=[common], help="learn centroids on a sample")
    learn.add_argument(
        "--features", required=True, help="output dir of hubert-ray extract (or URL)"
    )
    learn.add_argument("--layer", type=int, required=True, help="stored layer to cluster")
    learn.add_argument("--k", type=int, required=True, help="number of clusters (<= 65536)")
    learn.add_argument("--sample-hours", type=float, required=True, help="hours of frames")
    learn.add_argument("--output", required=True, help="centroid file (.safetensors)")
    learn.add_argument("--seed", type=int, default=0, help="sample and k-means seed (0)")
    learn.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="k-means implementation: torch (k-means++ + Lloyd on the device) or sklearn "
        "(MiniBatchKMeans, CPU); auto: torch",
    )
    learn.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where k-means runs; auto: cuda when torch sees a GPU, else cpu",
    )
    learn.add_argument("--n-init", type=int, default=None, help="inits, best kept (20)")
    learn.add_argument("--max-iter", type=int, default=None, help="iterations / epochs (100)")
    learn.add_argument("--batch-size", type=int, default=None, help="sklearn only (10000)")
    learn.add_argument("--max-no-improvement", type=int, default=None, help="sklearn only (100)")
    learn.add_argument(
        "--tol",
        type=float,
        default=None,
        help="torch: stop when an iteration lowers the inertia by less than this fraction "
        "(1e-4); sklearn: MiniBatchKMeans's tol (0)",
    )

    assign = sub.add_parser("assign", parents=[common], help="units of a feature dataset")
    assign.add_argument(
        "--features", required=True, help="output dir of hubert-ray extract (or URL)"
    )
    assign.add_argument("--km", required=True, help="centroid file")
    assign.add_argument("--output", required=True, help="units dataset directory")
    assign.add_argument("--num-gpus", type=int, default=0, help="1 = assign on GPUs if any")
    assign.add_argument("--overwrite", action="store_true", help="replace an existing output")

    export = sub.add_parser("export", parents=[common], help="fairseq .tsv/.km label files")
    export.add_argument("--units", required=True, help="units dataset (assign or extract)")
    export.add_argument("--manifest", required=True, help="manifest giving the line order")
    export.add_argument("--output", required=True, help="prefix: writes PREFIX.tsv/.km/.ids")
    export.add_argument("--layer", type=int, default=None, help="unit layer (default: highest)")
    export.add_argument(
        "--skip-missing", action="store_true", help="leave out segments without units"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    so = args.storage_options or {}
    if not isinstance(so, dict):
        print("error: --storage-options: expected a JSON object", file=sys.stderr)
        return 2
    try:
        if args.command == "learn":
            from hubert_ray.units import kmeans

            params = {
                k: getattr(args, k)
                for k in ("batch_size", "max_iter", "n_init", "max_no_improvement", "tol")
                if getattr(args, k) is not None
            }
            prov = kmeans.learn(
                args.features,
                args.layer,
                args.k,
                args.sample_hours,
                args.output,
                seed=args.seed,
                storage_options=so,
                backend=args.backend,
                device=args.device,
                **params,
            )
            print(json.dumps(prov, indent=2))
            return 0
        if args.command == "assign":
            from hubert_ray.backend import assign

            summary = assign.run_assign(
                args.features, args.km, args.output, so, args.num_gpus, args.overwrite
            )
            print(json.dumps(summary, indent=2))
            return 0
        from hubert_ray.units import kmeans

        try:
            done = kmeans.export_fairseq(
                args.units, args.manifest, args.output, args.layer, args.skip_missing, so
            )
        except ValueError as exc:
            if "have no units" in str(exc):
                print(f"error: {exc}", file=sys.stderr)
                return 1
            raise
        print(json.dumps(done, indent=2))
        return 0
    except ConfigError as e:
        option = f"--{e.field.replace('_', '-')}: " if e.field else ""
        print(f"error: {option}{e}", file=sys.stderr)
        return 2
    except ManifestError as e:
        print(f"error: --manifest: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

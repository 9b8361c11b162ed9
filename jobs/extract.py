"""Run the extraction job.

    python -m jobs.extract --manifest M --model DIR --output OUT [--layers 6,9,12]
        [--dtype float16] [--chunk-seconds 10] [--batch-size 64] [--num-gpus N] [--config FILE]

Options may also come from a YAML/JSON file (``--config``; keys are the option names with
``_`` or ``-``); command-line options override the file. Under ``ray job submit`` the job joins
the cluster named by ``RAY_ADDRESS``; otherwise it starts Ray locally. Bad options exit with
code 2 and a message naming the option and what is allowed; a precision breach under
``--on-precision-breach fail`` exits 3; a worker process that keeps dying on the same work
(past the job's retries) exits 4; missing or duplicated segments at the end exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from hubert_ray.config import ExtractConfig
from hubert_ray.errors import ConfigError, ManifestError, WorkerDeathError


def _json_option(text: str):
    """argparse type for JSON options; its error never echoes the value (it may hold secrets)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({exc.msg} at column {exc.colno}); expected a JSON object"
        ) from None


# option -> (type, help); every option maps to the ExtractConfig field of the same name.
OPTIONS: dict[str, tuple[type, str]] = {
    "manifest": (str, "manifest: JSONL, Parquet (raw or canonical) or fairseq TSV; path or URL"),
    "model": (str, "model directory (save_pretrained, safetensors); path or URL"),
    "output": (str, "output directory; path or URL"),
    "layers": (str, "layers to store: 'last' (default), 'all', or e.g. 6,9,12 (0 = CNN proj.)"),
    "dtype": (
        str,
        "compute dtype: auto (float16 on GPU, float32 on CPU), float16, bfloat16, "
        "float32, int8 (CPU dynamic quantisation)",
    ),
    "storage_dtype": (str, "stored feature dtype: float16 (default) or float32"),
    "chunk_seconds": (float, "split segments longer than this into chunks (default 10)"),
    "batch_size": (int, "segments per model-actor call (default 256 // stored layers, >= 16)"),
    "max_batch_samples": (int, "padded-sample budget of one forward micro-batch"),
    "micro_batch_cost_seconds": (
        float,
        "cost of one forward micro-batch in seconds of padded audio; the packer trades "
        "padding against micro-batches (default: 1 on CPU, 16 on GPU)",
    ),
    "pad_multiple_seconds": (
        float,
        "pad each forward micro-batch to a multiple of this many seconds, so shapes repeat "
        "(default: 0 on CPU = to the longest item, 0.25 on GPU)",
    ),
    "compile": (
        str,
        "torch.compile the model actors' forward: none (default), default, reduce-overhead "
        "(CUDA graphs), max-autotune, max-autotune-no-cudagraphs; each actor compiles once",
    ),
    "num_gpus": (int, "model actors on GPUs (default: all GPUs in the cluster; 0 = CPU)"),
    "num_cpu_actors": (int, "model actors when running on CPU (default 1)"),
    "cpus_per_actor": (float, "Ray CPUs reserved per CPU model actor (default 1)"),
    "torch_threads": (int, "torch threads per CPU model actor (default: cpus_per_actor)"),
    "calls_per_actor": (
        int,
        "Ray tasks per model actor at once; the model runs one at a time, the others' "
        "input/output transfers overlap it (default: 2 on GPU, 1 on CPU)",
    ),
    "decode_batch_size": (
        int,
        "segments per decode batch (default 128); decode tasks take whole recordings",
    ),
    "decode_memory_mb": (int, "memory reserved per decode task, MiB (default 1024)"),
    "rows_per_file": (int, "rows per output Parquet file (default 2000)"),
    "end_tolerance_s": (float, "clip segment ends past the audio end by at most this (0.1)"),
    "precision_sample_rate": (float, "fraction of segments rechecked in FP32 (default 0.01)"),
    "precision_warn": (float, "relative error that logs a warning (default 0.005)"),
    "precision_limit": (float, "relative error that triggers --on-precision-breach (0.02)"),
    "on_precision_breach": (str, "fallback (recompute in FP32, default), fail, warn"),
    "units": (
        str,
        "centroid file (python -m jobs.kmeans learn) adding a units_<layer> column (uint16 per "
        "frame) computed next to the forward; repeatable or comma-separated, one per layer",
    ),
    "store": (
        str,
        "what the feature parts hold: features, units (no continuous features) or both "
        "(default: both with --units, else features)",
    ),
    "units_form": (
        str,
        "frames (units_<layer>: one id per frame, default), runs (units_<layer>_dedup + "
        "units_<layer>_durations: run-length form) or both",
    ),
    "storage_options": (
        _json_option,
        "fsspec storage options as JSON, e.g. '{\"endpoint_url\": …}'",
    ),
}


REPEATABLE = {"units"}  # options that may be given several times (their values add up)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors already exit 2; keep its format
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m jobs.extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML or JSON file with any of the options below")
    for name, (typ, help_) in OPTIONS.items():
        more = {"action": "append"} if name in REPEATABLE else {}
        p.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_, **more
        )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dataset")
    p.add_argument(
        "--allow-pickle-weights",
        action="store_true",
        default=None,
        help="load pickle (.bin) model weights; they can run arbitrary code when loaded",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def load_config_file(path: str) -> dict:
    import fsspec
    import yaml

    with fsspec.open(path, "r") as f:
        data = yaml.safe_load(f)  # YAML is a superset of JSON
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path!r} must hold a mapping of option: value", field="config"
        )
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(OPTIONS) - {"overwrite", "allow_pickle_weights"})
    if unknown:
        raise ConfigError(
            f"config file {path!r}: unknown option(s) {unknown}; allowed: {sorted(OPTIONS)}",
            field="config",
        )
    return data


def config_from_args(args: argparse.Namespace) -> tuple[ExtractConfig, bool]:
    values = load_config_file(args.config) if args.config else {}
    overwrite = bool(values.pop("overwrite", False)) or args.overwrite
    values.update({k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None})
    if args.allow_pickle_weights:
        values["allow_pickle_weights"] = True
    missing = [k for k in ("manifest", "model", "output") if not values.get(k)]
    if missing:
        raise ConfigError(
            f"missing required option(s): {', '.join('--' + m for m in missing)}", field=missing[0]
        )
    return ExtractConfig(**values), overwrite


def _precision_breach(exc: BaseException) -> str | None:
    """The precision-breach message inside a (Ray-wrapped) exception chain, if any.

    Ray re-raises an actor's exception as ``RayTaskError(UserCodeException)``, which keeps the
    original message but not always its type, so the message marker is what is matched."""
    from hubert_ray.precision import BREACH_MARKER

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if BREACH_MARKER in text:
            return text[text.index(BREACH_MARKER) :].splitlines()[0]
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg, overwrite = config_from_args(args)
        from hubert_ray import pipeline

        if args.quiet:
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
        summary = pipeline.run(cfg, overwrite=overwrite)
    except ConfigError as e:
        option = f"--{e.field.replace('_', '-')}: " if e.field else ""
        print(f"error: {option}{e}", file=sys.stderr)
        return 2
    except ManifestError as e:
        print(f"error: --manifest: {e}", file=sys.stderr)
        return 2
    except WorkerDeathError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except Exception as e:
        breach = _precision_breach(e)
        if breach is None:
            raise
        print(f"error: {breach}", file=sys.stderr)
        return 3
    shown = {k: v for k, v in summary.items() if k != "config"}
    print(json.dumps(shown, indent=2))
    print(
        f"features: {cfg.output.rstrip('/')}/features  errors: {cfg.output.rstrip('/')}/errors"
        f"  summary: {cfg.output.rstrip('/')}/_summary.json"
        f"  report: {cfg.output.rstrip('/')}/report.html"
    )
    bad = summary["segments_missing"] + summary["segments_duplicated"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Capacity planner: expected wall time and node counts for a corpus on a given cluster.

    hubert-ray plan --hours 10000 --gpus 8 --decode-cores 352 [--format opus|flac]
        [--gpu-rate X] [--decode-rate X] [--decode-profile host|reference|measured]
        [--layers 1] [--write-rate X] [--gpus-per-node 8] [--cores-per-node 16] [--json]

The job is a pipeline: decode (CPU tasks) feeds the model actors (one per GPU), so its speed is
the slower of the two stages: ``min(gpus x gpu_rate, decode_cores x decode_rate)`` seconds of
audio per second. The write tasks (Parquet encoding of the features) need cores of their own,
``throughput x layers / write_rate``, on any node; the plan reports them. Rates come from
:mod:`hubert_ray.core.rates` (each printed with where it was measured) unless given.
``--decode-cores`` counts every core given to decoding (CPU-only nodes plus spare cores on GPU
nodes). Not modelled: start-up (cluster, model load), the manifest read, object-storage
bandwidth, and stragglers at the end; treat the result as a lower bound.
Bad options exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from hubert_ray.core import rates


def plan(
    hours: float,
    gpus: int,
    decode_cores: int,
    fmt: str = "opus",
    gpu_rate: float | None = None,
    decode_rate: float | None = None,
    decode_profile: str = rates.DEFAULT_DECODE_PROFILE,
    gpus_per_node: int = 8,
    cores_per_node: int = 16,
    layers: int = 1,
    write_rate: float | None = None,
) -> dict:
    """The plan as a dict (see the module doc for the model)."""
    if gpu_rate is None:
        gpu = rates.GPU_RATES[rates.DEFAULT_GPU_RATE]
        gpu_rate, gpu_source = gpu.x_realtime, gpu.source
    else:
        gpu_source = "given (--gpu-rate)"
    if decode_rate is None:
        dec = rates.DECODE_RATES[decode_profile][fmt]
        decode_rate, decode_source = dec.x_realtime, dec.source
    else:
        decode_source = "given (--decode-rate)"
    if write_rate is None:
        write_rate, write_source = rates.WRITE_RATE.x_realtime, rates.WRITE_RATE.source
    else:
        write_source = "given (--write-rate)"
    audio_s = hours * 3600.0
    gpu_x = gpus * gpu_rate
    decode_x = decode_cores * decode_rate
    x = min(gpu_x, decode_x)
    wall_s = audio_s / x
    balanced_cores = math.ceil(gpu_x / decode_rate)
    return {
        "hours": hours,
        "audio_seconds": audio_s,
        "format": fmt,
        "gpus": gpus,
        "gpu_rate": gpu_rate,
        "gpu_rate_source": gpu_source,
        "model_stage_x_realtime": gpu_x,
        "decode_cores": decode_cores,
        "decode_rate_per_core": decode_rate,
        "decode_rate_source": decode_source,
        "decode_stage_x_realtime": decode_x,
        "x_realtime": x,
        "bottleneck": "decode" if decode_x < gpu_x else "gpu",
        "gpu_busy_fraction": x / gpu_x,
        "wall_seconds": wall_s,
        "wall_hours": wall_s / 3600.0,
        "gpu_hours": gpus * wall_s / 3600.0,
        "gpu_nodes": math.ceil(gpus / gpus_per_node),
        "gpus_per_node": gpus_per_node,
        "decode_nodes": math.ceil(decode_cores / cores_per_node),
        "cores_per_node": cores_per_node,
        "decode_cores_to_saturate_gpus": balanced_cores,
        "decode_nodes_to_saturate_gpus": math.ceil(balanced_cores / cores_per_node),
        "layers": layers,
        "write_rate_per_core_per_layer": write_rate,
        "write_rate_source": write_source,
        "write_cores": math.ceil(x * layers / write_rate),
    }


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def render(p: dict) -> str:
    lines = [
        f"{p['hours']:,.0f} h of {p['format']} audio ({p['audio_seconds']:,.0f} s)",
        f"  model stage : {p['gpus']} GPU(s) x {p['gpu_rate']:,.0f}x = "
        f"{p['model_stage_x_realtime']:,.0f}x realtime  [{p['gpu_rate_source']}]",
        f"  decode stage: {p['decode_cores']} core(s) x {p['decode_rate_per_core']:,.1f}x = "
        f"{p['decode_stage_x_realtime']:,.0f}x realtime  [{p['decode_rate_source']}]",
        f"  write tasks : {p['write_cores']:,} core(s) for {p['layers']} stored layer(s) at "
        f"{p['write_rate_per_core_per_layer']:,.0f}x per core per layer, on any node  "
        f"[{p['write_rate_source']}]",
        f"  throughput  : {p['x_realtime']:,.0f}x realtime; bottleneck: {p['bottleneck']}; "
        f"GPUs {100 * p['gpu_busy_fraction']:.0f}% busy",
        f"  wall time   : {_duration(p['wall_seconds'])} ({p['wall_seconds']:,.0f} s), "
        f"{p['gpu_hours']:,.1f} GPU-hours",
        f"  nodes       : {p['gpu_nodes']} GPU node(s) of {p['gpus_per_node']} GPUs + "
        f"{p['decode_nodes']} CPU-only decode node(s) of {p['cores_per_node']} cores",
        f"  to keep {p['gpus']} GPU(s) busy: {p['decode_cores_to_saturate_gpus']:,} decode cores "
        f"({p['decode_nodes_to_saturate_gpus']} nodes of {p['cores_per_node']})",
    ]
    return "\n".join(lines)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hubert-ray plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--hours", type=_positive(float), required=True, help="hours of audio")
    p.add_argument("--gpus", type=_positive(int), required=True, help="GPUs (model actors)")
    p.add_argument(
        "--decode-cores", type=_positive(int), required=True, help="CPU cores decoding audio"
    )
    p.add_argument("--format", choices=rates.FORMATS, default="opus", help="audio format")
    p.add_argument("--gpu-rate", type=_positive(float), help="x realtime per GPU (override)")
    p.add_argument(
        "--decode-rate", type=_positive(float), help="x realtime per decode core (override)"
    )
    p.add_argument(
        "--decode-profile",
        choices=sorted(rates.DECODE_RATES),
        default=rates.DEFAULT_DECODE_PROFILE,
        help="which stored per-core rates: host (default: the whole job's host cost per audio "
        "hour, benchmarks.host_capacity), reference (a reference node's decoding), or measured "
        "(benchmarks.measure_decode's decode tasks)",
    )
    p.add_argument("--layers", type=_positive(int), default=1, help="stored layers")
    p.add_argument(
        "--write-rate",
        type=_positive(float),
        help="x realtime per write core per stored layer (override)",
    )
    p.add_argument("--gpus-per-node", type=_positive(int), default=8)
    p.add_argument("--cores-per-node", type=_positive(int), default=16)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    p = plan(
        args.hours,
        args.gpus,
        args.decode_cores,
        fmt=args.format,
        gpu_rate=args.gpu_rate,
        decode_rate=args.decode_rate,
        decode_profile=args.decode_profile,
        gpus_per_node=args.gpus_per_node,
        cores_per_node=args.cores_per_node,
        layers=args.layers,
        write_rate=args.write_rate,
    )
    print(json.dumps(p, indent=2) if args.json else render(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput rates the capacity planner (``hubert-ray plan``) works from, with provenance.

A rate is "x realtime": seconds of audio processed per second of wall time, per GPU (model
stage) or per CPU core (decode stage). Every rate says where it was measured; the planner
prints that next to its answer.
"""

from __future__ import annotations

from dataclasses import dataclass

REFERENCE = "reference measurement, H100, 16-core node"


@dataclass(frozen=True)
class Rate:
    x_realtime: float
    unit: str  # "gpu" or "core"
    source: str


GPU_RATES: dict[str, Rate] = {
    # Model stage alone, random weights with chinese-hubert-base's architecture.
    "fp16-batch64": Rate(9_720.0, "gpu", f"{REFERENCE}: FP16, batch 64 x 10 s"),
    "bf16-batch64": Rate(9_853.0, "gpu", f"{REFERENCE}: BF16, batch 64 x 10 s"),
    "fp32-batch1": Rate(1_315.0, "gpu", f"{REFERENCE}: FP32, batch 1"),
    "fp16-batch1": Rate(684.0, "gpu", f"{REFERENCE}: FP16 .half(), batch 1"),
    # A naive Ray Data pipeline end to end (FLAC) on one H100 node (GPUs per node not recorded):
    # what the design improves on, not a per-GPU planning rate.
    "naive-pipeline": Rate(
        1_080.0, "gpu", f"{REFERENCE}: naive Ray Data pipeline, FLAC, end to end"
    ),
}
# What this job's model actor measured (docs/performance.md): the planning default, since it
# is what a run achieves today; the reference rates above are what the model itself allows.
GPU_RATES["actor-fp16-batch16"] = Rate(
    3_254.0,
    "gpu",
    "measured 2026-11-28 on an H200: hubert-ray's model actor, FP16, batch 16 x 10 s, "
    "random weights (docs/performance.md)",
)
DEFAULT_GPU_RATE = "actor-fp16-batch16"

DECODE_RATES: dict[str, dict[str, Rate]] = {
    # ~3,500x / ~26,000x per 16-core node.
    "reference": {
        "opus": Rate(3_500.0 / 16, "core", f"{REFERENCE}: ~3,500x per node"),
        "flac": Rate(26_000.0 / 16, "core", f"{REFERENCE}: ~26,000x per node"),
    },
    # python -m benchmarks.measure_decode (3 x 60 s, 16 kHz mono, median of 5 rounds; Opus at
    # libsndfile's default ~28 kbit/s, like WenetSpeech's files): a decode task's whole work
    # (DecodeStage: decode, cut WenetSpeech-like segments, check, normalise, Arrow), which the
    # decode alone outruns by 5 % (Opus, 751x) and 31 % (FLAC, 5,480x).
    "measured": {
        "opus": Rate(
            713.2,
            "core",
            "measured 2026-11-28 on a 2-vCPU x86_64 cloud VM, "
            "python -m benchmarks.measure_decode: decode tasks, 16 kHz mono Opus ~28 kbit/s",
        ),
        "flac": Rate(
            4_167.7,
            "core",
            "measured 2026-11-28 on a 2-vCPU x86_64 cloud VM, "
            "python -m benchmarks.measure_decode: decode tasks, 16 kHz mono FLAC 16-bit",
        ),
    },
}
# The whole job's host cost per audio hour (decode, cut, normalise, transfers, the model actor's
# host work, writing), steady state, with an infinitely fast simulated device: what one CPU
# core of a node supplies per GPU. python -m benchmarks.host_capacity (median of 3 rounds;
# benchmarks/results/2026-12-06-host-capacity/): Opus 8.5 CPU-s per audio hour (decoding alone
# 5.0), FLAC 3.0 (decoding alone 0.68).
_HOST = (
    "measured 2026-12-06 on a 2-vCPU AMD EPYC VM (shared, loaded), python -m "
    "benchmarks.host_capacity: the whole job's host CPU per audio hour, steady, 10-minute "
    "16 kHz recordings in WenetSpeech-like segments"
)
DECODE_RATES["host"] = {
    "opus": Rate(3600 / 8.5, "core", f"{_HOST}, Ogg Opus: 8.5 CPU-s per audio hour"),
    "flac": Rate(3600 / 3.0, "core", f"{_HOST}, FLAC: 3.0 CPU-s per audio hour"),
}
DEFAULT_DECODE_PROFILE = "host"
# Write tasks: Parquet parts of one stored 768-dim float16 layer (output.write_part), per core;
# a run storing k layers needs k times the cores. (pyarrow's default options, dictionary
# encoding and statistics on every feature value, measured 658-850x: ~3.5x the cores.)
WRITE_RATE = Rate(
    2_739.0,
    "core",
    "measured 2026-11-28 on a 2-vCPU x86_64 cloud VM, python -m "
    "benchmarks.write_rate: one 768-dim float16 layer, WenetSpeech-like segments, "
    "median of 5 rounds",
)
FORMATS = ("opus", "flac")

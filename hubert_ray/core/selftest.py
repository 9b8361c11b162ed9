"""The precision self-test every model actor runs before its first batch (numpy only).

Reduced precision can be wrong for reasons no code review sees: a broken kernel for one shape
on one CPU (oneDNN's AMX bfloat16 path for HuBERT's grouped positional convolution), a model
whose activations underflow float16, a new driver or library version. So each actor measures
its own arithmetic on its own device before trusting it: a fixed, speech-like calibration input
of several lengths (padding inside a micro-batch, and one item long enough to be chunked) goes
through the compute dtype and through FP32, with the same packing as real work; per layer the
relative L2 error and the cosine similarity of the frames are compared with the precision limit.
The engine applies the breach policy to the whole actor (``Engine.self_test``).
"""

from __future__ import annotations

import math

import numpy as np

from hubert_ray.core.config import SAMPLE_RATE_HZ
from hubert_ray.core.precision import compare
from hubert_ray.core.signal import normalise, synth_signal

# Short, medium and long items share micro-batches (padding); the last is 1.5 chunks (chunking).
SHORT_SECONDS = (0.6, 1.9, 4.3)
SEED = 20_240_601


def calibration_signals(chunk_seconds: float) -> list[np.ndarray]:
    """Deterministic normalised speech-like waveforms (16 kHz float32)."""

    seconds = [*SHORT_SECONDS, 1.5 * chunk_seconds]
    return [
        normalise(synth_signal(s, SAMPLE_RATE_HZ, 1, seed=SEED + i)[:, 0])
        for i, s in enumerate(seconds)
    ]


def evaluate(got: dict, ref: dict, limit: float) -> dict:
    """Per-layer metrics of ``got`` (reduced precision, as stored) against ``ref`` (FP32),
    both ``{layer: [frames, hidden]}``; the worst layer decides the breach."""
    layers = {}
    for k in sorted(ref):
        a, b = got[k], ref[k]
        if np.isfinite(a).all():
            m = compare(a, b)
        else:  # non-finite output: as far off as it gets
            m = {"cos_mean": math.nan, "cos_min": math.nan, "rel_l2": math.inf, "max_abs": math.inf}
        layers[str(k)] = {name: _json_number(v) for name, v in m.items()}
    worst = max(layers, key=lambda k: _order(layers[k]["rel_l2"]))
    rel = layers[worst]["rel_l2"]
    return {
        "layers": layers,
        "worst_layer": int(worst),
        "worst_rel_l2": rel,
        "limit": limit,
        "breach": not (isinstance(rel, float) and rel <= limit),
    }


def _json_number(v: float):
    """JSON has no inf/NaN: those become strings."""
    v = float(v)
    return v if math.isfinite(v) else str(v)


def _order(v) -> float:
    return v if isinstance(v, float) else math.inf


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX bfloat16 tiles (Intel Sapphire Rapids and later)."""
    return "amx_bf16" in cpu_flags()


def cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

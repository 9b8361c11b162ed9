"""Precision assurance helpers (numpy only): deterministic sampling and error metrics.

A fraction of segments, chosen by a hash of ``segment_id`` (so reruns check the same ones), is
recomputed in FP32 on the same device; for each output layer the stored features are compared
with the FP32 reference: per-frame cosine similarity (mean and minimum), relative L2 error over
the segment, and the maximum absolute error.
"""

from __future__ import annotations

import hashlib

import numpy as np

BREACH_MARKER = "precision breach:"  # every PrecisionBreach message starts with it
# Sampling checks at least this many segments of a run (all of a smaller one), so that a small
# run is checked too; above 6,400 segments the 1 % default rate checks more.
MIN_CHECKED_SEGMENTS = 64


def effective_rate(rate: float, num_segments: int) -> float:
    """The sample rate a run of ``num_segments`` (the manifest's, so reruns agree) uses:
    ``rate``, raised so that about :data:`MIN_CHECKED_SEGMENTS` are checked (0 stays 0)."""
    if rate <= 0 or num_segments <= 0:
        return rate
    return max(rate, min(1.0, MIN_CHECKED_SEGMENTS / num_segments))


class PrecisionBreach(RuntimeError):
    """Raised with ``--on-precision-breach fail``; the message names segment, layer, error."""


def is_sampled(segment_id: str, rate: float) -> bool:
    """Deterministic Bernoulli(rate) draw from the segment id (same ids on every rerun)."""
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    h = int.from_bytes(hashlib.blake2b(segment_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < rate


def compare(features: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Metrics of ``features`` [frames, hidden] against the FP32 ``reference`` (same shape)."""
    a = np.asarray(features, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape {a.shape} != reference shape {b.shape}")
    diff = a - b
    na = np.linalg.norm(a, axis=-1)
    nb = np.linalg.norm(b, axis=-1)
    denom = na * nb
    cos = np.where(denom > 0, (a * b).sum(-1) / np.where(denom > 0, denom, 1.0), 1.0)
    ref_norm = float(np.linalg.norm(b))
    err_norm = float(np.linalg.norm(diff))
    return {
        "cos_mean": float(cos.mean()) if cos.size else 1.0,
        "cos_min": float(cos.min()) if cos.size else 1.0,
        "rel_l2": err_norm / ref_norm if ref_norm > 0 else (0.0 if err_norm == 0 else np.inf),
        "max_abs": float(np.abs(diff).max()) if diff.size else 0.0,
    }


def summarize_layers(rows: list[dict]) -> dict:
    """Per-layer mean / p50 / p99 / max of the relative error and min cosine over rows of
    ``{"layer", "rel_l2", "cos_min", ...}``; with units (rows' ``unit_flip_rate`` and
    ``num_frames``), the frame-weighted share of frames whose unit differs from FP32's and
    the worst segment's share."""
    out: dict[str, dict] = {}
    for layer in sorted({r["layer"] for r in rows}):
        mine = [r for r in rows if r["layer"] == layer]
        rel = np.array([r["rel_l2"] for r in mine], dtype=np.float64)
        cos = np.array([r["cos_min"] for r in mine], dtype=np.float64)
        flips = [r for r in mine if r.get("unit_flip_rate") is not None]
        if flips:
            rate = np.array([r["unit_flip_rate"] for r in flips], dtype=np.float64)
            frames = np.array([r.get("num_frames") or 0 for r in flips], dtype=np.float64)
            flipped = float((rate * frames).sum())
            units = {
                "unit_frames": int(frames.sum()),
                "unit_flips": int(round(flipped)),
                "unit_flip_rate": flipped / frames.sum() if frames.sum() else 0.0,
                "unit_flip_rate_max": float(rate.max()),
            }
        else:
            units = {}
        out[str(layer)] = {
            "segments": int(rel.size),
            "rel_l2_mean": float(rel.mean()),
            "rel_l2_p50": float(np.percentile(rel, 50)),
            "rel_l2_p99": float(np.percentile(rel, 99)),
            "rel_l2_max": float(rel.max()),
            "cos_min": float(cos.min()),
            **units,
        }
    return out

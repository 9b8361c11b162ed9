"""Signals of the pure core: the model's input normalisation and a deterministic speech-like
signal (the precision self-test's calibration input, and the synthetic corpora's audio)."""

from __future__ import annotations

import numpy as np


def normalise(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (Wav2Vec2FeatureExtractor's ``do_normalize``), float32 out.

    Statistics are computed in float64; a constant (silent) input gives all zeros.
    """
    x64 = np.asarray(x, dtype=np.float64)
    if x64.size == 0 or np.all(x64 == x64.flat[0]):
        return np.zeros(x64.shape, dtype=np.float32)
    out = (x64 - x64.mean()) / np.sqrt(x64.var() + 1e-7)
    return out.astype(np.float32)


def synth_signal(duration_s: float, sr: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Speech-like ``[frames, channels]`` float32 in [-0.9, 0.9], deterministic from ``seed``.

    A few harmonics of a gliding pitch (~100-220 Hz), amplitude-modulated at ~4 Hz (syllable
    rate), plus a little noise. Channels differ slightly (gain, noise).
    """
    rng = np.random.default_rng(seed)
    frames = max(int(round(duration_s * sr)), 0)
    t = np.arange(frames, dtype=np.float64) / sr
    f_base = rng.uniform(100.0, 160.0)
    f0 = f_base + 40.0 * np.sin(2 * np.pi * rng.uniform(0.3, 0.8) * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = np.zeros(frames)
    for k in range(1, 6):
        if (f_base + 40.0) * k < 0.45 * sr:
            voiced += np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k
    am_rate = rng.uniform(3.5, 4.5)
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * am_rate * t + rng.uniform(0, 2 * np.pi))
    mono = voiced * envelope
    out = np.empty((frames, channels), dtype=np.float64)
    for c in range(channels):
        gain = 1.0 - 0.08 * c
        out[:, c] = gain * mono + 0.03 * rng.standard_normal(frames)
    peak = np.abs(out).max() if frames else 0.0
    if peak > 0:
        out *= 0.9 / peak
    return np.clip(out, -0.9, 0.9).astype(np.float32)

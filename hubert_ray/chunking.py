"""Pure helpers for frame counts, chunk planning and micro-batch packing (no torch, no Ray).

HuBERT's conv frontend has a receptive field of 400 samples and a hop of 320 samples
(25 ms / 20 ms at 16 kHz), so N samples give ``floor((N - 400) / 320) + 1`` frames.

Chunking keeps that count exact. Frame ``t`` of a segment covers samples ``[320 t, 320 t + 400)``;
a chunk that starts on a multiple of 320 samples produces exactly the segment's frames from its
start on. Chunks therefore start at ``320 * a_i`` and overlap by 80 samples, and the frame
sequences concatenate to exactly ``num_frames(N)`` frames. Frames are spread evenly over the
chunks, so a 10.5 s segment becomes two ~5.25 s chunks instead of 10 s + 0.5 s (a short tail
chunk would have almost no context).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

RECEPTIVE_FIELD = 400
HOP = 320


def num_frames(num_samples: int) -> int:
    """Frames HuBERT produces for ``num_samples`` 16 kHz samples (0 below 400 samples)."""
    if num_samples < RECEPTIVE_FIELD:
        return 0
    return (num_samples - RECEPTIVE_FIELD) // HOP + 1


def plan_chunks(num_samples: int, chunk_samples: int) -> list[tuple[int, int]]:
    """Split ``[0, num_samples)`` into ``(start, end)`` sample ranges of at most
    ``chunk_samples`` each (the last may run to ``num_samples``) whose frames concatenate to
    exactly ``num_frames(num_samples)`` frames, equal to the unchunked frame grid."""
    total = num_frames(num_samples)
    per_chunk = num_frames(chunk_samples)
    if total <= per_chunk:
        return [(0, num_samples)]
    n_chunks = math.ceil(total / per_chunk)
    chunks = []
    first_frame = 0
    for i in range(n_chunks):
        frames = total // n_chunks + (1 if i < total % n_chunks else 0)
        start = first_frame * HOP
        end = num_samples if i == n_chunks - 1 else start + (frames - 1) * HOP + RECEPTIVE_FIELD
        chunks.append((start, end))
        first_frame += frames
    return chunks


def pack_micro_batches(lengths: Sequence[int], max_batch_samples: int) -> list[list[int]]:
    """Group item indices into micro-batches, longest first, so that
    ``len(batch) * max(lengths in batch) <= max_batch_samples`` (the padded size).

    Sorting by length keeps padding low; an item longer than the budget runs alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > max_batch_samples:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(items: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Zero-pad 1-D float32 arrays into one [len(items), longest] array; returns it and the
    lengths (exact batching masks the padding, see hubert_ray.model)."""
    lengths = [len(x) for x in items]
    out = np.zeros((len(items), max(lengths)), dtype=np.float32)
    for i, x in enumerate(items):
        out[i, : len(x)] = x
    return out, lengths

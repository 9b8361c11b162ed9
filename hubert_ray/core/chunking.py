"""Pure helpers for frame counts, chunk planning and micro-batch packing (no torch, no Ray).

A wav2vec2-style conv frontend (HuBERT, wav2vec2, WavLM, data2vec-audio) is a stack of unpadded
strided convolutions, so its output frame ``t`` covers samples ``[hop t, hop t + receptive
field)`` with ``hop`` the product of the strides and the receptive field
``k_1 + s_1 (k_2 - 1) + s_1 s_2 (k_3 - 1) + ...`` (:class:`Geometry`, from the config's
``conv_kernel`` / ``conv_stride``). N samples give ``floor((N - rf) / hop) + 1`` frames (0 below
``rf``). The released models all have HuBERT's geometry, a receptive field of 400 samples and a
hop of 320 (25 ms / 20 ms at 16 kHz): the default here.

Chunking keeps that count exact. A chunk that starts on a multiple of ``hop`` samples produces
exactly the segment's frames from its start on, so chunks start at ``hop * a_i`` and overlap by
``rf - hop`` samples (80 for HuBERT), and their frame sequences concatenate to exactly
``num_frames(N)`` frames. Frames are spread evenly over the chunks, so a 10.5 s segment becomes
two ~5.25 s chunks instead of 10 s + 0.5 s (a short tail chunk would have almost no context).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RECEPTIVE_FIELD = 400
HOP = 320


@dataclass(frozen=True)
class Geometry:
    """Receptive field and hop (in input samples) of a conv frontend."""

    receptive_field: int = RECEPTIVE_FIELD
    hop: int = HOP

    @classmethod
    def from_convs(cls, kernels: Sequence[int], strides: Sequence[int]) -> Geometry:
        """The geometry of unpadded convolutions with these kernels and strides, in order."""
        if len(kernels) != len(strides) or not kernels:
            raise ValueError(f"conv_kernel {list(kernels)} and conv_stride {list(strides)}")
        rf, hop = 1, 1
        for k, s in zip(kernels, strides, strict=True):
            if int(k) < 1 or int(s) < 1:
                raise ValueError(f"conv kernel {k} / stride {s} must be >= 1")
            rf += (int(k) - 1) * hop
            hop *= int(s)
        return cls(rf, hop)

    def num_frames(self, num_samples: int) -> int:
        if num_samples < self.receptive_field:
            return 0
        return (num_samples - self.receptive_field) // self.hop + 1


HUBERT = Geometry()


def num_frames(num_samples: int, geometry: Geometry = HUBERT) -> int:
    """Frames the conv frontend produces for ``num_samples`` 16 kHz samples (HuBERT's
    geometry unless given: 0 below 400 samples)."""
    return geometry.num_frames(num_samples)


def plan_chunks(
    num_samples: int, chunk_samples: int, geometry: Geometry = HUBERT
) -> list[tuple[int, int]]:
    """Split ``[0, num_samples)`` into ``(start, end)`` sample ranges of at most
    ``chunk_samples`` each (the last may run to ``num_samples``) whose frames concatenate to
    exactly ``num_frames(num_samples)`` frames, equal to the unchunked frame grid.
    ``chunk_samples`` must hold at least one frame (the receptive field)."""
    rf, hop = geometry.receptive_field, geometry.hop
    total = geometry.num_frames(num_samples)
    per_chunk = geometry.num_frames(chunk_samples)
    if total <= per_chunk:
        return [(0, num_samples)]
    if per_chunk == 0:
        raise ValueError(f"chunk of {chunk_samples} samples is shorter than one frame ({rf})")
    n_chunks = math.ceil(total / per_chunk)
    chunks = []
    first_frame = 0
    for i in range(n_chunks):
        frames = total // n_chunks + (1 if i < total % n_chunks else 0)
        start = first_frame * hop
        end = num_samples if i == n_chunks - 1 else start + (frames - 1) * hop + rf
        chunks.append((start, end))
        first_frame += frames
    return chunks


def padded_length(longest: int, multiple: int = 1) -> int:
    """A micro-batch's padded length: its longest item rounded up to ``multiple`` samples."""
    return -(-longest // multiple) * multiple if multiple > 1 else longest


def pack_micro_batches(
    lengths: Sequence[int],
    max_batch_samples: int,
    batch_cost_samples: float = 0.0,
    pad_multiple: int = 1,
) -> list[list[int]]:
    """Group item indices into micro-batches of similar lengths, longest first.

    A micro-batch is padded to its longest item rounded up to ``pad_multiple`` samples
    (:func:`padded_length`: fewer distinct shapes, so per-shape work such as cuDNN's plan
    choice is cached instead of redone) and holds at most ``max_batch_samples`` padded samples
    (an item longer than that runs alone). Of all splits of the length-sorted items into
    consecutive runs, returns the one with the least ``padded samples + batch_cost_samples ×
    micro-batches`` (dynamic programming; ties go to fewer, larger micro-batches).
    ``batch_cost_samples`` is the fixed cost of one forward pass (kernel launches, per-call
    overhead) in samples of padded audio: 0 only minimises padding.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    n = len(order)
    sorted_len = np.array(
        [padded_length(lengths[i], pad_multiple) for i in order], dtype=np.float64
    )
    best = np.zeros(n + 1)  # best[i]: least cost of packing sorted items i..n-1
    end = np.zeros(n, dtype=np.int64)  # the run starting at i ends before end[i]
    for i in range(n - 1, -1, -1):
        longest = max(sorted_len[i], 1.0)
        k_max = max(1, min(n - i, int(max_batch_samples // longest)))
        js = np.arange(i + 1, i + k_max + 1)
        cost = (js - i) * sorted_len[i] + batch_cost_samples + best[js]
        k = k_max - 1 - int(np.argmin(cost[::-1]))  # last minimum: the largest run
        best[i], end[i] = cost[k], js[k]
    batches, i = [], 0
    while i < n:
        batches.append(order[i : end[i]])
        i = int(end[i])
    return batches


def pad_batch(
    items: Sequence[np.ndarray], out: np.ndarray | None = None, multiple: int = 1
) -> tuple[np.ndarray, list[int]]:
    """Zero-pad 1-D float32 arrays into one [len(items), padded_length(longest, multiple)]
    array; returns it and the lengths (exact batching masks the padding, see
    hubert_ray.model.encoder). With ``out`` (a 1-D float32 buffer of at least that many values, e.g.
    reused pinned memory) the batch is written into its head instead of a new array."""
    lengths = [len(x) for x in items]
    shape = (len(items), padded_length(max(lengths), multiple))
    if out is None:
        batch = np.zeros(shape, dtype=np.float32)
    else:
        batch = out[: shape[0] * shape[1]].reshape(shape)
    for i, x in enumerate(items):
        batch[i, : len(x)] = x
        if out is not None:
            batch[i, len(x) :] = 0.0
    return batch, lengths


def split_by_seconds(seconds: Sequence[float], bound: float) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` row ranges of a model call whose rows hold ``seconds`` of
    audio each, every range at most ``bound`` seconds (a row longer than ``bound`` alone), in
    order and covering every row: the sub-calls of a call that holds too much audio."""
    ranges: list[tuple[int, int]] = []
    start, total = 0, 0.0
    for i, s in enumerate(seconds):
        if i > start and total + s > bound:
            ranges.append((start, i))
            start, total = i, 0.0
        total += s
    if len(seconds):
        ranges.append((start, len(seconds)))
    return ranges

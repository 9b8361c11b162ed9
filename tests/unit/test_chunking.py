"""Pure tests of frame counting, chunk planning and micro-batch packing (no torch, no Ray)."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from hubert_ray.core.chunking import (
    HOP,
    RECEPTIVE_FIELD,
    num_frames,
    pack_micro_batches,
    pad_batch,
    padded_length,
    plan_chunks,
)

OVERLAP = RECEPTIVE_FIELD - HOP  # 80 samples


@pytest.mark.parametrize(
    "n, expected",
    [(0, 0), (1, 0), (399, 0), (400, 1), (719, 1), (720, 2), (16000, 49), (160000, 499)],
)
def test_num_frames_values(n, expected):
    assert num_frames(n) == expected


def test_num_frames_formula():
    for n in range(0, 5000):
        expected = 0 if n < 400 else (n - 400) // 320 + 1
        assert num_frames(n) == expected


def _sample_lengths(chunk_samples: int, rng: random.Random) -> list[int]:
    edges = {0, 1, 399, 400, 401, 719, 720, 721, 16000, 160000}
    for m in (1, 2, 3, 7):
        base = m * chunk_samples
        edges.update(base + d for d in (-321, -320, -81, -80, -1, 0, 1, 80, 319, 320, 321))
    edges.update(rng.randrange(0, 40 * chunk_samples) for _ in range(150))
    return sorted(n for n in edges if n >= 0)


@pytest.mark.parametrize("chunk_samples", [400, 720, 1000, 8000, 16000, 160000])
def test_plan_chunks_covers_exactly(chunk_samples):
    rng = random.Random(chunk_samples)
    for n in _sample_lengths(chunk_samples, rng):
        chunks = plan_chunks(n, chunk_samples)
        assert chunks, n
        assert chunks[0][0] == 0
        assert chunks[-1][1] == n
        for (_, e0), (s1, _) in zip(chunks, chunks[1:], strict=False):
            # contiguous coverage with exactly the receptive-field overlap
            assert s1 == e0 - OVERLAP, (n, chunk_samples, chunks)
        for i, (s, e) in enumerate(chunks):
            assert s % HOP == 0, (n, chunk_samples, chunks)
            assert e > s or n == 0
            if i < len(chunks) - 1:
                assert e - s <= chunk_samples, (n, chunk_samples, chunks)
                assert e - s >= RECEPTIVE_FIELD
            else:
                assert e - s < chunk_samples + HOP, (n, chunk_samples, chunks)
        assert sum(num_frames(e - s) for s, e in chunks) == num_frames(n), (n, chunk_samples)
        if num_frames(n) <= num_frames(chunk_samples):
            assert chunks == [(0, n)]


@pytest.mark.parametrize("n", [0, 1, 399, 400, 720, 7999, 8000, 8079])
def test_plan_chunks_short_input_is_one_chunk(n):
    # up to num_frames(8000) == 24 frames (8079 samples) fit in one 8000-sample chunk
    assert plan_chunks(n, 8000) == [(0, n)]


def test_plan_chunks_one_frame_over_splits():
    assert num_frames(8080) == num_frames(8000) + 1
    assert len(plan_chunks(8080, 8000)) == 2


def test_plan_chunks_frames_spread_evenly():
    # 10.5 s at 10 s chunks: two similar chunks, not 10 s + 0.5 s.
    chunks = plan_chunks(168000, 160000)
    frames = [num_frames(e - s) for s, e in chunks]
    assert len(chunks) == 2
    assert max(frames) - min(frames) <= 1


def _check_packing(lengths, budget, cost=0.0, multiple=1):
    batches = pack_micro_batches(lengths, budget, cost, multiple)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    for b in batches:
        assert b, batches
        if len(b) > 1:
            width = padded_length(max(lengths[i] for i in b), multiple)
            assert len(b) * width <= budget, (b, budget)
    # longest first: flattened order is non-increasing in length
    flat_lengths = [lengths[i] for i in flat]
    assert flat_lengths == sorted(flat_lengths, reverse=True)
    return batches


def test_pack_micro_batches_random():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randrange(0, 60)
        lengths = [rng.randrange(1, 200000) for _ in range(n)]
        budget = rng.choice([400, 8000, 16000, 160000, 640000, 10**7])
        _check_packing(lengths, budget, rng.choice([0, 1000, 160000]), rng.choice([1, 4000]))


def test_padded_length_and_pad_batch_multiple():
    assert [padded_length(n, 4000) for n in (1, 3999, 4000, 4001)] == [4000] * 3 + [8000]
    assert padded_length(4001) == 4001
    batch, lengths = pad_batch([np.ones(5000, np.float32), np.ones(100, np.float32)], multiple=4000)
    assert batch.shape == (2, 8000) and lengths == [5000, 100]
    assert batch[0, 5000:].sum() == 0 and batch[1, 100:].sum() == 0
    # with buckets, lengths in one bucket pad alike: one micro-batch costs no more padding
    assert _check_packing([3000, 3900], 10**6, cost=1, multiple=4000) == [[1, 0]]


def test_pack_micro_batches_cases():
    assert pack_micro_batches([], 1000) == []
    # an item longer than the budget runs alone
    batches = _check_packing([5000, 10, 20], 1000)
    assert batches[0] == [0]
    # everything fits into one batch: taken when a forward costs more than the padding...
    assert _check_packing([100, 300, 200], 900, cost=1000) == [[1, 2, 0]]
    # ...not when only padding counts
    assert _check_packing([100, 300, 200], 900) == [[1], [2], [0]]
    # budget allows exactly two of the longest; equal lengths: fewest batches
    batches = _check_packing([100] * 5, 200)
    assert [len(b) for b in batches] == [2, 2, 1]
    # one long item does not pad nine short ones to its length
    assert _check_packing([1000] + [100] * 9, 10_000, cost=200) == [[0], list(range(1, 10))]


def _cost(lengths, batches, cost, multiple=1):
    return sum(len(b) * padded_length(max(lengths[i] for i in b), multiple) + cost for b in batches)


def _greedy(lengths, budget):
    """The previous packer: fill each micro-batch up to the budget, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > budget:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def test_pack_micro_batches_is_optimal():
    """Least padded samples + cost per batch over every split of the sorted items into
    consecutive runs (brute force for small n); never worse than greedy filling."""
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randrange(1, 9)
        lengths = [rng.randrange(400, 160_000) for _ in range(n)]
        budget = rng.choice([160_000, 320_000, 10**6])
        cost = rng.choice([0, 8000, 160_000])
        m = rng.choice([1, 1, 4000])
        got = _cost(lengths, _check_packing(lengths, budget, cost, m), cost, m)
        order = sorted(range(n), key=lambda i: lengths[i], reverse=True)
        best = math.inf
        for cuts in itertools.product([False, True], repeat=n - 1):
            batches, current = [], [order[0]]
            for i, cut in zip(order[1:], cuts, strict=True):
                if cut:
                    batches.append(current)
                    current = []
                current.append(i)
            batches.append(current)
            if all(
                len(b) == 1 or len(b) * padded_length(lengths[b[0]], m) <= budget for b in batches
            ):
                best = min(best, _cost(lengths, batches, cost, m))
        assert got == pytest.approx(best), (lengths, budget, cost, m)
        if m == 1:
            assert got <= _cost(lengths, _greedy(lengths, budget), cost) + 1e-6

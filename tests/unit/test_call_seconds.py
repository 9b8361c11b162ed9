"""Model calls bounded in audio seconds: a few long segments among short ones are computed in
sub-calls of at most ``call_seconds`` (seen in the actors' reports), each segment written once.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/ray/test_call_seconds.py``.
"""

from __future__ import annotations

import pytest

from hubert_ray.core.chunking import split_by_seconds
from hubert_ray.core.config import ExtractConfig


def test_split_by_seconds():
    assert split_by_seconds([], 10) == []
    assert split_by_seconds([2, 2, 60, 2, 2], 61) == [(0, 2), (2, 3), (3, 5)]
    assert split_by_seconds([70, 70], 61) == [(0, 1), (1, 2)]  # a longer row alone
    assert split_by_seconds([1] * 10, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert split_by_seconds([1] * 10, 100) == [(0, 10)]


def test_call_size_options():
    cfg = ExtractConfig(manifest="m", model="m", output="o")
    assert cfg.call_seconds_bound(1) == 640 and cfg.call_seconds_bound(20) == 40
    assert cfg.rows_per_call(1) == 256  # mean unknown: the rows as before
    assert cfg.rows_per_call(1, 2.5) == 256 and cfg.rows_per_call(1, 60.0) == 11
    assert cfg.rows_per_call(1, 0.001) == 4096  # at most MAX_ROWS_PER_CALL
    rows = ExtractConfig(manifest="m", model="m", output="o", batch_size=32)
    assert rows.rows_per_call(1, 60.0) == 32 and rows.call_seconds_bound(1) is None
    both = ExtractConfig(manifest="m", model="m", output="o", batch_size=32, call_seconds=90)
    assert both.rows_per_call(1, 60.0) == 32 and both.call_seconds_bound(3) == 90
    from hubert_ray.core.errors import ConfigError

    for bad in (0, -1.0, float("nan"), True, "10"):
        with pytest.raises(ConfigError, match="call_seconds"):
            ExtractConfig(manifest="m", model="m", output="o", call_seconds=bad)

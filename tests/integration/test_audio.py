"""Unit tests for the decode stage (corpus.audio) and the generators (testing.synth).

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/unit/test_audio.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import soundfile as sf

from hubert_ray.corpus.audio import (
    clear_cache,
)
from hubert_ray.testing.synth import (
    synth_signal,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


STREAM_RSS = """
import resource, sys
import numpy as np, pyarrow as pa
from hubert_ray.corpus.audio import DecodeStage
from hubert_ray.core.config import DecodeConfig
path, n = sys.argv[1], int(sys.argv[2])
seg = 20 * 60 / n
rows = pa.table({"segment_id": [f"s{i}" for i in range(n)], "recording_id": ["r"] * n,
                 "audio_uri": [path] * n, "start_s": [i * seg for i in range(n)],
                 "end_s": [(i + 1) * seg for i in range(n)]})
stage = DecodeStage(DecodeConfig())
stage(rows.slice(0, 1))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
samples = 0
for b in range(0, n, 128):
    samples += sum(stage(rows.slice(b, 128)).column("num_samples").to_pylist())
print(samples, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_streaming_decode_memory_is_bounded_by_the_window(tmp_path):
    """A 20-minute recording (73 MiB as 16 kHz float32) cut into 1,000 segments decoded in
    batches of 128: the decode process grows by far less than the decoded recording."""
    path = str(tmp_path / "long.flac")
    with sf.SoundFile(path, "w", 16000, 1, format="FLAC", subtype="PCM_16") as f:
        for i in range(20):
            f.write(synth_signal(60.0, 16000, seed=i))
    res = subprocess.run(
        [sys.executable, "-c", STREAM_RSS, path, "1000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    samples, base, peak = (int(v) for v in res.stdout.split())
    assert samples == 20 * 60 * 16000
    growth_mib = (peak - base) / 1024
    print(f"20-min FLAC streamed in 1,000 segments: +{growth_mib:.0f} MiB over the first batch")
    assert growth_mib < 73 / 2


def test_audio_module_imports_no_torch_or_ray():
    code = (
        "import sys, hubert_ray.corpus.audio, hubert_ray.testing.synth; "
        "print('torch' in sys.modules, 'ray' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]

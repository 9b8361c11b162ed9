"""Bad-input matrix: each generated input with its documented outcome. The decode
stage turns every bad input into error rows (stage ``decode``) with one reason, never an
exception; manifest problems stop the job before Ray with exit code 2.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/unit/test_bad_inputs.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import soundfile as sf

from hubert_ray.testing.synth import synth_signal

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_manifest_line_not_json_exits_2_before_ray(tmp_path, tiny_model):
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "a", "audio": "a.wav"}\n{not json\n')
    res = subprocess.run(
        [sys.executable, "-m", "jobs.extract", "--manifest", str(m), "--model", tiny_model]
        + ["--output", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "m.jsonl:2" in res.stderr, res.stderr[-2000:]
    assert "ray" not in res.stderr.lower().replace("--manifest", "")


# The child's own peak (VmHWM, per address space): ru_maxrss survives exec on Linux, so it would
# report the forking pytest process's peak when that is larger.
LONG_DECODE = """
import sys, time
from hubert_ray.corpus.audio import read_audio, to_mono_16k
t = time.time()
x = to_mono_16k(*read_audio(sys.argv[1]))
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(len(x), hwm, time.time() - t)
"""


def test_30_minute_recording_decodes_with_bounded_memory(tmp_path):
    path = str(tmp_path / "long.flac")
    minutes = 31
    with sf.SoundFile(path, "w", 16000, 1, format="FLAC", subtype="PCM_16") as f:
        for i in range(minutes):
            f.write(synth_signal(60.0, 16000, seed=i))
    res = subprocess.run(
        [sys.executable, "-c", LONG_DECODE, path], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    n, rss_kib, secs = res.stdout.split()
    assert int(n) == minutes * 60 * 16000
    peak_mib = int(rss_kib) / 1024
    print(f"31-min 16 kHz FLAC decode: peak RSS {peak_mib:.0f} MiB, {float(secs):.1f} s")
    # float32 samples are 113 MiB; read + decode + mono copy stay well under 1 GiB.
    assert peak_mib < 1024

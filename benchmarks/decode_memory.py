"""Peak memory of the decode workers on long recordings, and their values against whole-file
decoding:

    python -m benchmarks.decode_memory [--hours 3] [--segments 2000] [--stereo-hours 1]

Generates, in a temporary directory, a 16 kHz mono FLAC of ``--hours`` cut into ``--segments``
back-to-back segments and a 44.1 kHz stereo FLAC of ``--stereo-hours`` cut into 6 s segments
(cheap synthetic signal: a tone plus noise, written minute by minute). Runs the job's decode
stage on local Ray exactly as the pipeline does (blocks of whole recordings,
``dataset._decode`` tasks with ``stage_args("decode", ...)``); every task reports its worker
process's peak resident memory (``ru_maxrss``) and a digest of each segment's samples. A fresh
process then decodes each file whole (``read_audio`` + ``to_mono_16k`` + ``cut_segment`` +
``normalise``, what the decode stage did before it streamed) and prints its own peak memory;
the digests must be equal segment for segment. Prints one row per file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WHOLE = r"""
import hashlib, json, resource, sys
import numpy as np
from hubert_ray.corpus.audio import cut_segment, normalise, read_audio, to_mono_16k
path, times = sys.argv[1], json.loads(sys.argv[2])
audio = to_mono_16k(*read_audio(path))
digests = {}
for sid, a, b in times:
    seg = normalise(cut_segment(audio, a, b, 0.1))
    digests[sid] = hashlib.sha1(seg.tobytes()).hexdigest()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mib": peak, "digests": digests}))
"""


def write_flac(path: str, hours: float, sr: int, channels: int) -> None:
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    t = np.arange(60 * sr) / sr
    with sf.SoundFile(path, "w", sr, channels, format="FLAC", subtype="PCM_16") as f:
        for minute in range(int(round(hours * 60))):
            tone = 0.3 * np.sin(2 * np.pi * (220 + 5 * minute) * t)
            x = tone[:, None] + 0.01 * rng.standard_normal((t.size, channels))
            f.write(x.astype(np.float32))


def _probe(batch, config):
    """The decode task as the pipeline runs it, reporting its process's peak memory and a
    digest of each segment (the audio itself is not sent back)."""
    import hashlib
    import os
    import resource

    import numpy as np
    import pyarrow as pa

    from hubert_ray.backend import dataset

    out = dataset._decode(batch, config)
    col = out.column("audio").combine_chunks()
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False)
    digests = [
        hashlib.sha1(
            np.ascontiguousarray(values[offsets[i] : offsets[i + 1]]).tobytes()
        ).hexdigest()
        for i in range(out.num_rows)
    ]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = out.num_rows
    return pa.table(
        {
            "segment_id": out.column("segment_id"),
            "error_reason": out.column("error_reason"),
            "digest": digests,
            "pid": [os.getpid()] * n,
            "peak_rss_mib": [peak] * n,
        }
    )


def measure(path: str, times: list[tuple[str, float, float]], rec: str) -> dict:
    import pyarrow as pa
    import ray

    from hubert_ray.backend import placement
    from hubert_ray.core.config import ExtractConfig

    cfg = ExtractConfig(manifest="-", model="-", output="-", num_gpus=0)
    placement = placement.Placement(1, False, cfg.model_config("cpu"), 16)
    segments = pa.table(
        {
            "segment_id": [s for s, _, _ in times],
            "recording_id": [rec] * len(times),
            "audio_uri": [path] * len(times),
            "start_s": [a for _, a, _ in times],
            "end_s": [b for _, _, b in times],
        }
    )
    args = placement.stage_args("decode", cfg, placement)
    t0 = time.perf_counter()
    rows = (
        ray.data.from_arrow([segments])  # one recording: one block, as the job's tasks give
        .map_batches(_probe, **args)
        .take_all()
    )
    wall = time.perf_counter() - t0
    res = subprocess.run(
        [sys.executable, "-c", WHOLE, path, json.dumps(times)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    whole = json.loads(res.stdout)
    equal = sum(r["digest"] == whole["digests"][r["segment_id"]] for r in rows)
    peaks: dict[int, float] = {}
    for r in rows:
        peaks[r["pid"]] = max(peaks.get(r["pid"], 0.0), r["peak_rss_mib"])
    return {
        "segments": len(rows),
        "errors": sum(r["error_reason"] is not None for r in rows),
        "equal_to_whole_file": equal,
        "decode_workers": len(peaks),
        "worker_peak_rss_mib": round(max(peaks.values()), 1),
        "decode_wall_s": round(wall, 1),
        "whole_file_peak_rss_mib": round(whole["peak_mib"], 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hours", type=float, default=3.0)
    p.add_argument("--segments", type=int, default=2000)
    p.add_argument("--stereo-hours", type=float, default=1.0)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory(prefix="decode-memory-") as work:
        mono = os.path.join(work, "long_16k_1ch.flac")
        write_flac(mono, args.hours, 16000, 1)
        seg = args.hours * 3600 / args.segments
        times = [(f"m{i:05d}", i * seg, (i + 1) * seg) for i in range(args.segments)]
        results[f"{args.hours:g} h 16 kHz mono FLAC"] = measure(mono, times, "mono")
        os.remove(mono)
        stereo = os.path.join(work, "long_44k_2ch.flac")
        write_flac(stereo, args.stereo_hours, 44100, 2)
        n = int(args.stereo_hours * 3600 / 6)
        times = [(f"s{i:05d}", i * 6.0, (i + 1) * 6.0) for i in range(n)]
        results[f"{args.stereo_hours:g} h 44.1 kHz stereo FLAC"] = measure(stereo, times, "st")
    print(
        "| recording | segments | equal to whole-file | decode workers | worker peak RSS MiB "
        "| decode wall s | whole-file decode peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['segments']} | {r['equal_to_whole_file']} | {r['decode_workers']} "
            f"| {r['worker_peak_rss_mib']} | {r['decode_wall_s']} "
            f"| {r['whole_file_peak_rss_mib']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure the decode stage's per-core speed (x realtime) for Opus and FLAC on this machine.

    python -m jobs.measure_decode [--seconds 60] [--recordings 3] [--repeats 5]

Generates long 16 kHz mono recordings (the synthetic WenetSpeech signal), writes each as Ogg
Opus and as FLAC, then times what a decode task does per recording — one whole-object read,
soundfile decode, downmix/resample to 16 kHz mono (:func:`hubert_ray.audio.read_audio` +
:func:`~hubert_ray.audio.to_mono_16k`) — in this single process (= one core). Prints JSON: the
median and best x-realtime over the repeats per format. The numbers stored in
:mod:`hubert_ray.rates` as "measured" come from this command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time


def measure(seconds: float, recordings: int, repeats: int) -> dict:
    from hubert_ray.audio import read_audio, to_mono_16k
    from hubert_ray.synth import synth_signal, write_audio

    out: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {platform.platform()}",
        "recording_seconds": seconds,
        "recordings": recordings,
        "formats": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("opus", "flac"):
            paths = []
            for i in range(recordings):
                path = os.path.join(tmp, f"rec{i}.{fmt}")
                write_audio(path, synth_signal(seconds, 16000, 1, seed=i), 16000, fmt)
                paths.append(path)
            rates = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for path in paths:
                    samples, sr = read_audio(path)
                    to_mono_16k(samples, sr)
                rates.append(seconds * recordings / (time.perf_counter() - t0))
            out["formats"][fmt] = {
                "x_realtime_median": round(statistics.median(rates), 1),
                "x_realtime_best": round(max(rates), 1),
                "bytes_per_second": round(
                    sum(os.path.getsize(p) for p in paths) / seconds / recordings
                ),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.measure_decode", description=__doc__)
    p.add_argument("--seconds", type=float, default=60.0, help="length of each recording")
    p.add_argument("--recordings", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.seconds, args.recordings, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

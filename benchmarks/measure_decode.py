"""Measure the decode stage's per-core speed (x realtime) for Opus and FLAC where it runs.

    python -m benchmarks.measure_decode [--seconds 60] [--recordings 3] [--repeats 5]

Generates long 16 kHz mono recordings (the synthetic WenetSpeech signal), writes each as Ogg
Opus and as FLAC, then times in this single process (= one core), alternating: the decode of
each recording — one whole-object read, soundfile decode, downmix/resample to 16 kHz mono
(:func:`~hubert_ray.corpus.decoding.read_audio` + ``to_mono_16k``) — and a decode
task's whole work (``stage_*``: :class:`hubert_ray.corpus.audio.DecodeStage` on the recordings cut
into WenetSpeech-like segments, 128 per batch: decode, cut, check, normalise, Arrow). Prints
JSON: the median and best x-realtime over the repeats per format. The numbers stored in
:mod:`hubert_ray.core.rates` as "measured" come from this command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import tempfile
import time

INPUT_COLUMNS = ("segment_id", "recording_id", "audio_uri", "start_s", "end_s")


def segment_table(paths: list[str], seconds: float, seed: int = 0) -> dict[str, list]:
    """Each recording cut back to back into WenetSpeech-like segments (gamma lengths, mean
    2.5 s, 0.3-20 s): a decode task's input columns."""
    rng = random.Random(seed)
    table: dict[str, list] = {k: [] for k in INPUT_COLUMNS}
    for r, path in enumerate(paths):
        start = 0.0
        while start < seconds - 0.3:
            end = min(start + min(max(rng.gammavariate(2.0, 1.25), 0.3), 20.0), seconds)
            row = (f"r{r}-{len(table['segment_id'])}", f"r{r}", path, start, end)
            for key, value in zip(INPUT_COLUMNS, row, strict=True):
                table[key].append(value)
            start = end
    return table


def measure(seconds: float, recordings: int, repeats: int) -> dict:
    import pyarrow as pa

    from hubert_ray.corpus.audio import DecodeStage, clear_cache, read_audio, to_mono_16k
    from hubert_ray.testing.synth import synth_signal, write_audio

    stage = DecodeStage()

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
            table = segment_table(paths, seconds)
            audio_s = sum(e - b for b, e in zip(table["start_s"], table["end_s"], strict=True))
            segments = pa.table(table)
            batches = [segments.slice(s, 128) for s in range(0, segments.num_rows, 128)]
            rates, stage_rates = [], []
            for _ in range(repeats):  # alternating: drifts hit both alike
                t0 = time.perf_counter()
                for path in paths:
                    samples, sr = read_audio(path)
                    to_mono_16k(samples, sr)
                rates.append(seconds * recordings / (time.perf_counter() - t0))
                clear_cache()
                t0 = time.perf_counter()
                for batch in batches:  # the job's decode batches (128 segments)
                    stage(batch)
                stage_rates.append(audio_s / (time.perf_counter() - t0))
            out["formats"][fmt] = {
                "x_realtime_median": round(statistics.median(rates), 1),
                "x_realtime_best": round(max(rates), 1),
                "stage_x_realtime_median": round(statistics.median(stage_rates), 1),
                "stage_x_realtime_best": round(max(stage_rates), 1),
                "bytes_per_second": round(
                    sum(os.path.getsize(p) for p in paths) / seconds / recordings
                ),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.measure_decode", description=__doc__)
    p.add_argument("--seconds", type=float, default=60.0, help="length of each recording")
    p.add_argument("--recordings", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.seconds, args.recordings, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

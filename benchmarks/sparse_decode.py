"""Sparse decoding: segment audio per wall second when a manifest lists part of each recording.

    python -m benchmarks.sparse_decode --format opus|flac --recording-minutes M --coverage C
        [--recordings N] [--repeats R] [--crossover] [--preroll S]

Generates ``N`` recordings of ``M`` minutes (16 kHz mono synthetic speech, as the WenetSpeech
corpus is), cuts each back to back into WenetSpeech-like segments (the corpus' durations,
clipped to 0.6-9 s) and keeps a random ``C`` of them (each segment with probability ``C``:
spread through the recordings, the way WenetSpeech's M and S subsets tag segments of the same
long recordings as L). Then times :class:`hubert_ray.corpus.audio.DecodeStage` (batches of 128
segments; decode, cut, normalise, Arrow) in this one process, the three ways alternating,
``R`` times each (median):

* ``streaming whole @ C``: the C segments, every recording decoded front to back (seeks off:
  ``reading.SEEK_MIN_GAP_S = inf``, the stage before sparse decoding);
* ``sparse @ C``: the C segments, seeking over the gaps worth a seek (the stage as it is);
* ``full coverage``: every segment (no gap to skip: front to back either way).

Prints segment-audio seconds per wall second for each, the share of the recordings' frames
decoded, the seeks, and whether the sparse run's values equal the streaming run's (they must:
``max |diff|`` 0). The goal: ``sparse @ 0.1`` at least 0.6 of ``full coverage``.

``--crossover`` also prints what a seek costs against decoding through (soundfile alone, on the
same files): the gap in seconds of audio above which a seek is cheaper (the basis of
``reading.SEEK_MIN_GAP_S``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time

import numpy as np

INPUT_COLUMNS = ("segment_id", "recording_id", "audio_uri", "start_s", "end_s")
BATCH_ROWS = 128


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def write_recordings(tmp: str, fmt: str, minutes: float, n: int) -> list[str]:
    import soundfile as sf

    from hubert_ray.core.signal import synth_signal
    from hubert_ray.testing.synth import FORMATS

    container, subtype, ext = FORMATS[fmt]
    paths = []
    for i in range(n):
        path = os.path.join(tmp, f"rec{i}.{ext}")
        x = synth_signal(minutes * 60, 16000, 1, seed=i)
        with sf.SoundFile(path, "w", 16000, 1, format=container, subtype=subtype) as f:
            for s in range(0, len(x), 16000 * 60):  # a minute at a time
                f.write(x[s : s + 16000 * 60])
        paths.append(path)
    return paths


def segments(paths: list[str], seconds: float, coverage: float, seed: int = 0) -> dict:
    """Back-to-back WenetSpeech-like segments of each recording, each kept with probability
    ``coverage``: a decode task's input columns."""
    from hubert_ray.testing.synth_wenetspeech import segment_durations

    rng = np.random.default_rng(seed)
    table: dict[str, list] = {k: [] for k in INPUT_COLUMNS}
    for r, path in enumerate(paths):
        start = 0.0
        durations = np.clip(segment_durations(int(seconds) + 1, rng), 0.6, 9.0)
        keep = rng.random(len(durations)) < coverage
        for d, kept in zip(durations, keep, strict=True):
            if seconds - start < 0.6:
                break
            end = min(start + float(d), seconds)
            if kept:
                row = (f"r{r}-{len(table['segment_id'])}", f"r{r}", path, start, end)
                for key, value in zip(INPUT_COLUMNS, row, strict=True):
                    table[key].append(value)
            start = end
    return table


def run_stage(table: dict, seek: bool, preroll: float | None = None) -> tuple[float, list, dict]:
    """Wall seconds of the stage over ``table``, its audio column, and the streams' counts
    (``preroll``: the lossy codecs' pre-roll instead of ``reading.CODEC_PREROLL_S``)."""
    import pyarrow as pa

    from hubert_ray.corpus import audio, reading

    streams = []
    real_open, real_gap = audio.open_recording, reading.SEEK_MIN_GAP_S
    real_preroll = dict(reading.CODEC_PREROLL_S)

    def counting(*args, **kwargs):
        streams.append(real_open(*args, **kwargs))
        return streams[-1]

    audio.open_recording = counting
    reading.SEEK_MIN_GAP_S = real_gap if seek else float("inf")
    if preroll is not None:
        reading.CODEC_PREROLL_S.update(dict.fromkeys(real_preroll, preroll))
    try:
        audio.clear_cache()
        stage = audio.DecodeStage()
        rows = pa.table(table)
        out = []
        t0 = time.perf_counter()
        for b in range(0, rows.num_rows, BATCH_ROWS):
            out.append(stage(rows.slice(b, BATCH_ROWS)).column("audio"))
        wall = time.perf_counter() - t0
        audio.clear_cache()
    finally:
        audio.open_recording, reading.SEEK_MIN_GAP_S = real_open, real_gap
        reading.CODEC_PREROLL_S.update(real_preroll)
    counts = {
        "decoded": sum(s.decoded for s in streams),
        "seeks": sum(s.seeks for s in streams),
        "opens": sum(s.opens for s in streams),
    }
    return wall, out, counts


def max_diff(a: list, b: list) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x.to_pylist(), y.to_pylist(), strict=True):
            d = np.abs(np.asarray(u, np.float32) - np.asarray(v, np.float32))
            worst = max(worst, float(d.max()) if d.size else 0.0)
    return worst


def crossover(paths: list[str], repeats: int = 200) -> str:
    """Seek cost against decode-through cost, soundfile alone."""
    import soundfile as sf

    rng = np.random.default_rng(1)
    with sf.SoundFile(paths[0]) as f:
        t0 = time.perf_counter()
        n = 0
        while True:
            x = f.read(1 << 16, dtype="float32")
            n += len(x)
            if len(x) < 1 << 16:
                break
        decode_ms = (time.perf_counter() - t0) / (n / f.samplerate) * 1e3
        targets = np.sort(rng.integers(0, n - f.samplerate, repeats))
        t0 = time.perf_counter()
        for t in targets:
            f.seek(int(t))
            f.read(1, dtype="float32")
        seek_ms = (time.perf_counter() - t0) / repeats * 1e3
    return (
        f"crossover: decode {decode_ms:.2f} ms per audio second, seek {seek_ms:.2f} ms "
        f"(+ read of 1 frame) -> a seek pays off over gaps > {seek_ms / decode_ms:.2f} s "
        "(plus the format's pre-roll)"
    )


def measure(
    fmt: str,
    minutes: float,
    coverage: float,
    recordings: int,
    repeats: int,
    seeks: bool = False,
    preroll: float | None = None,
) -> str:
    seconds = minutes * 60
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_recordings(tmp, fmt, minutes, recordings)
        part, full = segments(paths, seconds, coverage), segments(paths, seconds, 1.0)
        runs = {
            f"streaming whole @ {coverage:g}": (part, False),
            f"sparse @ {coverage:g}": (part, True),
            "full coverage (1.0)": (full, True),
        }
        walls: dict[str, list[float]] = {k: [] for k in runs}
        results = {}
        for _ in range(repeats):  # alternating: drifts hit all alike
            for name, (table, seek) in runs.items():
                wall, out, counts = run_stage(table, seek, preroll)
                walls[name].append(wall)
                results[name] = (out, counts)
        frames = recordings * seconds * 16000
        lines.append(
            f"format={fmt} recordings={recordings} x {minutes:g} min coverage={coverage:g} "
            f"repeats={repeats} cpu={cpu_name()!r}"
            + ("" if preroll is None else f" codec pre-roll={preroll:g} s")
        )
        lines.append(
            f"{'run':<24} {'segments':>8} {'seg audio s':>11} {'wall s':>8} "
            f"{'audio s/wall s':>14} {'decoded':>8} {'seeks':>6}"
        )
        rate = {}
        for name, (table, _) in runs.items():
            audio_s = sum(e - s for s, e in zip(table["start_s"], table["end_s"], strict=True))
            wall = statistics.median(walls[name])
            rate[name] = audio_s / wall
            counts = results[name][1]
            lines.append(
                f"{name:<24} {len(table['start_s']):>8} {audio_s:>11.1f} {wall:>8.3f} "
                f"{rate[name]:>14.1f} {counts['decoded'] / frames:>8.1%} {counts['seeks']:>6}"
            )
        names = list(runs)
        diff = max_diff(results[names[0]][0], results[names[1]][0])
        lines.append(
            f"sparse / full coverage: {rate[names[1]] / rate[names[2]]:.2f} (goal >= 0.6); "
            f"sparse / streaming whole: {rate[names[1]] / rate[names[0]]:.2f}; "
            f"values sparse vs streaming: max |diff| {diff:.3g}"
        )
        if seeks:
            lines.append(crossover(paths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sparse_decode", description=__doc__)
    p.add_argument("--format", choices=("opus", "flac", "wav16", "ogg"), default="opus")
    p.add_argument("--recording-minutes", type=float, default=10.0)
    p.add_argument("--coverage", type=float, default=0.1)
    p.add_argument("--recordings", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--crossover", action="store_true", help="also print the seek crossover")
    p.add_argument(
        "--preroll",
        type=float,
        default=None,
        help="seconds decoded before a seek in Opus/Vorbis (default: reading.CODEC_PREROLL_S)",
    )
    args = p.parse_args(argv)
    if not 0 < args.coverage <= 1:
        p.error("--coverage must be in (0, 1]")
    print(
        measure(
            args.format,
            args.recording_minutes,
            args.coverage,
            args.recordings,
            args.repeats,
            args.crossover,
            args.preroll,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

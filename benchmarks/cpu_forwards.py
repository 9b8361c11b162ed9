"""A CPU model actor's forwards: one at a time on N torch threads, or N at once on one thread
each; alone, and beside processes that decode FLAC as the job's decode tasks do.

    python -m benchmarks.cpu_forwards --arch tiny --seconds 600 --json out.json

The engine (no Ray) computes the same generated audio (WenetSpeech-like mixed lengths, or
``--utt-seconds`` fixed) in calls of ``--call-seconds``, float32, in the two ways it can run
forwards on N threads (``Engine(..., cpu_strategy=...)``, :mod:`hubert_ray.model.threads`):

    one_at_a_time   one forward at a time on N torch threads (``threaded``; what a plain
                    script does)
    at_once         N forwards at once, one torch thread each (``at_once``)

each alone and beside ``--decoders`` processes decoding a FLAC file in a loop, the four rows
alternating for ``--repeats`` rounds. Prints x realtime (audio seconds / wall seconds of the
forwards) per row, each row's median and the ratios of the medians at_once / one_at_a_time,
and writes them to ``--json``, with what an engine's own timing at start chose in each round
(``calibrations``: the engine report's ``cpu_strategy``; a job's engine keeps the faster way).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from benchmarks.workloads import make_lengths, make_model, make_raw

SR = 16_000
WAYS = ("one_at_a_time", "at_once")


def decode_loop(path: str, stop) -> None:
    """Decode ``path`` (FLAC, 16 kHz) again and again until ``stop`` is set."""
    import soundfile as sf

    while not stop.is_set():
        sf.read(path, dtype="float32")


def lengths_of(args) -> list[int]:
    mixed = args.utt_seconds == "mixed"
    return make_lengths(2.5 if mixed else float(args.utt_seconds), mixed, args.seconds, 7)


def measure(args, way: str, model: str, flac: str) -> dict[int, float]:
    """x realtime of one way, alone and beside ``args.decoders`` decoding processes (in a
    process of its own: nothing of the other way's left in it)."""
    from hubert_ray.core.config import ModelConfig
    from hubert_ray.model.engine import Engine

    lengths = lengths_of(args)
    raw, audio_s = make_raw(lengths, seed=11), sum(lengths) / SR
    calls, ids, audio, held = [], [], [], 0.0
    for i, x in enumerate(raw):
        ids.append(f"u{i}")
        audio.append(x)
        held += len(x) / SR
        if held >= args.call_seconds or i == len(raw) - 1:
            calls.append((ids, audio))
            ids, audio, held = [], [], 0.0
    config = ModelConfig(model_uri=model, layers="last", dtype="float32", num_threads=args.threads)
    strategy = "at_once" if way == "at_once" else "threaded"
    engine = Engine(config, model, self_test=False, cpu_strategy=strategy)
    engine.run(*calls[0])  # warm-up: allocator, kernels
    out = {}
    for decoders in (0, args.decoders):
        stop = mp.Event()
        procs = [mp.Process(target=decode_loop, args=(flac, stop)) for _ in range(decoders)]
        for proc in procs:
            proc.start()
        try:
            t0 = time.perf_counter()
            for ids, audio in calls:
                engine.run(ids, audio)
            out[decoders] = audio_s / (time.perf_counter() - t0)
        finally:
            stop.set()
            for proc in procs:
                proc.join()
    return out


def calibration(args, model: str) -> dict:
    """What an engine's own timing at start (as a job's) measured and chose."""
    from hubert_ray.core.config import ModelConfig
    from hubert_ray.model.engine import Engine

    config = ModelConfig(model_uri=model, layers="last", dtype="float32", num_threads=args.threads)
    return Engine(config, model, self_test=False).report()["cpu_strategy"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="tiny", help="tiny, small, base6, base, large")
    p.add_argument("--seconds", type=float, default=600.0, help="audio per row")
    p.add_argument("--utt-seconds", default="mixed", help="'mixed' or a fixed length")
    p.add_argument("--call-seconds", type=float, default=640.0, help="audio per engine call")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="N")
    p.add_argument("--decoders", type=int, default=1, help="decoding processes beside")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the four rows")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import soundfile as sf

    lengths = lengths_of(args)
    audio_s = sum(lengths) / SR

    rows, calibrations = [], []
    with tempfile.TemporaryDirectory() as work:
        model = make_model(args.arch, os.path.join(work, args.arch))
        flac = os.path.join(work, "decode.flac")  # what the decoding processes read
        first = lengths[: int(np.searchsorted(np.cumsum(lengths), 60 * SR)) + 1]
        sf.write(flac, np.concatenate(make_raw(first, seed=11)), SR, "PCM_16", format="FLAC")
        spawn = mp.get_context("spawn")
        for repeat in range(args.repeats):  # rows alternate: the machine's drift hits all
            for way in WAYS:
                with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    got = pool.submit(measure, args, way, model, flac).result()
                for decoders, x in got.items():
                    row = {"way": way, "decoders": decoders, "repeat": repeat}
                    rows.append(row | {"x_realtime": round(x, 1)})
                    print(json.dumps(rows[-1]), flush=True)
            if args.threads > 1:
                with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    calibrations.append(pool.submit(calibration, args, model).result())
                print(json.dumps({"calibration": calibrations[-1]}), flush=True)
    median = {
        (way, d): float(
            np.median([r["x_realtime"] for r in rows if (r["way"], r["decoders"]) == (way, d)])
        )
        for way in WAYS
        for d in (0, args.decoders)
    }
    ratios = {
        f"at_once / one_at_a_time, {d} decoders": round(
            median[("at_once", d)] / median[("one_at_a_time", d)], 2
        )
        for d in (0, args.decoders)
    }
    out = {"arch": args.arch, "threads": args.threads, "audio_s": round(audio_s, 1)}
    out |= {"median_x_realtime": {f"{w}, {d} decoders": v for (w, d), v in median.items()}}
    out |= {"rows": rows, "ratios": ratios, "calibrations": calibrations}
    print(json.dumps(out["median_x_realtime"]))
    print(json.dumps(ratios))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

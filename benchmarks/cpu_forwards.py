"""A CPU model actor's forwards: one at a time on N torch threads, or N at once on one thread
each; alone, and beside processes that decode FLAC as the job's decode tasks do.

    python -m benchmarks.cpu_forwards --arch tiny --seconds 600 --json out.json

The engine (no Ray) computes the same generated audio (WenetSpeech-like mixed lengths, or
``--utt-seconds`` fixed) in calls of ``--call-seconds``, float32, in two ways:

    one_at_a_time   one forward at a time on N torch threads (the CPU engine before it ran
                    forwards at once; what a plain script does)
    at_once         N forwards at once, one torch thread each (the CPU engine's default)

each alone and beside ``--decoders`` processes decoding a FLAC file in a loop. Prints x
realtime (audio seconds / wall seconds of the forwards) per row and the ratios at_once /
one_at_a_time, and writes them to ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import tempfile
import time

import numpy as np

from benchmarks.workloads import make_lengths, make_model, make_raw

SR = 16_000


def decode_loop(path: str, stop) -> None:
    """Decode ``path`` (FLAC, 16 kHz) again and again until ``stop`` is set."""
    import soundfile as sf

    while not stop.is_set():
        sf.read(path, dtype="float32")


def timed(engine, calls: list[tuple[list[str], list[np.ndarray]]]) -> float:
    engine.run(*calls[0])  # warm-up: allocator, kernels
    t0 = time.perf_counter()
    for ids, audio in calls:
        engine.run(ids, audio)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="tiny", help="tiny, small, base, large")
    p.add_argument("--seconds", type=float, default=600.0, help="audio per row")
    p.add_argument("--utt-seconds", default="mixed", help="'mixed' or a fixed length")
    p.add_argument("--call-seconds", type=float, default=640.0, help="audio per engine call")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="N")
    p.add_argument("--decoders", type=int, default=1, help="decoding processes beside")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import soundfile as sf
    import torch

    from hubert_ray.config import ModelConfig
    from hubert_ray.engine import Engine

    mixed = args.utt_seconds == "mixed"
    lengths = make_lengths(2.5 if mixed else float(args.utt_seconds), mixed, args.seconds, 7)
    raw = make_raw(lengths, seed=11)
    calls, ids, audio, held = [], [], [], 0.0
    for i, x in enumerate(raw):
        ids.append(f"u{i}")
        audio.append(x)
        held += len(x) / SR
        if held >= args.call_seconds or i == len(raw) - 1:
            calls.append((ids, audio))
            ids, audio, held = [], [], 0.0
    audio_s = sum(lengths) / SR

    rows = []
    with tempfile.TemporaryDirectory() as work:
        model = make_model(args.arch, os.path.join(work, args.arch))
        flac = os.path.join(work, "decode.flac")
        sf.write(flac, np.concatenate(raw)[: 60 * SR], SR, format="FLAC", subtype="PCM_16")
        config = ModelConfig(model_uri=model, layers="last", dtype="float32")
        for way in ("one_at_a_time", "at_once"):
            if way == "one_at_a_time":
                engine = Engine(dataclasses.replace(config, num_threads=1), model, self_test=False)
                torch.set_num_threads(args.threads)
            else:
                engine = Engine(
                    dataclasses.replace(config, num_threads=args.threads), model, self_test=False
                )
            for decoders in (0, args.decoders):
                stop = mp.Event()
                procs = [mp.Process(target=decode_loop, args=(flac, stop)) for _ in range(decoders)]
                for proc in procs:
                    proc.start()
                try:
                    wall = timed(engine, calls)
                finally:
                    stop.set()
                    for proc in procs:
                        proc.join()
                row = {
                    "way": way,
                    "decoders": decoders,
                    "x_realtime": round(audio_s / wall, 1),
                    "wall_s": round(wall, 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    by = {(r["way"], r["decoders"]): r["x_realtime"] for r in rows}
    ratios = {
        f"at_once / one_at_a_time, {d} decoders": round(
            by[("at_once", d)] / by[("one_at_a_time", d)], 2
        )
        for d in sorted({0, args.decoders})
    }
    out = {"arch": args.arch, "threads": args.threads, "audio_s": round(audio_s, 1)}
    out |= {"rows": rows, "ratios": ratios}
    print(json.dumps(ratios))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A synthetic corpus shaped like WenetSpeech: long Opus recordings + a ``WenetSpeech.json``.

Segment durations follow the real corpus' statistics (mean ≈ 2.5 s, median ≈ 2.0 s,
p99 ≈ 8.4 s, a few over 60 s): a log-normal body fitted so that, together with two small uniform
tails, the mixture has exactly that median, p99 and mean:

* body: log-normal, ``mu = 0.690`` (e^mu ≈ 1.99 s), ``sigma = 0.564``, weight 1 - 0.0045 - 0.0002
* 0.45 % uniform in [10, 60] s (long utterances)
* 0.02 % uniform in [60, 120] s (the few very long ones)

(solved numerically: with no mass above 10 s the median and p99 pin ``mu``/``sigma``; the
tail weight then sets the mean). :func:`segment_durations` draws from it;
``tests/unit/test_wenetspeech.py`` checks the statistics on a large sample.

Subsets are tagged like the real file: every training segment is ``{L}``, about half also
``{M}``, about a fifth also ``{S}`` (so S ⊂ M ⊂ L); DEV, TEST_NET and TEST_MEETING are separate
recordings tagged only with their own set. Nothing is downloaded; all is deterministic from a
seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import numpy as np

LOGNORMAL_MU = 0.690
LOGNORMAL_SIGMA = 0.564
LONG_FRACTION, LONG_RANGE_S = 0.0045, (10.0, 60.0)
VERY_LONG_FRACTION, VERY_LONG_RANGE_S = 0.0002, (60.0, 120.0)
MIN_SEGMENT_S = 0.2
M_FRACTION, S_FRACTION = 0.5, 0.2  # of training segments also in M / in S
EVAL_SETS = {"DEV": "dev", "TEST_NET": "test_net", "TEST_MEETING": "test_meeting"}

_HANZI = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作"
    "地于出就分对成会可主发年动同工也能下过子说"
)


def segment_durations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` segment durations in seconds with WenetSpeech's statistics (see module doc)."""
    u = rng.random(n)
    out = np.exp(rng.normal(LOGNORMAL_MU, LOGNORMAL_SIGMA, n))
    long_ = u < LONG_FRACTION
    very = (u >= LONG_FRACTION) & (u < LONG_FRACTION + VERY_LONG_FRACTION)
    out[long_] = rng.uniform(*LONG_RANGE_S, int(long_.sum()))
    out[very] = rng.uniform(*VERY_LONG_RANGE_S, int(very.sum()))
    return np.maximum(out, MIN_SEGMENT_S)


_TEXT_POOL: dict[int, str] = {}


def _text(rng: np.random.Generator, seconds: float) -> str:
    """~4 random characters a second: a slice of a per-seed pool (fast for big files)."""
    pool = _TEXT_POOL.get(id(rng))
    if pool is None:
        _TEXT_POOL.clear()
        pool = _TEXT_POOL[id(rng)] = "".join(
            _HANZI[i] for i in rng.integers(0, len(_HANZI), 1 << 16)
        )
    k = max(1, int(seconds * 4))
    o = int(rng.integers(0, len(pool) - k)) if k < len(pool) else 0
    return pool[o : o + k]


def _train_tags(rng: np.random.Generator) -> list[str]:
    r = rng.random()
    return ["{L}"] + (["{M}"] if r < M_FRACTION else []) + (["{S}"] if r < S_FRACTION else [])


def audio_entry(
    aid: str,
    path: str,
    duration_s: float,
    rng: np.random.Generator,
    subset: str = "train",
    forced_s: Iterable[float] = (),
) -> dict:
    """One ``audios[]`` object: segments laid end to end with small gaps inside ``duration_s``.

    ``subset`` is "train" (tags from {L}, {M}, {S}) or an evaluation set name (DEV, ...).
    ``forced_s`` durations are placed first (e.g. one long segment to exercise chunking).
    """
    segments: list[dict] = []
    t = float(rng.uniform(0.1, 1.0))
    forced = list(forced_s)
    drawn: list[float] = []
    while True:
        if not drawn:
            drawn = segment_durations(max(8, int(duration_s / 2.5) + 8), rng).tolist()[::-1]
        dur = forced.pop(0) if forced else drawn.pop()
        if t + dur > duration_s - 0.05:
            if dur > 10.0:  # a long draw that does not fit: try a normal one instead
                continue
            break
        tags = _train_tags(rng) if subset == "train" else ["{" + subset + "}"]
        segments.append(
            {
                "sid": f"{aid}_S{len(segments):05d}",
                "confidence": 1.0,
                "begin_time": round(t, 3),
                "end_time": round(t + dur, 3),
                "subsets": tags,
                "text": _text(rng, dur),
            }
        )
        t += dur + float(rng.uniform(0.05, 0.8))
    return {
        "aid": aid,
        "title": f"synthetic {aid}",
        "url": "none",
        "path": path,
        "source": "youtube" if subset == "train" else "podcast",
        "tags": ["synthetic"],
        "duration": round(duration_s, 3),
        "format": "opus",
        "sample_rate": 16000,
        "segments": segments,
    }


def write_wenetspeech_json(path: str, audios: Iterable[dict | str]) -> None:
    """Write a WenetSpeech-shaped JSON file, streaming the ``audios`` array (any size).

    ``audios`` holds audio objects, or the same already serialised as JSON text.

    Metadata keys come both before and after ``audios`` (parsers must not rely on the order).
    """
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"dataset": "WenetSpeech (synthetic)", "language": "Chinese",\n')
        f.write(' "version": "synthetic-1", "audios": [\n')
        for i, a in enumerate(audios):
            if i:
                f.write(",\n")
            f.write(a if isinstance(a, str) else json.dumps(a, ensure_ascii=False))
        f.write('\n],\n "description": "generated by hubert_ray.testing.synth_wenetspeech"}\n')


def _aid(kind: str, i: int) -> str:
    return f"{kind}{i:010d}_synth{i:04x}"


def iter_text_only_audios(
    n_audios: int, seed: int = 0, recording_s: tuple[float, float] = (600.0, 3600.0)
) -> Iterator[dict]:
    """Audio objects for a text-only JSON (no audio written): long training recordings."""
    rng = np.random.default_rng(seed)
    for i in range(n_audios):
        aid = _aid("Y", i)
        path = f"audio/train/youtube/B{i // 1000:05d}/{aid}.opus"
        yield audio_entry(aid, path, float(rng.uniform(*recording_s)), rng)


def make_wenetspeech_json_text_only(path: str, target_bytes: int, seed: int = 0) -> dict:
    """Write a text-only WenetSpeech.json of at least ``target_bytes``; return its counts."""
    counts = {"audios": 0, "segments": 0}

    def until_big_enough() -> Iterator[str]:
        written = 0
        for a in iter_text_only_audios(10**9, seed):
            counts["audios"] += 1
            counts["segments"] += len(a["segments"])
            text = json.dumps(a, ensure_ascii=False)
            yield text
            written += len(text.encode())
            if written >= target_bytes:
                return

    write_wenetspeech_json(path, until_big_enough())
    counts["bytes"] = os.path.getsize(path)
    return counts


def make_wenetspeech_corpus(
    root: str,
    seed: int = 0,
    train_recording_s: tuple[float, ...] = (60.0, 75.0, 90.0),
    eval_recording_s: float = 20.0,
    long_segment_s: float = 15.0,
) -> str:
    """Write a small WenetSpeech-shaped corpus under ``root``; return the JSON path.

    Training recordings of ``train_recording_s`` seconds plus one recording each for DEV,
    TEST_NET and TEST_MEETING, all 16 kHz mono Ogg Opus under ``root/audio/...`` with the real
    corpus' directory layout. The first training recording starts with one ``long_segment_s``
    segment (longer than the default 10 s chunk). Defaults: 4 min of audio.
    """
    from hubert_ray.testing.synth import synth_signal, write_audio

    rng = np.random.default_rng(seed)
    entries: list[dict] = []
    plan: list[tuple[str, str, float, str]] = []
    for i, dur in enumerate(train_recording_s):
        aid = _aid("Y", i)
        plan.append((aid, f"audio/train/youtube/B00000/{aid}.opus", dur, "train"))
    for j, (name, folder) in enumerate(EVAL_SETS.items()):
        aid = _aid("X", j)
        plan.append((aid, f"audio/{folder}/podcast/B00000/{aid}.opus", eval_recording_s, name))
    for k, (aid, rel, dur, subset) in enumerate(plan):
        forced = [long_segment_s] if k == 0 and long_segment_s else []
        entries.append(audio_entry(aid, rel, dur, rng, subset, forced))
        full = os.path.join(root, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        write_audio(full, synth_signal(dur, 16000, 1, seed=seed * 1000 + k), 16000, "opus")
    path = os.path.join(root, "WenetSpeech.json")
    write_wenetspeech_json(path, entries)
    return path

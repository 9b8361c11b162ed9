"""Benchmark workloads: utterance lengths, speech-like audio, corpora on disk, models with random
weights (nothing is downloaded). Shared by every benchmark."""

from __future__ import annotations

import json
import os

import numpy as np

SR = 16_000
MIXED_MIN_S, MIXED_MAX_S = 0.3, 20.0


# -- inputs ---------------------------------------------------------------------------------------
def numbers(text: str | None, kind: type) -> list:
    """A comma-separated option ("1,16,64") as a list of ``kind``; empty or unset: []."""
    return [kind(v) for v in (text or "").split(",") if v.strip()]


def parse_dists(spec: str) -> list[tuple[str, float, bool]]:
    """``"10,mixed"`` → [(name, seconds, is_mixed)]; ``mixed:MEAN`` sets the mean (default 2.5)."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part.startswith("mixed"):
            mean = float(part.split(":", 1)[1]) if ":" in part else 2.5
            out.append((f"mixed{mean:g}s", mean, True))
        else:
            out.append((f"fixed{float(part):g}s", float(part), False))
    if not out:
        raise ValueError(f"--utt-seconds {spec!r}: no distribution given")
    return out


def make_lengths(seconds: float, mixed: bool, total_s: float, seed: int) -> list[int]:
    """Utterance lengths in samples. Fixed: ``round(total/seconds)`` (at least 1) items.
    Mixed (WenetSpeech-like): gamma(shape 2) lengths with the given mean, clipped to
    [0.3 s, 20 s], until ``total_s`` is reached (at least 2 items)."""
    if not mixed:
        return [int(round(seconds * SR))] * max(1, int(round(total_s / seconds)))
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < total_s * SR or len(lengths) < 2:
        d = float(np.clip(rng.gamma(2.0, seconds / 2.0), MIXED_MIN_S, MIXED_MAX_S))
        lengths.append(int(round(d * SR)))
    return lengths


def make_raw(lengths: list[int], seed: int) -> list[np.ndarray]:
    """Speech-like mono 16 kHz signals (before normalisation)."""
    from hubert_ray.core.signal import synth_signal

    return [synth_signal(n / SR, SR, 1, seed=seed + i)[:, 0] for i, n in enumerate(lengths)]


ARCHS = ("tiny", "small", "base6", "base", "large")


def make_model(arch: str, path: str) -> str:
    """A model directory with random weights: ``tiny`` (the tests' model), ``small`` (4 layers x
    256 dims: a model-bound CPU workload), ``base6`` (6 layers x 384 dims: a heavier one),
    ``base`` (chinese-hubert-base's architecture:
    ``HubertConfig()``), ``large`` (chinese-hubert-large's: 24 x 1024, layer-norm frontend with
    conv bias, stable layer norm)."""
    if arch == "tiny":
        from hubert_ray.testing.synth import make_tiny_model

        return make_tiny_model(path)
    import torch
    from transformers import HubertConfig, HubertModel

    configs = {
        "small": dict(
            hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
        ),
        "base6": dict(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536
        ),
        "base": {},
        "large": dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            feat_extract_norm="layer",
            do_stable_layer_norm=True,
            conv_bias=True,
        ),
    }
    if arch not in configs:
        raise ValueError(f"arch {arch!r}: expected one of {ARCHS}")
    torch.manual_seed(0)
    model = HubertModel(HubertConfig(**configs[arch])).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def recording_blocks(table, rows: int) -> list:
    """A segment table (recording-ordered) cut at recording boundaries into blocks of about
    ``rows`` rows, as the job's tasks hand segments to the decode stage."""
    ids = table.column("recording_id").to_pylist()
    blocks, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (ids[i] != ids[i - 1] and i - start >= rows):
            if i > start:
                blocks.append(table.slice(start, i - start))
            start = i
    return blocks


def decoded_table(items: list[np.ndarray], prefix: str):
    """A pre-decoded batch in ``DECODED_SCHEMA`` (what the decode stage hands the actor)."""
    import pyarrow as pa

    from hubert_ray.corpus.audio import DECODED_SCHEMA

    lengths = np.array([len(x) for x in items], dtype=np.int64)
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    audio = pa.LargeListArray.from_arrays(
        pa.array(offsets), pa.array(np.concatenate(items).astype(np.float32))
    )
    n = len(items)
    ids = [f"{prefix}-{i}" for i in range(n)]
    return pa.Table.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.array(ids, pa.string()),
            pa.array([0.0] * n, pa.float64()),
            pa.array((lengths / SR).tolist(), pa.float64()),
            pa.array(lengths),
            audio,
            pa.nulls(n, pa.string()),
            pa.nulls(n, pa.string()),
            pa.nulls(n, pa.string()),
        ],
        schema=DECODED_SCHEMA,
    )


def write_corpus(root: str, raw: list[np.ndarray], dist: str, max_rec_s: float = 60.0) -> str:
    """Items concatenated into FLAC recordings of up to ``max_rec_s`` (16 kHz, PCM_16), one
    segment per item; returns the JSONL manifest path."""
    from hubert_ray.testing.synth import write_audio

    os.makedirs(os.path.join(root, "audio"), exist_ok=True)
    recs, cur, cur_n = [], [], 0
    for x in raw:
        if cur and cur_n + len(x) > max_rec_s * SR:
            recs.append(cur)
            cur, cur_n = [], 0
        cur.append(x)
        cur_n += len(x)
    if cur:
        recs.append(cur)
    lines = []
    k = 0
    for r, parts in enumerate(recs):
        rid = f"{dist}-rec{r:05d}"
        write_audio(os.path.join(root, "audio", f"{rid}.flac"), np.concatenate(parts), SR, "flac")
        segs, off = [], 0
        for x in parts:
            segs.append({"id": f"{rid}-{k:06d}", "start_s": off / SR, "end_s": (off + len(x)) / SR})
            off += len(x)
            k += 1
        lines.append({"id": rid, "audio": f"audio/{rid}.flac", "segments": segs})
    manifest = os.path.join(root, "manifest.jsonl")
    with open(manifest, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return manifest

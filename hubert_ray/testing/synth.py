"""Generated test/demo data: speech-like audio, a small mixed corpus, a tiny random HuBERT.

Nothing is downloaded and no binaries are checked in; everything is deterministic from a seed.
torch/transformers are imported only inside :func:`make_tiny_model`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import soundfile as sf

from hubert_ray.core.errors import MISSING_FILE, SEGMENT_OUT_OF_RANGE, TOO_SHORT, UNREADABLE_AUDIO
from hubert_ray.core.signal import synth_signal

OK = "ok"

# fmt -> (soundfile format, subtype, file extension)
FORMATS: dict[str, tuple[str, str, str]] = {
    "wav16": ("WAV", "PCM_16", "wav"),
    "wav24": ("WAV", "PCM_24", "wav"),
    "wavf32": ("WAV", "FLOAT", "wav"),
    "flac": ("FLAC", "PCM_16", "flac"),
    "ogg": ("OGG", "VORBIS", "ogg"),
    "opus": ("OGG", "OPUS", "opus"),
}
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)  # the only rates libsndfile's Opus writer takes


def write_audio(path: str, samples: np.ndarray, sr: int, fmt: str) -> None:
    """Write ``samples`` ([frames] or [frames, channels]) as ``fmt``: wav16, wav24, wavf32,
    flac, ogg (Vorbis) or opus (Ogg Opus; sr must be one of 8k/12k/16k/24k/48k)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is invalid; allowed: {', '.join(FORMATS)}")
    if fmt == "opus" and sr not in OPUS_RATES:
        raise ValueError(f"opus cannot be written at {sr} Hz; allowed: {OPUS_RATES}")
    container, subtype, _ = FORMATS[fmt]
    sf.write(path, samples, sr, format=container, subtype=subtype)


# (id, fmt, sr, channels, duration_s, segments or None = whole file)
# segments: list of (suffix, start_s, end_s, expected outcome)
_RECORDINGS: list[tuple] = [
    (
        "wav16_16k_1ch",
        "wav16",
        16000,
        1,
        6.0,
        [("0", 0.0, 2.5, OK), ("1", 2.5, 6.0, OK), ("tiny", 3.0, 3.02, TOO_SHORT)],
    ),
    ("wav16_8k_1ch", "wav16", 8000, 1, 4.0, None),
    (
        "wav24_44k_2ch",
        "wav24",
        44100,
        2,
        5.0,
        [("0", 0.0, 2.0, OK), ("1", 2.0, 5.05, OK)],
    ),  # end 50 ms past the audio: clipped
    ("wav24_22k_6ch", "wav24", 22050, 6, 3.0, None),
    ("wavf32_48k_6ch", "wavf32", 48000, 6, 3.0, None),
    ("wavf32_22k_1ch", "wavf32", 22050, 1, 4.0, [("0", 0.5, 1.5, OK), ("1", 1.5, 3.9, OK)]),
    ("flac_16k_1ch", "flac", 16000, 1, 5.0, None),
    ("flac_44k_2ch", "flac", 44100, 2, 4.0, [("0", 0.0, 4.0, OK)]),
    ("flac_22k_6ch", "flac", 22050, 6, 3.0, None),
    ("flac_8k_2ch", "flac", 8000, 2, 3.0, [("0", 0.0, 1.2, OK), ("1", 1.2, 3.0, OK)]),
    ("ogg_16k_1ch", "ogg", 16000, 1, 4.0, [("0", 0.0, 2.0, OK), ("1", 2.0, 4.0, OK)]),
    ("ogg_44k_2ch", "ogg", 44100, 2, 4.0, None),
    ("ogg_48k_6ch", "ogg", 48000, 6, 3.0, None),
    ("ogg_22k_1ch", "ogg", 22050, 1, 3.0, [("0", 0.25, 2.75, OK)]),
    ("opus_48k_1ch", "opus", 48000, 1, 4.0, [("0", 0.0, 1.5, OK), ("1", 1.5, 4.0, OK)]),
    ("opus_16k_2ch", "opus", 16000, 2, 4.0, None),
    ("opus_8k_1ch", "opus", 8000, 1, 3.0, None),
    ("opus_48k_6ch", "opus", 48000, 6, 2.0, None),
    # Long recording cut into several segments, one of them longer than 10 s (chunking).
    (
        "long_flac_16k_1ch",
        "flac",
        16000,
        1,
        40.0,
        [
            ("0", 0.0, 5.0, OK),
            ("1", 5.0, 10.0, OK),
            ("2", 10.0, 22.5, OK),
            ("3", 22.5, 34.0, OK),
            ("4", 34.0, 40.0, OK),
        ],
    ),
    # Whole-file segment over 10 s.
    ("long_wav16_48k_2ch", "wav16", 48000, 2, 15.0, None),
    # Edge lengths: < 400 samples at 16 kHz → too_short; just over 400 → ok.
    ("tiny_wav16_16k", "wav16", 16000, 1, 0.02, None),  # 320 samples
    ("tiny_flac_44k", "flac", 44100, 1, 0.015, None),  # ~240 samples at 16 kHz
    ("short_wav16_16k", "wav16", 16000, 1, 0.03, None),  # 480 samples: ok
    ("silent_wav16_16k", "wav16", 16000, 1, 1.0, None),  # all zeros: normalises to zeros
    # Segment ends far past (and one starts after) the end of the audio.
    (
        "range_flac_16k",
        "flac",
        16000,
        1,
        4.0,
        [
            ("0", 0.0, 2.0, OK),
            ("past", 2.0, 60.0, SEGMENT_OUT_OF_RANGE),
            ("after", 10.0, 11.0, SEGMENT_OUT_OF_RANGE),
        ],
    ),
]

# (id, file name, kind, expected) — broken or absent objects, all whole-file.
_BROKEN: list[tuple[str, str, str, str]] = [
    ("corrupt_random", "corrupt_random.flac", "random", UNREADABLE_AUDIO),
    ("truncated_header", "truncated_header.wav", "truncated", UNREADABLE_AUDIO),
    ("zero_bytes", "zero_bytes.wav", "empty", UNREADABLE_AUDIO),
    ("text_as_flac", "text_as_flac.flac", "text", UNREADABLE_AUDIO),
    ("missing", "missing.flac", "missing", MISSING_FILE),
]


def make_corpus(root: str, seed: int = 0) -> str:
    """Write a small mixed corpus under ``root``; return the JSONL manifest path.

    Also writes ``root/expected.json``: segment_id → "ok" or the expected error reason.
    Whole-file recordings have no ``segments`` key and one segment with id = recording id.
    """
    audio_dir = os.path.join(root, "audio")
    os.makedirs(audio_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines: list[dict] = []
    expected: dict[str, str] = {}

    for k, (rid, fmt, sr, ch, dur, segs) in enumerate(_RECORDINGS):
        rel = f"audio/{rid}.{FORMATS[fmt][2]}"
        if rid.startswith("silent"):
            samples = np.zeros((int(round(dur * sr)), ch), dtype=np.float32)
        else:
            samples = synth_signal(dur, sr, ch, seed=seed * 1000 + k)
        write_audio(os.path.join(root, rel), samples, sr, fmt)
        rec: dict = {"id": rid, "audio": rel}
        if segs is None:
            expected[rid] = TOO_SHORT if rid.startswith("tiny") else OK
        else:
            rec["segments"] = []
            for suffix, start, end, outcome in segs:
                sid = f"{rid}-{suffix}"
                rec["segments"].append({"id": sid, "start_s": start, "end_s": end})
                expected[sid] = outcome
        lines.append(rec)

    for rid, name, kind, outcome in _BROKEN:
        path = os.path.join(audio_dir, name)
        if kind == "random":
            data = rng.bytes(4096)
        elif kind == "truncated":
            full = os.path.join(audio_dir, "_full.wav")
            write_audio(full, synth_signal(1.0, 16000, 1, seed=seed), 16000, "wav16")
            with open(full, "rb") as f:
                data = f.read(30)  # RIFF header cut inside the fmt chunk
            os.remove(full)
        elif kind == "empty":
            data = b""
        elif kind == "text":
            data = b"this is not audio, just a text file with a .flac name\n" * 8
        else:  # missing: referenced by the manifest, never written
            data = None
        if data is not None:
            with open(path, "wb") as f:
                f.write(data)
        lines.append({"id": rid, "audio": f"audio/{name}"})
        expected[rid] = outcome

    # Interleave broken recordings among good ones (deterministically) so batches mix them.
    order = rng.permutation(len(lines))
    manifest = os.path.join(root, "manifest.jsonl")
    with open(manifest, "w") as f:
        for i in order:
            f.write(json.dumps(lines[i]) + "\n")
    with open(os.path.join(root, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    return manifest


# The tiny test models' size (every family): HuBERT's conv frontend geometry, 32-dim everywhere.
_TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(32,) * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)


def make_tiny_model(path: str, **overrides) -> str:
    """Save a tiny random HuBERT (safetensors) at ``path``; same conv frontend geometry as the
    real model, so ``frames = floor((N - 400) / 320) + 1``. Returns ``path``."""
    import torch
    from transformers import HubertConfig, HubertModel

    kwargs = {**_TINY, "feat_extract_norm": "group", **overrides}
    config = HubertConfig(**kwargs)
    torch.manual_seed(0)
    model = HubertModel(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


# model_type -> transformers (config class, model class)
_FAMILY_CLASSES = {
    "hubert": ("HubertConfig", "HubertModel"),
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"),
    "wavlm": ("WavLMConfig", "WavLMModel"),
    "data2vec-audio": ("Data2VecAudioConfig", "Data2VecAudioModel"),
}
# variant -> config overrides: base = group-norm frontend + post-LN encoder; large = layer-norm
# frontend with conv bias + stable-layer-norm (pre-LN) encoder, as in HuBERT/wav2vec2/WavLM
# large; posbn = HuBERT's batch norm before the positional convolution.
FAMILY_VARIANTS = {
    "base": {"feat_extract_norm": "group"},
    "large": {"feat_extract_norm": "layer", "do_stable_layer_norm": True, "conv_bias": True},
    "posbn": {"feat_extract_norm": "group", "conv_pos_batch_norm": True},
}


def make_tiny_family_model(
    path: str,
    model_type: str = "hubert",
    variant: str = "base",
    preprocessor: dict | None = None,
    **overrides,
) -> str:
    """Save a tiny random model of ``model_type`` (``hubert``, ``wav2vec2``, ``wavlm``,
    ``data2vec-audio``) and ``variant`` (:data:`FAMILY_VARIANTS`; data2vec-audio has one
    architecture: layer-norm frontend, post-LN encoder, stacked positional convolutions) at
    ``path`` (safetensors). Unlike :func:`make_tiny_model`, every norm's affine parameters,
    running statistics and every bias are random too (the stock initialisation leaves them at
    1 / 0, which would hide a padding effect that passes through them). ``preprocessor``: the
    keyword arguments of a ``Wav2Vec2FeatureExtractor`` saved beside it
    (``preprocessor_config.json``), or ``None`` for none. Returns ``path``."""
    import torch
    import transformers

    config_cls, model_cls = _FAMILY_CLASSES[model_type]
    kwargs = dict(_TINY)
    if model_type == "data2vec-audio":
        # num_conv_pos_embeddings is the number of stacked positional conv layers here
        kwargs.update(num_conv_pos_embeddings=3, conv_pos_kernel_size=5, conv_bias=True)
    else:
        kwargs.update(FAMILY_VARIANTS[variant])
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    gen = torch.Generator().manual_seed(1)

    def noise(t: torch.Tensor, scale: float = 0.3) -> torch.Tensor:
        return scale * torch.randn(t.shape, generator=gen)

    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm1d)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, norms) and getattr(m, "weight", None) is not None:
                m.weight.copy_(1.0 + noise(m.weight))
                m.bias.copy_(noise(m.bias))
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(noise(m.running_mean))
                m.running_var.copy_(1.0 + noise(m.running_var).abs())
            if isinstance(m, torch.nn.Conv1d) and m.bias is not None:
                m.bias.copy_(noise(m.bias))
    model.save_pretrained(path, safe_serialization=True)
    if preprocessor is not None:
        args = {"feature_size": 1, "sampling_rate": 16000, "padding_value": 0.0, **preprocessor}
        transformers.Wav2Vec2FeatureExtractor(**args).save_pretrained(path)
    return path

"""Unit tests for the decode stage (corpus.audio) and the generators (testing.synth).

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/integration/test_audio.py``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

import hubert_ray.corpus.audio as audio_mod
import hubert_ray.corpus.reading as reading_mod
from hubert_ray.core.config import DecodeConfig
from hubert_ray.core.errors import (
    MISSING_FILE,
    NON_FINITE,
    SEGMENT_OUT_OF_RANGE,
    STAGE_DECODE,
    TOO_SHORT,
    UNREADABLE_AUDIO,
)
from hubert_ray.corpus.audio import (
    DECODED_SCHEMA,
    DecodeError,
    DecodeStage,
    SegmentError,
    clear_cache,
    cut_segment,
    normalise,
    read_audio,
    to_mono_16k,
)
from hubert_ray.io.storage import resolve
from hubert_ray.testing.synth import (
    FORMATS,
    make_corpus,
    make_tiny_model,
    synth_signal,
    write_audio,
)

INPUT_SCHEMA = pa.schema(
    [
        ("segment_id", pa.string()),
        ("recording_id", pa.string()),
        ("audio_uri", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
    ]
)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corpus"))
    manifest = make_corpus(root, seed=0)
    with open(os.path.join(root, "expected.json")) as f:
        expected = json.load(f)
    return root, manifest, expected


def manifest_rows(manifest: str) -> list[dict]:
    """Explode the JSONL manifest into DecodeStage input rows (recording-contiguous)."""
    base = os.path.dirname(manifest)
    rows = []
    with open(manifest) as f:
        for line in f:
            rec = json.loads(line)
            uri = resolve(base, rec["audio"])
            segs = rec.get("segments") or [{"id": rec["id"], "start_s": 0.0, "end_s": None}]
            for s in segs:
                rows.append(
                    {
                        "segment_id": s["id"],
                        "recording_id": rec["id"],
                        "audio_uri": uri,
                        "start_s": s["start_s"],
                        "end_s": s["end_s"],
                    }
                )
    return rows


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)


def fft_peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


# --- read / mono / resample -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("sr", [8000, 16000, 22050, 44100, 48000])
def test_roundtrip_formats(tmp_path, fmt, sr):
    if fmt == "opus" and sr in (22050, 44100):
        with pytest.raises(ValueError, match="opus"):
            write_audio(str(tmp_path / "x.opus"), np.zeros((sr, 1), np.float32), sr, fmt)
        return
    duration = 1.5
    path = str(tmp_path / f"x.{FORMATS[fmt][2]}")
    write_audio(path, synth_signal(duration, sr, channels=2, seed=1), sr, fmt)
    samples, got_sr = read_audio(path)
    assert samples.dtype == np.float32 and samples.ndim == 2 and samples.shape[1] == 2
    assert got_sr == sr
    mono = to_mono_16k(samples, got_sr)
    assert mono.dtype == np.float32 and mono.ndim == 1 and mono.flags["C_CONTIGUOUS"]
    tol = 0.02 * 16000 if fmt == "opus" else 4
    assert abs(len(mono) - duration * 16000) <= tol
    assert np.isfinite(mono).all() and np.abs(mono).max() > 0.1


def test_read_audio_file_url(tmp_path):
    path = tmp_path / "a.flac"
    write_audio(str(path), synth_signal(0.5, 16000), 16000, "flac")
    samples, sr = read_audio(f"file://{path}")
    assert sr == 16000 and samples.shape == (8000, 1)


def test_read_audio_single_whole_object_read(tmp_path, monkeypatch):
    import fsspec.implementations.local as local

    path = tmp_path / "a.wav"
    write_audio(str(path), synth_signal(0.5, 16000), 16000, "wav16")
    calls = []
    orig = local.LocalFileSystem.cat_file

    def spy(self, p, *a, **k):
        calls.append(p)
        return orig(self, p, *a, **k)

    monkeypatch.setattr(local.LocalFileSystem, "cat_file", spy)
    read_audio(str(path))
    assert len(calls) == 1


@pytest.mark.parametrize(
    "data, reason",
    [(None, MISSING_FILE), (b"", UNREADABLE_AUDIO), (b"not audio\n" * 50, UNREADABLE_AUDIO)],
)
def test_read_audio_errors(tmp_path, data, reason):
    path = tmp_path / "bad.flac"
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(DecodeError) as ei:
        read_audio(str(path), storage_options={"secret": "hunter2"})
    assert ei.value.reason == reason
    assert str(path) in ei.value.message and "hunter2" not in ei.value.message


def test_downmix_six_channels():
    frames = 1000
    chans = np.stack([np.full(frames, c / 10, np.float32) for c in range(6)], axis=1)
    mono = to_mono_16k(chans, 16000)
    assert mono.shape == (frames,)
    np.testing.assert_allclose(mono, np.full(frames, 0.25), atol=1e-6)


@pytest.mark.parametrize("sr", [8000, 44100])
def test_resample_length_and_frequency(sr):
    duration, freq = 2.0, 440.0
    t = np.arange(int(duration * sr)) / sr
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)[:, None]
    y = to_mono_16k(x, sr)
    assert abs(len(y) - duration * 16000) <= 2
    assert abs(fft_peak_hz(y, 16000) - freq) < 1.0


# --- normalise --------------------------------------------------------------------------------


def test_normalise_stats_and_silence():
    x = synth_signal(1.0, 16000)[:, 0] * 0.3 + 0.1
    y = normalise(x)
    assert y.dtype == np.float32
    assert abs(float(y.mean())) < 1e-5 and abs(float(y.std()) - 1) < 1e-3
    for silent in (np.zeros(800, np.float32), np.full(800, 0.1, np.float32)):
        z = normalise(silent)
        assert z.dtype == np.float32 and np.isfinite(z).all() and not z.any()
    assert normalise(np.zeros(0, np.float32)).shape == (0,)


def test_normalise_matches_transformers():
    from transformers import Wav2Vec2FeatureExtractor

    fe = Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=False,
    )
    x = synth_signal(1.3, 16000, seed=3)[:, 0] * 0.2 + 0.05
    ref = fe(x, sampling_rate=16000, return_tensors="np").input_values[0]
    np.testing.assert_allclose(normalise(x), ref, atol=1e-6, rtol=0)


# --- cut_segment ------------------------------------------------------------------------------


def test_cut_segment():
    a = np.arange(16000, dtype=np.float32)  # 1.0 s
    np.testing.assert_array_equal(cut_segment(a, 0.25, 0.5, 0.1), a[4000:8000])
    assert cut_segment(a, 0.5, None, 0.1).shape == (8000,)
    assert cut_segment(a, 0.5, 1.08, 0.1).shape == (8000,)  # clipped within tolerance
    for start, end in [(0.5, 1.2), (1.0, 1.05), (2.0, 3.0), (-0.1, 0.5), (0.6, 0.4)]:
        with pytest.raises(SegmentError) as ei:
            cut_segment(a, start, end, 0.1)
        assert ei.value.reason == SEGMENT_OUT_OF_RANGE
        assert "1.000s" in ei.value.message  # the audio duration


# --- DecodeStage ------------------------------------------------------------------------------


def test_decode_stage_corpus(corpus):
    _, manifest, expected = corpus
    rows = manifest_rows(manifest)
    assert {r["segment_id"] for r in rows} == set(expected)
    out = DecodeStage(DecodeConfig())(table(rows))
    assert out.schema.equals(DECODED_SCHEMA)
    assert out.num_rows == len(rows)
    assert out.column("segment_id").to_pylist() == [r["segment_id"] for r in rows]
    for r in out.to_pylist():
        want = expected[r["segment_id"]]
        got = r["error_reason"] or "ok"
        assert got == want, (r["segment_id"], r["error_message"])
        if want == "ok":
            assert r["error_stage"] is None and r["error_message"] is None
            assert r["num_samples"] == len(r["audio"]) >= 400
            assert r["end_s"] is not None
            a = np.asarray(r["audio"], dtype=np.float32)
            assert np.isfinite(a).all()
            if a.any():
                assert abs(a.mean()) < 1e-3 and abs(a.std() - 1) < 1e-2
        else:
            assert r["error_stage"] == STAGE_DECODE and r["error_message"]
            assert r["audio"] == [] and r["num_samples"] == 0
    by_id = {r["segment_id"]: r for r in out.to_pylist()}
    # Whole-file segments get their real duration; long segments exist for chunking.
    assert by_id["long_wav16_48k_2ch"]["end_s"] == pytest.approx(15.0, abs=1e-3)
    assert by_id["long_wav16_48k_2ch"]["num_samples"] > 10 * 16000
    assert by_id["flac_16k_1ch"]["end_s"] == pytest.approx(5.0)


def test_decode_stage_decodes_each_recording_once(corpus, monkeypatch):
    _, manifest, expected = corpus
    rows = manifest_rows(manifest)
    calls: list[str] = []
    orig = audio_mod.open_recording

    def counting(uri, storage_options=None):
        calls.append(uri)
        return orig(uri, storage_options)

    monkeypatch.setattr(audio_mod, "open_recording", counting)
    stage = DecodeStage(DecodeConfig())
    stage(table(rows))
    uris = [r["audio_uri"] for r in rows]
    assert sorted(calls) == sorted(set(uris))
    long_uri = next(r["audio_uri"] for r in rows if r["recording_id"] == "long_flac_16k_1ch")
    assert uris.count(long_uri) == 5 and calls.count(long_uri) == 1

    # A recording split across two consecutive batches on one worker continues its stream.
    calls.clear()
    clear_cache()
    long_rows = sorted((r for r in rows if r["audio_uri"] == long_uri), key=lambda r: r["start_s"])
    a = stage(table(long_rows[:2]))
    b = stage(table(long_rows[2:]))
    assert calls == [long_uri]
    assert a.num_rows == 2 and b.num_rows == 3
    assert a.column("error_reason").null_count == 2 and b.column("error_reason").null_count == 3
    # ...and a failure is not retried either.
    missing = [r for r in rows if expected[r["segment_id"]] == MISSING_FILE]
    calls.clear()
    for _ in range(2):
        assert stage(table(missing)).column("error_reason").to_pylist() == [MISSING_FILE]
    assert len(calls) == 1


def _whole_file_reference(rows):
    """What decoding each recording whole gives (read_audio + to_mono_16k + cut)."""
    cfg = DecodeConfig()
    out = []
    for r in rows:
        audio = to_mono_16k(*read_audio(r["audio_uri"]))
        try:
            seg = cut_segment(audio, r["start_s"], r["end_s"], cfg.end_tolerance_s)
        except SegmentError as exc:
            out.append(exc.reason)
            continue
        out.append(normalise(seg) if seg.shape[0] >= cfg.min_samples else TOO_SHORT)
    return out


@pytest.mark.parametrize(
    "fmt, sr, channels",
    [
        ("wav16", 16000, 1),
        ("flac", 16000, 1),
        ("flac", 44100, 2),
        ("wav16", 8000, 1),
        ("flac", 22050, 6),
        ("opus", 48000, 2),
        ("opus", 16000, 1),
    ],
)
def test_streaming_equals_whole_file_decoding(tmp_path, monkeypatch, fmt, sr, channels):
    """Windows of 4,096 frames (many per segment), segments out of order, overlapping, cut at
    the end and split over three batches: every segment's samples are bit-identical to decoding
    the whole file and resampling it in one call (soxr's stream resampler gives the same
    values; Opus pre-roll is handled inside libsndfile the same way for both reads)."""
    monkeypatch.setattr(reading_mod, "WINDOW_FRAMES", 4096)
    path = str(tmp_path / f"x.{FORMATS[fmt][2]}")
    write_audio(path, synth_signal(7.3, sr, channels=channels, seed=3), sr, fmt)
    times = [(2.0, 3.5), (0.0, 1.0), (0.5, 2.25), (3.4, 3.41), (6.9, None), (5.0, 7.35),
             (6.0, 9.0), (1.0, 6.0), (0.0, None)]  # fmt: skip
    rows = [
        dict(segment_id=f"s{i}", recording_id="r", audio_uri=path, start_s=a, end_s=b)
        for i, (a, b) in enumerate(times)
    ]
    want = _whole_file_reference(rows)
    stage = DecodeStage(DecodeConfig())
    got = []
    for part in (rows[:3], rows[3:5], rows[5:]):
        got.extend(stage(table(part)).to_pylist())
    for w, g in zip(want, got, strict=True):
        if isinstance(w, str):
            assert g["error_reason"] == w, g["segment_id"]
        else:
            assert g["error_reason"] is None, g["error_message"]
            np.testing.assert_array_equal(np.asarray(g["audio"], np.float32), w)


def test_streaming_error_half_way_is_a_read_error(tmp_path, monkeypatch):
    """A storage failure while the stream is being read is an error for the segments not yet
    cut (read_error), never a silently shorter recording."""
    monkeypatch.setattr(reading_mod, "WINDOW_FRAMES", 4096)
    path = str(tmp_path / "x.flac")
    write_audio(path, synth_signal(6.0, 16000, seed=2), 16000, "flac")
    real = audio_mod._GuardedFile.read

    def failing(self, n=-1):
        if self._f.tell() > 20_000:
            self.error = self.error or PermissionError("injected: access denied")
            return b""
        return real(self, n)

    monkeypatch.setattr(audio_mod._GuardedFile, "read", failing)
    rows = [
        dict(segment_id=s, recording_id="r", audio_uri=path, start_s=a, end_s=b)
        for s, a, b in [("early", 0.0, 0.5), ("late", 4.0, 5.0)]
    ]
    out = DecodeStage(DecodeConfig())(table(rows)).to_pylist()
    assert out[0]["error_reason"] is None
    assert out[1]["error_reason"] == "read_error" and "access denied" in out[1]["error_message"]


def test_decode_stage_non_finite_and_too_short(tmp_path):
    x = synth_signal(1.0, 16000)
    x[12000:12010] = np.nan
    path = str(tmp_path / "nan.wav")
    write_audio(path, x, 16000, "wavf32")
    rows = [
        dict(segment_id=s, recording_id="r", audio_uri=path, start_s=a, end_s=b)
        for s, a, b in [("clean", 0.0, 0.5), ("nan", 0.5, 1.0), ("short", 0.1, 0.12)]
    ]
    out = DecodeStage(DecodeConfig())(table(rows))
    assert out.column("error_reason").to_pylist() == [None, NON_FINITE, TOO_SHORT]
    assert out.column("num_samples").to_pylist() == [8000, 0, 0]
    offsets = out.column("audio").combine_chunks().offsets.to_pylist()
    assert offsets == [0, 8000, 8000, 8000]


def test_decode_stage_empty_batch():
    out = DecodeStage(DecodeConfig())(table([]))
    assert out.num_rows == 0 and out.schema.equals(DECODED_SCHEMA)


def test_corpus_composition(corpus):
    root, manifest, expected = corpus
    recs = [json.loads(line) for line in open(manifest)]
    exts = {r["audio"].rsplit(".", 1)[1] for r in recs}
    assert {"wav", "flac", "ogg", "opus"} <= exts
    assert any("segments" not in r for r in recs) and any("segments" in r for r in recs)
    rates, chans, total = set(), set(), 0.0
    for r in recs:
        p = os.path.join(root, r["audio"])
        if os.path.exists(p) and os.path.getsize(p) > 100:
            try:
                info = sf.info(p)
            except Exception:
                continue
            rates.add(info.samplerate)
            chans.add(info.channels)
            total += info.duration
    assert {8000, 16000, 22050, 44100, 48000} <= rates and {1, 2, 6} <= chans
    assert 100 < total < 240
    assert set(expected.values()) == {
        "ok",
        MISSING_FILE,
        UNREADABLE_AUDIO,
        TOO_SHORT,
        SEGMENT_OUT_OF_RANGE,
    }
    # Deterministic from the seed.
    root2 = os.path.join(root, "again")
    make_corpus(root2, seed=0)
    assert open(os.path.join(root2, "manifest.jsonl")).read() == open(manifest).read()
    a = os.path.join(root, "audio", "flac_16k_1ch.flac")
    b = os.path.join(root2, "audio", "flac_16k_1ch.flac")
    assert open(a, "rb").read() == open(b, "rb").read()


def test_tiny_model_frame_counts(tmp_path):
    import torch
    from transformers import HubertModel

    path = make_tiny_model(str(tmp_path / "tiny"))
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    model = HubertModel.from_pretrained(path).eval()
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2

    def frames(n: int) -> int:
        with torch.no_grad():
            return model(torch.randn(1, n)).last_hidden_state.shape[1]

    for n in (400, 720, 16000):
        assert frames(n) == (n - 400) // 320 + 1
    assert frames(16000) == 49
    try:  # 399 samples: zero frames (or the conv stack refuses) → too_short upstream
        assert frames(399) == 0
    except RuntimeError:
        pass

"""Sparse decoding (corpus.reading): a recording is decoded only where its segments are, with
seeks over the gaps, and every value equals decoding the whole file. Pure unit tests: no Ray."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

import hubert_ray.corpus.audio as audio_mod
import hubert_ray.corpus.objects as objects_mod
import hubert_ray.corpus.reading as reading_mod
from hubert_ray.core.config import DecodeConfig
from hubert_ray.core.signal import synth_signal
from hubert_ray.corpus.audio import (
    DecodeStage,
    SegmentError,
    clear_cache,
    cut_segment,
    normalise,
    read_audio,
    to_mono_16k,
)
from hubert_ray.io import storage
from hubert_ray.testing.synth import FORMATS

INPUT_SCHEMA = pa.schema(
    [
        ("segment_id", pa.string()),
        ("recording_id", pa.string()),
        ("audio_uri", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
    ]
)
# Gaps of 10-15 s (a seek in every format, Opus's 6 s pre-roll included), a dense run, two
# overlapping segments, one gap of 5.5 s (a seek in FLAC, decoded through in Opus), the end.
SPARSE = [(0.5, 2.0), (2.0, 3.7), (14.2, 16.9), (16.0, 18.5), (31.0, 31.9), (47.3, 52.0),
          (66.0, 68.4), (73.9, None)]  # fmt: skip
DURATION = 75.0


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


@pytest.fixture
def streams(monkeypatch):
    """Every stream the stage opens, kept for its counters."""
    opened = []
    real = audio_mod.open_recording

    def keeping(*args, **kwargs):
        opened.append(real(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(audio_mod, "open_recording", keeping)
    return opened


def recording(tmp_path, fmt: str, sr: int = 16000, channels: int = 1, seconds=DURATION):
    path = str(tmp_path / f"rec-{fmt}-{sr}-{channels}.{FORMATS[fmt][2]}")
    container, subtype, _ = FORMATS[fmt]
    x = synth_signal(seconds, sr, channels=channels, seed=7)
    with sf.SoundFile(path, "w", sr, channels, format=container, subtype=subtype) as f:
        for s in range(0, len(x), sr * 10):  # ten seconds at a time (libvorbis and long writes)
            f.write(x[s : s + sr * 10])
    return path


def rows(path: str, times) -> list[dict]:
    return [
        dict(segment_id=f"s{i}", recording_id="r", audio_uri=path, start_s=a, end_s=b)
        for i, (a, b) in enumerate(times)
    ]


def decode(rows_: list[dict], config: DecodeConfig | None = None, batches: int = 2) -> list:
    """The stage over ``rows_`` in ``batches`` consecutive batches (one worker)."""
    stage = DecodeStage(config or DecodeConfig())
    size = -(-len(rows_) // batches)
    out = []
    for b in range(0, len(rows_), size):
        out.extend(
            stage(pa.Table.from_pylist(rows_[b : b + size], schema=INPUT_SCHEMA)).to_pylist()
        )
    return out


def reference(path: str, times, normalize: bool = True) -> list:
    """Decoding the whole file (read_audio + to_mono_16k), cut: the values before seeks."""
    cfg = DecodeConfig()
    audio = to_mono_16k(*read_audio(path))
    out = []
    for a, b in times:
        try:
            seg = cut_segment(audio, a, b, cfg.end_tolerance_s)
        except SegmentError as exc:
            out.append(exc.reason)
            continue
        out.append(normalise(seg) if normalize else np.array(seg))
    return out


def assert_values(got: list, want: list, atol: float = 0.0) -> None:
    for w, g in zip(want, got, strict=True):
        if isinstance(w, str):
            assert g["error_reason"] == w, g["segment_id"]
            continue
        assert g["error_reason"] is None, g["error_message"]
        a = np.asarray(g["audio"], np.float32)
        if atol:
            np.testing.assert_allclose(a, w, rtol=0, atol=atol, err_msg=g["segment_id"])
        else:
            np.testing.assert_array_equal(a, w, err_msg=g["segment_id"])


def comparable(out: list[dict]) -> list[dict]:
    """Output rows with NaN (an invalid end_s passes through) made equal to itself."""
    nan = "NaN"
    return [{k: nan if isinstance(v, float) and v != v else v for k, v in r.items()} for r in out]


def frames_of(path: str) -> int:
    return sf.info(path).frames


# --- values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, channels", [("wav16", 1), ("flac", 1), ("opus", 1), ("opus", 2), ("ogg", 1)]
)
def test_sparse_equals_whole_file_at_16k(tmp_path, streams, fmt, channels):
    """16 kHz: bit for bit equal to the whole-file decode, while seeking over the gaps."""
    path = recording(tmp_path, fmt, channels=channels)
    got = decode(rows(path, SPARSE))
    assert_values(got, reference(path, SPARSE))
    (stream,) = streams
    assert stream.seeks >= 4, stream.seeks
    assert stream.decoded < 0.75 * frames_of(path), (stream.decoded, frames_of(path))


@pytest.mark.parametrize("fmt", ["flac", "opus"])
def test_sparse_rows_equal_streaming_rows(tmp_path, monkeypatch, fmt):
    """Every column of every row, errors and their messages included, equals what decoding the
    recording front to back gives (seeks off)."""
    path = recording(tmp_path, fmt)
    times = [*SPARSE[:-1], (30.0, 30.02), (60.0, 90.0), (90.0, 91.0), (80.0, None),
             (74.0, 75.05), (-1.0, 2.0), (20.0, 19.0), (40.0, float("nan"))]  # fmt: skip
    sparse = decode(rows(path, times), batches=3)
    monkeypatch.setattr(reading_mod, "SEEK_MIN_GAP_S", float("inf"))
    clear_cache()
    streamed = decode(rows(path, times), batches=3)
    assert comparable(sparse) == comparable(streamed)
    reasons = [r["error_reason"] for r in sparse]
    assert reasons[-8:] == ["too_short", *["segment_out_of_range"] * 3, None,
                            *["segment_out_of_range"] * 3]  # fmt: skip


@pytest.mark.parametrize("sr", [44100, 48000])
def test_resampled_streams_through_by_default(tmp_path, streams, sr):
    """Resampled audio is decoded front to back (no seek): bit for bit the one-call resample."""
    path = recording(tmp_path, "flac", sr=sr, channels=2)
    assert_values(decode(rows(path, SPARSE)), reference(path, SPARSE))
    assert streams[0].seeks == 0


@pytest.mark.parametrize("sr", [44100, 48000])
def test_resampled_seeks_within_1e6(tmp_path, monkeypatch, streams, sr):
    """With SEEK_RESAMPLED the resampler restarts on the 16 kHz grid after a 50 ms pre-roll:
    within 1e-6 of the one-call resample (speech-level audio), decoding less."""
    monkeypatch.setattr(reading_mod, "SEEK_RESAMPLED", True)
    path = recording(tmp_path, "flac", sr=sr, channels=2)
    cfg = DecodeConfig(normalize=False)
    assert_values(decode(rows(path, SPARSE), cfg), reference(path, SPARSE, False), atol=1e-6)
    assert streams[0].seeks >= 4
    assert streams[0].decoded < 0.75 * frames_of(path)


# --- seeking ----------------------------------------------------------------------------------


def test_large_gaps_seek_and_dense_segments_stream(tmp_path, streams):
    path = recording(tmp_path, "flac", seconds=120.0)
    sparse = [(10.0, 11.0), (40.0, 41.5), (80.0, 80.8), (110.0, 111.0)]
    assert_values(decode(rows(path, sparse), batches=1), reference(path, sparse))
    assert streams[0].seeks == 4
    # what the segments need (4.3 s) and the reads' rounding (MIN_READ_FRAMES), not 111 s
    assert streams[0].decoded <= 4.3 * 16000 + 4 * reading_mod.MIN_READ_FRAMES

    clear_cache()
    dense = [(i * 2.5, (i + 1) * 2.5) for i in range(48)]
    assert_values(decode(rows(path, dense), batches=3), reference(path, dense))
    assert streams[1].seeks == 0 and streams[1].decoded == frames_of(path)


def test_seek_threshold_is_the_gap_plus_the_pre_roll(tmp_path, streams):
    """A gap just under SEEK_MIN_GAP_S is decoded through; just over, skipped."""
    path = recording(tmp_path, "wav16", seconds=30.0)
    gap = reading_mod.SEEK_MIN_GAP_S
    times = [(1.0, 2.0), (2.0 + gap - 0.05, 4.0 + gap), (4.0 + 2 * gap + 0.3, 6.0 + 2 * gap)]
    assert_values(decode(rows(path, times), batches=1), reference(path, times))
    assert streams[0].seeks == 2  # from the start to 1.0 s, and over the longer gap


def test_seek_preroll_by_subtype():
    assert reading_mod.seek_preroll_s("PCM_16") == 0.0
    assert reading_mod.seek_preroll_s("FLOAT") == 0.0
    assert reading_mod.seek_preroll_s("OPUS") >= 2.0
    assert reading_mod.seek_preroll_s("VORBIS") > 0.0
    assert reading_mod.seek_preroll_s("MPEG_LAYER_III") is None  # inexact seeks: streamed
    assert reading_mod.seek_preroll_s("GSM610") is None


def test_unseekable_audio_is_streamed(tmp_path, monkeypatch, streams):
    monkeypatch.setattr(sf.SoundFile, "seekable", lambda self: False)
    path = recording(tmp_path, "flac")
    assert_values(decode(rows(path, SPARSE)), reference(path, SPARSE))
    assert streams[0].seeks == 0


def test_refused_seek_falls_back_to_streaming(tmp_path, monkeypatch, streams):
    """libsndfile landing elsewhere than asked: the recording is opened again and decoded
    front to back from then on; values unchanged."""
    real = sf.SoundFile.seek

    def lying(self, frames, whence=sf.SEEK_SET):
        if whence == sf.SEEK_SET and frames > 0:
            return real(self, frames, whence) + 1
        return real(self, frames, whence)

    monkeypatch.setattr(sf.SoundFile, "seek", lying)
    path = recording(tmp_path, "flac")
    assert_values(decode(rows(path, SPARSE)), reference(path, SPARSE))
    assert streams[0].seeks == 0 and streams[0].opens == 2
    assert streams[0].decoded >= frames_of(path)


def test_truncated_flac_rows_equal_streaming(tmp_path, monkeypatch):
    """A FLAC cut short (its header promises 75 s): seeks past the data fail and fall back;
    the rows equal decoding front to back."""
    path = recording(tmp_path, "flac")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    times = [(2.0, 3.0), (20.0, 21.0), (50.0, 51.0), (70.0, None)]
    sparse = decode(rows(path, times), batches=1)
    monkeypatch.setattr(reading_mod, "SEEK_MIN_GAP_S", float("inf"))
    clear_cache()
    assert comparable(sparse) == comparable(decode(rows(path, times), batches=1))
    assert sparse[0]["error_reason"] is None and sparse[-1]["error_reason"] is not None


def test_next_batch_before_the_buffer_seeks_back(tmp_path, streams):
    """A batch that starts before what the open stream holds seeks back (no second open)."""
    path = recording(tmp_path, "opus")
    times = [(40.0, 42.0), (55.0, 57.5), (5.0, 6.0), (20.0, 21.0)]
    got = decode(rows(path, times), batches=2)
    assert_values(got, reference(path, times))
    assert len(streams) == 1 and streams[0].opens == 1 and streams[0].seeks >= 3


def test_transient_failure_reopens_and_seeks_back(tmp_path, monkeypatch, streams):
    """A dropped connection half-way: reopened, back to where it was by a seek; values equal."""
    path = recording(tmp_path, "flac")
    size = os.path.getsize(path)
    real = objects_mod.GuardedFile.read
    failed = []

    def flaky(self, n=-1):
        if not failed and self._f.tell() > size * 0.6:
            failed.append(True)
            self.error = self.error or ConnectionResetError(104, "injected: connection reset")
            return b""
        return real(self, n)

    monkeypatch.setattr(objects_mod.GuardedFile, "read", flaky)
    before = storage.retry_count()
    assert_values(decode(rows(path, SPARSE)), reference(path, SPARSE))
    assert failed and streams[0].opens == 2 and storage.retry_count() == before + 1
    assert streams[0].decoded < 0.75 * frames_of(path)


# --- the range reader ------------------------------------------------------------------------


class _Counting:
    """An fsspec-like file with no cache: every read is one request."""

    def __init__(self, data: bytes):
        self.data, self.loc, self.gets = data, 0, []

    def seek(self, offset, whence=0):
        self.loc = offset
        return offset

    def read(self, n):
        self.gets.append((self.loc, n))
        out = self.data[self.loc : self.loc + n]
        self.loc += len(out)
        return out

    def close(self):
        pass


def test_range_reader_grows_on_reading_on_and_shrinks_on_a_jump(monkeypatch):
    monkeypatch.setattr(objects_mod, "READ_BLOCK_BYTES", 64 << 10)
    monkeypatch.setattr(objects_mod, "SEEK_READ_BLOCK_BYTES", 8 << 10)
    monkeypatch.setattr(objects_mod, "SEEK_BACK_BYTES", 1 << 10)
    data = os.urandom(1 << 20)
    f = _Counting(data)
    r = objects_mod.RangeReader(f, len(data), first_block=8 << 10)
    assert r.read(100) == data[:100]
    assert r.read(30_000) == data[100:30_100]  # 8 KiB, then 16 KiB, then 32 KiB blocks
    assert [n for _, n in f.gets] == [8 << 10, 16 << 10, 32 << 10]
    r.seek(500_000)
    assert r.read(10) == data[500_000:500_010] and f.gets[-1] == (500_000 - 1024, 8 << 10)
    r.seek(499_500)  # back a little: still in the block
    assert r.read(10) == data[499_500:499_510] and len(f.gets) == 4
    assert r.holds(500_000) and not r.holds(600_000)
    r.seek(len(data) - 5)
    assert r.read(100) == data[-5:] and r.read(10) == b""
    r.seek(500_100)  # the block before the last jump is still held
    assert r.read(10) == data[500_100:500_110] and len(f.gets) == 5
    r.seek(498_976 + (8 << 10))  # reading on after a jump: the same size, then twice
    r.read(20_000)
    assert [n for _, n in f.gets[5:]] == [8 << 10, 16 << 10]
    assert r.fetched == sum(min(n, len(data) - o) for o, n in f.gets)

"""CPU decode stage: fsspec read → soundfile decode → mono → soxr 16 kHz → cut → normalise
(when the checkpoint's preprocessing says so: DecodeConfig.normalize).

Each recording is read with ONE whole-object read (``fs.cat_file``) and decoded once; all its
segments are cut from the decoded 16 kHz mono array in memory (seeking deep into compressed
files such as Opus is slow, see DESIGN §4). A one-entry per-process cache keeps the last decoded
recording so a recording split across two consecutive batches on the same worker is not decoded
twice (the read yields segment rows, see DESIGN §3).

Failures never raise out of :class:`DecodeStage`; they become error rows (stage ``decode``)
with a reason from :mod:`hubert_ray.errors`.

This module must not import torch or ray at import time.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import pyarrow as pa
import soundfile as sf
import soxr

from hubert_ray.config import DecodeConfig
from hubert_ray.errors import (
    ESCAPED_URI_PREFIX,
    MISSING_FILE,
    NON_FINITE,
    PATH_ESCAPE,
    READ_ERROR,
    SEGMENT_OUT_OF_RANGE,
    STAGE_DECODE,
    TOO_SHORT,
    UNREADABLE_AUDIO,
)
from hubert_ray.storage import filesystem, with_retries

TARGET_SR = 16_000
_MAX_DETAIL = 160

DECODED_SCHEMA = pa.schema(
    [
        pa.field("segment_id", pa.string()),
        pa.field("recording_id", pa.string()),
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("num_samples", pa.int64()),
        pa.field("audio", pa.large_list(pa.float32())),
        pa.field("error_stage", pa.string()),
        pa.field("error_reason", pa.string()),
        pa.field("error_message", pa.string()),
    ]
)
"""Output of :class:`DecodeStage`: one row per input segment, same order."""


class DecodeError(Exception):
    """A recording or segment could not be decoded; ``reason`` is an errors.py constant."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, message={self.message!r})"


class SegmentError(DecodeError):
    """A segment's times do not fit its recording (reason ``segment_out_of_range``)."""


def _detail(exc: BaseException) -> str:
    # libsndfile errors carry a clean ``error_string``; str() would include a BytesIO repr.
    text = getattr(exc, "error_string", None) or str(exc) or type(exc).__name__
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _read_object(fs, path: str) -> bytes:
    """The whole object in one request. s3fs would first size it (HEAD) to split objects over
    50 MB into parallel ranged GETs; decoding is far slower than one GET streams, so skip that."""
    if getattr(fs, "max_concurrency", 1) > 1:
        return fs.cat_file(path, max_concurrency=1)
    return fs.cat_file(path)


def read_audio(uri: str, storage_options: dict | None = None) -> tuple[np.ndarray, int]:
    """Read and decode one audio object: ``(samples [frames, channels] float32, sample_rate)``.

    The object is fetched with one whole-object read (retried while it fails transiently, see
    :func:`hubert_ray.storage.with_retries`), then decoded from memory.
    Raises :class:`DecodeError` with reason missing_file / read_error / unreadable_audio.
    """
    try:
        fs, path = filesystem(uri, storage_options)
        data = with_retries(_read_object, fs, path)
    except FileNotFoundError as exc:
        raise DecodeError(MISSING_FILE, f"{uri}: audio object not found") from exc
    except Exception as exc:  # permissions, I/O, bad URL / filesystem
        raise DecodeError(READ_ERROR, f"{uri}: cannot read ({_detail(exc)})") from exc
    if not data:
        raise DecodeError(UNREADABLE_AUDIO, f"{uri}: empty object (0 bytes)")
    try:
        samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError, EOFError) as exc:
        raise DecodeError(
            UNREADABLE_AUDIO, f"{uri}: unreadable audio ({_detail(exc)}, {len(data)} bytes)"
        ) from exc
    return samples, int(sr)


def to_mono_16k(samples: np.ndarray, sr: int) -> np.ndarray:
    """Downmix ``[frames, channels]`` (or 1-D) by channel mean and resample to 16 kHz (soxr HQ)."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 2:
        x = x[:, 0] if x.shape[1] == 1 else x.mean(axis=1, dtype=np.float32)
    elif x.ndim != 1:
        raise ValueError(f"expected [frames, channels] or 1-D samples, got shape {x.shape}")
    if sr != TARGET_SR and x.size:
        x = soxr.resample(x, sr, TARGET_SR, quality="HQ")
    return np.ascontiguousarray(x, dtype=np.float32)


def normalise(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (Wav2Vec2FeatureExtractor's ``do_normalize``), float32 out.

    Statistics are computed in float64; a constant (silent) input gives all zeros.
    """
    x64 = np.asarray(x, dtype=np.float64)
    if x64.size == 0 or np.all(x64 == x64.flat[0]):
        return np.zeros(x64.shape, dtype=np.float32)
    out = (x64 - x64.mean()) / np.sqrt(x64.var() + 1e-7)
    return out.astype(np.float32)


def cut_segment(
    audio: np.ndarray,
    start_s: float,
    end_s: float | None,
    tolerance_s: float,
    sr: int = TARGET_SR,
) -> np.ndarray:
    """Samples ``[round(start_s*sr), round(end_s*sr))`` of ``audio`` (a view).

    ``end_s=None`` means to the end. An end past the audio by at most ``tolerance_s`` is clipped
    to the end; a start at/after the end, a negative start, an end before the start, or an end
    past the audio by more than ``tolerance_s`` raise :class:`SegmentError`.
    """
    n = int(audio.shape[0])
    duration = n / sr
    times = f"[{start_s:.3f}s, {'end' if end_s is None else f'{end_s:.3f}s'})"

    def fail(why: str) -> SegmentError:
        return SegmentError(
            SEGMENT_OUT_OF_RANGE, f"segment {times} {why}; audio duration {duration:.3f}s"
        )

    if start_s is None or not np.isfinite(start_s) or start_s < 0:
        raise fail("has an invalid start")
    lo = int(round(start_s * sr))
    if lo >= n:
        raise fail("starts at or after the end of the audio")
    if end_s is None:
        hi = n
    else:
        if not np.isfinite(end_s) or end_s <= start_s:
            raise fail("ends at or before its start")
        if end_s > duration + tolerance_s + 1e-9:
            raise fail(f"ends more than {tolerance_s:g}s past the end of the audio")
        hi = min(int(round(end_s * sr)), n)
    return audio[lo:hi]


# One-entry per-process cache: (uri, mono 16 kHz array or the DecodeError it raised).
_cache_lock = threading.Lock()
_last: tuple[str, np.ndarray | DecodeError] | None = None


def clear_cache() -> None:
    """Forget the cached last-decoded recording (tests; memory)."""
    global _last
    with _cache_lock:
        _last = None


def _decode_recording(uri: str, storage_options: dict | None) -> np.ndarray | DecodeError:
    global _last
    with _cache_lock:
        if _last is not None and _last[0] == uri:
            return _last[1]
        _last = None  # drop the old recording before decoding the next one
    try:
        if uri.startswith(ESCAPED_URI_PREFIX):
            raise DecodeError(
                PATH_ESCAPE,
                f"audio path {uri[len(ESCAPED_URI_PREFIX) :]!r} leads outside the manifest's "
                "directory; not read",
            )
        samples, sr = read_audio(uri, storage_options)
        result: np.ndarray | DecodeError = to_mono_16k(samples, sr)
        del samples
    except DecodeError as exc:
        # A fresh error without traceback/cause: the cache must not pin the object's bytes.
        result = DecodeError(exc.reason, exc.message)
    except MemoryError:
        raise
    except Exception as exc:  # any other decoder failure is still just a bad file
        result = DecodeError(UNREADABLE_AUDIO, f"{uri}: unreadable audio ({_detail(exc)})")
    with _cache_lock:
        _last = (uri, result)
    return result


class DecodeStage:
    """Ray Data ``map_batches`` callable (``batch_format="pyarrow"``).

    In: ``segment_id, recording_id, audio_uri, start_s, end_s`` (null end = whole file), rows of
    one recording contiguous. Out: :data:`DECODED_SCHEMA`, one row per input row, same order.
    """

    def __init__(self, config: DecodeConfig | None = None):
        self.config = config if config is not None else DecodeConfig()

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not isinstance(batch, pa.Table):
            batch = pa.table(batch)
        cfg = self.config
        sr = cfg.sample_rate_hz
        seg_ids = batch.column("segment_id").to_pylist()
        rec_ids = batch.column("recording_id").to_pylist()
        uris = batch.column("audio_uri").to_pylist()
        starts = batch.column("start_s").to_pylist()
        ends = batch.column("end_s").to_pylist()
        n_rows = len(seg_ids)

        out_end: list[float | None] = list(ends)
        num_samples = np.zeros(n_rows, dtype=np.int64)
        offsets = np.zeros(n_rows + 1, dtype=np.int64)
        pieces: list[np.ndarray] = []
        stage: list[str | None] = [None] * n_rows
        reason: list[str | None] = [None] * n_rows
        message: list[str | None] = [None] * n_rows

        total = 0
        cur_uri: str | None = None
        audio: np.ndarray | DecodeError | None = None
        for i in range(n_rows):
            uri = uris[i]
            if uri != cur_uri or audio is None:
                cur_uri = uri
                audio = _decode_recording(uri, cfg.storage_options)
            if isinstance(audio, DecodeError):
                stage[i], reason[i], message[i] = STAGE_DECODE, audio.reason, audio.message
                offsets[i + 1] = total
                continue
            try:
                # Whole-file segments get the real end; ends clipped within the tolerance
                # report where the audio actually ends.
                duration = audio.shape[0] / sr
                out_end[i] = duration if ends[i] is None else min(float(ends[i]), duration)
                start = 0.0 if starts[i] is None else float(starts[i])
                try:
                    seg = cut_segment(audio, start, ends[i], cfg.end_tolerance_s, sr)
                except SegmentError as exc:
                    raise SegmentError(exc.reason, f"{uri}: {exc.message}") from None
                if seg.shape[0] < cfg.min_samples:
                    raise DecodeError(
                        TOO_SHORT,
                        f"{uri}: segment has {seg.shape[0]} samples at {sr} Hz, "
                        f"fewer than {cfg.min_samples}",
                    )
                if not np.isfinite(seg).all():
                    bad = int(seg.size - np.count_nonzero(np.isfinite(seg)))
                    raise DecodeError(
                        NON_FINITE, f"{uri}: segment has {bad} NaN/inf samples after decoding"
                    )
                if cfg.normalize:
                    seg = normalise(seg)
            except DecodeError as exc:
                stage[i], reason[i], message[i] = STAGE_DECODE, exc.reason, exc.message
                offsets[i + 1] = total
                continue
            except Exception as exc:  # never raise out of the stage
                stage[i], reason[i] = STAGE_DECODE, UNREADABLE_AUDIO
                message[i] = f"{uri}: decode failed ({_detail(exc)})"
                offsets[i + 1] = total
                continue
            pieces.append(seg)
            total += seg.shape[0]
            num_samples[i] = seg.shape[0]
            offsets[i + 1] = total

        values = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        audio_col = pa.LargeListArray.from_arrays(
            pa.array(offsets, type=pa.int64()), pa.array(values, type=pa.float32())
        )
        return pa.Table.from_arrays(
            [
                pa.array(seg_ids, type=pa.string()),
                pa.array(rec_ids, type=pa.string()),
                pa.array(starts, type=pa.float64()),
                pa.array(out_end, type=pa.float64()),
                pa.array(num_samples, type=pa.int64()),
                audio_col,
                pa.array(stage, type=pa.string()),
                pa.array(reason, type=pa.string()),
                pa.array(message, type=pa.string()),
            ],
            schema=DECODED_SCHEMA,
        )

"""Whole-object decode and segment arithmetic: the reference the decode stream equals.

:func:`read_audio` reads and decodes one whole object; :func:`to_mono_16k` downmixes and
resamples it in one call; :func:`segment_bounds` / :func:`cut_segment` give a segment's samples.
:class:`DecodeError` (and :class:`SegmentError`) carry a reason from
:mod:`hubert_ray.core.errors`. The stream (:mod:`hubert_ray.corpus.reading`) and the stage
(:mod:`hubert_ray.corpus.audio`) build on these.

This module must not import torch or ray at import time.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

from hubert_ray.core.errors import (
    MISSING_FILE,
    READ_ERROR,
    SEGMENT_OUT_OF_RANGE,
    UNREADABLE_AUDIO,
)
from hubert_ray.io.storage import filesystem, with_retries

TARGET_SR = 16_000
_MAX_DETAIL = 160


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


_DECODER_ERRORS = (sf.SoundFileError, RuntimeError, ValueError, TypeError, EOFError)


def _read_object(fs, path: str) -> bytes:
    """The whole object in one request. s3fs would first size it (HEAD) to split objects over
    50 MB into parallel ranged GETs; decoding is far slower than one GET streams, so skip that."""
    if getattr(fs, "max_concurrency", 1) > 1:
        return fs.cat_file(path, max_concurrency=1)
    return fs.cat_file(path)


def read_audio(uri: str, storage_options: dict | None = None) -> tuple[np.ndarray, int]:
    """Read and decode one whole audio object: ``(samples [frames, channels] float32,
    sample_rate)``; the reference that :class:`~hubert_ray.corpus.reading.RecordingStream`
    equals, and a tool for small files (the decode stage streams instead).

    The object is fetched with one whole-object read (retried while it fails transiently, see
    :func:`hubert_ray.io.storage.with_retries`), then decoded from memory.
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
    except _DECODER_ERRORS as exc:
        raise DecodeError(
            UNREADABLE_AUDIO, f"{uri}: unreadable audio ({_detail(exc)}, {len(data)} bytes)"
        ) from exc
    return samples, int(sr)


def _downmix(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:
        return x[:, 0] if x.shape[1] == 1 else x.mean(axis=1, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected [frames, channels] or 1-D samples, got shape {x.shape}")
    return x


def to_mono_16k(samples: np.ndarray, sr: int) -> np.ndarray:
    """Downmix ``[frames, channels]`` (or 1-D) by channel mean and resample to 16 kHz (soxr HQ)."""
    x = _downmix(np.asarray(samples, dtype=np.float32))
    if sr != TARGET_SR and x.size:
        x = soxr.resample(x, sr, TARGET_SR, quality="HQ")
    return np.ascontiguousarray(x, dtype=np.float32)


def _times(start_s, end_s) -> str:
    end = "end" if end_s is None else f"{end_s:.3f}s"
    start = "?" if start_s is None else f"{start_s:.3f}s"
    return f"[{start}, {end})"


def _check_times(start_s, end_s, duration: float) -> None:
    """The checks of :func:`segment_bounds` that do not depend on the audio's length (the
    duration only appears in the message)."""

    def fail(why: str) -> SegmentError:
        return SegmentError(
            SEGMENT_OUT_OF_RANGE,
            f"segment {_times(start_s, end_s)} {why}; audio duration {duration:.3f}s",
        )

    if start_s is None or not np.isfinite(start_s) or start_s < 0:
        raise fail("has an invalid start")
    if end_s is not None and (not np.isfinite(end_s) or end_s <= start_s):
        raise fail("ends at or before its start")


def segment_bounds(
    n: int, start_s: float, end_s: float | None, tolerance_s: float, sr: int = TARGET_SR
) -> tuple[int, int]:
    """Sample range ``[lo, hi)`` of a segment in audio of ``n`` samples at ``sr``:
    ``[round(start_s*sr), round(end_s*sr))``; ``end_s=None`` means to the end. An end past the
    audio by at most ``tolerance_s`` is clipped to the end; a start at/after the end, a
    negative start, an end before the start, or an end past the audio by more than
    ``tolerance_s`` raise :class:`SegmentError`."""
    duration = n / sr
    _check_times(start_s, end_s, duration)

    def fail(why: str) -> SegmentError:
        return SegmentError(
            SEGMENT_OUT_OF_RANGE,
            f"segment {_times(start_s, end_s)} {why}; audio duration {duration:.3f}s",
        )

    lo = int(round(start_s * sr))
    if lo >= n:
        raise fail("starts at or after the end of the audio")
    if end_s is None:
        return lo, n
    if end_s > duration + tolerance_s + 1e-9:
        raise fail(f"ends more than {tolerance_s:g}s past the end of the audio")
    return lo, min(int(round(end_s * sr)), n)


def cut_segment(
    audio: np.ndarray,
    start_s: float,
    end_s: float | None,
    tolerance_s: float,
    sr: int = TARGET_SR,
) -> np.ndarray:
    """Samples ``[round(start_s*sr), round(end_s*sr))`` of ``audio`` (a view); the rules of
    :func:`segment_bounds`."""
    lo, hi = segment_bounds(int(audio.shape[0]), start_s, end_s, tolerance_s, sr)
    return audio[lo:hi]

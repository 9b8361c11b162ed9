"""CPU decode stage: fsspec stream → soundfile windows → mono → soxr 16 kHz stream → cut →
normalise (when the checkpoint's preprocessing says so: DecodeConfig.normalize).

A recording is read sequentially, window by window (:data:`WINDOW_FRAMES` frames), from a
file-like object opened through fsspec (ranged reads of :data:`READ_BLOCK_BYTES` on object
storage, after one HEAD for the object's size); each window is downmixed and resampled as it
passes (``soxr.ResampleStream``), and each segment is cut out as soon as the stream has passed
its end. One pass per recording, no seeks into the compressed stream: memory per decode task is
bounded by the window and the segments in flight, not by the recording's length. The values
are bit-identical to decoding the whole file and resampling it in one call
(``tests/test_audio.py`` checks WAV, FLAC, Opus and resampled inputs).

A recording whose segments continue in the next batch on the same worker (a decode task runs
its block's batches in order) continues from the open stream instead of decoding again; a
recording that failed to open is remembered the same way (one entry per process).

Failures never raise out of :class:`DecodeStage`; they become error rows (stage ``decode``)
with a reason from :mod:`hubert_ray.core.errors`.

This module must not import torch or ray at import time.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import pyarrow as pa
import soundfile as sf
import soxr

from hubert_ray.core.config import DecodeConfig
from hubert_ray.core.errors import (
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
from hubert_ray.core.signal import normalise
from hubert_ray.io import storage
from hubert_ray.io.storage import filesystem, with_retries

TARGET_SR = 16_000
_MAX_DETAIL = 160
WINDOW_FRAMES = 1 << 16
"""Frames (at the file's own rate) decoded per window: ~4 s at 16 kHz, 1.5 s at 44.1 kHz."""
READ_BLOCK_BYTES = 8 << 20
"""Bytes per ranged read of a remote object (one GET each); local files read as usual."""
STREAM_ATTEMPTS = 3
"""Times a recording is opened in all while reading it fails transiently (a dropped
connection half-way through restarts it from its beginning, discarding what was decoded)."""

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


_DECODER_ERRORS = (sf.SoundFileError, RuntimeError, ValueError, TypeError, EOFError)


def _read_object(fs, path: str) -> bytes:
    """The whole object in one request. s3fs would first size it (HEAD) to split objects over
    50 MB into parallel ranged GETs; decoding is far slower than one GET streams, so skip that."""
    if getattr(fs, "max_concurrency", 1) > 1:
        return fs.cat_file(path, max_concurrency=1)
    return fs.cat_file(path)


def read_audio(uri: str, storage_options: dict | None = None) -> tuple[np.ndarray, int]:
    """Read and decode one whole audio object: ``(samples [frames, channels] float32,
    sample_rate)``; the reference that :class:`RecordingStream` equals, and a tool for small
    files (the decode stage streams instead).

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


class _GuardedFile:
    """The file object soundfile reads through. An exception raised inside libsndfile's read
    callback would be lost (the callback returns 0 bytes, which libsndfile takes for the end
    of the file: a silently truncated recording); it is kept in ``error`` instead and raised
    by the stream after the call."""

    def __init__(self, f):
        self._f = f
        self.error: BaseException | None = None

    def read(self, n: int = -1) -> bytes:
        try:
            return self._f.read(n)
        except Exception as exc:
            self.error = self.error or exc
            return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            return self._f.seek(offset, whence)
        except Exception as exc:
            self.error = self.error or exc
            return self._f.tell()

    def tell(self) -> int:
        return self._f.tell()


def _open_object(fs, path: str):
    """A sequential reader of one object: remote objects in ranged reads of
    :data:`READ_BLOCK_BYTES` (fsspec's read-ahead buffer holds one)."""
    if _is_local(fs):
        return fs.open(path, "rb")
    return fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead")


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


class RecordingStream:
    """One recording as 16 kHz mono samples, decoded window by window, front to back.

    ``fill()`` decodes the next window into a buffer of retained samples; ``samples(lo, hi)``
    copies a range out of it; ``release(before)`` drops what no segment needs any more.
    ``pos`` counts the samples decoded so far; after the last window ``eof`` is true and
    ``pos`` is the recording's length. Opening raises :class:`DecodeError` (missing_file,
    read_error, unreadable_audio), as :func:`read_audio` does.
    """

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri
        self.storage_options = storage_options
        self._guard = None
        self.pos = 0
        self.eof = False
        self.opens = 0
        self._skip = 0  # samples of a restarted decode already delivered before the restart
        self._chunks: list[tuple[int, np.ndarray]] = []
        self._raw = self._sf = None
        self._open()

    # -- opening ------------------------------------------------------------------------
    def _open(self) -> None:
        """Open (again), retrying a transient failure of the first reads the decoder makes."""
        while True:
            try:
                return self._open_once()
            except DecodeError as exc:
                cause = self._guard.error if self._guard is not None else None
                if exc.reason != READ_ERROR or cause is None or self.opens >= STREAM_ATTEMPTS:
                    raise
                if not storage.is_transient(cause):
                    raise
                storage._add_retries(1)

    def _open_once(self) -> None:
        uri = self.uri
        self.opens += 1
        try:
            fs, path = filesystem(uri, self.storage_options)
            raw = with_retries(_open_object, fs, path)
            raw.seek(0, 2)
            size = raw.tell()
            raw.seek(0)
        except FileNotFoundError:
            raise DecodeError(MISSING_FILE, f"{uri}: audio object not found") from None
        except Exception as exc:  # permissions, I/O, bad URL / filesystem
            raise DecodeError(READ_ERROR, f"{uri}: cannot read ({_detail(exc)})") from None
        if not size:
            raw.close()
            raise DecodeError(UNREADABLE_AUDIO, f"{uri}: empty object (0 bytes)")
        self.size = size
        self._guard = _GuardedFile(raw)
        try:
            sfile = sf.SoundFile(self._guard)
        except _DECODER_ERRORS as exc:
            raw.close()
            self._raise_read_error()
            raise DecodeError(
                UNREADABLE_AUDIO, f"{uri}: unreadable audio ({_detail(exc)}, {size} bytes)"
            ) from None
        self._raw, self._sf = raw, sfile
        self.native_sr = int(sfile.samplerate)
        self.header_duration = sfile.frames / sfile.samplerate if sfile.frames > 0 else 0.0
        self._resampler = (
            soxr.ResampleStream(self.native_sr, TARGET_SR, 1, dtype="float32", quality="HQ")
            if self.native_sr != TARGET_SR
            else None
        )

    def _raise_read_error(self) -> None:
        err = self._guard.error
        if err is not None:
            if isinstance(err, FileNotFoundError):
                raise DecodeError(MISSING_FILE, f"{self.uri}: audio object not found")
            raise DecodeError(READ_ERROR, f"{self.uri}: cannot read ({_detail(err)})")

    def close(self) -> None:
        for closing in (self._sf, self._raw):
            if closing is not None:
                try:
                    closing.close()
                except Exception:  # closing a broken stream must not fail the batch
                    pass
        self._sf = self._raw = None
        self._chunks = []

    # -- decoding -----------------------------------------------------------------------
    def _window(self) -> tuple[np.ndarray, bool]:
        try:
            x = self._sf.read(WINDOW_FRAMES, dtype="float32", always_2d=True)
        except _DECODER_ERRORS as exc:
            self._raise_read_error()
            raise DecodeError(
                UNREADABLE_AUDIO,
                f"{self.uri}: unreadable audio ({_detail(exc)}, {self.size} bytes)",
            ) from None
        self._raise_read_error()
        last = x.shape[0] < WINDOW_FRAMES
        mono = np.ascontiguousarray(_downmix(x), dtype=np.float32)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono, last=last)
        return np.ascontiguousarray(mono, dtype=np.float32), last

    def _restart(self) -> None:
        """Reopen after a transient failure and decode again up to ``pos`` (discarded)."""
        storage._add_retries(1)
        delivered = self.pos
        chunks = self._chunks
        self.close()
        self._chunks = chunks
        self._open()
        self._skip = delivered

    def fill(self) -> int:
        """Decode the next window into the buffer; returns the samples added (0 at the end)."""
        if self.eof:
            return 0
        while True:
            try:
                y, last = self._window()
                break
            except DecodeError as exc:
                cause = self._guard.error
                if (
                    exc.reason == READ_ERROR
                    and cause is not None
                    and storage.is_transient(cause)
                    and self.opens < STREAM_ATTEMPTS
                ):
                    self._restart()
                    continue
                raise
        if self._skip:
            drop = min(self._skip, y.shape[0])
            y, self._skip = y[drop:], self._skip - drop
        if y.shape[0]:
            self._chunks.append((self.pos, y))
            self.pos += y.shape[0]
        if last:
            self.eof = True
            if self._skip:  # the object changed between the two reads
                raise DecodeError(
                    READ_ERROR, f"{self.uri}: cannot read (object shorter when read again)"
                )
        return y.shape[0]

    @property
    def start(self) -> int:
        """First sample still in the buffer (``pos`` when it is empty)."""
        return self._chunks[0][0] if self._chunks else self.pos

    def samples(self, lo: int, hi: int) -> np.ndarray:
        """A copy of samples ``[lo, hi)`` (``start <= lo``, ``hi <= pos``)."""
        parts = []
        for off, chunk in self._chunks:
            a, b = max(lo, off), min(hi, off + chunk.shape[0])
            if a < b:
                parts.append(chunk[a - off : b - off])
        if not parts:
            return np.zeros(0, np.float32)
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()

    def release(self, before: int) -> None:
        """Drop buffered windows that end at or before sample ``before``."""
        keep = 0
        while keep < len(self._chunks) and (
            self._chunks[keep][0] + self._chunks[keep][1].shape[0] <= before
        ):
            keep += 1
        if keep:
            del self._chunks[:keep]


def open_recording(uri: str, storage_options: dict | None = None) -> RecordingStream:
    """A :class:`RecordingStream` for ``uri``; a relative path that escaped the manifest's
    directory raises :class:`DecodeError` (path_escape) without being opened."""
    if uri.startswith(ESCAPED_URI_PREFIX):
        raise DecodeError(
            PATH_ESCAPE,
            f"audio path {uri[len(ESCAPED_URI_PREFIX) :]!r} leads outside the manifest's "
            "directory; not read",
        )
    return RecordingStream(uri, storage_options)


# One-entry per-process state: the recording the last batch ended in (its open stream, or the
# DecodeError it raised), so the next batch continues it instead of decoding it again.
_cache_lock = threading.Lock()
_last: tuple[str, RecordingStream | DecodeError] | None = None


def clear_cache() -> None:
    """Close and forget the open recording of this process (tests; memory)."""
    global _last
    with _cache_lock:
        if _last is not None and isinstance(_last[1], RecordingStream):
            _last[1].close()
        _last = None


def _stream_for(uri: str, first: int, storage_options: dict | None):
    """The open stream of ``uri`` if it can still deliver sample ``first``, else a new one (or
    the DecodeError that opening it raised); becomes this process's open recording."""
    global _last
    with _cache_lock:
        if _last is not None and _last[0] == uri:
            cached = _last[1]
            if isinstance(cached, DecodeError) or cached.start <= first:
                return cached
        if _last is not None and isinstance(_last[1], RecordingStream):
            _last[1].close()
        _last = None  # drop the old recording before opening the next one
    try:
        result: RecordingStream | DecodeError = open_recording(uri, storage_options)
    except DecodeError as exc:
        result = DecodeError(exc.reason, exc.message)  # no traceback pinning buffers
    except MemoryError:
        raise
    except Exception as exc:  # any other decoder failure is still just a bad file
        result = DecodeError(UNREADABLE_AUDIO, f"{uri}: unreadable audio ({_detail(exc)})")
    with _cache_lock:
        _last = (uri, result)
    return result


def _forget_failed(uri: str, error: DecodeError) -> None:
    """A stream that failed half-way: remember the error instead of the stream."""
    global _last
    with _cache_lock:
        if _last is not None and _last[0] == uri and isinstance(_last[1], RecordingStream):
            _last[1].close()
        _last = (uri, DecodeError(error.reason, error.message))


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
        seg_ids = batch.column("segment_id").to_pylist()
        rec_ids = batch.column("recording_id").to_pylist()
        uris = batch.column("audio_uri").to_pylist()
        starts = batch.column("start_s").to_pylist()
        ends = batch.column("end_s").to_pylist()
        n_rows = len(seg_ids)

        self._out_end: list[float | None] = list(ends)
        self._audio: list[np.ndarray | None] = [None] * n_rows
        self._error: list[tuple[str, str] | None] = [None] * n_rows
        i = 0
        while i < n_rows:  # one run of rows of the same recording at a time
            j = i + 1
            while j < n_rows and uris[j] == uris[i]:
                j += 1
            self._decode_rows(uris[i], range(i, j), starts, ends)
            i = j

        num_samples = np.zeros(n_rows, dtype=np.int64)
        offsets = np.zeros(n_rows + 1, dtype=np.int64)
        stage: list[str | None] = [None] * n_rows
        reason: list[str | None] = [None] * n_rows
        message: list[str | None] = [None] * n_rows
        pieces = []
        total = 0
        for k in range(n_rows):
            if self._error[k] is not None:
                stage[k] = STAGE_DECODE
                reason[k], message[k] = self._error[k]
            else:
                seg = self._audio[k]
                pieces.append(seg)
                total += seg.shape[0]
                num_samples[k] = seg.shape[0]
            offsets[k + 1] = total
        out_end, self._out_end, self._audio, self._error = self._out_end, [], [], []
        values = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        del pieces
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

    def _decode_rows(self, uri: str, rows: range, starts: list, ends: list) -> None:
        """Cut the segments of ``rows`` (one recording) as its stream passes them."""
        cfg = self.config
        sr = cfg.sample_rate_hz
        pending: list[tuple[int, int]] = []  # (first sample, row)
        for k in rows:
            start = 0.0 if starts[k] is None else float(starts[k])
            if ends[k] is None or np.isfinite(ends[k]):
                if np.isfinite(start) and start >= 0:
                    pending.append((int(round(start * sr)), k))
                    continue
            pending.append((-1, k))  # invalid times: reported once the file is open
        first = min((lo for lo, _ in pending if lo >= 0), default=0)
        stream = _stream_for(uri, first, cfg.storage_options)
        if isinstance(stream, DecodeError):
            for k in rows:
                self._error[k] = (stream.reason, stream.message)
            return
        todo = []
        for lo, k in pending:
            start = 0.0 if starts[k] is None else float(starts[k])
            try:
                _check_times(start, ends[k], stream.header_duration)
            except SegmentError as exc:
                self._error[k] = (exc.reason, f"{uri}: {exc.message}")
                continue
            todo.append((lo, k))
        todo.sort()
        last_lo = max((lo for lo, _ in todo), default=0)
        try:
            while todo:
                left = []
                for lo, k in todo:
                    end = ends[k]
                    done_early = (
                        end is not None
                        and lo < stream.pos
                        and float(end) <= stream.pos / sr
                        and int(round(float(end) * sr)) <= stream.pos
                    )
                    if stream.eof or done_early:
                        self._cut(stream, k, starts[k], end)
                    else:
                        left.append((lo, k))
                todo = left
                if todo:
                    stream.release(todo[0][0])
                    stream.fill()
        except MemoryError:
            raise
        except Exception as exc:  # a read or decoder failure half-way: the rest of the rows
            if not isinstance(exc, DecodeError):
                exc = DecodeError(UNREADABLE_AUDIO, f"{uri}: unreadable audio ({_detail(exc)})")
            for _, k in todo:
                self._error[k] = (exc.reason, exc.message)
            _forget_failed(uri, exc)
            return
        stream.release(last_lo)

    def _cut(self, stream: RecordingStream, k: int, start_s, end_s) -> None:
        cfg = self.config
        sr = cfg.sample_rate_hz
        uri = stream.uri
        start = 0.0 if start_s is None else float(start_s)
        try:
            # stream.pos is the recording's length once at its end; before, only segments
            # that end within what was decoded are cut (the same bounds either way).
            duration = stream.pos / sr
            self._out_end[k] = duration if end_s is None else min(float(end_s), duration)
            try:
                lo, hi = segment_bounds(stream.pos, start, end_s, cfg.end_tolerance_s, sr)
            except SegmentError as exc:
                raise SegmentError(exc.reason, f"{uri}: {exc.message}") from None
            if hi - lo < cfg.min_samples:
                raise DecodeError(
                    TOO_SHORT,
                    f"{uri}: segment has {hi - lo} samples at {sr} Hz, "
                    f"fewer than {cfg.min_samples}",
                )
            seg = stream.samples(lo, hi)
            if not np.isfinite(seg).all():
                bad = int(seg.size - np.count_nonzero(np.isfinite(seg)))
                raise DecodeError(
                    NON_FINITE, f"{uri}: segment has {bad} NaN/inf samples after decoding"
                )
            # normalised as the checkpoint's preprocessing says (DecodeConfig.normalize); a
            # copy either way (the stream's buffer moves on)
            self._audio[k] = normalise(seg) if cfg.normalize else np.array(seg, np.float32)
        except DecodeError as exc:
            self._error[k] = (exc.reason, exc.message)
        except Exception as exc:  # never raise out of the stage
            self._error[k] = (UNREADABLE_AUDIO, f"{uri}: decode failed ({_detail(exc)})")

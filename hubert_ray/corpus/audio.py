"""CPU decode stage: segments → their recording's decode stream → cut → normalise (when the
checkpoint's preprocessing says so: DecodeConfig.normalize).

Each run of rows of one recording is cut from one :class:`~hubert_ray.corpus.reading.
RecordingStream` (fsspec → soundfile windows → mono → soxr 16 kHz stream), each segment as
soon as the stream has passed its end. The stream decodes only the spans the segments cover:
it seeks over a gap worth a seek and decodes through the others (the rule, the measured
crossover and what each format gives: :mod:`hubert_ray.corpus.reading`), so a manifest that
lists a tenth of a long recording decodes about a tenth of it. Over dense segments it decodes
the recording front to back, as before. Memory per decode task is bounded by the window and
the segments in flight, not by the recording's length. Values equal decoding the whole file
and resampling it in one call (bit for bit where nothing is resampled; ``tests/unit/test_audio.py``
and ``tests/unit/test_sparse_decode.py``).

A recording whose segments continue in the next batch on the same worker (a decode task runs
its block's batches in order) continues from the open stream instead of decoding again (it
seeks back when the next batch starts before what it holds); a recording that failed to open
is remembered the same way (one entry per process).

Failures never raise out of :class:`DecodeStage`; they become error rows (stage ``decode``)
with a reason from :mod:`hubert_ray.core.errors`.

This module must not import torch or ray at import time.
"""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from hubert_ray.core.config import DecodeConfig
from hubert_ray.core.errors import NON_FINITE, STAGE_DECODE, TOO_SHORT, UNREADABLE_AUDIO
from hubert_ray.core.signal import normalise
from hubert_ray.corpus import reading
from hubert_ray.corpus.decoding import (
    TARGET_SR,
    DecodeError,
    SegmentError,
    _check_times,
    _detail,
    cut_segment,
    read_audio,
    segment_bounds,
    to_mono_16k,
)
from hubert_ray.corpus.objects import GuardedFile as _GuardedFile
from hubert_ray.corpus.reading import RecordingStream, open_recording

__all__ = [
    "DECODED_SCHEMA",
    "TARGET_SR",
    "DecodeError",
    "DecodeStage",
    "RecordingStream",
    "SegmentError",
    "_GuardedFile",
    "clear_cache",
    "cut_segment",
    "normalise",
    "open_recording",
    "read_audio",
    "segment_bounds",
    "to_mono_16k",
]

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


def _stream_for(uri: str, first: int, storage_options: dict | None, sparse: bool = False):
    """The open stream of ``uri`` if it can still deliver sample ``first`` (or seek back to
    it), else a new one (or the DecodeError that opening it raised); becomes this process's
    open recording. ``sparse``: the segments leave gaps (see ``RecordingStream``)."""
    global _last
    with _cache_lock:
        if _last is not None and _last[0] == uri:
            cached = _last[1]
            if isinstance(cached, DecodeError) or cached.start <= first:
                return cached
            if cached.rewind(first):
                return cached
        if _last is not None and isinstance(_last[1], RecordingStream):
            _last[1].close()
        _last = None  # drop the old recording before opening the next one
    try:
        if sparse:
            result: RecordingStream | DecodeError = open_recording(
                uri, storage_options, sparse=True
            )
        else:
            result = open_recording(uri, storage_options)
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


def _pending(rows: range, starts: list, ends: list, sr: int) -> list[tuple[int, int]]:
    """``(first sample, row)`` of each row; -1 for times that are invalid whatever the audio
    (reported once the file is open)."""
    pending = []
    for k in rows:
        start = 0.0 if starts[k] is None else float(starts[k])
        if ends[k] is None or np.isfinite(ends[k]):
            if np.isfinite(start) and start >= 0:
                pending.append((int(round(start * sr)), k))
                continue
        pending.append((-1, k))
    return pending


def _sparse(pending: list[tuple[int, int]], ends: list, sr: int) -> bool:
    """Whether the segments leave a gap (from the start, or between them) a seek skips."""
    gap = reading.SEEK_MIN_GAP_S * sr
    reach = 0
    for lo, k in sorted(p for p in pending if p[0] >= 0):
        if lo - reach >= gap:
            return True
        if ends[k] is None:
            return False
        reach = max(reach, int(round(float(ends[k]) * sr)))
    return False


def _next_run(stream: RecordingStream, todo: list, ends: list, sr: int) -> int | None:
    """Skip (seek) to the first sample still needed where the gap is worth it; returns the end
    of the run of segments to decode next, gaps shorter than a seek's included (None: to the
    end of the recording)."""
    first = todo[0][0]
    if first > stream.pos:
        stream.skip_to(first)
    gap = stream.seek_gap
    end = None
    for lo, k in todo:
        if end is not None and lo - end >= gap:
            break
        if ends[k] is None:
            return None
        hi = int(round(float(ends[k]) * sr))
        end = hi if end is None else max(end, hi)
    return end


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
        return self._table(seg_ids, rec_ids, starts)

    def _table(self, seg_ids: list, rec_ids: list, starts: list) -> pa.Table:
        n_rows = len(seg_ids)
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
        pending = _pending(rows, starts, ends, sr)
        first = min((lo for lo, _ in pending if lo >= 0), default=0)
        stream = _stream_for(uri, first, cfg.storage_options, _sparse(pending, ends, sr))
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
            self._cut_as_decoded(stream, todo, starts, ends)
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

    def _cut_as_decoded(self, stream: RecordingStream, todo: list, starts: list, ends: list):
        """Decode (skipping the gaps worth a seek) and cut each segment of ``todo`` (sorted
        ``(first sample, row)``) once decoded; ``todo`` keeps the rows not cut yet."""
        sr = self.config.sample_rate_hz
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
            todo[:] = left
            if todo:
                stream.release(todo[0][0])
                stream.fill(_next_run(stream, todo, ends, sr))

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

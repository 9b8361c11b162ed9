"""One recording as 16 kHz mono samples, decoded where its segments are: the decode stream.

A recording is opened through fsspec (:mod:`hubert_ray.corpus.objects`: local files as they
are, remote objects in ranged GETs) and decoded by soundfile in windows of at most
:data:`WINDOW_FRAMES` frames; each window is downmixed and resampled as it passes
(``soxr.ResampleStream``). Memory is bounded by the window, the buffer of decoded samples the
stage has not released yet (:meth:`RecordingStream.release`) and at most two blocks of a remote
object (8 MiB + 256 KiB).

**Seek or stream.** The stage asks for the next sample a segment needs
(:meth:`RecordingStream.skip_to`). The stream seeks there when the gap from where the decoder
is reaches :data:`SEEK_MIN_GAP_S` plus the format's pre-roll (below); otherwise it decodes
through the gap, as it does over dense segments; after a seek it decodes just up to the end of
the run of segments it seeked for. The crossover (a seek costs what decoding this much audio
costs, one core; ``python -m benchmarks.sparse_decode --crossover``, soundfile alone, AMD EPYC,
2 shared vCPUs, several runs): FLAC 16 kHz 0.5-1.2 s, WAV 0.6 s, Vorbis 0.5 s, Opus 16 kHz
0.7-1.1 s (its seek includes the 80 ms libsndfile decodes before the target); 1 s is about all
of them, and either side of it a gap costs little either way. On a remote object a seek to
bytes the reader does not hold costs a GET (tens of ms on S3: seconds of Opus, tens of seconds
of FLAC decoding), so there the gap must reach :data:`REMOTE_SEEK_MIN_GAP_S` (an estimate, not
measured against S3); a seek within a block already fetched costs no request.

**Values.** Output equals decoding the whole object from its start (``read_audio`` +
``to_mono_16k``), by format (``tests/unit/test_sparse_decode.py``; the numbers below from
thousands of random seeks when these constants were chosen):

* Lossless subtypes (:data:`EXACT_SEEK_SUBTYPES`: PCM in WAV/AIFF/W64/..., FLAC, ALAC, A-law,
  mu-law, IMA/MS ADPCM): a seek + read equals the whole decode bit for bit; no pre-roll.
* Vorbis: libsndfile's seek can differ in its first block (up to 30 ms, even by 1.0);
  :data:`CODEC_PREROLL_S` decodes 0.25 s before the target and drops it: identical.
* Opus: libsndfile lands on the sample, decoding 80 ms before it, but the decoder's state
  (SILK's predictors) need not have converged by then. 16 kHz mono at libsndfile's default 28
  kbit/s, continuously voiced synthetic speech: 24 % of seeks differed at the target (by up to
  1.4e-3), for up to 1.2 s after it at p99 and 5.2 s at most over 3,000 seeks (at 130 and 260
  kbit/s, or with pauses in the speech: 0.1 s at most; 48 kHz stereo: 10 ms). The stream decodes
  6 s before the target (:data:`CODEC_PREROLL_S`), covering every seek measured; no finite
  pre-roll is proven: values are identical once the decoder has converged.
* Every other subtype (MPEG layers: seeks measured inexact for seconds; GSM, G.72x, ...) and
  any object libsndfile cannot seek in (``SoundFile.seekable()``) is decoded front to back.
* Resampled audio (not 16 kHz) is decoded front to back by default: bit-identical to the
  one-call resample. With :data:`SEEK_RESAMPLED` it seeks too, the resampler restarting on a
  frame of the 16 kHz grid (a multiple of ``sr / gcd(sr, 16000)``) :data:`RESAMPLE_PREROLL_S`
  before the target; soxr's FFT blocks then fall differently, so values come within 4.8e-7 of
  the one-call resample for speech-level audio (|x| < 0.9; 44.1, 48, 22.05, 24, 8 kHz) but up
  to 1.2e-6 for a full-scale square wave, and normalised segments by up to 1.2e-6 too; a longer
  pre-roll does not lower this (a floor of ~8 float32 ulp). Not within 1e-6 in every case,
  hence off.

With :data:`SEEK_MIN_GAP_S` set to ``inf`` nothing seeks: every recording is decoded front to
back, as before sparse decoding. A seek that libsndfile refuses (or lands elsewhere) reopens the
recording and decodes it front to back from then on. A transient storage failure reopens it (at
most :data:`STREAM_ATTEMPTS` opens) and seeks back to where it was (or decodes up to there).

This module must not import torch or ray at import time.
"""

from __future__ import annotations

import math

import numpy as np
import soundfile as sf
import soxr

from hubert_ray.core.errors import (
    ESCAPED_URI_PREFIX,
    MISSING_FILE,
    PATH_ESCAPE,
    READ_ERROR,
    UNREADABLE_AUDIO,
)
from hubert_ray.corpus import objects
from hubert_ray.corpus.decoding import (
    _DECODER_ERRORS,
    TARGET_SR,
    DecodeError,
    _detail,
    _downmix,
)
from hubert_ray.corpus.objects import GuardedFile, RangeReader, is_local, open_object
from hubert_ray.io import storage
from hubert_ray.io.storage import filesystem, with_retries

WINDOW_FRAMES = 1 << 16
"""Frames (at the file's own rate) decoded per window: ~4 s at 16 kHz, 1.5 s at 44.1 kHz."""
MIN_READ_FRAMES = 4096
"""Fewest frames one read decodes (a read that ends a sparse segment asks for just enough)."""
STREAM_ATTEMPTS = 3
"""Times a recording is opened in all while reading it fails transiently (a dropped
connection half-way through reopens it and seeks back, or decodes up to where it was)."""
SEEK_MIN_GAP_S = 1.0
"""A gap (beyond the pre-roll) shorter than this is decoded through rather than skipped by a
seek: the measured crossover (module docstring). ``math.inf``: never seek."""
REMOTE_SEEK_MIN_GAP_S = 10.0
"""The same where the seek leaves the block of a remote object already fetched (a GET)."""
SEEK_RESAMPLED = False
"""Whether audio that is resampled (not 16 kHz) seeks too. Off: it is decoded front to back,
bit-identical to the one-call resample; on: within ~1.2e-6 of it (module docstring)."""
RESAMPLE_PREROLL_S = 0.05
"""Audio the resampler is fed before a seek's target (SEEK_RESAMPLED): 20 ms reaches the
rounding floor."""
EXACT_SEEK_SUBTYPES = frozenset(
    {"PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW"}
    | {"IMA_ADPCM", "MS_ADPCM", "ALAC_16", "ALAC_20", "ALAC_24", "ALAC_32"}
)
"""soundfile subtypes whose seek + read equals the whole decode bit for bit (measured)."""
CODEC_PREROLL_S = {"VORBIS": 0.25, "OPUS": 6.0}
"""Audio decoded (and dropped) before a seek's target, for lossy codecs whose decoder carries
state. Opus, 3,000 seeks into 16 kHz mono synthetic speech at libsndfile's default bitrate
(28 kbit/s), share still differing at the target after a pre-roll of 0 / 0.5 / 1 / 2 / 3 / 6 s:
23.7 / 7.0 / 2.1 / 0.13 / 0.07 / 0 %. The price: 6 s of Opus decode per seek (~15 ms, one core),
so a seek pays off over gaps of 7 s and more."""


def seek_preroll_s(subtype: str) -> float | None:
    """Pre-roll before a seek in audio of this soundfile subtype; None: do not seek in it."""
    if subtype in EXACT_SEEK_SUBTYPES:
        return 0.0
    return CODEC_PREROLL_S.get(subtype)


class RecordingStream:
    """One recording as 16 kHz mono samples, decoded window by window where it is needed.

    ``fill(until)`` decodes the next window (or just enough to reach 16 kHz sample ``until``)
    into a buffer of retained samples; ``skip_to(target)`` seeks ahead when the gap is worth it;
    ``samples(lo, hi)`` copies a range out of the buffer; ``release(before)`` drops what no
    segment needs any more. ``pos``: the samples before it are decoded (those from the last
    seek's target on are exact and buffered until released); after the last window ``eof`` is
    true and ``pos`` is the recording's length. ``decoded`` counts the frames decoded (pre-roll
    included), ``seeks`` the seeks, ``bytes_fetched`` the bytes read from storage. ``sparse``
    (a hint: the segments leave gaps) makes a remote object's first read small. Opening raises
    :class:`DecodeError` (missing_file, read_error, unreadable_audio), as ``read_audio`` does.
    """

    def __init__(self, uri: str, storage_options: dict | None = None, sparse: bool = False):
        self.uri = uri
        self.storage_options = storage_options
        self.sparse = sparse
        self._guard = self._reader = None
        self._raw = self._sf = None
        self.pos = 0
        self.eof = False
        self.opens = 0
        self.decoded = 0
        self.seeks = 0
        self._tries = 0  # opens that count against STREAM_ATTEMPTS
        self._bytes_closed = 0
        self._no_seek = False  # a seek failed: front to back from then on
        self._next = 0  # 16 kHz index of the decoder's next output sample
        self._keep_from = 0  # decoded samples before this index are dropped
        self._restarted = False
        self._reposition = False
        self._chunks: list[tuple[int, np.ndarray]] = []
        self._open()

    # -- opening ------------------------------------------------------------------------
    def _open(self, count: bool = True) -> None:
        """Open (again), retrying a transient failure of the first reads the decoder makes."""
        while True:
            try:
                return self._open_once(count)
            except DecodeError as exc:
                cause = self._guard.error if self._guard is not None else None
                if exc.reason != READ_ERROR or cause is None or self._tries >= STREAM_ATTEMPTS:
                    raise
                if not storage.is_transient(cause):
                    raise
                storage._add_retries(1)
                count = True

    def _open_once(self, count: bool) -> None:
        uri = self.uri
        self.opens += 1
        self._tries += int(count)
        try:
            fs, path = filesystem(uri, self.storage_options)
            raw = with_retries(open_object, fs, path)
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
        reader = None
        if not is_local(fs):
            first = objects.SEEK_READ_BLOCK_BYTES if self.sparse else objects.READ_BLOCK_BYTES
            reader = RangeReader(raw, size, first)
        self._guard = GuardedFile(reader if reader is not None else raw)
        try:
            sfile = sf.SoundFile(self._guard)
        except _DECODER_ERRORS as exc:
            raw.close()
            self._raise_read_error()
            raise DecodeError(
                UNREADABLE_AUDIO, f"{uri}: unreadable audio ({_detail(exc)}, {size} bytes)"
            ) from None
        self._raw, self._reader, self._sf = raw, reader, sfile
        self._setup(sfile)

    def _setup(self, sfile: sf.SoundFile) -> None:
        self.native_sr = int(sfile.samplerate)
        self.header_duration = sfile.frames / sfile.samplerate if sfile.frames > 0 else 0.0
        gcd = math.gcd(self.native_sr, TARGET_SR)
        self._q, self._p = self.native_sr // gcd, TARGET_SR // gcd  # q frames -> p samples
        self._frames = int(sfile.frames)
        self._resampler = self._new_resampler()
        self._next = 0
        preroll = seek_preroll_s(sfile.subtype)
        if self._resampler is not None and not SEEK_RESAMPLED:
            preroll = None
        self._can_seek = bool(
            preroll is not None
            and not self._no_seek
            and 0 < self._frames < (1 << 62)
            and sfile.seekable()
        )
        if self._resampler is not None and preroll is not None:
            preroll += RESAMPLE_PREROLL_S
        self._preroll_s = preroll or 0.0

    def _new_resampler(self):
        if self.native_sr == TARGET_SR:
            return None
        return soxr.ResampleStream(self.native_sr, TARGET_SR, 1, dtype="float32", quality="HQ")

    def _raise_read_error(self) -> None:
        err = self._guard.error
        if err is not None:
            if isinstance(err, FileNotFoundError):
                raise DecodeError(MISSING_FILE, f"{self.uri}: audio object not found")
            raise DecodeError(READ_ERROR, f"{self.uri}: cannot read ({_detail(err)})")

    def close(self) -> None:
        self._bytes_closed += self._bytes_now()
        for closing in (self._sf, self._raw):
            if closing is not None:
                try:
                    closing.close()
                except Exception:  # closing a broken stream must not fail the batch
                    pass
        self._sf = self._raw = self._reader = self._guard = None
        self._chunks = []

    def _bytes_now(self) -> int:
        if self._reader is not None:
            return self._reader.fetched
        return self._guard.bytes_read if self._guard is not None else 0

    @property
    def bytes_fetched(self) -> int:
        """Bytes read from storage so far (remote: fetched in ranged GETs), all opens."""
        return self._bytes_closed + self._bytes_now()

    # -- failures -----------------------------------------------------------------------
    def _transient(self, exc: DecodeError) -> bool:
        cause = self._guard.error if self._guard is not None else None
        return (
            exc.reason == READ_ERROR
            and cause is not None
            and storage.is_transient(cause)
            and self._tries < STREAM_ATTEMPTS
        )

    def _reopen(self, count: bool) -> None:
        """Open again, decoding from the start; samples before ``pos`` are dropped."""
        chunks = self._chunks
        self.close()
        self._chunks = chunks
        self._open(count)
        self._keep_from = self.pos
        self._restarted = True

    def _retrying(self, step):
        """``step()``; a transient read failure reopens the recording, goes back to ``pos``
        (by a seek where it is worth one) and tries again."""
        while True:
            try:
                if self._reposition:
                    self._reposition = False
                    if self._can_seek and self.pos >= self._gap_for(self.pos):
                        if not self._seek(self.pos):
                            self._fall_back()
                return step()
            except DecodeError as exc:
                if not self._transient(exc):
                    raise
            storage._add_retries(1)
            self._reopen(count=True)
            self._reposition = True

    def _fall_back(self) -> None:
        """libsndfile refused a seek: reopen and decode front to back from now on."""
        self._no_seek = True
        self._reopen(count=False)

    # -- seeking ------------------------------------------------------------------------
    @property
    def seek_gap(self) -> float:
        """The shortest gap (16 kHz samples) this stream skips by a seek; inf: it never does."""
        if not self._can_seek:
            return math.inf
        return (SEEK_MIN_GAP_S + self._preroll_s) * TARGET_SR

    def _seek_start(self, target: int) -> int:
        """The frame (native rate) a seek for 16 kHz sample ``target`` decodes from."""
        native = min(target * self._q // self._p, self._frames - 1)
        start = max(0, native - int(math.ceil(self._preroll_s * self.native_sr)))
        return start - start % self._q

    def _gap_for(self, target: int) -> float:
        floor = SEEK_MIN_GAP_S
        if self._reader is not None:
            byte = self.size * self._seek_start(target) // max(self._frames, 1)
            if not self._reader.holds(byte):
                floor = max(floor, REMOTE_SEEK_MIN_GAP_S)
        return (floor + self._preroll_s) * TARGET_SR

    def _seek(self, target: int) -> bool:
        """Seek so that decoding reaches 16 kHz sample ``target`` after the pre-roll; False
        (nothing changed but the decoder's position) where libsndfile refuses."""
        start = self._seek_start(target)
        try:
            got = self._sf.seek(start)
        except _DECODER_ERRORS:
            got = -1
        self._raise_read_error()
        if got != start:
            return False
        self._resampler = self._new_resampler()
        self._next = start * self._p // self._q
        self._keep_from = self.pos = target
        self.seeks += 1
        return True

    def skip_to(self, target: int) -> bool:
        """Seek ahead so that 16 kHz sample ``target`` is decoded next, when the gap to it is
        worth a seek (module docstring); False: decoding goes on from where it is."""
        if self.eof or not self._can_seek:
            return False
        here = max(self.pos, self._next)
        if target - here < self._gap_for(target):
            return False
        if self._seek_start(target) * self._p // self._q <= self._next:
            return False

        def step() -> bool:
            if self._seek(target):
                return True
            self._fall_back()
            return False

        return self._retrying(step)

    def rewind(self, first: int) -> bool:
        """Go back to 16 kHz sample ``first`` (before :attr:`start`) by a seek, dropping the
        buffer; False where this stream cannot (the caller opens the recording again)."""
        if not self._can_seek or self._sf is None:
            return False
        self._chunks = []
        self.eof = False
        try:
            return self._seek(first)
        except DecodeError:
            return False

    # -- decoding -----------------------------------------------------------------------
    def _read_size(self, until: int | None) -> int:
        if until is None:
            return WINDOW_FRAMES
        frames = -(-(until - self._next) * self._q // self._p)
        if self._resampler is not None:  # what soxr holds back at the end of a chunk
            frames += int(RESAMPLE_PREROLL_S * self.native_sr)
        return int(min(WINDOW_FRAMES, max(MIN_READ_FRAMES, frames)))

    def _window(self, n: int) -> tuple[np.ndarray, bool]:
        try:
            x = self._sf.read(n, dtype="float32", always_2d=True)
        except _DECODER_ERRORS as exc:
            self._raise_read_error()
            raise DecodeError(
                UNREADABLE_AUDIO,
                f"{self.uri}: unreadable audio ({_detail(exc)}, {self.size} bytes)",
            ) from None
        self._raise_read_error()
        self.decoded += x.shape[0]
        last = x.shape[0] < n
        mono = np.ascontiguousarray(_downmix(x), dtype=np.float32)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono, last=last)
        return np.ascontiguousarray(mono, dtype=np.float32), last

    def fill(self, until: int | None = None) -> int:
        """Decode the next window into the buffer (``until``: a 16 kHz sample the caller needs
        decoded, None: as far as a window goes); returns the samples added (0 at the end)."""
        if self.eof:
            return 0
        y, last = self._retrying(lambda: self._window(self._read_size(until)))
        off = self._next
        self._next += y.shape[0]
        drop = min(max(self._keep_from - off, 0), y.shape[0])
        if drop < y.shape[0]:
            self._chunks.append((off + drop, y[drop:].copy() if drop else y))
        self.pos = max(self.pos, self._next)
        if last:
            self.eof = True
            if self._restarted and self._next < self._keep_from:  # changed between reads
                raise DecodeError(
                    READ_ERROR, f"{self.uri}: cannot read (object shorter when read again)"
                )
            self.pos = self._next
        return y.shape[0] - drop

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


def open_recording(
    uri: str, storage_options: dict | None = None, sparse: bool = False
) -> RecordingStream:
    """A :class:`RecordingStream` for ``uri``; a relative path that escaped the manifest's
    directory raises :class:`DecodeError` (path_escape) without being opened."""
    if uri.startswith(ESCAPED_URI_PREFIX):
        raise DecodeError(
            PATH_ESCAPE,
            f"audio path {uri[len(ESCAPED_URI_PREFIX) :]!r} leads outside the manifest's "
            "directory; not read",
        )
    return RecordingStream(uri, storage_options, sparse)

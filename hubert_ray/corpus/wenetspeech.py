"""WenetSpeech.json → canonical manifest, streaming.

The real ``WenetSpeech.json`` is one JSON object of more than 1 GB whose ``audios`` array holds
one object per long Opus recording::

    {"dataset": "WenetSpeech", ..., "audios": [
        {"aid": "Y0000000000_--5llN02F84", "path": "audio/train/youtube/B00000/Y0...opus",
         "duration": 2494.57, ...,
         "segments": [{"sid": "Y0000000000_--5llN02F84_S00000", "begin_time": 20.08,
                       "end_time": 24.4, "subsets": ["{L}", "{M}"], "text": "...", ...}]},
        ...]}

``json.load`` of that file needs several times its size in memory (lhotse's recipe does
this). :func:`iter_audios` instead scans to the ``audios`` array and decodes one audio
object at a time with :meth:`json.JSONDecoder.raw_decode` over a buffered reader, so memory is
bounded by the read buffer plus the largest single audio object, whatever the file size.

:func:`prepare` turns the recordings of one subset into the canonical manifest
(:func:`hubert_ray.corpus.manifest.write_canonical`, written in row groups as it streams): ``aid`` →
``recording_id``, ``path`` resolved against the JSON's directory (the corpus root) →
``audio_uri``, ``duration`` → ``duration_s``, and per segment ``sid`` / ``begin_time`` /
``end_time`` → ``segment_id`` / ``start_s`` / ``end_s``. A segment belongs to a subset when the
subset's tag is in its ``subsets`` list; tags are accepted as ``"{L}"`` (the real file) or
``"L"``. Recordings with no segment in the subset are left out. Per-segment subset tags are not
stored (the canonical schema has no column for them); the subset filter is recorded in the
Parquet file's key-value metadata under ``hubert_ray.corpus.wenetspeech``.

Validation follows :mod:`hubert_ray.corpus.manifest`: every problem is collected and reported in one
:class:`ManifestError` (the written file is removed). Segment-id uniqueness is checked across
the whole subset with 8-byte hashes (8 bytes per segment instead of a set of strings), and a
hash collision is confirmed against the real ids in a second pass before it is reported.
"""

from __future__ import annotations

import array
import hashlib
import io
import json
import math
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from hubert_ray.core.errors import ManifestError
from hubert_ray.corpus.manifest import Recording, Segment, _Problems, _source_name, write_canonical
from hubert_ray.io import storage

SUBSETS = ("L", "M", "S", "DEV", "TEST_NET", "TEST_MEETING")
"""WenetSpeech subsets: S ⊂ M ⊂ L (training) and three separate evaluation sets."""
METADATA_KEY = "hubert_ray.wenetspeech"
READ_CHARS = 1 << 18  # characters read per refill of the parse buffer
MAX_VALUE_CHARS = 64 << 20  # one audio object larger than this is treated as malformed JSON
# Canonical-manifest row groups: at most this many recordings / about this many segments each
# (bounds the batch the writer holds in memory).
ROWS_PER_GROUP, SEGMENTS_PER_GROUP = 500, 10_000

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def normalise_subset(name: str) -> str:
    """``"m"``, ``"M"`` or ``"{M}"`` → ``"M"``; raise :class:`ManifestError` for unknown names."""
    key = str(name).strip().strip("{}").upper()
    if key not in SUBSETS:
        raise ManifestError(f"subset={name!r} is invalid; allowed: {', '.join(SUBSETS)}")
    return key


# --------------------------------------------------------------------------------------------
# Streaming parser


class _Scanner:
    """A character buffer over a text stream that decodes one JSON value at a time."""

    def __init__(self, f: io.TextIOBase, source: str, read_chars: int = READ_CHARS):
        self.f = f
        self.source = source
        self.read_chars = read_chars
        self.buf = ""
        self.pos = 0
        self.dropped = 0  # characters discarded before buf[0] (for error offsets)
        self.eof = False

    def _fill(self) -> bool:
        data = self.f.read(self.read_chars)
        if not data:
            self.eof = True
            return False
        self.dropped += self.pos
        self.buf = self.buf[self.pos :] + data
        self.pos = 0
        return True

    def _error(self, what: str) -> ManifestError:
        return ManifestError(
            f"WenetSpeech file {self.source}: {what} at character {self.dropped + self.pos}"
        )

    def peek(self) -> str:
        """The next non-blank character ('' at the end of the file), not consumed."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self._fill():
                return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def expect(self, chars: str, what: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            found = repr(c) if c else "the end of the file"
            raise self._error(f"expected {what}, found {found}")
        self.pos += 1
        return c

    def value(self) -> Any:
        """Decode the next JSON value, reading more of the file until it is complete."""
        self.peek()
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                if self.eof or len(self.buf) - self.pos > MAX_VALUE_CHARS:
                    raise ManifestError(
                        f"WenetSpeech file {self.source}: invalid JSON ({exc.msg}) at "
                        f"character {self.dropped + exc.pos}"
                    ) from None
                self._fill()
                continue
            # A number (or literal) ending exactly at the buffer end may continue in the file.
            if end == len(self.buf) and not self.eof and self._fill():
                continue
            self.pos = end
            return obj


def iter_audios(
    f: io.TextIOBase, source: str = "WenetSpeech.json", read_chars: int = READ_CHARS
) -> Iterator[dict]:
    """Yield the objects of the top-level ``audios`` array one at a time (streaming).

    Other top-level keys (``dataset``, ``version``, ...) are decoded and discarded, wherever
    they are. Memory: the read buffer (``read_chars``) plus one audio object.
    """
    sc = _Scanner(f, source, read_chars)
    if sc.peek() == "\ufeff":
        sc.pos += 1
    sc.expect("{", "'{' (a WenetSpeech.json object)")
    if sc.peek() == "}":
        return
    while True:
        key = sc.value()
        if not isinstance(key, str):
            raise sc._error(f"expected an object key, found {key!r}")
        sc.expect(":", "':'")
        if key == "audios":
            sc.expect("[", "'[' (the audios array)")
            if sc.peek() == "]":
                sc.pos += 1
            else:
                while True:
                    yield sc.value()
                    if sc.expect(",]", "',' or ']' in the audios array") == "]":
                        break
        else:
            sc.value()
        if sc.expect(",}", "',' or '}'") == "}":
            return


def open_text(uri: str, storage_options: dict | None = None):
    """Open a (possibly gzip/bz2/xz-compressed) local or remote JSON file as UTF-8 text."""
    fs, path = storage.filesystem(uri, storage_options)
    raw = fs.open(path, "rb", compression="infer")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


# --------------------------------------------------------------------------------------------
# WenetSpeech objects → Recording


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    x = float(value)
    return x if math.isfinite(x) and x >= 0 else None


def _recording(
    audio: Any, index: int, subset: str, base_dir: str, problems: _Problems
) -> Recording | None:
    """The recording with its segments of ``subset``; None (problems noted) or no segments."""
    where = f"audios[{index}]"
    tag = "{" + subset + "}"
    if not isinstance(audio, dict):
        problems.add(None, f"a JSON {type(audio).__name__} is not an audio object", where)
        return None
    before = problems.count
    aid = audio.get("aid")
    if not isinstance(aid, str) or not aid.strip():
        problems.add(None, f"{aid!r} is invalid; expected a non-empty string", f"{where}.aid")
    path = audio.get("path")
    if not isinstance(path, str) or not path.strip():
        problems.add(
            None, f"{path!r} is invalid; expected a path relative to the corpus", f"{where}.path"
        )
    duration = audio.get("duration")
    if duration is not None:
        duration = _number(duration)
        if not duration:
            problems.add(
                None,
                f"{audio.get('duration')!r} is invalid; expected seconds > 0",
                f"{where}.duration",
            )
    segments = audio.get("segments")
    if not isinstance(segments, list):
        problems.add(None, "missing or not a list; expected segments", f"{where}.segments")
        return None
    kept: list[Segment] = []
    for j, seg in enumerate(segments):
        field = f"{where}.segments[{j}]"
        if not isinstance(seg, dict):
            problems.add(None, "not an object; expected {sid, begin_time, end_time}", field)
            continue
        tags = seg.get("subsets")
        if not isinstance(tags, list):
            problems.add(None, f"{tags!r}; expected a list like ['{{L}}']", f"{field}.subsets")
            continue
        if tag not in tags and subset not in tags:
            continue
        sid = seg.get("sid")
        begin, end = _number(seg.get("begin_time")), _number(seg.get("end_time"))
        if not isinstance(sid, str) or not sid.strip():
            problems.add(None, f"{sid!r} is invalid; expected a non-empty string", f"{field}.sid")
        elif begin is None:
            problems.add(
                None, f"{seg.get('begin_time')!r}; expected seconds >= 0", f"{field}.begin_time"
            )
        elif end is None or end <= begin:
            problems.add(
                None,
                f"{seg.get('end_time')!r}; expected seconds > begin_time={begin!r}",
                f"{field}.end_time",
            )
        else:
            kept.append(Segment(sid, begin, end))
    if problems.count != before or not kept:
        return None
    return Recording(
        recording_id=aid,
        audio_uri=storage.resolve(base_dir, path.strip()),
        segments=tuple(kept),
        duration_s=duration,
    )


def _sid_hash(sid: str) -> int:
    return int.from_bytes(hashlib.blake2b(sid.encode(), digest_size=8).digest(), "little")


def iter_recordings(
    uri: str, subset: str, problems: _Problems, storage_options: dict | None = None
) -> Iterator[Recording]:
    """Recordings of ``subset`` (validated), streaming; problems are collected, not raised."""
    base_dir = storage.parent(uri)
    with open_text(uri, storage_options) as f:
        for i, audio in enumerate(iter_audios(f, problems.source)):
            rec = _recording(audio, i, subset, base_dir, problems)
            if rec is not None:
                yield rec


def _duplicates(
    uri: str, subset: str, hashes: array.array, storage_options: dict | None
) -> tuple[set[str], set[str]]:
    """Exact duplicate segment ids (a second pass only when two 8-byte hashes collide)."""
    h = np.frombuffer(hashes, dtype=np.uint64)
    h = np.sort(h)
    clash = set(h[1:][h[1:] == h[:-1]].tolist())
    if not clash:
        return set(), set()
    seen: set[str] = set()
    dups: set[str] = set()
    quiet = _Problems(uri, "")
    for rec in iter_recordings(uri, subset, quiet, storage_options):
        for s in rec.segments:
            if _sid_hash(s.segment_id) in clash:
                (dups if s.segment_id in seen else seen).add(s.segment_id)
    return dups, clash


def prepare(
    uri: str, subset: str, output: str, storage_options: dict | None = None
) -> dict[str, Any]:
    """Write the canonical manifest of one WenetSpeech subset; return counts.

    Raises :class:`ManifestError` (after removing ``output``) listing every problem found.
    """
    subset = normalise_subset(subset)
    problems = _Problems(uri, _source_name(uri))
    counts = {"recordings": 0, "segments": 0, "audio_seconds": 0.0}
    rec_ids: set[str] = set()
    dup_recs: list[str] = []
    hashes = array.array("Q")

    def counted() -> Iterator[Recording]:
        for rec in iter_recordings(uri, subset, problems, storage_options):
            if rec.recording_id in rec_ids:
                dup_recs.append(rec.recording_id)
                continue
            rec_ids.add(rec.recording_id)
            counts["recordings"] += 1
            counts["segments"] += len(rec.segments)
            for s in rec.segments:
                hashes.append(_sid_hash(s.segment_id))
                counts["audio_seconds"] += s.end_s - s.start_s
            yield rec

    meta = {"source": uri, "subset": subset, "format": "WenetSpeech.json"}
    try:
        write_canonical(
            counted(),
            output,
            storage_options,
            metadata={METADATA_KEY: json.dumps(meta)},
            rows_per_group=ROWS_PER_GROUP,
            segments_per_group=SEGMENTS_PER_GROUP,
            validated=True,  # removed below if any rule fails
        )
    except ManifestError:
        _remove(output, storage_options)
        raise
    for rid in dup_recs[:5]:
        problems.add(None, f"duplicate aid {rid!r}; expected aids unique in the file", "aid")
    dups, _ = _duplicates(uri, subset, hashes, storage_options)
    for sid in sorted(dups):
        problems.add(
            None, f"duplicate sid {sid!r}; expected segment ids unique in the subset", "sid"
        )
    if not problems.count and not counts["segments"]:
        problems.add(None, f"no segment is tagged {{{subset}}}; expected at least one")
    if problems.count:
        _remove(output, storage_options)
        problems.raise_if_any()
    counts["audio_seconds"] = round(counts["audio_seconds"], 3)
    return {"subset": subset, **counts}


def _remove(uri: str, storage_options: dict | None) -> None:
    fs, path = storage.filesystem(uri, storage_options)
    try:
        if fs.exists(path):
            fs.rm(path)
    except OSError:
        pass


__all__ = [
    "SUBSETS",
    "iter_audios",
    "iter_recordings",
    "normalise_subset",
    "open_text",
    "prepare",
]

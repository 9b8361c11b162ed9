"""Manifest records: :class:`Recording` and :class:`Segment`, and the validation turning one
input record (a dict, from any format) into a Recording. Every problem is added to a
:class:`_Problems` (``<source>:<line>: field '<path>': ...``), none stops the reading, so one
:class:`ManifestError` lists them all."""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass
from typing import Any

from hubert_ray.core.errors import ESCAPED_URI_PREFIX, ManifestError
from hubert_ray.io import storage

MAX_LISTED = 20


@dataclass(frozen=True)
class Segment:
    segment_id: str
    start_s: float
    end_s: float | None  # None = to the end of the audio (whole-file segment)


@dataclass(frozen=True)
class Recording:
    recording_id: str
    audio_uri: str  # absolute path or URL (relative paths already resolved)
    segments: tuple[Segment, ...]
    duration_s: float | None = None


@dataclass(frozen=True)
class _Keys:
    """Column / key names of one input flavour."""

    recording_id: str
    audio: str
    segment_id: str
    id_required: bool  # canonical rows must carry their ids; raw ones may derive them


_RAW = _Keys(recording_id="id", audio="audio", segment_id="id", id_required=False)
_CANONICAL = _Keys(
    recording_id="recording_id", audio="audio_uri", segment_id="segment_id", id_required=True
)


class _Problems:
    """Collects validation problems; keeps the first :data:`MAX_LISTED` messages."""

    def __init__(self, uri: str, source: str) -> None:
        self.uri = uri
        self.source = source
        self.messages: list[str] = []
        self.count = 0

    def add(self, line: int | None, message: str, field: str | None = None) -> None:
        self.count += 1
        if len(self.messages) < MAX_LISTED:
            where = self.source if line is None else f"{self.source}:{line}"
            what = message if field is None else f"field {field!r}: {message}"
            self.messages.append(f"{where}: {what}")

    def raise_if_any(self) -> None:
        if not self.count:
            return
        lines = list(self.messages)
        if self.count > len(lines):
            lines.append(f"... and {self.count - len(lines)} more")
        noun = "problem" if self.count == 1 else "problems"
        raise ManifestError(
            f"manifest {self.uri} has {self.count} {noun}:\n" + "\n".join(f"  {m}" for m in lines)
        )


# --------------------------------------------------------------------------------------------
# One record (a dict from any format) -> Recording


def _parse_record(
    obj: dict,
    line: int,
    keys: _Keys,
    base_dir: str,
    problems: _Problems,
    seen_recordings: dict[str, int],
    seen_segments: dict[str, int],
) -> Recording | None:
    """The record as a :class:`Recording`, or None after adding its every problem; notes its
    recording and segment ids in ``seen_*`` (id -> line) to find duplicates across records."""
    before = problems.count
    audio_uri = _audio_uri(obj.get(keys.audio), line, keys, base_dir, problems)
    rec_id = _recording_id(obj.get(keys.recording_id), audio_uri, line, keys, problems)
    duration = obj.get("duration_s")
    if duration is not None:
        duration = _number(duration, "duration_s", line, problems, positive=True)
    duplicate_recording = _is_duplicate_recording(rec_id, line, keys, problems, seen_recordings)
    segments = _parse_segments(obj.get("segments"), rec_id, line, keys, problems)
    if not duplicate_recording and segments is not None:
        listed = obj.get("segments") is not None
        _note_segment_ids(segments, listed, line, keys, problems, seen_segments)
    if problems.count != before or rec_id is None or audio_uri is None or segments is None:
        return None
    return Recording(
        recording_id=rec_id, audio_uri=audio_uri, segments=tuple(segments), duration_s=duration
    )


def _audio_uri(
    audio: Any, line: int, keys: _Keys, base_dir: str, problems: _Problems
) -> str | None:
    if not isinstance(audio, str) or not audio.strip():
        what = "missing" if audio is None else f"{audio!r} is invalid"
        problems.add(line, f"{what}; expected a non-empty audio path or URL", field=keys.audio)
        return None
    return _resolve_within(base_dir, audio.strip())


def _recording_id(
    rec_id: Any, audio_uri: str | None, line: int, keys: _Keys, problems: _Problems
) -> Any:
    """The record's id, derived from the audio when absent and allowed; None when invalid (an
    underivable id stays ``""``: reported, and still noted as seen)."""
    if rec_id is None and not keys.id_required:
        rec_id = _derive_id(audio_uri) if audio_uri else None
        if audio_uri and not rec_id:
            problems.add(
                line,
                f"cannot derive a recording id from audio {audio_uri!r}; "
                "expected an explicit non-empty id",
                field=keys.recording_id,
            )
    elif not isinstance(rec_id, str) or not rec_id.strip():
        what = "missing" if rec_id is None else f"{rec_id!r} is invalid"
        problems.add(line, f"{what}; expected a non-empty string", field=keys.recording_id)
        rec_id = None
    return rec_id


def _is_duplicate_recording(
    rec_id: str | None, line: int, keys: _Keys, problems: _Problems, seen: dict[str, int]
) -> bool:
    if rec_id is None:
        return False
    if rec_id in seen:
        problems.add(
            line,
            f"duplicate recording id {rec_id!r} (first at "
            f"line {seen[rec_id]}); expected unique ids",
            field=keys.recording_id,
        )
        return True
    seen[rec_id] = line
    return False


def _note_segment_ids(
    segments: list[Segment],
    listed: bool,
    line: int,
    keys: _Keys,
    problems: _Problems,
    seen: dict[str, int],
) -> None:
    """Report segment ids seen in an earlier record; note the others (``listed``: the record
    has a ``segments`` list, else its one whole-file segment was derived)."""
    for i, seg in enumerate(segments):
        if seg.segment_id in seen:
            field = f"segments[{i}].{keys.segment_id}" if listed else "segments"
            problems.add(
                line,
                f"duplicate segment id {seg.segment_id!r} (first at "
                f"line {seen[seg.segment_id]}); expected segment ids "
                "unique across the manifest",
                field=field,
            )
        else:
            seen[seg.segment_id] = line


def _parse_segments(
    value: Any, rec_id: str | None, line: int, keys: _Keys, problems: _Problems
) -> list[Segment] | None:
    if value is None:
        if keys.id_required:
            problems.add(line, "missing; expected a list of segments", field="segments")
            return None
        return [Segment(rec_id, 0.0, None)] if rec_id is not None else None
    if not isinstance(value, list):
        problems.add(
            line,
            f"a {_json_type(value)} is invalid; expected a list of {{id, start_s, end_s}} objects",
            field="segments",
        )
        return None
    if not value:
        problems.add(
            line,
            "an empty list; expected at least one segment "
            "(omit 'segments' for one whole-file segment)",
            field="segments",
        )
        return None
    out = [_parse_segment(seg, i, rec_id, line, keys, problems) for i, seg in enumerate(value)]
    return out if all(s is not None for s in out) else None


def _parse_segment(
    seg: Any, i: int, rec_id: str | None, line: int, keys: _Keys, problems: _Problems
) -> Segment | None:
    """Segment ``i`` of the record, or None (after reporting its problems, if any)."""
    prefix = f"segments[{i}]"
    if not isinstance(seg, dict):
        problems.add(
            line,
            f"a {_json_type(seg)} is invalid; expected an object {{id, start_s, end_s}}",
            field=prefix,
        )
        return None
    id_ok = True
    seg_id = seg.get(keys.segment_id)
    if seg_id is None and not keys.id_required:
        seg_id = f"{rec_id}-{i}" if rec_id is not None else None
    elif not isinstance(seg_id, str) or not seg_id.strip():
        what = "missing" if seg_id is None else f"{seg_id!r} is invalid"
        problems.add(
            line, f"{what}; expected a non-empty string", field=f"{prefix}.{keys.segment_id}"
        )
        id_ok = False
    start: float | None = None
    if "start_s" not in seg or seg["start_s"] is None:
        problems.add(line, "missing; expected a number of seconds >= 0", field=f"{prefix}.start_s")
    else:
        start = _number(seg["start_s"], f"{prefix}.start_s", line, problems)
    end: float | None = None
    end_ok = True
    if "end_s" not in seg:
        problems.add(
            line,
            "missing; expected a number of seconds > start_s, or null for the end of the audio",
            field=f"{prefix}.end_s",
        )
        end_ok = False
    elif seg["end_s"] is not None:
        end = _number(seg["end_s"], f"{prefix}.end_s", line, problems)
        end_ok = end is not None
    if start is not None and end is not None and end <= start:
        problems.add(line, f"end_s={end!r} must be > start_s={start!r}", field=f"{prefix}.end_s")
        end_ok = False
    if not id_ok or seg_id is None or start is None or not end_ok:
        return None
    return Segment(seg_id, start, end)


def _number(
    value: Any, field: str, line: int, problems: _Problems, positive: bool = False
) -> float | None:
    """A finite float >= 0 (> 0 when ``positive``), or None after reporting the problem."""
    name = field.rsplit(".", 1)[-1]
    expected = "a number of seconds " + ("> 0" if positive else ">= 0")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.add(line, f"{name}={value!r} is not a number; expected {expected}", field=field)
        return None
    x = float(value)
    if not math.isfinite(x):
        problems.add(line, f"{name}={value!r} is not finite; expected {expected}", field=field)
        return None
    if x < 0 or (positive and x == 0):
        problems.add(line, f"{name}={value!r} must be {'> 0' if positive else '>= 0'}", field=field)
        return None
    return x


# --------------------------------------------------------------------------------------------
# Small helpers


def _resolve_within(base_dir: str, path: str) -> str:
    """``path`` resolved against ``base_dir``; a relative path whose normalised form leaves
    ``base_dir`` (``../../etc/passwd``) becomes ``path-escape://<path>``, which the decode
    stage reports as ``path_escape`` error rows instead of reading it. Absolute paths and URLs
    are the manifest author's explicit choice and pass unchanged."""
    if "://" in path or path.startswith("/"):
        return path
    resolved = storage.resolve(base_dir, path)
    root = base_dir.rstrip("/") + "/"
    if not resolved.startswith(root):
        return ESCAPED_URI_PREFIX + path
    return resolved


def _source_name(uri: str) -> str:
    """How problem lines name the manifest: the basename (the full URI is in the header)."""
    return posixpath.basename(uri.split("://", 1)[-1].rstrip("/")) or uri


def _derive_id(audio_uri: str) -> str:
    name = posixpath.basename(audio_uri.split("://", 1)[-1].split("?", 1)[0].rstrip("/"))
    return posixpath.splitext(name)[0]


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__

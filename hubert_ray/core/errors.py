"""Error types and the error-row vocabulary shared by every stage.

A failed segment is never dropped: it becomes one row with these fields, written to
``<output>/errors/*.parquet`` and counted in the summary by ``reason``.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed.

    ``field`` is the config field at fault (the CLI maps it to its ``--option``)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ManifestError(ValueError):
    """A manifest record is invalid; the message names the source, line and field."""


class WorkerDeathError(RuntimeError):
    """A decode/write task or model-actor call whose worker process kept dying (crash, OOM
    killer, lost node) past the job's retry bound; the message names which. The parts already
    written are kept (a rerun resumes)."""


class OutputError(RuntimeError):
    """The output cannot be written (no space left, permission denied, a missing bucket, a
    quota): the job stops and exits 5. Every part written before is whole and kept; once the
    cause is fixed, a rerun resumes."""

    def __init__(self, output: str, reason: str):
        super().__init__(output, reason)
        self.output, self.reason = output, reason

    def __str__(self) -> str:
        return (
            f"cannot write to the output {self.output}: {self.reason}. The parts written so far "
            "are kept: fix that, then rerun to resume"
        )


# Stages that can produce error rows.
STAGE_DECODE = "decode"
STAGE_MODEL = "model"

# Reasons (the summary's ``errors_by_reason`` keys).
MISSING_FILE = "missing_file"  # the audio object does not exist
READ_ERROR = "read_error"  # the object exists but could not be read (permissions, I/O)
UNREADABLE_AUDIO = "unreadable_audio"  # corrupt, truncated, empty or unknown format
SEGMENT_OUT_OF_RANGE = "segment_out_of_range"  # segment starts/ends outside the audio
TOO_SHORT = "too_short"  # fewer than 400 samples at 16 kHz: HuBERT yields 0 frames
NON_FINITE = "non_finite"  # NaN/inf in the input audio or in the model output
MODEL_ERROR = "model_error"  # the forward pass raised for this segment
PATH_ESCAPE = "path_escape"  # a relative audio path leads outside the manifest's directory

ESCAPED_URI_PREFIX = "path-escape://"
"""``audio_uri`` of a record whose relative path escapes the manifest's directory (e.g.
``../../etc/passwd``): never opened; the decode stage turns it into ``path_escape`` rows."""

ERROR_COLUMNS = ("segment_id", "recording_id", "stage", "reason", "message")
TRANSIENT_COLUMN = "transient"
"""Boolean column of error rows: true for a failure that may not happen again (the object
could not be read: storage errors that outlasted the retries, permissions that may be fixed);
a rerun retries those segments (unless told not to) and skips the permanent ones."""
TRANSIENT_REASONS = frozenset({READ_ERROR})

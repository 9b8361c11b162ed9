"""The model stage's Arrow adapter: decoded batches in, feature batches out, around a
:class:`hubert_ray.model.engine.Engine` (which owns the model and everything numeric).

Strictly one row in, one row out: decode-error rows pass through untouched, every other row
gets its features (or becomes an error row when the model output is non-finite even in FP32).
torch is imported only when the stage is constructed (inside the actor process).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import numpy as np
import pyarrow as pa

from hubert_ray.core import errors
from hubert_ray.core.config import SAMPLE_RATE_HZ, ModelConfig

log = logging.getLogger("hubert_ray")

ERROR_FIELDS = ("error_stage", "error_reason", "error_message")
PRECISION_TYPE = pa.list_(
    pa.struct(
        [
            ("layer", pa.int32()),
            ("checked_dtype", pa.string()),
            ("cos_mean", pa.float64()),
            ("cos_min", pa.float64()),
            ("rel_l2", pa.float64()),
            ("max_abs", pa.float64()),
            ("action", pa.string()),  # none | warn | fallback | breach_ignored
            # share of frames whose unit differs from FP32's (null: no centroids for the layer)
            ("unit_flip_rate", pa.float64()),
        ]
    )
)


def feature_type(hidden: int, storage_dtype: str) -> pa.DataType:
    value = pa.float16() if storage_dtype == "float16" else pa.float32()
    return pa.list_(pa.list_(value, hidden))


def features_array(
    values: np.ndarray, frames: list[int], valid: list[bool], storage_dtype: str
) -> pa.Array:
    """``list<fixed_size_list<half|float, hidden>>``: row i is the next ``frames[i]`` rows of
    ``values`` [N, hidden] (in order), or null where not ``valid[i]`` (its frames, if any, are
    dropped). Zero-copy over ``values`` when no frames are dropped."""
    hidden = values.shape[1]
    values, lengths, valid_np = _valid_only(values, frames, valid)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    np_dtype = np.float16 if storage_dtype == "float16" else np.float32
    flat = np.ascontiguousarray(values, dtype=np_dtype).reshape(-1)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat), hidden)
    mask = pa.array(~valid_np)
    return pa.ListArray.from_arrays(pa.array(offsets), inner, mask=mask).cast(
        feature_type(hidden, storage_dtype)
    )


def units_array(values: np.ndarray, frames: list[int], valid: list[bool]) -> pa.Array:
    """``list<uint16>``: row i is the next ``frames[i]`` ids of ``values`` [N], or null
    where not ``valid[i]`` (its ids, if any, are dropped)."""
    values, lengths, valid_np = _valid_only(values, frames, valid)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    ids = pa.array(np.ascontiguousarray(values, dtype=np.uint16))
    return pa.ListArray.from_arrays(pa.array(offsets), ids, mask=pa.array(~valid_np))


def unit_run_arrays(
    values: np.ndarray, frames: list[int], valid: list[bool]
) -> tuple[pa.Array, pa.Array]:
    """Run-length form of :func:`units_array`: ``list<uint16>`` deduplicated ids and
    ``list<uint32>`` their durations in frames, per row (null where not ``valid[i]``)."""
    from hubert_ray.units import centroids as units

    values, lengths, valid_np = _valid_only(values, frames, valid)
    dedup, durations, counts = units.run_length_rows(values, lengths)
    offsets = pa.array(np.concatenate(([0], np.cumsum(counts))).astype(np.int32))
    mask = pa.array(~valid_np)
    return (
        pa.ListArray.from_arrays(offsets, pa.array(dedup.astype(np.uint16)), mask=mask),
        pa.ListArray.from_arrays(offsets, pa.array(durations.astype(np.uint32)), mask=mask),
    )


def _valid_only(values: np.ndarray, frames: list[int], valid: list[bool]):
    """``values`` without the frames of rows that are not ``valid``, the rows' frame counts
    (0 where not valid) and the validity mask."""
    lengths = np.asarray(frames, dtype=np.int64)
    valid_np = np.asarray(valid, dtype=bool)
    if (lengths[~valid_np] > 0).any():  # rows that failed after their frames were computed
        values = values[np.repeat(valid_np, lengths)]
        lengths = np.where(valid_np, lengths, 0)
    return values, lengths, valid_np


def audio_views(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """Zero-copy float32 views of a ``large_list<float32>`` column, one per row (chunk by
    chunk: combining a batch's chunks would copy all of its audio)."""
    views = []
    for arr in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        offsets = arr.offsets.to_numpy()  # of this (possibly sliced) array, into arr.values
        values = arr.values.to_numpy(zero_copy_only=False)
        views.extend(values[offsets[i] : offsets[i + 1]] for i in range(len(arr)))
    return views


# The actor record's device times are rewritten at most this often (the precision record, at
# every change): one small write per call would be ~10 per second per GPU.
REPORT_INTERVAL_S = 30.0


class ModelStage:
    """Ray Data UDF (constructed once per actor). ``__call__`` maps a decoded pyarrow batch to
    a feature batch with the same rows in the same order."""

    def __init__(self, config: ModelConfig, self_test: bool = True, device=None):
        """``device``: a spec of the device the engine runs on
        (:class:`hubert_ray.model.device.DeviceSpec`, e.g. a
        :class:`~hubert_ray.model.device.SimulatedDevice`); ``None``: the real device
        ``config.device`` names."""
        from hubert_ray.io.storage import local_model_dir
        from hubert_ray.model import encoder as hm
        from hubert_ray.model.engine import Engine

        self.config = config
        self.actor_id = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns() % 10**12:012d}"
        model_dir = local_model_dir(config.model_uri, config.storage_options)
        self.engine = Engine(config, model_dir, self_test=self_test, device=device)

        self.layers = self.engine.layers
        self.identity = {
            "model": hm.model_name(model_dir),
            "model_revision": self.engine.revision,
            "actor_id": self.actor_id,
        }
        # The most audio (of rows to compute) and the most rows of any call this actor ran: in
        # its report, where the bound on a call's audio (backend.actor.ModelActor) can be seen.
        self.largest_call = {"audio_seconds": 0.0, "rows": 0}
        self._reported, self._timing, self._reported_at = None, None, 0.0
        self._write_report()

    @property
    def stats(self) -> dict:
        return self.engine.stats

    def _write_report(self) -> None:
        """Write this actor's precision record when it changed (and there is a place); its
        device times alone are rewritten at most every :data:`REPORT_INTERVAL_S`."""
        report = self.engine.report() | {"largest_call": dict(self.largest_call)}
        if not self.config.report_uri:
            return
        timing = report.pop("device_s")
        stale = time.monotonic() - self._reported_at >= REPORT_INTERVAL_S
        if report == self._reported and (timing == self._timing or not stale):
            return
        self._reported, self._timing = dict(report), timing
        self._reported_at = time.monotonic()
        report["device_s"] = timing
        from hubert_ray.io import storage

        report = {"actor_id": self.actor_id, **report}
        fs, path = storage.filesystem(self.config.report_uri, self.config.storage_options)
        if not storage.is_remote(self.config.report_uri):
            os.makedirs(path, exist_ok=True)
        data = json.dumps(report, indent=2).encode()
        storage.with_retries(fs.pipe_file, f"{path.rstrip('/')}/{self.actor_id}.json", data)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.finish(self.launch(batch))

    def launch(self, batch: pa.Table):
        """Queue ``batch``'s forward on the device (returns at once on an accelerator)."""
        n = batch.num_rows
        reasons = batch.column("error_reason").to_pylist()
        audio = audio_views(batch.column("audio"))  # views: ``batch`` stays referenced
        ids = batch.column("segment_id").to_pylist()
        todo = [audio[i] if reasons[i] is None else None for i in range(n)]
        seconds = sum(len(a) for a in todo if a is not None) / SAMPLE_RATE_HZ
        if seconds > self.largest_call["audio_seconds"]:
            self.largest_call["audio_seconds"] = round(seconds, 3)
        self.largest_call["rows"] = max(self.largest_call["rows"], n)
        pending = self.engine.launch(ids, todo)
        return batch, pending

    def finish(self, launched) -> pa.Table:
        """The feature table of a launched batch: one row per input row, in order."""
        batch, pending = launched
        res = self.engine.finish(pending)
        self._write_report()
        columns = {}
        if self.config.store != "units":
            for k in self.layers:
                columns[f"layer_{k}"] = features_array(
                    res.features[k].numpy(), res.frames, res.valid, self.config.storage_dtype
                )
        if self.config.store != "features":
            form = self.config.units_form
            for k in sorted(res.units):
                ids = res.units[k].numpy()
                if form != "runs":
                    columns[f"units_{k}"] = units_array(ids, res.frames, res.valid)
                if form != "frames":
                    dedup, durations = unit_run_arrays(ids, res.frames, res.valid)
                    columns[f"units_{k}_dedup"] = dedup
                    columns[f"units_{k}_durations"] = durations
        frames = [f if ok else 0 for f, ok in zip(res.frames, res.valid, strict=True)]
        out = assemble(batch, columns, frames, res, self.identity)
        if out.num_rows != batch.num_rows or out.column("segment_id") != batch.column("segment_id"):
            raise AssertionError("model stage must return one row per input row, in order")
        return out


def assemble(batch: pa.Table, columns: dict, frames: list[int], res, identity: dict) -> pa.Table:
    """The model stage's output table: ``batch``'s rows with their ``columns`` (name -> Arrow
    array: ``layer_<k>``, ``units_<k>``, ...), frame counts, the engine's per-row outcome
    ``res`` (:class:`hubert_ray.model.calls.Result`) and ``identity`` (model, model_revision,
    actor_id)."""
    n = batch.num_rows
    stage = batch.column("error_stage").to_pylist()
    reason = batch.column("error_reason").to_pylist()
    message = batch.column("error_message").to_pylist()
    for i, (why, text) in res.errors.items():
        stage[i], reason[i], message[i] = errors.STAGE_MODEL, why, text
    cols = {
        "segment_id": batch.column("segment_id"),
        "recording_id": batch.column("recording_id"),
        "start_s": batch.column("start_s"),
        "end_s": batch.column("end_s"),
        "num_frames": pa.array(frames, pa.int32()),
    }
    cols.update(columns)
    ok = [reason[i] is None for i in range(n)]
    cols["model"] = pa.array([identity["model"]] * n, pa.string())
    cols["model_revision"] = pa.array([identity["model_revision"]] * n, pa.string())
    cols["compute_dtype"] = pa.array(
        [d if ok[i] else None for i, d in enumerate(res.compute_dtype)], pa.string()
    )
    cols["precision_checked"] = pa.array([p is not None for p in res.precision], pa.bool_())
    cols["fallback_reason"] = pa.array(res.fallback, pa.string())
    cols["actor_id"] = pa.array([identity["actor_id"]] * n, pa.string())
    cols["precision"] = pa.array(res.precision, PRECISION_TYPE)
    cols["error_stage"] = pa.array(stage, pa.string())
    cols["error_reason"] = pa.array(reason, pa.string())
    cols["error_message"] = pa.array(message, pa.string())
    return pa.table(cols)

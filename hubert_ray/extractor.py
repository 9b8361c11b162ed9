"""The model stage: one HuBERT per actor, exact padded micro-batches, chunking, NaN guard.

Strictly one row in, one row out: decode-error rows pass through untouched, every other row
gets its features (or becomes an error row when the model output is non-finite even in FP32).
torch is imported only when the stage is constructed (inside the actor process).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from hubert_ray import errors
from hubert_ray.chunking import num_frames, pack_micro_batches, plan_chunks
from hubert_ray.config import ModelConfig, parse_layers

log = logging.getLogger(__name__)

ERROR_FIELDS = ("error_stage", "error_reason", "error_message")


def feature_type(hidden: int, storage_dtype: str) -> pa.DataType:
    value = pa.float16() if storage_dtype == "float16" else pa.float32()
    return pa.list_(pa.list_(value, hidden))


def features_array(per_row: list[np.ndarray | None], hidden: int, storage_dtype: str) -> pa.Array:
    """``list<fixed_size_list<half|float, hidden>>`` from per-row [frames, hidden] arrays;
    ``None`` entries become nulls."""
    np_dtype = np.float16 if storage_dtype == "float16" else np.float32
    lengths = np.array([0 if a is None else a.shape[0] for a in per_row], dtype=np.int32)
    offsets = np.zeros(len(per_row) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    parts = [a.reshape(-1) for a in per_row if a is not None and a.size]
    flat = np.concatenate(parts).astype(np_dtype, copy=False) if parts else np.zeros(0, np_dtype)
    values = pa.FixedSizeListArray.from_arrays(pa.array(flat), hidden)
    mask = pa.array([a is None for a in per_row])
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask).cast(
        feature_type(hidden, storage_dtype)
    )


def audio_views(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """Zero-copy float32 views of a ``large_list<float32>`` column, one per row."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(arr))]


class HubertStage:
    """Ray Data UDF (constructed once per actor). ``__call__`` maps a decoded pyarrow batch to
    a feature batch with the same rows in the same order."""

    def __init__(self, config: ModelConfig):
        import torch

        from hubert_ray import model as hm
        from hubert_ray.storage import local_model_dir

        self.config = config
        use_cuda = config.device == "cuda" or (
            config.device == "auto" and torch.cuda.is_available()
        )
        self.device = torch.device("cuda" if use_cuda else "cpu")
        if not use_cuda:
            if config.num_threads:
                torch.set_num_threads(config.num_threads)
            log.info("model actor on CPU with %d torch threads", torch.get_num_threads())
        dtype = config.dtype
        if dtype == "auto":
            dtype = "float16" if use_cuda else "float32"
        if dtype == "int8" and use_cuda:
            raise ValueError(
                "dtype=int8 (dynamic quantisation) runs on CPU only; use float16 on GPU"
            )
        self.dtype = dtype
        self.model_dir = local_model_dir(config.model_uri, config.storage_options)
        self.net = hm.load_hubert(self.model_dir, self.device, dtype)
        self.hidden = self.net.config.hidden_size
        self.layers = parse_layers(config.layers, self.net.num_hidden_layers)
        self.model_name = hm.model_name(self.model_dir)
        self.revision = hm.model_revision(self.model_dir)
        self._fp32 = self.net if dtype == "float32" else None
        self.stats = {"batches": 0, "fallbacks": 0, "forward_s": 0.0}

    # -- forward --------------------------------------------------------------------------
    def _fp32_net(self):
        if self._fp32 is None:
            from hubert_ray import model as hm

            self._fp32 = hm.load_hubert(self.model_dir, self.device, "float32")
        return self._fp32

    def _run(self, net, chunks: list[np.ndarray]):
        """One padded forward. Returns per-chunk {layer: [F, H] tensor on CPU} and a
        per-chunk finite flag."""
        import torch

        lengths = [len(c) for c in chunks]
        x = np.zeros((len(chunks), max(lengths)), dtype=np.float32)
        for i, c in enumerate(chunks):
            x[i, : len(c)] = c
        param = next(net.parameters())
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        xt = torch.from_numpy(x).to(self.device, non_blocking=True).to(dtype)
        lt = torch.tensor(lengths, device=self.device)
        out, frame_lengths = net(xt, lt, self.layers)
        store = torch.float16 if self.config.storage_dtype == "float16" else torch.float32
        finite = torch.ones(len(chunks), dtype=torch.bool, device=self.device)
        fl = frame_lengths.tolist()
        mask = (
            torch.arange(out[self.layers[0]].shape[1], device=self.device)[None, :]
            < (frame_lengths[:, None])
        )
        for k in self.layers:
            valid = torch.isfinite(out[k]).all(dim=-1) | ~mask
            finite &= valid.all(dim=-1)
        host = {k: out[k].to(store).cpu() for k in self.layers}
        per_chunk = [{k: host[k][i, : fl[i]] for k in self.layers} for i in range(len(chunks))]
        return per_chunk, finite.cpu().tolist()

    # -- batch ----------------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        reasons = batch.column("error_reason").to_pylist()
        audio = audio_views(batch.column("audio"))
        ok_rows = [i for i in range(n) if reasons[i] is None]

        # Chunk every OK row; remember which chunks belong to which row.
        chunks: list[np.ndarray] = []
        owner: list[int] = []
        for i in ok_rows:
            for s, e in plan_chunks(len(audio[i]), self.config.chunk_samples):
                chunks.append(audio[i][s:e])
                owner.append(i)
        results: list[dict | None] = [None] * len(chunks)
        row_dtype = {i: self.dtype for i in ok_rows}
        bad_rows: set[int] = set()
        t0 = time.perf_counter()
        for group in pack_micro_batches([len(c) for c in chunks], self.config.max_batch_samples):
            feats, finite = self._run(self.net, [chunks[j] for j in group])
            if not all(finite) and self.dtype != "float32":
                # Non-finite in reduced precision: recompute the micro-batch in FP32.
                self.stats["fallbacks"] += 1
                feats, finite = self._run(self._fp32_net(), [chunks[j] for j in group])
                for j in group:
                    row_dtype[owner[j]] = "float32"
            for j, f, fin in zip(group, feats, finite, strict=True):
                results[j] = f
                if not fin:
                    bad_rows.add(owner[j])
        self.stats["forward_s"] += time.perf_counter() - t0
        self.stats["batches"] += 1

        # Stitch chunk features back per row.
        per_layer: dict[int, list[np.ndarray | None]] = {k: [None] * n for k in self.layers}
        by_row: dict[int, list[dict]] = {}
        for j, i in enumerate(owner):
            by_row.setdefault(i, []).append(results[j])
        import torch

        frames = [0] * n
        for i, parts in by_row.items():
            if i in bad_rows:
                continue
            for k in self.layers:
                per_layer[k][i] = torch.cat([p[k] for p in parts]).numpy()
            frames[i] = per_layer[self.layers[0]][i].shape[0]
            expected = num_frames(len(audio[i]))
            if frames[i] != expected:
                raise AssertionError(f"frame count {frames[i]} != {expected} for row {i}")
        out = self._assemble(batch, per_layer, frames, row_dtype, bad_rows)
        if out.num_rows != n or out.column("segment_id") != batch.column("segment_id"):
            raise AssertionError("model stage must return one row per input row, in order")
        return out

    def _assemble(self, batch, per_layer, frames, row_dtype, bad_rows) -> pa.Table:
        n = batch.num_rows
        stage = batch.column("error_stage").to_pylist()
        reason = batch.column("error_reason").to_pylist()
        message = batch.column("error_message").to_pylist()
        for i in bad_rows:
            stage[i], reason[i] = errors.STAGE_MODEL, errors.NON_FINITE
            message[i] = (
                f"non-finite model output for {batch.column('segment_id')[i]} even in float32"
            )
        cols = {
            "segment_id": batch.column("segment_id"),
            "recording_id": batch.column("recording_id"),
            "start_s": batch.column("start_s"),
            "end_s": batch.column("end_s"),
            "num_frames": pa.array(frames, pa.int32()),
        }
        for k in self.layers:
            cols[f"layer_{k}"] = features_array(
                per_layer[k], self.hidden, self.config.storage_dtype
            )
        cols["model"] = pa.array([self.model_name] * n, pa.string())
        cols["model_revision"] = pa.array([self.revision] * n, pa.string())
        cols["compute_dtype"] = pa.array([row_dtype.get(i) for i in range(n)], pa.string())
        cols["precision_checked"] = pa.array([False] * n, pa.bool_())
        cols["error_stage"] = pa.array(stage, pa.string())
        cols["error_reason"] = pa.array(reason, pa.string())
        cols["error_message"] = pa.array(message, pa.string())
        return pa.table(cols)

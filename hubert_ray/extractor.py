"""The model stage: one HuBERT per actor, exact padded micro-batches, chunking, NaN guard,
sampled FP32 precision checks with fallback.

Strictly one row in, one row out: decode-error rows pass through untouched, every other row
gets its features (or becomes an error row when the model output is non-finite even in FP32).
torch is imported only when the stage is constructed (inside the actor process).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa

from hubert_ray import errors
from hubert_ray.chunking import num_frames, pack_micro_batches, pad_batch, plan_chunks
from hubert_ray.config import SAMPLE_RATE_HZ, ModelConfig, parse_layers
from hubert_ray.precision import PrecisionBreach, compare, is_sampled

log = logging.getLogger(__name__)

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
        ]
    )
)


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


# Default fixed cost of a forward micro-batch, in seconds of padded audio (ModelConfig.
# micro_batch_cost_seconds). CPU: the best of 0/1/4/16 s at 256 rows per call, tiny and base
# models (benchmarks/RESULTS.md). GPU: kernel launches weigh more against much faster
# arithmetic; 16 s is a first guess, not yet measured (benchmarks/gpu_run.sh sweeps it).
CPU_BATCH_COST_S = 1.0
GPU_BATCH_COST_S = 16.0


@dataclass
class _Work:
    """One batch's chunks and what is known about them while the stage processes it."""

    seg_ids: list[str]
    chunks: list[np.ndarray]  # every OK row's chunks
    owner: list[int]  # chunk j belongs to row owner[j]
    results: list[dict | None]  # chunk j's {layer: [frames, hidden] tensor}
    row_dtype: dict[int, str]  # dtype each OK row's features were computed in
    fallback: dict[int, str] = field(default_factory=dict)  # row -> why it was recomputed
    groups: list[list[int]] = field(default_factory=list)  # the micro-batches, chunk indices

    @cached_property
    def chunks_of(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for j, i in enumerate(self.owner):
            out.setdefault(i, []).append(j)
        return out


@dataclass
class _Launched:
    """A micro-batch whose forward has been queued: its outputs in host memory (being filled
    until ``done`` has happened, on CUDA), per-frame finite flags and valid frame counts."""

    host: dict  # layer -> [B, F, H] tensor
    finite: object  # [B, F] bool tensor
    frame_lengths: list[int]
    done: object = None  # torch.cuda.Event on CUDA


class HubertStage:
    """Ray Data UDF (constructed once per actor). ``__call__`` maps a decoded pyarrow batch to
    a feature batch with the same rows in the same order."""

    overlap = True  # pipeline micro-batches (see _launch); the benchmark times both ways

    def __init__(self, config: ModelConfig):
        import torch

        from hubert_ray import model as hm
        from hubert_ray.storage import local_model_dir

        self.config = config
        use_cuda = config.device == "cuda" or (
            config.device == "auto" and torch.cuda.is_available()
        )
        self.device = torch.device("cuda" if use_cuda else "cpu")
        cost_s = config.micro_batch_cost_seconds
        if cost_s is None:
            cost_s = GPU_BATCH_COST_S if use_cuda else CPU_BATCH_COST_S
        self.batch_cost_samples = cost_s * SAMPLE_RATE_HZ
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
        self.net = hm.load_hubert(
            self.model_dir, self.device, dtype, allow_pickle=config.allow_pickle_weights
        )
        self.hidden = self.net.config.hidden_size
        self.layers = parse_layers(config.layers, self.net.num_hidden_layers)
        self.model_name = hm.model_name(self.model_dir)
        self.revision = hm.model_revision(self.model_dir)
        self.precision = config.precision
        self.checking = dtype != "float32" and self.precision.precision_sample_rate > 0
        # The FP32 reference exists from the start only while sampling is on; otherwise it is
        # loaded on the first non-finite fallback.
        self._fp32 = self.net if dtype == "float32" else None
        if self.checking:
            self._reference()
        self.stats = {"batches": 0, "forward_s": 0.0, "samples": 0, "padded_samples": 0}
        self._inputs = [None, None]  # see _staging

    def _reference(self):
        if self._fp32 is None:
            from hubert_ray import model as hm

            self._fp32 = hm.load_hubert(
                self.model_dir,
                self.device,
                "float32",
                allow_pickle=self.config.allow_pickle_weights,
            )
        return self._fp32

    # -- forward --------------------------------------------------------------------------
    # Micro-batches are software-pipelined: micro-batch k+1 is padded and queued on the GPU
    # before micro-batch k's outputs are read back, so the host's work (padding, slicing) runs
    # while the GPU computes. Two pinned input buffers alternate; outputs come back through
    # pinned memory with one wait per micro-batch. On CPU the same code runs synchronously.
    def _launch(self, net, chunks: list[np.ndarray], keep_float32: bool, slot: int) -> _Launched:
        """Start one padded forward of ``chunks`` (asynchronous on CUDA): outputs cast to the
        storage dtype (float32 with ``keep_float32``) and a per-frame finiteness flag, both on
        their way to host memory. ``slot`` (0/1) picks the input buffer."""
        import torch

        staging = self._staging(slot, len(chunks) * max(len(c) for c in chunks))
        x, lengths = pad_batch(chunks, out=staging.numpy())
        self.stats["samples"] += sum(lengths)
        self.stats["padded_samples"] += x.size
        param = next(net.parameters())
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        xt = staging[: x.size].view(x.shape).to(self.device, non_blocking=True).to(dtype)
        out, frame_lengths = net(xt, lengths, self.layers)
        float16 = self.config.storage_dtype == "float16" and not keep_float32
        store = torch.float16 if float16 else torch.float32
        cast = {k: out[k].to(store) for k in self.layers}
        # Per frame: every stored value finite in every layer (checked after the storage cast:
        # float16 can overflow too). Padded frames are ignored in _collect.
        finite = torch.stack([torch.isfinite(v).all(dim=-1) for v in cast.values()]).all(dim=0)
        if self.device.type != "cuda":
            return _Launched(cast, finite, frame_lengths.tolist())
        host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in cast.items()}
        for k, v in cast.items():
            host[k].copy_(v, non_blocking=True)
        finite_host = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
        finite_host.copy_(finite, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return _Launched(host, finite_host, frame_lengths.tolist(), done)

    def _collect(self, launched: _Launched) -> tuple[list[dict], list[bool]]:
        """Wait for a launched forward; per chunk ``{layer: [F, H] CPU tensor}`` and whether
        all its stored values are finite."""
        if launched.done is not None:
            launched.done.synchronize()
        fl, host = launched.frame_lengths, launched.host
        per_chunk = [{k: host[k][i, :n] for k in self.layers} for i, n in enumerate(fl)]
        finite = [bool(launched.finite[i, :n].all()) for i, n in enumerate(fl)]
        return per_chunk, finite

    def _staging(self, slot: int, size: int):
        """Reused host input buffer ``slot`` (float32, pinned on CUDA) of at least ``size``
        values. A slot is refilled two micro-batches later, after the one that used it has been
        collected (so its copy to the device has finished)."""
        import torch

        buf = self._inputs[slot]
        if buf is None or buf.numel() < size:
            size = max(size, self.config.max_batch_samples)
            buf = torch.empty(size, dtype=torch.float32, pin_memory=self.device.type == "cuda")
            self._inputs[slot] = buf
        return buf

    def _forward_chunks(self, net, w: _Work, indices, results, keep_float32=False):
        """Forward ``w.chunks[j] for j in indices`` in packed micro-batches into ``results[j]``.
        Returns the micro-batches (lists of chunk indices) and the non-finite chunk indices."""
        groups = [
            [indices[g] for g in group]
            for group in pack_micro_batches(
                [len(w.chunks[j]) for j in indices],
                self.config.max_batch_samples,
                self.batch_cost_samples,
            )
        ]
        bad = []

        def collect(group, launched):
            feats, finite = self._collect(launched)
            for j, f, ok in zip(group, feats, finite, strict=True):
                results[j] = f
                if not ok:
                    bad.append(j)

        previous = None
        for n, group in enumerate(groups):
            launched = self._launch(net, [w.chunks[j] for j in group], keep_float32, n % 2)
            if previous is not None:
                collect(*previous)
            previous = (group, launched)
            if not self.overlap:
                collect(*previous)
                previous = None
        if previous is not None:
            collect(*previous)
        return groups, bad

    # -- batch ----------------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        reasons = batch.column("error_reason").to_pylist()
        audio = audio_views(batch.column("audio"))
        ok_rows = [i for i in range(n) if reasons[i] is None]

        # Chunk every OK row; remember which chunks belong to which row.
        chunks, owner = [], []
        for i in ok_rows:
            for s, e in plan_chunks(len(audio[i]), self.config.chunk_samples):
                chunks.append(audio[i][s:e])
                owner.append(i)
        w = _Work(
            seg_ids=batch.column("segment_id").to_pylist(),
            chunks=chunks,
            owner=owner,
            results=[None] * len(chunks),
            row_dtype={i: self.dtype for i in ok_rows},
        )
        t0 = time.perf_counter()
        w.groups, bad = self._forward_chunks(self.net, w, list(range(len(chunks))), w.results)
        bad_rows = {owner[j] for j in bad}
        if bad and self.dtype != "float32" and self.precision.on_precision_breach == "fail":
            j = bad[0]
            layer = next(k for k, v in w.results[j].items() if not bool(v.isfinite().all()))
            raise PrecisionBreach(
                f"precision breach: segment {w.seg_ids[owner[j]]!r} layer {layer}: non-finite "
                f"output in {self.dtype}; rerun with --dtype float32 or "
                "--on-precision-breach fallback"
            )
        if bad and self.dtype != "float32":
            # Non-finite in reduced precision: recompute the affected micro-batches' rows in FP32.
            rows = {owner[j] for g in w.groups if set(g) & set(bad) for j in g}
            bad_rows = (bad_rows - rows) | self._recompute_rows(w, rows, "non_finite")

        precision = [None] * n
        if self.checking:
            bad_rows |= self._check_precision(w, ok_rows, bad_rows, precision)
        self.stats["forward_s"] += time.perf_counter() - t0
        self.stats["batches"] += 1

        per_layer: dict[int, list[np.ndarray | None]] = {k: [None] * n for k in self.layers}
        frames = [0] * n
        for i, js in w.chunks_of.items():
            if i in bad_rows:
                continue
            for k, feats in self._stitch(w.results, js).items():
                per_layer[k][i] = feats
            frames[i] = per_layer[self.layers[0]][i].shape[0]
            if frames[i] != num_frames(len(audio[i])):
                raise AssertionError(
                    f"{w.seg_ids[i]}: {frames[i]} frames, expected {num_frames(len(audio[i]))}"
                )
        out = self._assemble(batch, per_layer, frames, w.row_dtype, bad_rows, w.fallback, precision)
        if out.num_rows != n or out.column("segment_id") != batch.column("segment_id"):
            raise AssertionError("model stage must return one row per input row, in order")
        return out

    def _stitch(self, results, js) -> dict[int, np.ndarray]:
        import torch

        if len(js) == 1:  # most segments: one chunk, no copy
            return {k: results[js[0]][k].numpy() for k in self.layers}
        return {k: torch.cat([results[j][k] for j in js]).numpy() for k in self.layers}

    def _recompute_rows(self, w: _Work, rows: set[int], why: str) -> set[int]:
        """Recompute every chunk of ``rows`` in FP32 and mark those rows as float32.
        Returns the rows still non-finite."""
        chunks_of = w.chunks_of
        js = sorted(j for i in rows for j in chunks_of[i])
        _, bad = self._forward_chunks(self._reference(), w, js, w.results)
        for i in rows:
            w.row_dtype[i] = "float32"
            w.fallback.setdefault(i, why)
        return {i for i in rows if set(chunks_of[i]) & set(bad)}

    def _check_precision(self, w: _Work, ok_rows, bad_rows, precision) -> set[int]:
        """Recompute sampled rows in FP32; record metrics; warn / fall back / fail.
        Returns rows left non-finite by a fallback recompute (normally none)."""
        cfg = self.precision
        sampled = [
            i
            for i in ok_rows
            if i not in bad_rows
            and w.row_dtype[i] == self.dtype
            and is_sampled(w.seg_ids[i], cfg.precision_sample_rate)
        ]
        if not sampled:
            return set()
        chunks_of = w.chunks_of
        ref: list[dict | None] = [None] * len(w.chunks)
        js = [j for i in sampled for j in chunks_of[i]]
        self._forward_chunks(self._reference(), w, js, ref, keep_float32=True)
        group_of = {j: g for g, group in enumerate(w.groups) for j in group}
        breached: set[int] = set()
        for i in sampled:
            got = self._stitch(w.results, chunks_of[i])
            want = self._stitch(ref, chunks_of[i])
            metrics = {k: compare(got[k], want[k]) for k in self.layers}
            worst_layer = max(metrics, key=lambda k: metrics[k]["rel_l2"])
            worst = metrics[worst_layer]["rel_l2"]
            action = "none"
            if worst > cfg.precision_warn:
                action = "warn"
                log.warning(
                    "precision: %s layer %d relative error %.4g > warn %.4g (%s)",
                    w.seg_ids[i],
                    worst_layer,
                    worst,
                    cfg.precision_warn,
                    self.dtype,
                )
            if worst > cfg.precision_limit:
                if cfg.on_precision_breach == "fail":
                    raise PrecisionBreach(
                        f"precision breach: segment {w.seg_ids[i]!r} layer {worst_layer}: "
                        f"relative L2 error {worst:.4g} > precision_limit "
                        f"{cfg.precision_limit:g} in {self.dtype}; rerun with --dtype float32 "
                        "or --on-precision-breach fallback"
                    )
                action = "fallback" if cfg.on_precision_breach == "fallback" else "breach_ignored"
                if cfg.on_precision_breach == "fallback":
                    breached.add(i)
            precision[i] = [
                {"layer": k, "checked_dtype": self.dtype, **m, "action": action}
                for k, m in metrics.items()
            ]
        if breached:
            # The affected micro-batches are recomputed and written in FP32 (all their rows).
            hit = {group_of[j] for i in breached for j in chunks_of[i]}
            rows = {w.owner[j] for g in hit for j in w.groups[g]}
            return self._recompute_rows(w, rows, "precision")
        return set()

    def _assemble(self, batch, per_layer, frames, row_dtype, bad_rows, fallback, precision):
        n = batch.num_rows
        stage = batch.column("error_stage").to_pylist()
        reason = batch.column("error_reason").to_pylist()
        message = batch.column("error_message").to_pylist()
        for i in bad_rows:
            stage[i], reason[i] = errors.STAGE_MODEL, errors.NON_FINITE
            message[i] = (
                f"non-finite model output for {batch.column('segment_id')[i]} even in float32"
                f" (stored as {self.config.storage_dtype})"
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
        ok = [reason[i] is None for i in range(n)]
        cols["model"] = pa.array([self.model_name] * n, pa.string())
        cols["model_revision"] = pa.array([self.revision] * n, pa.string())
        cols["compute_dtype"] = pa.array(
            [row_dtype.get(i) if ok[i] else None for i in range(n)], pa.string()
        )
        cols["precision_checked"] = pa.array([p is not None for p in precision], pa.bool_())
        cols["fallback_reason"] = pa.array([fallback.get(i) for i in range(n)], pa.string())
        cols["precision"] = pa.array(precision, PRECISION_TYPE)
        cols["error_stage"] = pa.array(stage, pa.string())
        cols["error_reason"] = pa.array(reason, pa.string())
        cols["error_message"] = pa.array(message, pa.string())
        return pa.table(cols)

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
from hubert_ray import units as unit_ids
from hubert_ray.chunking import (
    num_frames,
    pack_micro_batches,
    pad_batch,
    padded_length,
    plan_chunks,
)
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
    lengths = np.asarray(frames, dtype=np.int64)
    valid_np = np.asarray(valid, dtype=bool)
    if (lengths[~valid_np] > 0).any():  # rows that failed after their frames were computed
        values = values[np.repeat(valid_np, lengths)]
        lengths = np.where(valid_np, lengths, 0)
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
    lengths = np.asarray(frames, dtype=np.int64)
    valid_np = np.asarray(valid, dtype=bool)
    if (lengths[~valid_np] > 0).any():
        values = values[np.repeat(valid_np, lengths)]
        lengths = np.where(valid_np, lengths, 0)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    ids = pa.array(np.ascontiguousarray(values, dtype=np.uint16))
    return pa.ListArray.from_arrays(pa.array(offsets), ids, mask=pa.array(~valid_np))


def unit_run_arrays(
    values: np.ndarray, frames: list[int], valid: list[bool]
) -> tuple[pa.Array, pa.Array]:
    """Run-length form of :func:`units_array`: ``list<uint16>`` deduplicated ids and
    ``list<uint32>`` their durations in frames, per row (null where not ``valid[i]``)."""
    lengths = np.asarray(frames, dtype=np.int64)
    valid_np = np.asarray(valid, dtype=bool)
    if (lengths[~valid_np] > 0).any():
        values = values[np.repeat(valid_np, lengths)]
        lengths = np.where(valid_np, lengths, 0)
    dedup, durations, counts = unit_ids.run_length_rows(values, lengths)
    offsets = pa.array(np.concatenate(([0], np.cumsum(counts))).astype(np.int32))
    mask = pa.array(~valid_np)
    return (
        pa.ListArray.from_arrays(offsets, pa.array(dedup.astype(np.uint16)), mask=mask),
        pa.ListArray.from_arrays(offsets, pa.array(durations.astype(np.uint32)), mask=mask),
    )


def audio_views(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """Zero-copy float32 views of a ``large_list<float32>`` column, one per row (chunk by
    chunk: combining a batch's chunks would copy all of its audio)."""
    views = []
    for arr in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        offsets = arr.offsets.to_numpy()  # of this (possibly sliced) array, into arr.values
        values = arr.values.to_numpy(zero_copy_only=False)
        views.extend(values[offsets[i] : offsets[i + 1]] for i in range(len(arr)))
    return views


# Default fixed cost of a forward micro-batch, in seconds of padded audio (ModelConfig.
# micro_batch_cost_seconds). CPU: the best of 0/1/4/16 s at 256 rows per call, tiny and base
# models (benchmarks/RESULTS.md). GPU: kernel launches weigh more against much faster
# arithmetic; 16 s is a first guess, not yet measured (benchmarks/gpu_run.sh sweeps it).
CPU_BATCH_COST_S = 1.0
GPU_BATCH_COST_S = 16.0
# Default padded-length multiple (ModelConfig.pad_multiple_seconds). GPU: every micro-batch of
# mixed lengths otherwise has a new shape, and cuDNN chooses plans per shape (on the H200, batch-1
# rows over hundreds of lengths spent their time in cudnn::EngineHeuristics, session 9): 0.25 s
# bounds the lengths to 40 per 10 s for ~0.125 s of padding per micro-batch row. Not yet
# measured on a GPU (benchmarks/gpu_run.sh sweeps it). CPU: no per-shape planning to save.
CPU_PAD_MULTIPLE_S = 0.0
GPU_PAD_MULTIPLE_S = 0.25


@dataclass
class _Work:
    """One batch's chunks and what is known about them while the stage processes it."""

    seg_ids: list[str]
    chunks: list[np.ndarray]  # every OK row's chunks, in row order
    owner: list[int]  # chunk j belongs to row owner[j]
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
class _Features:
    """Features of chunks ``js`` laid back to back in that order: per layer one host tensor
    [frames, hidden]; chunk ``js[p]`` is rows ``starts[p]:starts[p + 1]``."""

    js: list[int]
    starts: np.ndarray
    host: dict  # layer -> [N, H] CPU tensor
    finite: np.ndarray  # per chunk (position in js): every stored value finite in every layer
    groups: list[list[int]]  # the micro-batches that computed them (chunk indices)
    units: dict = field(default_factory=dict)  # layer with centroids -> [N] int32 CPU tensor

    @cached_property
    def pos(self) -> dict[int, int]:
        return {j: p for p, j in enumerate(self.js)}

    def span(self, js: list[int]) -> tuple[int, int]:
        """Row range of consecutive chunks ``js`` (e.g. all chunks of one segment)."""
        p = self.pos[js[0]]
        return int(self.starts[p]), int(self.starts[p + len(js)])

    def all_finite(self, js: list[int]) -> bool:
        return bool(all(self.finite[self.pos[j]] for j in js))


class HubertStage:
    """Ray Data UDF (constructed once per actor). ``__call__`` maps a decoded pyarrow batch to
    a feature batch with the same rows in the same order."""

    # Let the host run ahead of the device (see _forward); False waits after each micro-batch
    # (the benchmark's `_serial` rows time both).
    overlap = True

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
        pad_s = config.pad_multiple_seconds
        if pad_s is None:
            pad_s = GPU_PAD_MULTIPLE_S if use_cuda else CPU_PAD_MULTIPLE_S
        self.pad_multiple = max(1, int(round(pad_s * SAMPLE_RATE_HZ)))
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
        if config.compile != "none":
            self.net.compile_layers(config.compile)
            log.info("model forward compiled with torch.compile mode %s", config.compile)
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
        self._copied = [None, None]  # CUDA events: each input buffer's last copy to the device
        self.store = torch.float16 if config.storage_dtype == "float16" else torch.float32
        self.codebooks = self._load_codebooks(config)

    # -- units ----------------------------------------------------------------------------
    def _load_codebooks(self, config: ModelConfig) -> dict:
        """``{layer: (centroids, ||c||^2)}`` on the device, from ``config.units``."""
        from hubert_ray import units

        books = {}
        for uri in config.units:
            book = units.load(uri, config.storage_options)
            units.check_codebook(
                book.provenance,
                uri,
                model_revision=self.revision,
                hidden_size=self.hidden,
                layers=self.layers,
            )
            books[book.layer] = units.prepare(book.centroids, self.device)
        return books

    def units_of(self, feats: dict) -> dict:
        """Unit ids (int32 [frames] tensors on the device) of the device feature tensors
        ``feats[layer]`` [frames, hidden], for every layer with centroids."""
        from hubert_ray import units

        return {k: units.assign(feats[k], c, c_sq) for k, (c, c_sq) in self.codebooks.items()}

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
    # Inside a call the host does not wait for the device's results: micro-batch k+1 is padded
    # and queued while the device computes k (two pinned input buffers alternate; a buffer is
    # refilled once its copy to the device has finished, which keeps the host at most about two
    # micro-batches ahead), and every micro-batch writes its valid frames straight into
    # per-layer output tensors laid out in row order. One copy back per layer at the end of the
    # call, and those tensors become the Arrow feature columns without another copy (the
    # host's share of a call was the ceiling for a fast GPU: benchmarks/RESULTS.md).
    def _forward(self, net, w: _Work, js: list[int], store) -> _Features:
        """Features of chunks ``js`` (in this order) in the torch dtype ``store``, computed
        in packed micro-batches."""
        import torch

        frames = [num_frames(len(w.chunks[j])) for j in js]
        starts = np.zeros(len(js) + 1, dtype=np.int64)
        np.cumsum(frames, out=starts[1:])
        packed = pack_micro_batches(  # positions in js
            [len(w.chunks[j]) for j in js],
            self.config.max_batch_samples,
            self.batch_cost_samples,
            self.pad_multiple,
        )
        groups = [[js[p] for p in group] for group in packed]
        total = int(starts[-1])
        out = {
            k: torch.empty((total, self.hidden), dtype=store, device=self.device)
            for k in self.layers
        }
        peak = torch.empty(total, dtype=torch.float32, device=self.device)
        for n, (group, ps) in enumerate(zip(groups, packed, strict=True)):
            self._micro_batch(net, w, group, [int(starts[p]) for p in ps], out, peak, n % 2)
            if not self.overlap and self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()
        # A frame is finite once stored if no layer has NaN or a magnitude that overflows the
        # storage dtype (float16 rounds |x| >= 65520 to inf).
        ok = peak < 65520.0 if store == torch.float16 else torch.isfinite(peak)
        ids = self.units_of(out)  # from the features as stored (cast to ``store``)
        if self.device.type == "cuda":
            out, ok = self._to_host(out), self._to_host({0: ok})[0]
            ids = self._to_host(ids)
            torch.cuda.current_stream().synchronize()
        finite = np.ones(len(js), dtype=bool)  # per chunk: all its frames finite
        some = np.asarray(frames, dtype=np.int64) > 0  # (a chunk under 400 samples has none)
        if some.any():
            finite[some] = np.logical_and.reduceat(ok.numpy(), starts[:-1][some])
        return _Features(js, starts, out, finite, groups, ids)

    def _micro_batch(self, net, w: _Work, group: list[int], starts: list[int], out, peak, slot):
        """One padded forward of chunks ``group``; chunk ``group[i]``'s frames go to rows
        ``starts[i]:`` of ``out``'s tensors (cast on the way) and their largest magnitude over
        all layers (NaN if any is NaN) to ``peak``. ``slot``: the input buffer."""
        import torch

        chunks = [w.chunks[j] for j in group]
        width = padded_length(max(len(c) for c in chunks), self.pad_multiple)
        staging = self._staging(slot, len(chunks) * width)
        x, lengths = pad_batch(chunks, out=staging.numpy(), multiple=self.pad_multiple)
        self.stats["samples"] += sum(lengths)
        self.stats["padded_samples"] += x.size
        param = next(net.parameters())
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        xt = staging[: x.size].view(x.shape).to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self._copied[slot] = torch.cuda.Event()
            self._copied[slot].record()
        feats, frame_lengths = net(xt.to(dtype), lengths, self.layers)
        fl = frame_lengths.tolist()
        if fl != [num_frames(n) for n in lengths]:
            raise AssertionError(f"model frame counts {fl} != planned for {lengths} samples")
        top = None
        for k in self.layers:
            dest, src = out[k], feats[k]
            m = src.abs().amax(dim=-1)
            top = m if top is None else torch.maximum(top, m)  # NaN propagates
            for i, n in enumerate(fl):
                dest[starts[i] : starts[i] + n].copy_(src[i, :n])
        for i, n in enumerate(fl):
            peak[starts[i] : starts[i] + n].copy_(top[i, :n])

    @staticmethod
    def _to_host(tensors: dict) -> dict:
        """Start copying device tensors into pinned host memory (the caller synchronises)."""
        import torch

        host = {}
        for k, v in tensors.items():
            host[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            host[k].copy_(v, non_blocking=True)
        return host

    def _staging(self, slot: int, size: int):
        """Host input buffer ``slot`` (float32, pinned on CUDA) of at least ``size`` values,
        once its previous copy to the device has finished."""
        import torch

        if self._copied[slot] is not None:
            self._copied[slot].synchronize()
        buf = self._inputs[slot]
        if buf is None or buf.numel() < size:
            size = max(size, self.config.max_batch_samples)
            buf = torch.empty(size, dtype=torch.float32, pin_memory=self.device.type == "cuda")
            self._inputs[slot] = buf
        return buf

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
            row_dtype={i: self.dtype for i in ok_rows},
        )
        t0 = time.perf_counter()
        feats = self._forward(self.net, w, list(range(len(chunks))), self.store)
        w.groups = feats.groups
        bad = [j for j in range(len(chunks)) if not feats.finite[j]]
        bad_rows = {owner[j] for j in bad}
        if bad and self.dtype != "float32" and self.precision.on_precision_breach == "fail":
            j = bad[0]
            a, b = feats.span([j])
            layer = next(k for k, v in feats.host.items() if not bool(v[a:b].isfinite().all()))
            raise PrecisionBreach(
                f"precision breach: segment {w.seg_ids[owner[j]]!r} layer {layer}: non-finite "
                f"output in {self.dtype}; rerun with --dtype float32 or "
                "--on-precision-breach fallback"
            )
        if bad and self.dtype != "float32":
            # Non-finite in reduced precision: recompute the affected micro-batches' rows in FP32.
            rows = {owner[j] for g in w.groups if set(g) & set(bad) for j in g}
            bad_rows = (bad_rows - rows) | self._recompute_rows(w, feats, rows, "non_finite")

        precision = [None] * n
        if self.checking:
            bad_rows |= self._check_precision(w, feats, ok_rows, bad_rows, precision)
        self.stats["forward_s"] += time.perf_counter() - t0
        self.stats["batches"] += 1

        frames = [0] * n
        for i, js in w.chunks_of.items():
            a, b = feats.span(js)
            frames[i] = b - a
            if frames[i] != num_frames(len(audio[i])):
                raise AssertionError(
                    f"{w.seg_ids[i]}: {frames[i]} frames, expected {num_frames(len(audio[i]))}"
                )
        valid = [i in w.chunks_of and i not in bad_rows for i in range(n)]
        columns, unit_columns = {}, {}
        if self.config.store != "units":
            columns = {
                k: features_array(feats.host[k].numpy(), frames, valid, self.config.storage_dtype)
                for k in self.layers
            }
        if self.config.store != "features":
            form = self.config.units_form
            for k in sorted(feats.units):
                ids = feats.units[k].numpy()
                if form != "runs":
                    unit_columns[f"units_{k}"] = units_array(ids, frames, valid)
                if form != "frames":
                    dedup, durations = unit_run_arrays(ids, frames, valid)
                    unit_columns[f"units_{k}_dedup"] = dedup
                    unit_columns[f"units_{k}_durations"] = durations
        frames = [f if ok else 0 for f, ok in zip(frames, valid, strict=True)]
        out = self._assemble(
            batch, columns, frames, w.row_dtype, bad_rows, w.fallback, precision, unit_columns
        )
        if out.num_rows != n or out.column("segment_id") != batch.column("segment_id"):
            raise AssertionError("model stage must return one row per input row, in order")
        return out

    def _recompute_rows(self, w: _Work, feats: _Features, rows: set[int], why: str) -> set[int]:
        """Recompute every chunk of ``rows`` in FP32 into ``feats`` (storage dtype) and mark
        those rows as float32. Returns the rows still non-finite."""
        chunks_of = w.chunks_of
        js = sorted(j for i in rows for j in chunks_of[i])
        again = self._forward(self._reference(), w, js, self.store)
        for i in rows:
            a, b = feats.span(chunks_of[i])
            c, d = again.span(chunks_of[i])
            for k in self.layers:
                feats.host[k][a:b] = again.host[k][c:d]
            for k in feats.units:
                feats.units[k][a:b] = again.units[k][c:d]
            w.row_dtype[i] = "float32"
            w.fallback.setdefault(i, why)
        return {i for i in rows if not again.all_finite(chunks_of[i])}

    def _check_precision(
        self, w: _Work, feats: _Features, ok_rows, bad_rows, precision
    ) -> set[int]:
        """Recompute sampled rows in FP32; record metrics; warn / fall back / fail.
        Returns rows left non-finite by a fallback recompute (normally none)."""
        import torch

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
        ref = self._forward(
            self._reference(), w, [j for i in sampled for j in chunks_of[i]], torch.float32
        )
        group_of = {j: g for g, group in enumerate(w.groups) for j in group}
        breached: set[int] = set()
        for i in sampled:
            a, b = feats.span(chunks_of[i])
            c, d = ref.span(chunks_of[i])
            metrics = {
                k: {
                    **compare(feats.host[k][a:b].numpy(), ref.host[k][c:d].numpy()),
                    "unit_flip_rate": self._flip_rate(feats, ref, k, (a, b), (c, d)),
                }
                for k in self.layers
            }
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
            return self._recompute_rows(w, feats, rows, "precision")
        return set()

    @staticmethod
    def _flip_rate(feats: _Features, ref: _Features, k: int, span, ref_span) -> float | None:
        """Share of a segment's frames whose layer-``k`` unit differs from the FP32 one."""
        if k not in feats.units:
            return None
        a, b = span
        if b == a:
            return 0.0
        c, d = ref_span
        return float((feats.units[k][a:b] != ref.units[k][c:d]).sum()) / (b - a)

    def _assemble(
        self, batch, columns, frames, row_dtype, bad_rows, fallback, precision, unit_columns=None
    ):
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
            if k in columns:  # not with --store units
                cols[f"layer_{k}"] = columns[k]
        cols.update(unit_columns or {})  # units_<k>[_dedup, _durations], by column name
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

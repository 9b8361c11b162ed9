"""The model engine: waveforms in, features out. No Ray, no Arrow (torch inside).

One :class:`Engine` per model actor (one model per device). It owns everything between a batch
of decoded segments and their features:

- chunking of long segments and packing of chunks into padded micro-batches
  (:mod:`hubert_ray.core.chunking`), the exact padded forward (:mod:`hubert_ray.model.encoder`);
- the non-finite guard: a chunk whose output is NaN/inf (or overflows the storage dtype) is
  recomputed in FP32, else its segment fails with ``non_finite``;
- precision assurance against an FP32 reference of the same model on the same device:
  a **self-test** before the first batch (:mod:`hubert_ray.core.selftest`), **sampled rechecks** of
  segments chosen by a hash of their id, and **escalation** when sampled breaches stop being
  rare (:class:`Escalation`): the engine then computes in FP32 for the rest of its life.

The stage adapter (:mod:`hubert_ray.stages.extractor`) turns Arrow batches into :meth:`Engine.run`
calls and :class:`Result` back into Arrow.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from hubert_ray.core import selftest
from hubert_ray.core.chunking import (
    pack_micro_batches,
    pad_batch,
    padded_length,
    plan_chunks,
)
from hubert_ray.core.config import SAMPLE_RATE_HZ, ModelConfig, compute_dtype, parse_layers
from hubert_ray.core.precision import PrecisionBreach, is_sampled

log = logging.getLogger("hubert_ray")

# Default fixed cost of a forward micro-batch, in seconds of padded audio (ModelConfig.
# micro_batch_cost_seconds). CPU: the best of 0/1/4/16 s at 256 rows per call, tiny and base
# models (docs/performance.md). On a GPU (or a simulated one) it is measured (ForwardCost:
# kernel launches and the host's work per micro-batch weigh more against much faster
# arithmetic, by how much depends on the GPU, the model, the dtype and the host);
# GPU_BATCH_COST_S only where that measurement fails, and MAX_BATCH_COST_S bounds it.
CPU_BATCH_COST_S = 1.0
GPU_BATCH_COST_S = 16.0
MAX_BATCH_COST_S = 600.0
# Default padded-length multiple (ModelConfig.pad_multiple_seconds). GPU: every micro-batch of
# mixed lengths otherwise has a new shape, and cuDNN chooses plans per shape: 0.25 s bounds the
# lengths to 40 per 10 s for ~0.125 s of padding per row. CPU and the simulated device: no
# per-shape planning to save.
CPU_PAD_MULTIPLE_S = 0.0
GPU_PAD_MULTIPLE_S = 0.25
# CPU: most padded audio per micro-batch, so that a call has micro-batches for every one of the
# actor's threads (see Engine.streams); a GPU's bound is ModelConfig.max_batch_samples alone.
CPU_MAX_BATCH_S = 40.0

# Fallback reasons (the feature rows' ``fallback_reason``).
FALLBACK_NON_FINITE = "non_finite"  # this segment's output was non-finite in the reduced dtype
FALLBACK_PRECISION = "precision"  # a sampled check of its micro-batch breached the limit
FALLBACK_SELF_TEST = "self_test"  # the actor's self-test breached: the actor runs FP32
FALLBACK_ESCALATED = "escalated"  # sampled breaches were systematic: the actor runs FP32


@dataclass
class ForwardCost:
    """What one forward micro-batch costs apart from its samples, in seconds of padded audio:
    what the packing (:func:`hubert_ray.core.chunking.pack_micro_batches`) weighs against padding,
    on a device whose work is queued (a GPU, the simulated one).

    ``device_fixed_s`` and ``per_audio_s`` (device seconds per second of padded audio) are
    measured when the engine starts (:meth:`Engine.measure_forward`); ``host_s`` follows the
    host's own time per micro-batch (padding, staging, launching; not its waits for the
    device) as calls run. The host prepares micro-batch k+1 while the device computes k, so a
    forward's fixed cost is the larger of the two."""

    device_fixed_s: float
    per_audio_s: float
    host_s: float = 0.0

    def observe(self, host_s: float, weight: float = 0.2) -> None:
        """A call's host seconds per micro-batch (moving average)."""
        self.host_s = host_s if not self.host_s else (1 - weight) * self.host_s + weight * host_s

    @property
    def seconds(self) -> float:
        return min(MAX_BATCH_COST_S, max(self.device_fixed_s, self.host_s) / self.per_audio_s)


@dataclass
class Escalation:
    """When sampled breaches stop being rare, the actor stops trusting its reduced dtype.

    Rule: at least ``min_breaches`` breaching segments, and at least ``min_share`` of this
    actor's checked segments. Why: on sound hardware FP16 is ~0.2 % and BF16 ~1.5 % from FP32
    (docs/precision.md), so a breach of the 2 % limit is an outlier input and rare; a broken
    kernel or an underflowing model breaches on (nearly) every check. Two breaches at >= 5 % of
    the checks separates the two: two isolated outliers among the first 40 checks would need an
    outlier rate of several percent, far above what was measured, while a systematic fault is
    caught at its second check."""

    min_breaches: int = 2
    min_share: float = 0.05
    checks: int = 0
    breaches: int = 0

    def record(self, checks: int, breaches: int) -> bool:
        """Count a call's checks; True when the rule is met."""
        self.checks += checks
        self.breaches += breaches
        return self.breaches >= self.min_breaches and self.breaches >= self.min_share * self.checks


@dataclass
class Result:
    """What :meth:`Engine.run` returns, one entry per input row (in order).

    ``features[layer]`` holds every valid row's frames back to back ([sum of frames, hidden],
    host memory, the storage dtype): row i owns the next ``frames[i]`` of them when
    ``valid[i]``."""

    features: dict  # layer -> host torch tensor [N, H]
    frames: list[int]
    valid: list[bool]
    compute_dtype: list[str | None]
    fallback: list[str | None]
    precision: list[list[dict] | None]
    errors: dict[int, tuple[str, str]]  # row -> (reason, message) for rows the model failed
    units: dict = field(default_factory=dict)  # layer with centroids -> [N] int32 host tensor


@dataclass
class _Work:
    """One call's chunks and what is known about them while the engine processes it."""

    ids: list[str]
    chunks: list[np.ndarray]  # every row's chunks, in row order
    owner: list[int]  # chunk j belongs to row owner[j]
    row_dtype: dict[int, str]  # dtype each row's features were computed in
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
    units: dict = field(default_factory=dict)  # layer with centroids -> [N] int32 host tensor

    @cached_property
    def pos(self) -> dict[int, int]:
        return {j: p for p, j in enumerate(self.js)}

    def span(self, js: list[int]) -> tuple[int, int]:
        """Row range of consecutive chunks ``js`` (e.g. all chunks of one segment)."""
        p = self.pos[js[0]]
        return int(self.starts[p]), int(self.starts[p + len(js)])

    def all_finite(self, js: list[int]) -> bool:
        return bool(all(self.finite[self.pos[j]] for j in js))


@dataclass
class _Launched:
    """A forward queued on the device (:meth:`Engine._launch`), its results not yet read."""

    js: list[int]
    starts: np.ndarray
    frames: list[int]
    out: dict  # layer -> [N, H] tensor (host memory once ``done``)
    ok: object  # per frame: finite once stored (bool tensor)
    groups: list[list[int]]
    done: object  # the clock's event: results on the host
    units: dict  # layer with centroids -> [N] int32 tensor (host memory once ``done``)


@dataclass
class _Audit:
    """Sampled rows' FP32 recheck, queued right behind their call's forward
    (:meth:`Engine._launch_audit`): ``metrics`` [rows, layers, 6] (host memory once the call
    is done) holds per row and layer ``cos_mean, cos_min, rel_l2, max_abs, unit_flips,
    frames``, computed on the device."""

    rows: list[int]
    metrics: object


@dataclass
class Pending:
    """One call between :meth:`Engine.launch` and :meth:`Engine.finish`."""

    work: _Work
    audio: list
    launched: _Launched
    dtype: str  # the dtype it was launched in
    t0: float
    audit: _Audit | None = None
    stamps: tuple = ()  # the clock's stamps before the forward, after it, after the audit


def _input_dtype(net):
    """The dtype a model's input is cast to: its parameters' (float32 for an int8 model)."""
    import torch

    param = next(net.parameters())
    return param.dtype if param.dtype.is_floating_point else torch.float32


def resolve_device(config: ModelConfig):
    import torch

    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def resolve_dtype(config: ModelConfig, device) -> str:
    dtype = compute_dtype(config.dtype, device.type == "cuda")
    if dtype == "int8" and device.type == "cuda":
        raise ValueError("dtype=int8 (dynamic quantisation) runs on CPU only; use float16 on GPU")
    return dtype


class Engine:
    """Features for batches of waveforms on one device (see the module docstring)."""

    # Let the host run ahead of the device (see _forward); False waits after each micro-batch.
    overlap = True

    def __init__(self, config: ModelConfig, model_dir: str, self_test: bool = True, simulated=None):
        """``self_test=False`` skips the self-test (tests of the per-batch guards only);
        ``simulated``: a :class:`hubert_ray.model.device.SimulatedDevice` instead of the model
        (benchmarks and tests of the engine's overlap; no checks, zeros out)."""
        import torch

        from hubert_ray.model import device as dev
        from hubert_ray.model import encoder as hm

        self.config = config
        self.device = torch.device("cpu") if simulated else resolve_device(config)
        cost_s = config.micro_batch_cost_seconds
        # None: measured below, once the model is loaded and self-tested
        self.batch_cost_s = CPU_BATCH_COST_S if cost_s is None else cost_s
        self.forward_cost: ForwardCost | None = None
        pad_s = config.pad_multiple_seconds
        if pad_s is None:
            pad_s = GPU_PAD_MULTIPLE_S if self.device.type == "cuda" else CPU_PAD_MULTIPLE_S
        self.pad_multiple = max(1, int(round(pad_s * SAMPLE_RATE_HZ)))
        # On CPU, micro-batches run on this many threads at once, each forward on one core.
        # torch's intra-op threads meet at every operator: when the OS gives one of their cores
        # to a decode task the others wait at the next one, and the forward slows down several
        # times; independent forwards only slow down by the share of time they lose.
        self.streams = 1
        self.max_batch_samples = config.max_batch_samples
        self._pool = None
        if self.device.type == "cpu" and not simulated:
            self.streams = config.num_threads or len(os.sched_getaffinity(0))
            torch.set_num_threads(1)
            if self.streams > 1:
                from concurrent.futures import ThreadPoolExecutor

                cap = max(config.chunk_samples, int(CPU_MAX_BATCH_S * SAMPLE_RATE_HZ))
                self.max_batch_samples = min(self.max_batch_samples, cap)
                self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="forward")
            log.info("model actor on CPU: %d forwards at once, one thread each", self.streams)
        self.model_dir = model_dir
        self.simulated = simulated is not None
        self.calls_log: list | None = [] if self.simulated else None
        if simulated is not None:
            self.clock = simulated
            self.dtype = self.requested_dtype = "float32"
            self.net = simulated.model(hm.num_hidden_layers(model_dir))
            self.hidden = simulated.hidden
            self_test = False
        else:
            self.clock = dev.CudaClock() if self.device.type == "cuda" else dev.HostClock()
            self.dtype = self.requested_dtype = resolve_dtype(config, self.device)
            self.net = hm.load_model(
                model_dir, self.device, self.dtype, allow_pickle=config.allow_pickle_weights
            )
            self.hidden = self.net.config.hidden_size
        # Frame grid of the model's conv frontend (receptive field, hop): chunking and frame
        # counts follow it.
        self.geometry = self.net.geometry
        if config.compile != "none":
            self.net.compile_layers(config.compile)
            log.info("model forward compiled with torch.compile mode %s", config.compile)
        self.layers = parse_layers(config.layers, self.net.num_hidden_layers)
        self.codebooks = self._load_codebooks(config) if config.units and not simulated else {}
        self.precision = config.precision
        self.store = torch.float16 if config.storage_dtype == "float16" else torch.float32
        self.stats = {
            "batches": 0,
            "forward_s": 0.0,
            "samples": 0,
            "padded_samples": 0,
            "forward_device_s": 0.0,  # device time of the calls' forwards
            "audit_device_s": 0.0,  # device time of their sampled FP32 rechecks
        }
        self._local = threading.local()  # per-thread input buffers (see _staging)
        self._fp32 = self.net if self.dtype == "float32" else None
        # Why this engine computes in FP32 although a reduced dtype was asked for (None: it
        # does not): FALLBACK_SELF_TEST or FALLBACK_ESCALATED.
        self.demoted: str | None = None
        self.escalation = Escalation()
        self.audit = True
        self._lock = threading.Lock()
        # Segments this engine wrote in the reduced dtype (for the escalation report).
        self.reduced_rows = 0
        self.self_test_report: dict | None = None
        if self_test and self.dtype != "float32":
            self.self_test_report = self.self_test()
        # The packing's fixed cost per forward: given, the CPU default, or measured (GPU).
        if cost_s is None and (self.device.type == "cuda" or self.simulated):
            self.forward_cost = self.measure_forward()
            if self.simulated:
                self.clock.reset()  # its report: the device time of the work
            if self.forward_cost is None:
                self.batch_cost_s = GPU_BATCH_COST_S
        # The FP32 reference stays loaded only while sampled checks are on (it is reloaded on
        # the first non-finite fallback otherwise).
        if not self.checking and self._fp32 is not self.net:
            self._fp32 = None

    @cached_property
    def revision(self) -> str:
        """The model's content hash (weights and configs; read once per engine)."""
        from hubert_ray.model import encoder as hm

        return hm.model_revision(self.model_dir)

    # -- units -----------------------------------------------------------------------------
    def _load_codebooks(self, config: ModelConfig) -> dict:
        """``{layer: (centroids, ||c||^2)}`` on the device, from ``config.units``."""
        from hubert_ray.units import centroids as units

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
        """Unit ids (int32 [frames] tensors on the device) of the feature tensors
        ``feats[layer]`` [frames, hidden], for every layer with centroids."""
        from hubert_ray.units import centroids as units

        return {k: units.assign(feats[k], c, c_sq) for k, (c, c_sq) in self.codebooks.items()}

    @property
    def checking(self) -> bool:
        """Whether sampled FP32 rechecks run (``audit = False`` turns them off: benchmarks)."""
        return self.audit and self.dtype != "float32" and self.precision.precision_sample_rate > 0

    def _reference(self):
        if self._fp32 is None:
            from hubert_ray.model import encoder as hm

            self._fp32 = hm.load_model(
                self.model_dir,
                self.device,
                "float32",
                allow_pickle=self.config.allow_pickle_weights,
            )
        return self._fp32

    def _demote(self, why: str) -> None:
        """Compute in FP32 from now on (the reduced-precision model is released)."""
        self.net = self._reference()
        self.dtype = "float32"
        self.demoted = why

    # -- self-test ----------------------------------------------------------------------------
    def self_test(self) -> dict:
        """Run the calibration input through the compute dtype and FP32 (the same packing,
        padding and chunking as real work); apply the breach policy to the whole engine."""
        import torch

        t0 = time.perf_counter()
        signals = selftest.calibration_signals(self.config.chunk_seconds)
        w = self._work([f"self-test-{i}" for i in range(len(signals))], signals)
        js = list(range(len(w.chunks)))
        got = self._forward(self.net, w, js, self.store)  # what would be stored
        ref = self._forward(self._reference(), w, js, torch.float32)
        report = selftest.evaluate(
            {k: got.host[k].numpy() for k in self.layers},
            {k: ref.host[k].numpy() for k in self.layers},
            self.precision.precision_limit,
        )
        report.update(
            {
                "device": selftest.device_name(self.device),
                "dtype": self.dtype,
                "audio_seconds": round(sum(len(s) for s in signals) / SAMPLE_RATE_HZ, 3),
                "seconds": None,
                "action": "none",
            }
        )
        if report["breach"]:
            policy = self.precision.on_precision_breach
            msg = (
                f"precision breach: self-test on {report['device']} layer {report['worst_layer']}:"
                f" relative L2 error {float(report['worst_rel_l2']):.4g} > precision_limit "
                f"{self.precision.precision_limit:g} in {self.dtype}"
            )
            if policy == "fail":
                raise PrecisionBreach(
                    f"{msg}; rerun with --dtype float32 or --on-precision-breach fallback"
                )
            if policy == "fallback":
                log.warning("%s: this model actor computes in float32 for the whole run", msg)
                self._demote(FALLBACK_SELF_TEST)
                report["action"] = "fallback"
            else:
                log.warning("%s: kept (--on-precision-breach warn)", msg)
                report["action"] = "breach_ignored"
        report["seconds"] = round(time.perf_counter() - t0, 3)
        log.info(
            "precision self-test (%s on %s): worst layer %s relative error %.3g in %.2f s",
            report["dtype"],
            report["device"],
            report["worst_layer"],
            float(report["worst_rel_l2"]),
            report["seconds"],
        )
        return report

    def measure_forward(
        self, seconds: float = 4.0, items: int = 8, repeats: int = 3
    ) -> ForwardCost | None:
        """The device's fixed time per forward and its time per second of padded audio
        (:class:`ForwardCost`). Times forwards of 1 and ``items`` rows of ``seconds`` (the
        requested layers, the compute dtype) with the device's clock, best of ``repeats``
        after a warm-up, and fits ``time = fixed + padded seconds x per-second``. ``None`` if
        the fit is unusable (the larger batch was not slower)."""
        import torch

        n = int(seconds * SAMPLE_RATE_HZ)
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((items, n), np.float32))
        x = (0.1 * x).to(self.device, _input_dtype(self.net))

        def timed(b: int) -> float:
            with torch.inference_mode():
                start = self.clock.stamp()
                self.net(x[:b], [n] * b, self.layers)
                end = self.clock.stamp()
            self.clock.wait(self.clock.record())
            return self.clock.elapsed(start, end)

        timed(1), timed(items)  # warm-up: kernel selection, allocator, caches
        one = min(timed(1) for _ in range(repeats))
        many = min(timed(items) for _ in range(repeats))
        per_second = (many - one) / ((items - 1) * seconds)
        if not per_second > 0:
            log.warning("micro-batch cost not measurable (%.4g s, %.4g s)", one, many)
            return None
        cost = ForwardCost(max(0.0, one - seconds * per_second), per_second)
        log.info(
            "forward measured: %.3g ms fixed, %.0fx realtime (%.3g s of padded audio)",
            cost.device_fixed_s * 1e3,
            1 / per_second,
            cost.seconds,
        )
        return cost

    @property
    def batch_cost_samples(self) -> float:
        """The packing's fixed cost of a forward, in padded samples."""
        cost_s = self.forward_cost.seconds if self.forward_cost else self.batch_cost_s
        return cost_s * SAMPLE_RATE_HZ

    # -- forward --------------------------------------------------------------------------------
    # Inside a call the host does not wait for the device's results: micro-batch k+1 is padded
    # and queued while the device computes k (two pinned input buffers alternate; a buffer is
    # refilled once its copy to the device has finished), and every micro-batch writes its
    # valid frames straight into per-layer output tensors laid out in row order. One copy back
    # per layer at the end.
    def _forward(self, net, w: _Work, js: list[int], store) -> _Features:
        """Features of chunks ``js`` (in this order) in the torch dtype ``store``, computed
        in packed micro-batches (waits for the device)."""
        return self._collect(self._launch(net, w, js, store))

    def _launch(self, net, w: _Work, js: list[int], store, host: bool = True) -> _Launched:
        """Queue the forward of chunks ``js`` and (``host``) the copy of its results to the
        host (:meth:`_host`); returns without waiting for the device (:meth:`_collect`
        waits)."""
        import torch

        frames = [self.geometry.num_frames(len(w.chunks[j])) for j in js]
        starts = np.zeros(len(js) + 1, dtype=np.int64)
        np.cumsum(frames, out=starts[1:])
        lengths = [len(w.chunks[j]) for j in js]
        packed = pack_micro_batches(  # positions in js
            lengths, self.max_batch_samples, self.batch_cost_samples, self.pad_multiple
        )
        groups = [[js[p] for p in group] for group in packed]
        self.stats["samples"] += sum(lengths)
        self.stats["padded_samples"] += sum(
            len(ps) * padded_length(max(lengths[p] for p in ps), self.pad_multiple) for ps in packed
        )
        total = int(starts[-1])
        device = self.device
        # (zeros on a simulated device, which writes nothing into them)
        alloc = torch.zeros if self.simulated else torch.empty
        out = {k: alloc((total, self.hidden), dtype=store, device=device) for k in self.layers}
        peak = alloc(total, dtype=torch.float32, device=device)
        t0, self._local.waited = time.perf_counter(), 0.0
        batches = [
            (net, w, group, [int(starts[p]) for p in ps], out, peak, n % 2)
            for n, (group, ps) in enumerate(zip(groups, packed, strict=True))
        ]
        if self._pool is None:
            for args in batches:
                self._micro_batch(*args)
                if not self.overlap:
                    self.clock.wait(self.clock.record())
        else:  # CPU: micro-batches at once, each writing its own rows of ``out``
            futures = [self._pool.submit(self._micro_batch, *args) for args in batches]
            wait_all(futures)
            for f in futures:
                f.result()  # (raises a failed one's exception)
        if self.forward_cost is not None and groups:
            host_s = time.perf_counter() - t0 - self._local.waited
            self.forward_cost.observe(host_s / len(groups))
        # A frame is finite once stored if no layer has NaN or a magnitude that overflows the
        # storage dtype (float16 rounds |x| >= 65520 to inf).
        ok = peak < 65520.0 if store == torch.float16 else torch.isfinite(peak)
        units = self.units_of(out)  # from the features as stored (cast to ``store``)
        launched = _Launched(js, starts, frames, out, ok, groups, None, units)
        return self._host(launched) if host else launched

    def _host(self, launched: _Launched) -> _Launched:
        """Queue the copy of a launched forward's results to pinned host memory."""
        if self.device.type == "cuda":
            launched.out = self._to_host(launched.out)
            launched.ok = self._to_host({0: launched.ok})[0]
            launched.units = self._to_host(launched.units)
        launched.done = self.clock.record()
        return launched

    def _launch_audit(self, w: _Work, launched: _Launched, rows: list[int]) -> _Audit:
        """Queue the FP32 forward of ``rows`` and the comparison of its features with those
        of ``launched`` (still on the device, as stored) on the device: per row and layer the
        metrics of :func:`hubert_ray.core.precision.compare` and the frames whose unit differs.
        Nothing waits for the device; only the [rows, layers, 6] result is copied back."""
        import torch

        from hubert_ray.model.encoder import to_device

        chunks_of = w.chunks_of
        js = [j for i in rows for j in chunks_of[i]]
        ref = self._launch(self._reference(), w, js, torch.float32, host=False)
        # ref holds the rows' frames back to back; in ``launched`` (every chunk, in order)
        # row i's frames are starts[first chunk] : starts[last chunk + 1]
        starts = launched.starts
        spans = [(starts[chunks_of[i][0]], starts[chunks_of[i][-1] + 1]) for i in rows]
        counts = np.array([b - a for a, b in spans], dtype=np.int64)
        mine = np.concatenate([np.arange(a, b) for a, b in spans])
        mine = to_device(torch.from_numpy(mine), self.device)
        seg = to_device(torch.from_numpy(np.repeat(np.arange(len(rows)), counts)), self.device)
        frames = to_device(torch.from_numpy(counts.astype(np.float64)), self.device)
        zeros = torch.zeros(len(rows), dtype=torch.float64, device=self.device)

        def per_row(values, how="sum"):  # per-frame values -> per-row (float64)
            values = values.double()
            if how == "sum":
                return zeros.index_add(0, seg, values)
            start = zeros + (1.0 if how == "amin" else 0.0)
            return start.scatter_reduce(0, seg, values, how)

        per_layer = []
        for k in self.layers:
            a = launched.out[k].index_select(0, mine).float()
            b = ref.out[k]
            aa, bb, ab = (a * a).sum(-1), (b * b).sum(-1), (a * b).sum(-1)
            d = a - b
            denom = aa * bb
            cos = torch.where(denom > 0, ab / denom.clamp(min=1e-30).sqrt(), 1.0)
            err, norm = per_row((d * d).sum(-1)).sqrt(), per_row(bb).sqrt()
            rel = torch.where(norm > 0, err / norm.clamp(min=1e-300), err * torch.inf)
            rel = torch.nan_to_num(rel, nan=0.0)  # 0 / 0: both all zero
            flips = zeros
            if k in launched.units:
                flips = per_row(launched.units[k].index_select(0, mine) != ref.units[k])
            cos_mean = torch.where(frames > 0, per_row(cos) / frames.clamp(min=1), 1.0)
            metrics = [cos_mean, per_row(cos, "amin"), rel, per_row(d.abs().amax(-1), "amax")]
            per_layer.append(torch.stack([*metrics, flips, frames], dim=-1))
        return _Audit(rows, torch.stack(per_layer, dim=1))

    def _collect(self, launched: _Launched) -> _Features:
        """Wait for a launched forward's results on the host."""
        self.clock.wait(launched.done)
        frames, starts = launched.frames, launched.starts
        finite = np.ones(len(launched.js), dtype=bool)  # per chunk: all its frames finite
        some = np.asarray(frames, dtype=np.int64) > 0  # (a chunk under 400 samples has none)
        if some.any():
            finite[some] = np.logical_and.reduceat(launched.ok.numpy(), starts[:-1][some])
        return _Features(launched.js, starts, launched.out, finite, launched.groups, launched.units)

    def _micro_batch(self, net, w: _Work, group: list[int], starts: list[int], out, peak, slot):
        """One padded forward of chunks ``group``; chunk ``group[i]``'s frames go to rows
        ``starts[i]:`` of ``out``'s tensors (cast on the way) and their largest magnitude over
        all layers (NaN if any is NaN) to ``peak``. ``slot``: the input buffer."""
        import torch

        from hubert_ray.model.encoder import to_device

        chunks = [w.chunks[j] for j in group]
        width = padded_length(max(len(c) for c in chunks), self.pad_multiple)
        staging = self._staging(slot, len(chunks) * width)
        x, lengths = pad_batch(chunks, out=staging.numpy(), multiple=self.pad_multiple)
        dtype = _input_dtype(net)
        xt = staging[: x.size].view(x.shape).to(self.device, non_blocking=True)
        self._local.copied[slot] = self.clock.record()
        feats, frame_lengths = net(xt.to(dtype), lengths, self.layers)
        fl = frame_lengths.tolist()
        if fl != [self.geometry.num_frames(n) for n in lengths]:
            raise AssertionError(f"model frame counts {fl} != planned for {lengths} samples")
        if feats is None:  # a simulated device: nothing to copy out
            return
        # One gather per layer: the valid frames of every item (row-major in the padded batch)
        # to their rows of the call's output (index lists built on the host, no device sync).
        width = feats[self.layers[0]].shape[1]
        src_idx = np.concatenate([i * width + np.arange(n) for i, n in enumerate(fl)])
        dst_idx = np.concatenate([s + np.arange(n) for s, n in zip(starts, fl, strict=True)])
        src_idx = to_device(torch.from_numpy(src_idx), self.device)
        dst_idx = to_device(torch.from_numpy(dst_idx), self.device)
        top = None
        for k in self.layers:
            src = feats[k].reshape(-1, feats[k].shape[-1])
            m = src.abs().amax(dim=-1)
            top = m if top is None else torch.maximum(top, m)  # NaN propagates
            out[k].index_copy_(0, dst_idx, src.index_select(0, src_idx).to(out[k].dtype))
        peak.index_copy_(0, dst_idx, top.index_select(0, src_idx).float())

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
        """Host input buffer ``slot`` of this thread (float32, pinned on CUDA) of at least
        ``size`` values, once its previous copy to the device has finished."""
        import torch

        local = self._local
        if not hasattr(local, "inputs"):
            local.inputs, local.copied = [None, None], [None, None]
        if local.copied[slot] is not None:
            t0 = time.perf_counter()
            self.clock.wait(local.copied[slot])
            local.waited += time.perf_counter() - t0  # (reset by each _launch)
        buf = local.inputs[slot]
        if buf is None or buf.numel() < size:
            size = max(size, self.max_batch_samples)
            buf = torch.empty(size, dtype=torch.float32, pin_memory=self.device.type == "cuda")
            local.inputs[slot] = buf
        return buf

    # -- a call ---------------------------------------------------------------------------------
    def _work(self, ids: list[str], audio: list[np.ndarray | None]) -> _Work:
        """Chunk every row that has audio; remember which chunks belong to which row."""
        chunks, owner = [], []
        for i, x in enumerate(audio):
            if x is None:
                continue
            for s, e in plan_chunks(len(x), self.config.chunk_samples, self.geometry):
                chunks.append(x[s:e])
                owner.append(i)
        rows = {i for i, x in enumerate(audio) if x is not None}
        return _Work(ids=list(ids), chunks=chunks, owner=owner, row_dtype=dict.fromkeys(rows))

    def run(self, ids: list[str], audio: list[np.ndarray | None]) -> Result:
        """Features of each row's 16 kHz waveform (``None``: a row that failed upstream; it
        stays without features and without an error of its own)."""
        return self.finish(self.launch(ids, audio))

    def launch(self, ids: list[str], audio: list[np.ndarray | None]) -> Pending:
        """Chunk, pack and queue a call's forward on the device, then the FP32 recheck of its
        sampled rows; returns at once on CUDA (the host prepares the next call while the device
        computes this one). One thread launches, in call order; :meth:`finish` may run on
        another."""
        w = self._work(ids, audio)
        dtype = self.dtype
        for i in w.row_dtype:
            w.row_dtype[i] = dtype
            if self.demoted:
                w.fallback[i] = self.demoted
        t0 = time.perf_counter()
        clock = self.clock
        s0 = clock.stamp()
        launched = self._launch(self.net, w, list(range(len(w.chunks))), self.store, host=False)
        s1 = clock.stamp()
        audit = None
        if self.checking:
            rate = self.precision.precision_sample_rate
            sampled = [i for i in w.chunks_of if is_sampled(w.ids[i], rate)]
            if sampled:
                audit = self._launch_audit(w, launched, sampled)
        stamps = (s0, s1, clock.stamp())
        launched = self._host(launched)
        if audit is not None and self.device.type == "cuda":
            audit.metrics = self._to_host({0: audit.metrics})[0]
            launched.done = clock.record()
        return Pending(w, audio, launched, dtype, t0, audit, stamps)

    def finish(self, pending: Pending) -> Result:
        """Wait for a launched call's features; guard, check and fall back as needed."""
        w, audio = pending.work, pending.audio
        n = len(w.ids)
        feats = self._collect(pending.launched)
        w.groups = feats.groups
        with self._lock:  # the checks below may switch the engine to FP32
            bad_rows = self._guard(w, feats, pending.dtype)
            precision: list[list[dict] | None] = [None] * n
            if pending.audit is not None and pending.dtype == self.dtype:
                bad_rows |= self._check_precision(w, feats, bad_rows, precision, pending.audit)
            self._account(pending)
            if self.demoted and pending.dtype != "float32":
                # launched before this engine switched to FP32: recompute what is left
                reduced = {i for i, d in w.row_dtype.items() if d == pending.dtype}
                bad_rows |= self._recompute_rows(w, feats, reduced, self.demoted)
            self.stats["forward_s"] += time.perf_counter() - pending.t0
            self.stats["batches"] += 1
            if self.calls_log is not None:  # simulated device: when each call finished
                samples = sum(len(c) for c in w.chunks)
                self.calls_log.append((round(time.monotonic(), 4), samples))
            self.reduced_rows += sum(1 for d in w.row_dtype.values() if d not in (None, "float32"))

        frames = [0] * n
        for i, js in w.chunks_of.items():
            a, b = feats.span(js)
            frames[i] = b - a
            expected = self.geometry.num_frames(len(audio[i]))
            if frames[i] != expected:
                raise AssertionError(f"{w.ids[i]}: {frames[i]} frames, expected {expected}")
        valid = [i in w.chunks_of and i not in bad_rows for i in range(n)]
        errors = {
            i: (
                "non_finite",
                f"non-finite model output for {w.ids[i]} even in float32"
                f" (stored as {self.config.storage_dtype})",
            )
            for i in bad_rows
        }
        return Result(
            features=feats.host,
            frames=frames,
            valid=valid,
            compute_dtype=[w.row_dtype.get(i) if valid[i] else None for i in range(n)],
            fallback=[w.fallback.get(i) for i in range(n)],
            precision=precision,
            errors=errors,
            units=feats.units,
        )

    def _guard(self, w: _Work, feats: _Features, dtype: str) -> set[int]:
        """The non-finite guard: rows with NaN/inf (or storage overflow) are recomputed in FP32
        (all rows of their micro-batches); returns the rows non-finite even then."""
        bad = [j for j in range(len(w.chunks)) if not feats.finite[j]]
        bad_rows = {w.owner[j] for j in bad}
        if not bad or dtype == "float32":
            return bad_rows
        if self.precision.on_precision_breach == "fail":
            j = bad[0]
            a, b = feats.span([j])
            layer = next(k for k, v in feats.host.items() if not bool(v[a:b].isfinite().all()))
            raise PrecisionBreach(
                f"precision breach: segment {w.ids[w.owner[j]]!r} layer {layer}: non-finite "
                f"output in {dtype}; rerun with --dtype float32 or "
                "--on-precision-breach fallback"
            )
        rows = {w.owner[j] for g in w.groups if set(g) & set(bad) for j in g}
        return (bad_rows - rows) | self._recompute_rows(w, feats, rows, FALLBACK_NON_FINITE)

    def _recompute_rows(self, w: _Work, feats: _Features, rows: set[int], why: str) -> set[int]:
        """Recompute every chunk of ``rows`` in FP32 into ``feats`` (storage dtype) and mark
        those rows as float32. Returns the rows still non-finite."""
        chunks_of = w.chunks_of
        rows = {i for i in rows if i in chunks_of}
        js = sorted(j for i in rows for j in chunks_of[i])
        if not js:
            return set()
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

    def _account(self, pending: Pending) -> None:
        """Add a finished call's device time (forward, audit) to the stats."""
        s0, s1, s2 = pending.stamps
        self.stats["forward_device_s"] += self.clock.elapsed(s0, s1)
        self.stats["audit_device_s"] += self.clock.elapsed(s1, s2)

    def _check_precision(
        self, w: _Work, feats: _Features, bad_rows, precision, audit: _Audit
    ) -> set[int]:
        """Read the sampled rows' FP32 recheck (:meth:`_launch_audit`); record metrics; warn /
        fall back / fail; escalate when breaches are systematic. Returns rows left non-finite
        by a recompute."""
        cfg = self.precision
        values = audit.metrics.numpy()
        sampled = [
            (p, i)
            for p, i in enumerate(audit.rows)
            if i not in bad_rows and w.row_dtype[i] == self.dtype
        ]
        if not sampled:
            return set()
        chunks_of = w.chunks_of
        group_of = {j: g for g, group in enumerate(w.groups) for j in group}
        breached: set[int] = set()
        for p, i in sampled:
            metrics = {}
            for q, k in enumerate(self.layers):
                cos_mean, cos_min, rel_l2, max_abs, flips, frames = values[p, q].tolist()
                metrics[k] = {
                    "cos_mean": cos_mean,
                    "cos_min": cos_min,
                    "rel_l2": rel_l2,
                    "max_abs": max_abs,
                    "unit_flip_rate": (
                        (flips / frames if frames else 0.0) if k in self.codebooks else None
                    ),
                }
            worst_layer = max(metrics, key=lambda k: metrics[k]["rel_l2"])
            worst = metrics[worst_layer]["rel_l2"]
            action = "none"
            if worst > cfg.precision_warn:
                action = "warn"
                log.warning(
                    "precision: %s layer %d relative error %.4g > warn %.4g (%s)",
                    w.ids[i],
                    worst_layer,
                    worst,
                    cfg.precision_warn,
                    self.dtype,
                )
            if worst > cfg.precision_limit:
                if cfg.on_precision_breach == "fail":
                    raise PrecisionBreach(
                        f"precision breach: segment {w.ids[i]!r} layer {worst_layer}: "
                        f"relative L2 error {worst:.4g} > precision_limit "
                        f"{cfg.precision_limit:g} in {self.dtype}; rerun with --dtype float32 "
                        "or --on-precision-breach fallback"
                    )
                action = "fallback" if cfg.on_precision_breach == "fallback" else "breach_ignored"
                breached.add(i)
            precision[i] = [
                {"layer": k, "checked_dtype": self.dtype, **m, "action": action}
                for k, m in metrics.items()
            ]
        if cfg.on_precision_breach != "fallback":
            return set()
        if self.escalation.record(len(sampled), len(breached)):
            log.warning(
                "precision: %d of %d checked segments breached the limit in %s: this model "
                "actor computes in float32 for the rest of the run (%d segments were written "
                "in %s before; see the summary's precision.escalations)",
                self.escalation.breaches,
                self.escalation.checks,
                self.dtype,
                self.reduced_rows,
                self.dtype,
            )
            reduced = {i for i, d in w.row_dtype.items() if d == self.dtype}
            self._demote(FALLBACK_ESCALATED)
            for i in breached:  # their reason stays "precision"
                w.fallback[i] = FALLBACK_PRECISION
            return self._recompute_rows(w, feats, reduced, FALLBACK_ESCALATED)
        if breached:
            # The affected micro-batches are recomputed and written in FP32 (all their rows).
            hit = {group_of[j] for i in breached for j in chunks_of[i]}
            rows = {w.owner[j] for g in hit for j in w.groups[g]}
            return self._recompute_rows(w, feats, rows, FALLBACK_PRECISION)
        return set()

    def report(self) -> dict:
        """This engine's precision record (the stage adapter writes it for the summary); on a
        simulated device, also its device time."""
        extra = {}
        if self.calls_log is not None:
            extra["simulated"] = self.clock.report() | {"calls": list(self.calls_log)}
        forward, audit = self.stats["forward_device_s"], self.stats["audit_device_s"]
        return extra | {
            # device time of the forwards and of the sampled FP32 rechecks (their share: the
            # audit's cost)
            "device_s": {"forward": round(forward, 3), "audit": round(audit, 3)},
            "device": selftest.device_name(self.device),
            # the packing's fixed cost per forward (seconds of padded audio) and, on a GPU,
            # what it was derived from (ForwardCost)
            "micro_batch_cost_seconds": round(self.batch_cost_samples / SAMPLE_RATE_HZ, 3),
            "forwards_at_once": self.streams,  # CPU: micro-batches run at once, 1 thread each
            "forward_cost": dataclasses.asdict(self.forward_cost) if self.forward_cost else None,
            "requested_dtype": self.requested_dtype,
            "compute_dtype": self.dtype,
            "demoted": self.demoted,
            "self_test": self.self_test_report,
            "checks": self.escalation.checks,
            "breaches": self.escalation.breaches,
            "escalated": self.demoted == FALLBACK_ESCALATED,
            "reduced_rows_before_escalation": (
                self.reduced_rows if self.demoted == FALLBACK_ESCALATED else 0
            ),
        }

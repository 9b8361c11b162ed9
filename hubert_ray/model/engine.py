"""The model engine: waveforms in, features out. No Ray, no Arrow (torch inside).

One :class:`Engine` per model actor (one model per device). It owns the call, everything
between a batch of decoded segments and their features: chunking of long segments and packing
of chunks into padded micro-batches (:mod:`hubert_ray.core.chunking`), the exact padded forward
(:mod:`hubert_ray.model.encoder`) queued on the device, the results copied back, and (with
:meth:`Engine.launch` and :meth:`Engine.finish` apart) the host preparing the next call while
the device computes this one. Around it:

- :mod:`hubert_ray.model.device`: the device it runs on, handed in (``Engine(...,
  device=spec)``; the real one by ``ModelConfig.device`` without one): the CPU, a GPU, or a
  simulated accelerator. Whatever differs between them lives there, not here.
- :mod:`hubert_ray.model.cost`: the packing's fixed cost per forward, measured on a device
  whose work is queued (:class:`ForwardCost`).
- :mod:`hubert_ray.model.assurance`: precision against an FP32 reference (self-test, sampled
  rechecks, escalation, the non-finite guard and the fallbacks).
- :mod:`hubert_ray.model.calls`: what a call carries from its launch to its :class:`Result`.
- :mod:`hubert_ray.model.threads`: a CPU engine's forwards on N threads, N micro-batches at
  once or one at a time on all N, whichever was faster when the engine started.

The stage adapter (:mod:`hubert_ray.stages.extractor`) turns Arrow batches into
:meth:`Engine.launch` / :meth:`Engine.finish` calls and :class:`Result` back into Arrow.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from functools import cached_property

import numpy as np

from hubert_ray.core.chunking import (
    pack_micro_batches,
    pad_batch,
    padded_length,
    plan_chunks,
)
from hubert_ray.core.config import SAMPLE_RATE_HZ, ModelConfig, parse_layers
from hubert_ray.core.precision import is_sampled
from hubert_ray.model.assurance import (
    FALLBACK_ESCALATED,
    FALLBACK_NON_FINITE,
    FALLBACK_PRECISION,
    FALLBACK_SELF_TEST,
    Assurance,
    Escalation,
)
from hubert_ray.model.calls import Features, Launched, Pending, Result, Work
from hubert_ray.model.cost import (
    CPU_BATCH_COST_S,
    GPU_BATCH_COST_S,
    MAX_BATCH_COST_S,
    ForwardCost,
    measure_forward,
)

log = logging.getLogger("hubert_ray")

__all__ = [
    "CPU_BATCH_COST_S",
    "CPU_MAX_BATCH_S",
    "FALLBACK_ESCALATED",
    "FALLBACK_NON_FINITE",
    "FALLBACK_PRECISION",
    "FALLBACK_SELF_TEST",
    "GPU_BATCH_COST_S",
    "MAX_BATCH_COST_S",
    "Engine",
    "Escalation",
    "ForwardCost",
    "Pending",
    "Result",
]

# CPU: most padded audio per micro-batch, so that a call has micro-batches for every one of the
# actor's threads (see HostDevice.threads), whichever way they run them (the micro-batches, and so
# the features, do not depend on it); a GPU's bound is ModelConfig.max_batch_samples alone.
CPU_MAX_BATCH_S = 40.0


class Engine:
    """Features for batches of waveforms on one device (see the module docstring)."""

    # Let the host run ahead of the device (see _forward); False waits after each micro-batch.
    overlap = True

    def __init__(
        self,
        config: ModelConfig,
        model_dir: str,
        self_test: bool = True,
        device=None,
        cpu_strategy: str | None = None,
    ):
        """``self_test=False`` skips the self-test (tests of the per-batch guards only);
        ``device``: a spec of the device to run on (:class:`hubert_ray.model.device.DeviceSpec`,
        e.g. a :class:`~hubert_ray.model.device.SimulatedDevice` for benchmarks and tests of
        the engine's overlap); ``None``: the real device ``config.device`` names.
        ``cpu_strategy``: how a CPU engine of more than one thread runs its micro-batches
        (:mod:`hubert_ray.model.threads`: ``at_once`` or ``threaded``, untimed: tests and
        benchmarks); ``None``: both timed at start, the faster."""
        import torch

        from hubert_ray.model.device import open_device

        # What the engine's start took, by step (its report's ``start_s``)
        self.start_s: dict[str, float] = {}
        started = self._step_at = time.perf_counter()
        self.config = config
        self.model_dir = model_dir
        self.device = open_device(config, device)
        self._init_packing(config)
        self.dtype = self.requested_dtype = self.device.compute_dtype(config)
        self.net = self.device.load(model_dir, self.dtype, config)
        self.hidden = self.net.config.hidden_size
        # Frame grid of the model's conv frontend (receptive field, hop): chunking and frame
        # counts follow it.
        self.geometry = self.net.geometry
        if config.compile != "none":
            self.net.compile_layers(config.compile)
            log.info("model forward compiled with torch.compile mode %s", config.compile)
        self.layers = parse_layers(config.layers, self.net.num_hidden_layers)
        units = config.units and self.device.computes  # (simulated: zeros, no units)
        self.codebooks = self._load_codebooks(config) if units else {}
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
        self.audit = True
        self._lock = threading.Lock()
        self.assurance = Assurance(self)
        self._started("load")  # (torch and transformers imported; the centroids)
        if self_test and self.dtype != "float32":
            self.assurance.self_test()
            self._started("self_test")
        if self.forwards is not None:  # the CPU's N threads: which way runs forwards faster
            if cpu_strategy is None:
                self.forwards.calibrate(self.net, self.layers)
            else:
                self.forwards.use(cpu_strategy)
            self._started("cpu_strategy")
        # The packing's fixed cost per forward: given, the CPU default, or measured.
        if config.micro_batch_cost_seconds is None and self.device.queued:
            self.forward_cost = measure_forward(self.device, self.net, self.layers)
            if self.forward_cost is None:
                self.batch_cost_s = GPU_BATCH_COST_S
            self._started("forward_cost")
        self.device.reset()  # its report: the work from here on
        # The FP32 reference stays loaded only while sampled checks are on.
        self.assurance.release_reference()
        self.start_s["total"] = round(time.perf_counter() - started, 3)

    def _started(self, step: str) -> None:
        """``start_s[step]``: the seconds since the previous step ended."""
        now = time.perf_counter()
        self.start_s[step] = round(now - self._step_at, 3)
        self._step_at = now

    def _init_packing(self, config: ModelConfig) -> None:
        """The packing's bounds and fixed cost per forward, and the threads forwards run on
        (more than one: micro-batches at once, the CPU's)."""
        cost_s = config.micro_batch_cost_seconds
        # None: measured once the model is loaded and self-tested (a device whose work is queued)
        self.batch_cost_s = CPU_BATCH_COST_S if cost_s is None else cost_s
        self.forward_cost: ForwardCost | None = None
        pad_s = config.pad_multiple_seconds
        if pad_s is None:
            pad_s = self.device.pad_multiple_s
        self.pad_multiple = max(1, int(round(pad_s * SAMPLE_RATE_HZ)))
        self.max_batch_samples = config.max_batch_samples
        self.forwards = None  # CpuForwards: the CPU's threads, more than one
        if self.device.threads > 1:
            from hubert_ray.model.threads import CpuForwards

            cap = max(config.chunk_samples, int(CPU_MAX_BATCH_S * SAMPLE_RATE_HZ))
            self.max_batch_samples = min(self.max_batch_samples, cap)
            self.forwards = CpuForwards(self.device.threads)

    @cached_property
    def revision(self) -> str:
        """The model's content hash (weights and configs; read once per engine)."""
        from hubert_ray.model import encoder as hm

        return hm.model_revision(self.model_dir)

    @property
    def checking(self) -> bool:
        """Whether sampled FP32 rechecks run (``audit = False`` turns them off: benchmarks)."""
        return self.audit and self.dtype != "float32" and self.precision.precision_sample_rate > 0

    @property
    def demoted(self) -> str | None:
        """Why this engine computes in FP32 although a reduced dtype was asked for (None: it
        does not): ``self_test`` or ``escalated``."""
        return self.assurance.demoted

    @property
    def self_test_report(self) -> dict | None:
        return self.assurance.self_test_report

    def _reference(self):
        """The FP32 model on this engine's device."""
        return self.assurance.reference()

    @property
    def batch_cost_samples(self) -> float:
        """The packing's fixed cost of a forward, in padded samples."""
        cost_s = self.forward_cost.seconds if self.forward_cost else self.batch_cost_s
        return cost_s * SAMPLE_RATE_HZ

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
            books[book.layer] = units.prepare(book.centroids, self.device.torch_device)
        return books

    def units_of(self, feats: dict) -> dict:
        """Unit ids (int32 [frames] tensors on the device) of the feature tensors
        ``feats[layer]`` [frames, hidden], for every layer with centroids."""
        from hubert_ray.units import centroids as units

        return {k: units.assign(feats[k], c, c_sq) for k, (c, c_sq) in self.codebooks.items()}

    # -- a call ---------------------------------------------------------------------------------
    def _work(self, ids: list[str], audio: list[np.ndarray | None]) -> Work:
        """Chunk every row that has audio; remember which chunks belong to which row."""
        chunks, owner = [], []
        for i, x in enumerate(audio):
            if x is None:
                continue
            for s, e in plan_chunks(len(x), self.config.chunk_samples, self.geometry):
                chunks.append(x[s:e])
                owner.append(i)
        rows = {i for i, x in enumerate(audio) if x is not None}
        return Work(ids=list(ids), chunks=chunks, owner=owner, row_dtype=dict.fromkeys(rows))

    def run(self, ids: list[str], audio: list[np.ndarray | None]) -> Result:
        """Features of each row's 16 kHz waveform (``None``: a row that failed upstream; it
        stays without features and without an error of its own)."""
        return self.finish(self.launch(ids, audio))

    def launch(self, ids: list[str], audio: list[np.ndarray | None]) -> Pending:
        """Chunk, pack and queue a call's forward on the device, then the FP32 recheck of its
        sampled rows; returns at once on a device whose work is queued (the host prepares the
        next call while the device computes this one). One thread launches, in call order;
        :meth:`finish` may run on another."""
        w = self._work(ids, audio)
        dtype, demoted = self.dtype, self.assurance.demoted
        for i in w.row_dtype:
            w.row_dtype[i] = dtype
            if demoted:
                w.fallback[i] = demoted
        t0 = time.perf_counter()
        device = self.device
        s0 = device.stamp()
        launched = self._launch(self.net, w, list(range(len(w.chunks))), self.store, host=False)
        s1 = device.stamp()
        audit = None
        if self.checking:
            rate = self.precision.precision_sample_rate
            sampled = [i for i in w.chunks_of if is_sampled(w.ids[i], rate)]
            if sampled:
                audit = self.assurance.launch_audit(w, launched, sampled)
        stamps = (s0, s1, device.stamp())
        launched = self._host(launched)
        if audit is not None:  # its metrics come back with the features
            audit.metrics = device.to_host({0: audit.metrics})[0]
            launched.done = device.record()
        return Pending(w, audio, launched, dtype, t0, audit, stamps)

    def finish(self, pending: Pending) -> Result:
        """Wait for a launched call's features; guard, check and fall back as needed."""
        w = pending.work
        feats = self._collect(pending.launched)
        w.groups = feats.groups
        with self._lock:  # the checks may switch the engine to FP32
            bad_rows, precision = self.assurance.review(w, feats, pending.dtype, pending.audit)
            s0, s1, s2 = pending.stamps
            self.stats["forward_device_s"] += self.device.elapsed(s0, s1)
            self.stats["audit_device_s"] += self.device.elapsed(s1, s2)
            self.stats["forward_s"] += time.perf_counter() - pending.t0
            self.stats["batches"] += 1
            self.device.call_finished(sum(len(c) for c in w.chunks))
        return self._result(w, pending.audio, feats, bad_rows, precision)

    def _result(self, w: Work, audio: list, feats: Features, bad_rows, precision) -> Result:
        """A finished call's :class:`Result` (its frame counts checked against the plan)."""
        n = len(w.ids)
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

    def report(self) -> dict:
        """This engine's precision record (the stage adapter writes it for the summary), its
        device time, and what its device adds (a simulated device: ``simulated``)."""
        forward, audit = self.stats["forward_device_s"], self.stats["audit_device_s"]
        return self.device.report() | {
            # device time of the forwards and of the sampled FP32 rechecks (their share: the
            # audit's cost)
            "device_s": {"forward": round(forward, 3), "audit": round(audit, 3)},
            "device": self.device.name,
            # the packing's fixed cost per forward (seconds of padded audio) and, on a device
            # whose work is queued, what it was derived from (ForwardCost)
            "micro_batch_cost_seconds": round(self.batch_cost_samples / SAMPLE_RATE_HZ, 3),
            # CPU: micro-batches run at once (one torch thread each; 1: in order), how that was
            # chosen (CpuForwards.calibrate's figures; None: one thread, or not the CPU)
            "forwards_at_once": self.forwards.at_once if self.forwards else 1,
            "cpu_strategy": self.forwards.report() if self.forwards else None,
            "forward_cost": dataclasses.asdict(self.forward_cost) if self.forward_cost else None,
            "requested_dtype": self.requested_dtype,
            "compute_dtype": self.dtype,
            # the engine's start by step: the model and centroids loaded (torch and transformers
            # imported), the self-test, the CPU strategy's timing, the forward cost's; total
            "start_s": dict(self.start_s),
            **self.assurance.report(),
        }

    # -- forward --------------------------------------------------------------------------------
    # Inside a call the host does not wait for the device's results: micro-batch k+1 is padded
    # and queued while the device computes k (two input buffers alternate; a buffer is
    # refilled once its copy to the device has finished), and every micro-batch writes its
    # valid frames straight into per-layer output tensors laid out in row order. One copy back
    # per layer at the end.
    def _forward(self, net, w: Work, js: list[int], store) -> Features:
        """Features of chunks ``js`` (in this order) in the torch dtype ``store``, computed
        in packed micro-batches (waits for the device)."""
        return self._collect(self._launch(net, w, js, store))

    def _launch(self, net, w: Work, js: list[int], store, host: bool = True) -> Launched:
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
        out = {k: self.device.output((total, self.hidden), store) for k in self.layers}
        peak = self.device.output(total, torch.float32)
        t0, self._local.waited = time.perf_counter(), 0.0
        batches = [
            (net, w, group, [int(starts[p]) for p in ps], out, peak, n % 2)
            for n, (group, ps) in enumerate(zip(groups, packed, strict=True))
        ]
        if self.forwards is None:
            for args in batches:
                self._micro_batch(*args)
                if not self.overlap:
                    self.device.wait(self.device.record())
        else:  # the CPU's threads (at once or one at a time), each writing its rows of ``out``
            self.forwards.run(self._micro_batch, batches)
        if self.forward_cost is not None and groups:
            host_s = time.perf_counter() - t0 - self._local.waited
            self.forward_cost.observe(host_s / len(groups))
        # A frame is finite once stored if no layer has NaN or a magnitude that overflows the
        # storage dtype (float16 rounds |x| >= 65520 to inf).
        ok = peak < 65520.0 if store == torch.float16 else torch.isfinite(peak)
        units = self.units_of(out)  # from the features as stored (cast to ``store``)
        launched = Launched(js, starts, frames, out, ok, groups, None, units)
        return self._host(launched) if host else launched

    def _host(self, launched: Launched) -> Launched:
        """Queue the copy of a launched forward's results to host memory."""
        device = self.device
        launched.out = device.to_host(launched.out)
        launched.ok = device.to_host({0: launched.ok})[0]
        launched.units = device.to_host(launched.units)
        launched.done = device.record()
        return launched

    def _collect(self, launched: Launched) -> Features:
        """Wait for a launched forward's results on the host."""
        self.device.wait(launched.done)
        frames, starts = launched.frames, launched.starts
        finite = np.ones(len(launched.js), dtype=bool)  # per chunk: all its frames finite
        some = np.asarray(frames, dtype=np.int64) > 0  # (a chunk under 400 samples has none)
        if some.any():
            finite[some] = np.logical_and.reduceat(launched.ok.numpy(), starts[:-1][some])
        return Features(launched.js, starts, launched.out, finite, launched.groups, launched.units)

    def _micro_batch(self, net, w: Work, group: list[int], starts: list[int], out, peak, slot):
        """One padded forward of chunks ``group``; chunk ``group[i]``'s frames go to rows
        ``starts[i]:`` of ``out``'s tensors (cast on the way) and their largest magnitude over
        all layers (NaN if any is NaN) to ``peak``. ``slot``: the input buffer."""
        import torch

        from hubert_ray.model.encoder import input_dtype, to_device

        device = self.device.torch_device
        chunks = [w.chunks[j] for j in group]
        width = padded_length(max(len(c) for c in chunks), self.pad_multiple)
        staging = self._staging(slot, len(chunks) * width)
        x, lengths = pad_batch(chunks, out=staging.numpy(), multiple=self.pad_multiple)
        xt = staging[: x.size].view(x.shape).to(device, non_blocking=True)
        self._local.copied[slot] = self.device.record()
        feats, frame_lengths = net(xt.to(input_dtype(net)), lengths, self.layers)
        fl = frame_lengths.tolist()
        if fl != [self.geometry.num_frames(n) for n in lengths]:
            raise AssertionError(f"model frame counts {fl} != planned for {lengths} samples")
        if feats is None:  # a model that writes nothing (the simulated device's)
            return
        # One gather per layer: the valid frames of every item (row-major in the padded batch)
        # to their rows of the call's output (index lists built on the host, no device sync).
        width = feats[self.layers[0]].shape[1]
        src_idx = np.concatenate([i * width + np.arange(n) for i, n in enumerate(fl)])
        dst_idx = np.concatenate([s + np.arange(n) for s, n in zip(starts, fl, strict=True)])
        src_idx = to_device(torch.from_numpy(src_idx), device)
        dst_idx = to_device(torch.from_numpy(dst_idx), device)
        top = None
        for k in self.layers:
            src = feats[k].reshape(-1, feats[k].shape[-1])
            m = src.abs().amax(dim=-1)
            top = m if top is None else torch.maximum(top, m)  # NaN propagates
            out[k].index_copy_(0, dst_idx, src.index_select(0, src_idx).to(out[k].dtype))
        peak.index_copy_(0, dst_idx, top.index_select(0, src_idx).float())

    def _staging(self, slot: int, size: int):
        """Host input buffer ``slot`` of this thread (float32, pinned for a GPU) of at least
        ``size`` values, once its previous copy to the device has finished."""
        local = self._local
        if not hasattr(local, "inputs"):
            local.inputs, local.copied = [None, None], [None, None]
        if local.copied[slot] is not None:
            t0 = time.perf_counter()
            self.device.wait(local.copied[slot])
            local.waited += time.perf_counter() - t0  # (reset by each _launch)
        buf = local.inputs[slot]
        if buf is None or buf.numel() < size:
            buf = self.device.host_buffer(max(size, self.max_batch_samples))
            local.inputs[slot] = buf
        return buf

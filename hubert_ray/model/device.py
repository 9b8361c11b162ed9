"""The devices an engine runs on, without Ray (torch inside, imported when a device is opened).

Everything that differs between the hardware the engine's work runs on lives here, behind one
protocol (:class:`Device`); the engine has no branch of its own on the kind of device:

- :class:`CudaDevice`: a GPU. Work is queued on the current stream and the launch returns at
  once; CUDA events tell when it is done and how long it took; results are copied back to
  pinned host memory.
- :class:`HostDevice`: the CPU. Tensors are computed when the call returns (nothing to wait
  for); forwards run on ``threads`` threads (:mod:`hubert_ray.model.threads`).
- :class:`SimulatedDevice`: an accelerator for machines without one, for benchmarks and tests of
  the engine's overlap (never chosen by a job's configuration): a launch returns at once, the
  device is busy ``forward_s + padded samples / (x_realtime * 16 kHz)`` seconds per forward
  (``forward_s``: a GPU's fixed cost per forward, kernel launches; 0 by default), in order, a
  wait sleeps until the work is done (no host CPU while it "computes"), and the features stay
  zeros (no model runs, no units are assigned, nothing is copied out).

:class:`SimulatedDevice` is a small frozen spec (picklable: it can be a Ray actor's
constructor argument); :meth:`SimulatedDevice.open` makes the running device
(:class:`SimulatedRun`) inside the process that uses it. :func:`open_device` opens a spec, or
without one the real device that ``ModelConfig.device`` names.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace
from typing import Protocol

from hubert_ray.core.config import SAMPLE_RATE_HZ, ModelConfig, compute_dtype

log = logging.getLogger("hubert_ray")

# Default padded-length multiple (ModelConfig.pad_multiple_seconds). GPU: every micro-batch of
# mixed lengths otherwise has a new shape, and cuDNN chooses plans per shape: 0.25 s bounds the
# lengths to 40 per 10 s for ~0.125 s of padding per row. CPU and the simulated device: no
# per-shape planning to save.
CPU_PAD_MULTIPLE_S = 0.0
GPU_PAD_MULTIPLE_S = 0.25


class Device(Protocol):
    """What the engine needs of the hardware its forwards run on.

    Attributes: ``name`` (the hardware, for reports: ``cuda:0 (NVIDIA H100 80GB HBM3)``, or
    the CPU's model name and its AMX support), ``torch_device`` (where the engine's tensors
    live), ``threads`` (CPU threads the forwards run on, N micro-batches at once or one at a
    time on all N, :mod:`hubert_ray.model.threads`; 1: in order on the calling thread),
    ``queued`` (a launch returns before the work is done: the engine measures a
    forward's fixed cost, :mod:`hubert_ray.model.cost`), ``computes`` (a model computes the
    features: False for the simulated device, whose features are zeros and get no units),
    ``pad_multiple_s`` (the default padded-length multiple).

    The clock: ``record()`` returns an event for everything queued so far, ``wait(event)``
    blocks until it is done; ``elapsed(a, b)`` is the device time between two ``stamp()``\\ s
    (once both are done)."""

    name: str
    torch_device: object
    threads: int
    queued: bool
    computes: bool
    pad_multiple_s: float

    def compute_dtype(self, config: ModelConfig) -> str:
        """The dtype the model computes in (``config.dtype``; ``auto`` by device)."""

    def load(self, model_dir: str, dtype: str, config: ModelConfig):
        """The model in ``dtype`` on this device: ``net(x, lengths, layers)`` returns
        ``(features by layer, frame lengths)``; features ``None``: nothing to copy out."""

    def output(self, shape, dtype):
        """A tensor a call's results are written into (uninitialised where the forwards fill
        it; zeros on the simulated device, which writes nothing)."""

    def host_buffer(self, size: int):
        """A float32 host buffer of ``size`` values for inputs (pinned for a GPU's copies)."""

    def to_host(self, tensors: dict) -> dict:
        """Start copying ``tensors`` (name -> tensor) to host memory (:meth:`record` and
        :meth:`wait` tell when they are there); host tensors are returned as they are."""

    def record(self): ...

    def wait(self, event) -> None: ...

    def stamp(self): ...

    def elapsed(self, start, end) -> float: ...

    def reset(self) -> None:
        """Forget the work so far (the engine's start-up measurements) in :meth:`report`."""

    def call_finished(self, samples: int) -> None:
        """An engine call over ``samples`` samples of audio finished (for :meth:`report`)."""

    def report(self) -> dict:
        """Extra entries of the engine's report (the simulated device's time: ``simulated``)."""


class DeviceSpec(Protocol):
    """A picklable description of a device, opened in the process that runs the engine."""

    def open(self, config: ModelConfig) -> Device: ...


def open_device(config: ModelConfig, spec: DeviceSpec | None = None) -> Device:
    """``spec`` opened, or without one the real device ``config.device`` names (``auto``:
    CUDA when available, else the CPU)."""
    if spec is not None:
        return spec.open(config)
    import torch

    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    return CudaDevice() if use_cuda else HostDevice.open(config)


class _RealDevice:
    """What the CPU and a GPU share: the model is loaded and computes, reports add nothing."""

    queued = False
    computes = True
    threads = 1
    pad_multiple_s = CPU_PAD_MULTIPLE_S
    torch_device: object

    def load(self, model_dir: str, dtype: str, config: ModelConfig):
        from hubert_ray.model import encoder as hm

        return hm.load_model(
            model_dir, self.torch_device, dtype, allow_pickle=config.allow_pickle_weights
        )

    def output(self, shape, dtype):
        import torch

        return torch.empty(shape, dtype=dtype, device=self.torch_device)

    def reset(self) -> None:
        return None

    def call_finished(self, samples: int) -> None:
        return None

    def report(self) -> dict:
        return {}


class HostDevice(_RealDevice):
    """The CPU: nothing is queued, so there is nothing to wait for.

    Forwards run on ``threads`` threads: N micro-batches at once on one torch thread each, or
    one at a time on all N, whichever the engine measured faster when it started
    (:mod:`hubert_ray.model.threads`)."""

    def __init__(self, threads: int = 1):
        import torch

        self.torch_device = torch.device("cpu")
        self.threads = threads

    @cached_property
    def name(self) -> str:
        from hubert_ray.core.selftest import cpu_has_amx, cpu_model

        return f"cpu ({cpu_model()}{', AMX' if cpu_has_amx() else ''})"

    @classmethod
    def open(cls, config: ModelConfig) -> HostDevice:
        """The CPU for ``config``: forwards on ``num_threads`` threads (0: one per CPU of this
        process); torch set to one thread outside them."""
        import torch

        threads = config.num_threads or len(os.sched_getaffinity(0))
        torch.set_num_threads(1)
        log.info("model actor on CPU: forwards on %d threads", threads)
        return cls(threads)

    def compute_dtype(self, config: ModelConfig) -> str:
        return compute_dtype(config.dtype, False)

    def host_buffer(self, size: int):
        import torch

        return torch.empty(size, dtype=torch.float32)

    def to_host(self, tensors: dict) -> dict:
        return tensors

    def record(self):
        return None

    def wait(self, event) -> None:
        return None

    def stamp(self) -> float:
        """A point in the device's timeline (:meth:`elapsed` between two, once done)."""
        return time.perf_counter()

    def elapsed(self, start, end) -> float:
        return end - start


class CudaDevice(_RealDevice):
    """The current CUDA device: work queued on the current stream, CUDA events to wait for it
    and time it, results copied back to pinned host memory."""

    queued = True
    pad_multiple_s = GPU_PAD_MULTIPLE_S

    def __init__(self):
        import torch

        self.torch_device = torch.device("cuda")

    @cached_property
    def name(self) -> str:
        import torch

        index = torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"

    def compute_dtype(self, config: ModelConfig) -> str:
        dtype = compute_dtype(config.dtype, True)
        if dtype == "int8":
            raise ValueError(
                "dtype=int8 (dynamic quantisation) runs on CPU only; use float16 on GPU"
            )
        return dtype

    def host_buffer(self, size: int):
        import torch

        return torch.empty(size, dtype=torch.float32, pin_memory=True)

    def to_host(self, tensors: dict) -> dict:
        """Start copying device tensors into pinned host memory (the caller synchronises)."""
        import torch

        host = {}
        for k, v in tensors.items():
            host[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            host[k].copy_(v, non_blocking=True)
        return host

    def record(self):
        import torch

        event = torch.cuda.Event()
        event.record()
        return event

    def wait(self, event) -> None:
        if event is not None:
            event.synchronize()  # releases the GIL while it waits

    def stamp(self):
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed(self, start, end) -> float:
        """Seconds between two stamps (both done: the caller waited for a later event)."""
        return start.elapsed_time(end) / 1e3


@dataclass(frozen=True)
class SimulatedDevice:
    """A stream of work ``x_realtime`` times faster than real time, ``forward_s`` seconds of
    fixed time per forward, features ``hidden`` wide (see the module docstring). A spec:
    :meth:`open` makes the device an engine runs on (:class:`SimulatedRun`)."""

    x_realtime: float
    forward_s: float = 0.0
    hidden: int = 768

    def open(self, config: ModelConfig | None = None) -> SimulatedRun:
        return SimulatedRun(self)


class SimulatedRun(HostDevice):
    """A :class:`SimulatedDevice` at work in one process: its queue and its time. ``busy_s``
    totals the simulated device time, ``idle_s`` the gaps between its work, ``calls`` when each
    engine call finished and its samples. Tensors live in host memory, one forward at a time."""

    queued = True
    computes = False

    def __init__(self, spec: SimulatedDevice):
        super().__init__(threads=1)
        self.spec = spec
        self.x_realtime = float(spec.x_realtime)
        self.forward_s = float(spec.forward_s)
        self.hidden = spec.hidden
        self._lock = threading.Lock()
        self._free_at = 0.0  # when the queued work ends (time.monotonic)
        self.reset()

    def reset(self) -> None:
        self.busy_s = 0.0
        self.idle_s = 0.0
        self.forwards = 0
        self.first_start: float | None = None
        self.calls: list[tuple[float, int]] = []

    def compute_dtype(self, config: ModelConfig) -> str:
        return "float32"

    def output(self, shape, dtype):
        import torch

        return torch.zeros(shape, dtype=dtype, device=self.torch_device)

    def enqueue(self, padded_samples: int) -> float:
        """Queue a forward over ``padded_samples``; returns when it will be done."""
        seconds = self.forward_s + padded_samples / (self.x_realtime * SAMPLE_RATE_HZ)
        with self._lock:
            now = time.monotonic()
            if self.first_start is None:
                self.first_start = now
            elif now > self._free_at:
                self.idle_s += now - self._free_at
            self._free_at = max(now, self._free_at) + seconds
            self.busy_s += seconds
            self.forwards += 1
            return self._free_at

    def record(self) -> float:
        with self._lock:
            return self._free_at

    def wait(self, event) -> None:
        if event is not None:
            delay = event - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def stamp(self) -> float:
        with self._lock:
            return self.busy_s

    def call_finished(self, samples: int) -> None:
        with self._lock:
            self.calls.append((round(time.monotonic(), 4), samples))

    def report(self) -> dict:
        """Device time so far: busy seconds, the span from its first to its last work, and
        when each call finished."""
        with self._lock:
            return {
                "simulated": {
                    "x_realtime": self.x_realtime,
                    "forward_s": self.forward_s,
                    "forwards": self.forwards,
                    "busy_s": round(self.busy_s, 4),
                    "idle_s": round(self.idle_s, 4),
                    "first_start": self.first_start or 0.0,
                    "last_end": self._free_at,
                    "calls": list(self.calls),
                }
            }

    def load(self, model_dir: str, dtype: str, config: ModelConfig):
        """The simulated model: ``net(x, lengths, layers)`` like the real wrapper; queues the
        device time and returns no features (the call's outputs stay zeros)."""
        import torch
        from torch import nn

        from hubert_ray.core.chunking import HUBERT, num_frames
        from hubert_ray.model import encoder as hm

        device = self

        class SimulatedModel(nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = nn.Parameter(torch.zeros(1))
                self.num_hidden_layers = hm.num_hidden_layers(model_dir)
                self.config = SimpleNamespace(hidden_size=device.hidden)
                self.compiled = None
                self.geometry = HUBERT

            def forward(self, x, lengths, layers):
                device.enqueue(x.numel())
                return None, torch.tensor([num_frames(int(n)) for n in lengths])

        return SimulatedModel()

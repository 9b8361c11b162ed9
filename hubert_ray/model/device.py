"""Device clocks: how the engine knows queued work has finished, without Ray (torch inside).

The engine queues work and later waits for it through a clock: ``record()`` returns an event
for everything queued so far, ``wait(event)`` blocks until it is done; ``elapsed(a, b)`` is
the device time between two ``stamp()``s (once both are done).

- :class:`CudaClock`: CUDA events on the current stream (the launch returns at once).
- :class:`HostClock`: CPU tensors are computed when the call returns; nothing to wait for.
- :class:`SimulatedDevice`: an accelerator for machines without one, for benchmarks and tests
  of the engine's overlap (never chosen by a job's configuration): a launch returns at once,
  the device is busy ``forward_s + padded samples / (x_realtime * 16 kHz)`` seconds per
  forward (``forward_s``: a GPU's fixed cost per forward, kernel launches; 0 by default), in
  order, a wait sleeps until the work is done (no host CPU while it "computes"), and the features
  stay zeros (the engine's on-device copy-out is skipped: on a GPU it is device work).
"""

from __future__ import annotations

import threading
import time

from hubert_ray.core.config import SAMPLE_RATE_HZ


class HostClock:
    def record(self):
        return None

    def wait(self, event) -> None:
        return None

    def stamp(self) -> float:
        """A point in the device's timeline (:meth:`elapsed` between two, once done)."""
        return time.perf_counter()

    def elapsed(self, start, end) -> float:
        return end - start


class CudaClock:
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


class SimulatedDevice:
    """A stream of work ``x_realtime`` times faster than real time (see the module docstring).
    ``busy_s`` totals the simulated device time, ``idle_s`` the gaps between its work."""

    def __init__(self, x_realtime: float, forward_s: float = 0.0, hidden: int = 768):
        self.x_realtime = float(x_realtime)
        self.forward_s = float(forward_s)
        self.hidden = hidden
        self._lock = threading.Lock()
        self._free_at = 0.0  # when the queued work ends (time.monotonic)
        self.reset()

    def reset(self) -> None:
        """Forget the work so far (the engine's start-up measurements) in :meth:`report`."""
        self.busy_s = 0.0
        self.idle_s = 0.0
        self.forwards = 0
        self.first_start: float | None = None

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

    def stamp(self) -> float:
        with self._lock:
            return self.busy_s

    def elapsed(self, start, end) -> float:
        return end - start

    def report(self) -> dict:
        """Device time so far: busy seconds and the span from its first to its last work."""
        with self._lock:
            return {
                "x_realtime": self.x_realtime,
                "forward_s": self.forward_s,
                "forwards": self.forwards,
                "busy_s": round(self.busy_s, 4),
                "idle_s": round(self.idle_s, 4),
                "first_start": self.first_start or 0.0,
                "last_end": self._free_at,
            }

    def wait(self, event) -> None:
        if event is not None:
            delay = event - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def model(self, num_hidden_layers: int):
        """The simulated model: ``net(x, lengths, layers)`` like the real wrapper, zeros out."""
        import torch
        from torch import nn

        from hubert_ray.core.chunking import HUBERT, num_frames

        device = self

        class SimulatedModel(nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = nn.Parameter(torch.zeros(1))
                self.num_hidden_layers = num_hidden_layers
                self.compiled = None
                self.geometry = HUBERT

            def forward(self, x, lengths, layers):
                """Queues the device time; no outputs (``None``): the engine leaves the
                call's output tensors as allocated (zeros), as a device would fill them
                without the host."""
                device.enqueue(x.numel())
                return None, torch.tensor([num_frames(int(n)) for n in lengths])

        return SimulatedModel()

"""What a forward micro-batch costs apart from its samples: the fixed cost the packing
(:func:`hubert_ray.core.chunking.pack_micro_batches`) weighs against padding (torch inside).

On the CPU it is a constant (``ModelConfig.micro_batch_cost_seconds``, else
:data:`CPU_BATCH_COST_S`); on a device whose work is queued (a GPU, the simulated one) it is
measured when the engine starts (:func:`measure_forward`) and follows the host's own time per
micro-batch as calls run (:class:`ForwardCost`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from hubert_ray.core.config import SAMPLE_RATE_HZ

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


@dataclass
class ForwardCost:
    """What one forward micro-batch costs apart from its samples, in seconds of padded audio:
    what the packing (:func:`hubert_ray.core.chunking.pack_micro_batches`) weighs against padding,
    on a device whose work is queued (a GPU, the simulated one).

    ``device_fixed_s`` and ``per_audio_s`` (device seconds per second of padded audio) are
    measured when the engine starts (:func:`measure_forward`); ``host_s`` follows the
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


def measure_forward(
    device, net, layers, seconds: float = 4.0, items: int = 8, repeats: int = 3
) -> ForwardCost | None:
    """The device's fixed time per forward and its time per second of padded audio
    (:class:`ForwardCost`). Times forwards of 1 and ``items`` rows of ``seconds`` (the
    requested ``layers``, ``net``'s dtype) with the device's clock
    (:class:`hubert_ray.model.device.Device`), best of ``repeats`` after a warm-up, and fits
    ``time = fixed + padded seconds x per-second``. ``None`` if the fit is unusable (the
    larger batch was not slower)."""
    import torch

    from hubert_ray.model.encoder import input_dtype

    n = int(seconds * SAMPLE_RATE_HZ)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((items, n), np.float32))
    x = (0.1 * x).to(device.torch_device, input_dtype(net))

    def timed(b: int) -> float:
        with torch.inference_mode():
            start = device.stamp()
            net(x[:b], [n] * b, layers)
            end = device.stamp()
        device.wait(device.record())
        return device.elapsed(start, end)

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

"""Measurement helpers: peak memory, feature error against a reference, the row collector."""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import threading
import time

import numpy as np

from benchmarks.workloads import numbers

SR = 16_000
MIXED_MIN_S, MIXED_MAX_S = 0.3, 20.0


# -- measurement helpers --------------------------------------------------------------------------
class PeakMemory:
    """GPU: ``max_memory_allocated`` (MiB, weights included). CPU: peak RSS sampled from
    ``/proc/self/statm`` every 5 ms minus the RSS at entry (MiB); falls back to
    ``ru_maxrss`` delta where ``/proc`` is missing (then only growth past the old peak shows)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.peak_mib: float | None = None

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.base = self._rss()
        self._peak = self.base or 0
        self._stop = threading.Event()
        if self.base is None:
            import resource

            self._ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            rss = self._rss()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
            return False
        if self.base is None:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024
            ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_mib = (ru - self._ru) * scale / 2**20
            return False
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss() or 0)
        self.peak_mib = (self._peak - self.base) / 2**20
        return False


def rel_l2(outs: list[np.ndarray], refs: list[np.ndarray]) -> float:
    num = den = 0.0
    for a, b in zip(outs, refs, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"feature shape {a.shape} != reference {b.shape}")
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        num += float(((a64 - b64) ** 2).sum())
        den += float((b64**2).sum())
    return math.sqrt(num / den) if den > 0 else float("nan")


def feature_rows(table, layer: int) -> list[np.ndarray]:
    """Per-row [frames, hidden] arrays of a ModelStage output column ``layer_<layer>``."""
    col = table.column(f"layer_{layer}").combine_chunks()
    hidden = col.type.value_type.list_size
    offsets = col.offsets.to_numpy()
    flat = col.values.values.to_numpy(zero_copy_only=False).reshape(-1, hidden)
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(col))]


class Bench:
    def __init__(self, args, device: str):
        self.args = args
        self.device = device
        self.cuda = device == "cuda"
        self.rows: list[dict] = []
        self.pipeline_warmup_s: float | None = None  # wall of the 2-utterance warm-up run
        self.pipeline_calls = numbers(args.pipeline_calls, int)
        import torch

        # torch's default intra-op threads (a CPU engine sets 1 for its own forwards)
        self.torch_threads = torch.get_num_threads()

    def default_threads(self) -> None:
        """torch's default intra-op threads again, as a plain script computes."""
        import torch

        torch.set_num_threads(self.torch_threads)

    def sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def warm_item(self, x: np.ndarray) -> np.ndarray:
        """First warm-up input: the item itself on GPU; on CPU its first 2 s (slow CPU rows,
        e.g. float16 on the base model, would otherwise spend minutes warming up)."""
        return x if self.cuda else x[: 2 * SR]

    def release(self):
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()

    def timed(self, units, fn, warm_unit, budget_s: float | None):
        """Warm up, then run ``fn`` on ``units`` (each ``(audio_s, x)``) timed, in whole passes
        until ``--min-row-seconds`` have passed (short rows are repeated so timer noise
        matters less), stopping early once ``budget_s`` is spent (at least one unit runs).

        Warm-up: ``warm_unit`` (a short input on CPU), then one untimed pass over ``units``
        when it is estimated to take at most half the budget: the first call with a new input
        shape pays one-off kernel setup (oneDNN primitives on CPU, cuDNN/cuBLAS plans on GPU)
        that would otherwise be timed for whichever row sees the shapes first.
        Outputs are the first timed pass's. Returns (outputs, audio_s, wall_s, peak, passes).
        """
        outs, audio_s, passes, stop = [], 0.0, 0, False
        min_s = self.args.min_row_seconds
        # memory: over warm-up and timed passes (the warm-up is where allocators grow)
        with PeakMemory(self.cuda) as mem:
            t = time.perf_counter()
            fn(warm_unit[1])
            self.sync()
            per_audio_s = (time.perf_counter() - t) / max(warm_unit[0], 1e-3)
            pass_audio_s = sum(a for a, _ in units)
            if budget_s is None or per_audio_s * pass_audio_s <= budget_s / 2:
                for _, x in units:
                    fn(x)
            self.sync()
            t0 = time.perf_counter()
            while not stop:
                for a, x in units:
                    out = fn(x)
                    if passes == 0:
                        outs.append(out)
                    audio_s += a
                    if budget_s is not None and time.perf_counter() - t0 > budget_s:
                        stop = True
                        break
                passes += 1
                self.sync()
                stop = stop or time.perf_counter() - t0 >= min_s
            wall = time.perf_counter() - t0
        return outs, audio_s, wall, mem.peak_mib, passes

    def add(self, **row) -> dict:
        base = {
            "status": "ok",
            "items": None,
            "audio_s": None,
            "wall_s": None,
            "x_realtime": None,
            "peak_mem_mib": None,
            "rel_l2_err": None,
            "err_ref": None,
            "real_per_padded": None,
            "note": "",
        }
        base.update(row)
        if base["status"] == "ok" and base["wall_s"]:
            base["x_realtime"] = base["audio_s"] / base["wall_s"]
        for k in ("audio_s", "wall_s", "x_realtime", "peak_mem_mib", "rel_l2_err"):
            if isinstance(base[k], float):
                base[k] = float(f"{base[k]:.6g}")
        self.rows.append(base)
        shown = {k: base[k] for k in ("dist", "name", "x_realtime", "peak_mem_mib", "rel_l2_err")}
        print(f"[bench] {json.dumps(shown)}" + (f" {base['status']}: {base['note']}"), flush=True)
        return base

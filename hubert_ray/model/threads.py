"""The CPU's forwards on N threads: N micro-batches at once on one torch thread each, or one at a
time on N torch threads; each engine times both when it starts and keeps the faster (torch
inside).

Which one is faster depends on the CPU, the model and what else runs on the cores: on an Intel
Xeon (2 threads) N forwards at once ran 1.30-1.44x faster than one forward at a time; one
forward on all cores waits at every operator for the slowest of its threads, which loses more
when the OS hands one core to a decode task, while independent forwards only lose that core's
share. Elsewhere (a CPU whose caches or memory bandwidth N forwards at once exhaust, say) one
forward at a time may win. So :meth:`CpuForwards.calibrate` times both on the real model, on
a fixed micro-batch of the self-test's calibration signal, and the engine's report keeps the
figures and the choice (``cpu_strategy``).

Both run the same micro-batches (the packing does not depend on the strategy) with the same
arithmetic per micro-batch: features are the same bits whichever runs. (The positional
convolution's weight norm, a reduction whose rounding depended on the threads, is computed once
at load: :func:`hubert_ray.model.encoder.freeze_weight_norms`.)
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_all

import numpy as np

from hubert_ray.core.config import SAMPLE_RATE_HZ

log = logging.getLogger("hubert_ray")

AT_ONCE = "at_once"  # N micro-batches at once, one torch thread each
THREADED = "threaded"  # one micro-batch at a time on N torch threads
STRATEGIES = (AT_ONCE, THREADED)

# The calibration micro-batch: CALIBRATION_ROWS rows of CALIBRATION_SECONDS of the self-test's
# speech-like signal (padding-free: rows of one length). N of them per strategy and round, the
# same work for both: N at once, or one after another. A round takes about two one-thread
# forwards of it (~1.5 s for chinese-hubert-base on a 2-vCPU AMD EPYC, ~0.7 s for 6 x 384).
CALIBRATION_ROWS = 1
CALIBRATION_SECONDS = 4.0
# Best of up to CALIBRATION_ROUNDS rounds (strategies alternating first), as many as fit in
# CALIBRATION_BUDGET_S of start-up with the warm-up (at least one).
CALIBRATION_ROUNDS = 3
CALIBRATION_BUDGET_S = 2.0
# The warm-up's rows are this long (threads started, their first forward: allocator, kernels).
WARMUP_SECONDS = 0.5


def _torch_threads(n: int) -> None:
    """torch's intra-op threads of the calling thread (and the default of threads that start
    later): ``n``. torch reads the default into a thread when the thread first uses it, unless
    it did already: read now, while it is ``n``."""
    import torch

    torch.set_num_threads(n)
    torch.get_num_threads()


class CpuForwards:
    """Where a CPU engine's micro-batches run: ``threads`` > 1 threads, as :data:`AT_ONCE` or
    :data:`THREADED` (``strategy``; :data:`AT_ONCE` until :meth:`calibrate` or :meth:`use`
    says otherwise). ``measured``: what :meth:`calibrate` timed (None: not timed)."""

    def __init__(self, threads: int):
        if threads < 2:
            raise ValueError(f"CpuForwards needs 2 threads or more, not {threads}")
        self.threads = threads
        self.strategy = AT_ONCE
        self.measured: dict | None = None
        self._pools: dict[str, ThreadPoolExecutor] = {}

    @property
    def at_once(self) -> int:
        """Micro-batches that run at once."""
        return self.threads if self.strategy == AT_ONCE else 1

    def _pool(self, strategy: str) -> ThreadPoolExecutor:
        """The strategy's threads (started as work comes), torch's intra-op threads set in
        each: one for :data:`AT_ONCE`'s N, N for :data:`THREADED`'s one."""
        if strategy not in STRATEGIES:
            raise ValueError(f"CPU strategy {strategy!r}: expected one of {STRATEGIES}")
        pool = self._pools.get(strategy)
        if pool is None:
            workers, torch_threads = (self.threads, 1) if strategy == AT_ONCE else (1, self.threads)
            pool = ThreadPoolExecutor(
                workers,
                thread_name_prefix=f"forward-{strategy}",
                initializer=_torch_threads,
                initargs=(torch_threads,),
            )
            # Every worker started now (a barrier holds each task until all run), then torch's
            # threads for threads started later set back to one, as the CPU device set them
            # (torch.set_num_threads sets the calling thread's and the default of new ones).
            barrier = threading.Barrier(workers)
            wait_all([pool.submit(barrier.wait) for _ in range(workers)])
            _torch_threads(1)
            self._pools[strategy] = pool
        return pool

    def use(self, strategy: str) -> None:
        """Run the micro-batches as ``strategy`` from now on (the other's threads end)."""
        self._pool(strategy)
        self.strategy = strategy
        for other in [s for s in self._pools if s != strategy]:
            self._pools.pop(other).shutdown(wait=False)

    def run(self, fn, batches: list[tuple], strategy: str | None = None) -> None:
        """``fn(*args)`` for every ``args`` of ``batches`` (each writing its own rows of the
        outputs), as ``strategy`` (default: the chosen one); returns when all are done and
        raises the first failed one's exception."""
        pool = self._pool(strategy or self.strategy)
        futures = [pool.submit(fn, *args) for args in batches]
        wait_all(futures)
        for f in futures:
            f.result()

    def calibrate(
        self,
        net,
        layers,
        rows: int = CALIBRATION_ROWS,
        seconds: float = CALIBRATION_SECONDS,
        rounds: int = CALIBRATION_ROUNDS,
        budget_s: float = CALIBRATION_BUDGET_S,
    ) -> dict:
        """Time N forwards of the calibration micro-batch (``rows`` x ``seconds``, ``net``'s
        dtype, the requested ``layers``) each way: at once on the N one-thread workers, and
        one after another on the N-thread one; best of up to ``rounds`` rounds (which way
        goes first alternates) within ``budget_s`` with the warm-up (at least one round).
        Keeps the faster (a tie: :data:`AT_ONCE`) and returns :attr:`measured`."""
        import torch

        from hubert_ray.core.selftest import SEED
        from hubert_ray.core.signal import normalise, synth_signal
        from hubert_ray.model.encoder import input_dtype

        def batch(s: float):
            n = int(round(s * SAMPLE_RATE_HZ))
            x = np.stack(
                [
                    normalise(synth_signal(s, SAMPLE_RATE_HZ, 1, seed=SEED + i)[:, 0])
                    for i in range(rows)
                ]
            )
            return torch.from_numpy(x).to(input_dtype(net)), [n] * rows

        def forward(x, lengths) -> None:
            with torch.inference_mode():
                net(x, lengths, layers)

        def timed(strategy: str, x, lengths) -> float:
            t0 = time.perf_counter()
            self.run(forward, [(x, lengths)] * self.threads, strategy)
            return time.perf_counter() - t0

        start = time.perf_counter()
        warm = batch(WARMUP_SECONDS)
        for strategy in STRATEGIES:  # every thread started and through a first forward
            timed(strategy, *warm)
        x, lengths = batch(seconds)
        times: dict[str, list[float]] = {s: [] for s in STRATEGIES}
        while True:
            round_start = time.perf_counter()
            order = STRATEGIES if len(times[AT_ONCE]) % 2 == 0 else STRATEGIES[::-1]
            for strategy in order:
                times[strategy].append(timed(strategy, x, lengths))
            now = time.perf_counter()
            done = len(times[AT_ONCE])
            if done >= rounds or now - start + (now - round_start) > budget_s:
                break
        best = {s: min(t) for s, t in times.items()}
        chosen = AT_ONCE if best[AT_ONCE] <= best[THREADED] else THREADED
        self.use(chosen)
        self.measured = {
            "chosen": chosen,
            "forced": False,
            "at_once_s": round(best[AT_ONCE], 4),
            "threaded_s": round(best[THREADED], 4),
            "threads": self.threads,
            # what each figure is: N forwards of this micro-batch, best of the rounds
            "micro_batch": f"{rows} x {seconds:g} s",
            "rounds": len(times[AT_ONCE]),
            "seconds": round(time.perf_counter() - start, 3),  # the calibration, warm-up included
        }
        log.info(
            "CPU forwards on %d threads: %d at once %.3f s, one at a time %.3f s: %s",
            self.threads,
            self.threads,
            best[AT_ONCE],
            best[THREADED],
            chosen,
        )
        return self.measured

    def report(self) -> dict:
        """The engine report's ``cpu_strategy``: the figures :meth:`calibrate` measured and its
        choice, or the strategy :meth:`use` forced (``forced``)."""
        if self.measured is None:
            return {"chosen": self.strategy, "threads": self.threads, "forced": True}
        return self.measured | {
            "chosen": self.strategy,
            "forced": self.measured["chosen"] != self.strategy,
        }

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False)
        self._pools.clear()

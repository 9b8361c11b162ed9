"""Progress of a running job in segments and audio hours, with an ETA, and its storage retries.

Write tasks report what they wrote to a small actor (:class:`Tally`, no CPU reserved, named so
that every task and actor of the job finds it); a thread on the driver prints a line every
``interval`` seconds::

    progress: 41,230 / 146,000 segments (28.2 %), 31.4 h audio, 2,130x realtime, ETA 0:06:12

The ETA assumes the remaining segments go at the rate since the first part was written.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("hubert_ray.progress")

TALLY_NAME = "hubert-ray-tally"
"""The run's :class:`Tally` (named actors are scoped to the job's Ray namespace)."""


class Tally:
    """Counts (a Ray actor: ``ray.remote(num_cpus=0)(Tally)``)."""

    def __init__(self):
        self.ok = self.failed = self.retries = 0
        self.audio_s = 0.0
        self.first: float | None = None

    def add(self, ok: int, failed: int, audio_s: float) -> None:
        if self.first is None:
            self.first = time.time()
        self.ok += ok
        self.failed += failed
        self.audio_s += audio_s

    def add_retries(self, n: int) -> None:
        self.retries += n

    def get(self) -> dict:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "audio_s": self.audio_s,
            "first": self.first,
            "retries": self.retries,
        }


def start_tally():
    """A new tally for this run (an earlier run's, left by a crash, is replaced), on the
    driver's node: a worker node that leaves mid-run (autoscaler, spot) must not take the
    run's counts with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        ray.kill(ray.get_actor(TALLY_NAME))
    except ValueError:
        pass
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(Tally).options(name=TALLY_NAME, scheduling_strategy=here).remote()


def report_retries(n: int) -> None:
    """A :func:`hubert_ray.io.storage.on_retries` listener: a Ray worker's storage retries go
    to the run's tally as they happen (retries are rare; the driver counts its own)."""
    import ray
    from ray._private.worker import WORKER_MODE

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != WORKER_MODE:
        return
    try:
        ray.get(ray.get_actor(TALLY_NAME).add_retries.remote(n), timeout=30)
    except Exception:  # a statistic is never worth failing a task
        log.warning("could not report %d storage retries to the run's tally", n)


def line(done: dict, total: int, started: float, now: float) -> str:
    """The progress line for counts ``done`` of ``total`` segments, job started at ``started``."""
    n = done["ok"] + done["failed"]
    wall = max(now - started, 1e-9)
    text = (
        f"progress: {n:,} / {total:,} segments ({100 * n / max(total, 1):.1f} %), "
        f"{done['audio_s'] / 3600:,.2f} h audio, {done['audio_s'] / wall:,.0f}x realtime"
    )
    first = done.get("first")
    if first is not None and n and now > first:
        rate = n / (now - first)
        text += f", ETA {_clock((total - n) / rate)}"
    return text


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Reporter:
    """A driver thread logging :func:`line` every ``interval`` seconds until stopped."""

    def __init__(self, tally, total: int, interval: float = 10.0):
        self.tally, self.total, self.interval = tally, total, interval
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.report()

    def report(self) -> None:
        import ray

        try:
            done = ray.get(self.tally.get.remote(), timeout=10)
        except Exception:  # a progress line is never worth failing the job
            return
        log.info(line(done, self.total, self.started, time.time()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.report()

"""The model stage's Ray actor: async calls, bounded retries, failure isolation by bisection."""

from __future__ import annotations

import importlib
import logging
import os
import time

import pyarrow as pa
import pyarrow.compute as pc

from hubert_ray.backend import metrics
from hubert_ray.backend.context import RETRY_MARKER, RetryableStageError, trace
from hubert_ray.core.config import ModelConfig
from hubert_ray.dataset import output

log = logging.getLogger("hubert_ray")


class ModelActor:
    """The model stage as Ray runs it (and names it: ``MapBatches(ModelActor)``), around
    :class:`hubert_ray.stages.extractor.ModelStage`: an async UDF, so that Ray hands it the next
    batch while the device still computes the last one.

    Each call is launched on one thread, in call order (the device's queue), and finished on
    another (waiting for the device, checks, Arrow): the launch of call k+1 does not wait for
    call k's results. At most ``queue_depth`` calls are launched and unfinished at once, which
    bounds the memory they hold.

    A call holding more than ``call_seconds`` of audio (Ray hands an actor a number of rows
    sized on the manifest's mean segment duration) is computed as consecutive sub-calls within
    that bound, each yielded as its own output batch (an async generator UDF).

    A call that fails is retried once; if it fails again, the failure is isolated by bisection
    (:meth:`_isolate`) down to the segments that cause it, which become ``model_error`` rows
    while the rest of the call is written. A segment that kills its worker process is found the
    same way across the process's restarts (:class:`Journal`).
    """

    def __init__(
        self,
        config: ModelConfig,
        queue_depth: int = 2,
        device=None,
        call_seconds: float | None = None,
    ):
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        from hubert_ray.stages import extractor

        trace("model")
        self.faults = _fault_hooks()  # None unless a test set a hook
        if self.faults:
            self.faults.check_start()
        self.stage = extractor.ModelStage(config, device=device)
        self.journal = Journal(config.report_uri)  # one journal per output
        self._launcher = ThreadPoolExecutor(1, thread_name_prefix="launch")
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="finish")
        self._slots = asyncio.Semaphore(queue_depth)
        self.call_seconds = call_seconds  # most audio per call (None: no bound)

    async def __call__(self, batch: pa.Table):
        """One output batch per sub-call (:meth:`_sub_calls`), in order; the sub-calls are
        launched as whole calls are (at most ``queue_depth`` at once)."""
        import asyncio

        loop = asyncio.get_running_loop()
        subs = [batch.slice(a, b - a) for a, b in self._sub_calls(batch)]
        outs = await asyncio.gather(*(self._call(loop, sub) for sub in subs))
        for out in outs:
            yield out

    def _sub_calls(self, batch: pa.Table) -> list[tuple[int, int]]:
        """Row ranges of ``batch`` holding at most ``call_seconds`` of decoded audio each (a
        longer segment alone): a call of a few long segments among short ones is split."""
        from hubert_ray.core.chunking import split_by_seconds
        from hubert_ray.core.config import SAMPLE_RATE_HZ

        if not self.call_seconds or not batch.num_rows:
            return [(0, batch.num_rows)]
        samples = pc.fill_null(pc.list_value_length(batch.column("audio")), 0)
        seconds = (samples.to_numpy() / SAMPLE_RATE_HZ).tolist()
        return split_by_seconds(seconds, self.call_seconds)

    async def _call(self, loop, batch: pa.Table) -> pa.Table:
        """One (sub-)call: computed, or isolated to its failing segments."""
        forward_before = self.stage.stats["forward_s"]
        key = output.part_key(batch.column("segment_id").to_pylist())
        async with self._slots:
            if self.journal.deaths(key):  # a process died on this call before: isolate
                out = await self._run(loop, self._launcher, self._isolate, batch, key)
            else:
                self.journal.start(key)
                try:
                    launched = await self._run(loop, self._launcher, self._launch, batch)
                    out = await self._run(loop, self._finisher, self.stage.finish, launched)
                except RetryableStageError:
                    self.journal.done(key)  # it raised: the process lives
                    out = await self._run(loop, self._launcher, self._isolate, batch, key)
                self.journal.done(key)
        metrics.record_model_batch(out, self.stage.stats["forward_s"] - forward_before)
        return out

    def _launch(self, batch: pa.Table):
        if self.faults:
            self.faults.check_call()
            self.faults.check_segments(_ok_ids(batch))
        return self.stage.launch(batch)

    def _compute(self, batch: pa.Table) -> pa.Table:
        """One call, start to end, on the calling thread."""
        if self.faults:
            self.faults.check_call()
            self.faults.check_segments(_ok_ids(batch))
        return self.stage(batch)

    def _isolate(self, batch: pa.Table, key: str) -> pa.Table:
        """The call once more; if it fails again, bisect it to the segments that fail alone
        (raising, or killing the process: a sub-batch the journal saw die is split without
        being run again). Those become ``model_error`` rows and the rest is computed. When
        more than a tenth of the rows fail alone, the fault is not the segments' (a broken
        device, say): the call fails and Ray retries it."""
        from hubert_ray.core.precision import PrecisionBreach

        deterministic = (PrecisionBreach, AssertionError)
        n = batch.num_rows
        if not self.journal.deaths(key):
            self.journal.start(key)
            try:
                out = self._compute(batch)
                self.journal.done(key)
                return out
            except deterministic:
                raise
            except Exception:  # noqa: BLE001 - isolated below
                pass
        bad: dict[int, str] = {}

        def probe(rows: list[int], known: str | None = None) -> None:
            if not rows:
                return
            sub_key = output.part_key(batch.column("segment_id").take(rows).to_pylist())
            if known is not None:  # the whole call: it failed already, split it
                error = known
            elif self.journal.deaths(sub_key):
                error = "its worker process died while computing it"
            else:
                self.journal.start(sub_key)
                try:
                    self._compute(batch.take(rows))
                    error = None
                except deterministic:
                    raise
                except Exception as exc:  # noqa: BLE001 - recorded as the row's error
                    error = f"{type(exc).__name__}: {exc}"[:500]
                self.journal.done(sub_key)
            if error is None:
                return
            if len(rows) == 1:
                bad[rows[0]] = error
                return
            half = len(rows) // 2
            probe(rows[:half])
            probe(rows[half:])

        ok_rows = [i for i in range(n) if batch.column("error_reason")[i].as_py() is None]
        probe(ok_rows, known="the call failed")
        if len(bad) > max(1, n // 10):
            raise RetryableStageError(
                f"{RETRY_MARKER}: {len(bad)} of {n} segments fail alone: {next(iter(bad.values()))}"
            )
        for i, error in bad.items():
            log.warning("model stage: %s failed: %s", batch.column("segment_id")[i], error)
        out = self._compute(_mark_model_errors(batch, bad))
        self.journal.done(key)
        return out

    @staticmethod
    async def _run(loop, executor, fn, *args):
        from hubert_ray.core.precision import PrecisionBreach

        try:
            return await loop.run_in_executor(executor, fn, *args)
        except (PrecisionBreach, AssertionError, RetryableStageError):
            raise  # deterministic: retrying cannot help (exit code 3 / a bug); or retried
        except Exception as exc:
            raise RetryableStageError(f"{RETRY_MARKER}: {type(exc).__name__}: {exc}") from exc


def _fault_hooks():
    """The test hooks of :mod:`hubert_ray.testing.faults`, loaded only when a test set one in
    the environment: the product never imports the testing package otherwise."""
    if not any(k.startswith(("HUBERT_RAY_FAULT", "HUBERT_RAY_FAIL")) for k in os.environ):
        return None
    return importlib.import_module("hubert_ray.testing.faults").from_env()


def _ok_ids(batch: pa.Table) -> list[str]:
    """Segment ids of the rows the model stage computes (no upstream error)."""
    ok = batch.column("error_reason").is_null()
    return batch.column("segment_id").filter(ok).to_pylist()


def _mark_model_errors(batch: pa.Table, bad: dict[int, str]) -> pa.Table:
    """``batch`` with rows ``bad`` turned into ``model_error`` rows (their messages)."""
    from hubert_ray.core import errors
    from hubert_ray.stages.extractor import ERROR_FIELDS

    cols = {name: batch.column(name).to_pylist() for name in ERROR_FIELDS}
    for i, message in bad.items():
        cols["error_stage"][i] = errors.STAGE_MODEL
        cols["error_reason"][i] = errors.MODEL_ERROR
        cols["error_message"][i] = message
    for name, values in cols.items():
        batch = batch.set_column(
            batch.schema.get_field_index(name), name, pa.array(values, pa.string())
        )
    return batch


class Journal:
    """Which model calls were running when their process died, on this node: a file per
    call in flight (its key: the hash of its segment ids), removed when the call ends. A file
    left behind means a process died during that call; the retry then isolates it. Files
    older than a day are ignored (an earlier job on the same output)."""

    MAX_AGE_S = 86_400

    def __init__(self, scope: str):
        import hashlib
        import tempfile

        digest = hashlib.sha256(scope.encode()).hexdigest()[:16]
        self.dir = os.path.join(tempfile.gettempdir(), "hubert-ray-inflight", digest)
        os.makedirs(self.dir, exist_ok=True)

    def deaths(self, key: str) -> int:
        path = os.path.join(self.dir, key)
        try:
            if time.time() - os.path.getmtime(path) > self.MAX_AGE_S:
                return 0
            with open(path) as f:
                return sum(1 for _ in f)
        except OSError:
            return 0

    def start(self, key: str) -> None:
        with open(os.path.join(self.dir, key), "a") as f:
            f.write(f"{os.getpid()}\n")

    def done(self, key: str) -> None:
        try:
            os.remove(os.path.join(self.dir, key))
        except OSError:
            pass

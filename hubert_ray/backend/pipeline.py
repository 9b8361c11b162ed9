"""The one module that talks to Ray: wires the stages into a Ray Data pipeline and runs it.

read (segment rows, recording-ordered blocks) → DecodeStage (CPU tasks) → ModelActor (actor
pool: one model per GPU, or CPU actors) → FeatureSink (features/ and errors/ Parquet parts) →
summary pass over the written files → ``_summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from hubert_ray.backend import metrics
from hubert_ray.core.config import ExtractConfig, ModelConfig, compute_dtype, parse_layers
from hubert_ray.core.errors import ConfigError, WorkerDeathError
from hubert_ray.core.precision import effective_rate
from hubert_ray.corpus import manifest, segments
from hubert_ray.dataset import output
from hubert_ray.io import storage
from hubert_ray.model import families as models
from hubert_ray.units import centroids as units

log = logging.getLogger("hubert_ray")


# -- checks that run before any Ray work -------------------------------------------------------
def read_model_config(
    model_uri: str, storage_options: dict | None = None, allow_pickle: bool = False
) -> dict:
    """The model directory's ``config.json``, checking the weights are safetensors (or, with
    ``allow_pickle``, pickle ``.bin`` weights: loading those can run arbitrary code), that it
    names a supported model family and that the weights fit it."""
    fs, path = storage.filesystem(model_uri, storage_options)
    cfg_path = f"{path.rstrip('/')}/config.json"
    if not fs.exists(cfg_path):
        raise ConfigError(
            f"model={model_uri!r} has no config.json; expected a directory written "
            "by save_pretrained (config.json + model.safetensors)",
            field="model",
        )
    names = [os.path.basename(p) for p in fs.ls(path, detail=False)]
    weights = (".safetensors", ".bin") if allow_pickle else (".safetensors",)
    if not any(n.endswith(weights) for n in names):
        raise ConfigError(
            f"model={model_uri!r} has no *.safetensors weights (found: "
            f"{sorted(names)}); pickle-based weights are not loaded unless "
            "--allow-pickle-weights is given (they can run code when loaded)",
            field="model",
        )
    with fs.open(cfg_path, "r") as f:
        cfg = json.load(f)
    # A supported model family whose weights fit its config (hubert_ray.model.families).
    models.check_model_files(fs, path, cfg, model_uri)
    return cfg


def fp32_weight_bytes(model_uri: str, storage_options: dict | None = None) -> int:
    """Bytes of the model's parameters in float32, from the safetensors headers only."""
    fs, path = storage.filesystem(model_uri, storage_options)
    numel = 0
    for name in fs.ls(path, detail=False):
        if not name.endswith(".safetensors"):
            continue
        with fs.open(name, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for key, info in header.items():
            if key != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= dim
                numel += n
    return 4 * numel


def redacted(cfg: ExtractConfig) -> dict:
    """The run config as recorded in outputs: storage option values are never written."""
    d = cfg.to_dict()
    d["storage_options"] = sorted(d["storage_options"])
    d["units"] = list(d["units"])  # as JSON reads it back
    return d


# -- resume --------------------------------------------------------------------------------
# Resume is a home-made skip, not ``ray.data.checkpoint``: before building the dataset the
# job counts, per recording, the rows already present in ``features/`` and ``errors/`` (a
# small table, segments.DoneIndex, built by Ray tasks and left in the object store:
# pipeline.done_index); the tasks that expand the manifest's recordings
# into segments skip a recording whose rows are all there and drop, by id, the written segments
# of one partly there (read from its own part files). It is exact because (1) a part file
# appears whole or not at all (temporary name + rename locally, one upload on object storage),
# (2) each segment is exactly one row in exactly one part (the model stage is one row in, one
# row out), and (3) the skip is by id, so a part written just before a kill is simply not
# redone. Ray's checkpointing (beta) needs a Read datasource and a Write datasink, while this
# job writes through its own ``FeatureSink``; it also adds a filter actor reserving 1 CPU +
# 1 GiB that stalls small clusters (docs/design.md). ``tests/test_resume.py`` proves exactness
# with SIGKILLed runs. A finished run leaves ``_summary.json`` then ``_SUCCESS`` (completion
# markers); ``_job.json`` (the run's identity) is written before any work so a rerun with a
# different model, layers or dtype into the same output is refused instead of mixing features.
# Transient error rows (read errors) are taken out of ``errors/`` by a rerun
# (output.retry_transient_errors), so their segments count as not done and are decoded again.

_IDENTITY_OPTIONS = {
    "model": "model",
    "model_revision": "model",
    "layers": "layers",
    "dtype": "dtype",
    "compute_dtype": "dtype",
    "storage_dtype": "storage_dtype",
    "chunk_seconds": "chunk_seconds",
    "store": "store",
    "units": "units",
    "units_form": "units_form",
    "normalize": "normalize",
}


def model_fingerprint(model_uri: str, storage_options: dict | None = None) -> str:
    """Hash of the model directory's weights and configs: content for local directories (the
    same value as the feature rows' ``model_revision``), name + size + ETag on object storage."""
    import hashlib

    fs, path = storage.filesystem(model_uri, storage_options)
    digest = hashlib.sha256()
    remote = storage.is_remote(model_uri)
    for name in sorted(fs.ls(path, detail=False), key=os.path.basename):
        base = os.path.basename(name)
        if not base.endswith((".safetensors", ".json", ".bin")):
            continue
        digest.update(base.encode())
        if remote:
            info = fs.info(name)
            digest.update(f"{info.get('size')}:{info.get('ETag', '')}".encode())
        else:
            with fs.open(name, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def job_identity(
    cfg: ExtractConfig, layers, model_revision: str, codebooks: list[dict] | None = None
) -> dict:
    """What must match for a rerun to add to an existing output (``<output>/_job.json``):
    ``codebooks`` are :func:`hubert_ray.units.centroids.check_files`' description of ``--units``."""
    return {
        "format_version": 1,
        "model": cfg.model,
        "model_revision": model_revision,
        "layers": list(layers),
        "dtype": cfg.dtype,
        "storage_dtype": cfg.storage_dtype,
        "chunk_seconds": float(cfg.chunk_seconds),
        "store": cfg.stored,
        "units_form": cfg.units_form,
        "units": [{k: b[k] for k in ("layer", "k", "centroids_sha")} for b in (codebooks or [])],
    }


def _previous_identity(cfg: ExtractConfig, fs, base: str) -> dict | None:
    job_path = f"{base}/{output.JOB_FILE}"
    if fs.exists(job_path):
        with fs.open(job_path, "r") as f:
            ident = json.load(f)
        # Outputs written before the normalize option were always normalised.
        ident.setdefault("normalize", True)
        return ident
    meta = output.run_metadata(cfg.output, cfg.storage_options)  # a dataset without _job.json
    if not meta:
        return None
    old = meta.get("config", {})
    ident = {k: old[k] for k in ("model", "dtype", "storage_dtype") if k in old}
    if "chunk_seconds" in old:
        ident["chunk_seconds"] = float(old["chunk_seconds"])
    if "layers" in meta:
        ident["layers"] = list(meta["layers"])
    ident["normalize"] = meta.get("preprocessing", {}).get("normalize", True)
    return ident


def check_identity(cfg: ExtractConfig, previous: dict | None, identity: dict) -> None:
    """Refuse (ConfigError naming every difference) to add to a dataset of another run."""
    if not previous:
        return
    diffs = [
        k
        for k in _IDENTITY_OPTIONS
        if k in previous and k in identity and previous[k] != identity[k]
    ]
    if diffs:
        what = "; ".join(f"{k}: existing {previous[k]!r}, this run {identity[k]!r}" for k in diffs)
        raise ConfigError(
            f"output={cfg.output!r} holds features of a different run ({what}); resume needs "
            "the same model, layers, dtype, storage dtype, chunking and input normalisation: use "
            "another --output, "
            "or --overwrite to start over",
            field=_IDENTITY_OPTIONS[diffs[0]],
        )


def prepare_output(
    cfg: ExtractConfig, overwrite: bool, identity: dict | None = None
) -> dict | None:
    """Make ``cfg.output`` ready: with ``overwrite`` remove any dataset there; otherwise check
    an existing one is compatible (:func:`check_identity`) and return its identity. What it
    already holds is found per recording later (``segments.build_done_index``)."""
    fs, path = storage.filesystem(cfg.output, cfg.storage_options)
    base = path.rstrip("/")
    if overwrite:
        for p in (
            output.FEATURES_DIR,
            output.ERRORS_DIR,
            output.RETRIED_DIR,
            output.PRECISION_DIR,
            output.SUMMARY_FILE,
            output.SUCCESS_FILE,
            output.JOB_FILE,
            output.ACTORS_DIR,
            output.RUNS_FILE,
            MANIFEST_COPY,
            "report.html",
        ):
            if fs.exists(f"{base}/{p}"):
                fs.rm(f"{base}/{p}", recursive=True)
        return None
    previous = _previous_identity(cfg, fs, base)
    if identity is not None:
        check_identity(cfg, previous, identity)
    return previous


def write_job_file(cfg: ExtractConfig, identity: dict) -> None:
    fs, path = storage.filesystem(cfg.output, cfg.storage_options)
    if not storage.is_remote(cfg.output):
        os.makedirs(path, exist_ok=True)
    data = json.dumps(identity, indent=2).encode()
    storage.with_retries(fs.pipe_file, f"{path.rstrip('/')}/{output.JOB_FILE}", data)


def _clear_completion(cfg: ExtractConfig) -> None:
    """A run that has work to do first removes the completion markers of an earlier run."""
    fs, path = storage.filesystem(cfg.output, cfg.storage_options)
    for name in (output.SUCCESS_FILE, output.SUMMARY_FILE):
        if fs.exists(f"{path.rstrip('/')}/{name}"):
            fs.rm(f"{path.rstrip('/')}/{name}")


# -- Ray wiring ---------------------------------------------------------------------------------
_DECODERS: dict[str, object] = {}


RETRIES_COLUMN = "storage_retries"
"""Per-row count of storage retries, carried from decode through the model stage to the sink
(the retries a task or actor made, on its batch's first row), summed into the summary."""


def _with_retries_column(table: pa.Table, retries: int) -> pa.Table:
    counts = [0] * table.num_rows
    if counts:
        counts[0] = retries
    return table.append_column(RETRIES_COLUMN, pa.array(counts, pa.int64()))


TRACE_ENV = "HUBERT_RAY_TRACE_DIR"


def _trace(stage: str) -> None:
    """Test hook: with ``$HUBERT_RAY_TRACE_DIR`` set, append the Ray node id that runs this
    decode task / model actor to ``<dir>/<stage>-<pid>.txt`` (tests check placement)."""
    trace_dir = os.environ.get(TRACE_ENV)
    if trace_dir:
        import ray

        with open(os.path.join(trace_dir, f"{stage}-{os.getpid()}.txt"), "a") as f:
            f.write(ray.get_runtime_context().get_node_id() + "\n")


def _decode(batch: pa.Table, config) -> pa.Table:
    """Task UDF: one DecodeStage per worker process (keeps its last-recording cache)."""
    from hubert_ray.corpus.audio import DecodeStage

    _trace("decode")

    # The whole config, storage options included (its repr leaves them out).
    key = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    if key not in _DECODERS:
        _DECODERS.clear()
        _DECODERS[key] = DecodeStage(config)
    batch, upstream = _upstream_retries(batch)
    before = storage.retry_count()
    t0 = time.perf_counter()
    out = _DECODERS[key](batch)
    metrics.record_decode(time.perf_counter() - t0)
    return _with_retries_column(out, upstream + storage.retry_count() - before)


RETRY_MARKER = "hubert_ray: retryable model-stage failure"
"""Prefix of the error the model stage raises for a failed batch; Ray Data retries map tasks
whose error matches it (``DataContext.retried_map_errors``) up to :data:`MAX_MODEL_RETRIES`
times. A model actor whose process dies is restarted and its task retried by Ray itself, up to
:data:`MAX_PROCESS_DEATHS` times."""
MAX_MODEL_RETRIES = 3
MAX_PROCESS_DEATHS = 3
"""Retries of a decode task or model-actor call whose process died (a lost node, a crash, the
kernel's OOM killer). Ray Data's defaults retry both without end (``max_retries=-1`` for
tasks, ``max_task_retries=-1`` for actor pools), so a batch that kills its process every time
(a decoder crash on one file, a batch too large for the host's memory) would loop forever; with
this bound the job fails with an error naming the stage, keeps the parts already written, and a
rerun resumes. Actors themselves are still restarted without end (``max_restarts=-1``)."""


class RetryableStageError(RuntimeError):
    """A model-stage batch failed for a reason other than a precision breach or a broken
    invariant (e.g. a CUDA error): the batch is retried."""


def configure_retries() -> None:
    """Let Ray Data retry failed model-stage batches (bounded), on top of its actor restarts."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if ctx.retried_map_errors is not True:
        patterns = list(ctx.retried_map_errors or [])
        if RETRY_MARKER not in patterns:
            patterns.append(RETRY_MARKER)
        ctx.retried_map_errors = patterns
    ctx.max_map_retries = max(ctx.max_map_retries, MAX_MODEL_RETRIES)


def configure_scheduling() -> None:
    """Turn off Ray Data's per-operator resource reservation (unless the environment sets
    ``RAY_DATA_ENABLE_OP_RESOURCE_RESERVATION``). It reserves part of the CPUs for each
    operator, so decode tasks were held back while the cores idled and the model actor waited:
    on a simulated 1,000x device, 10 h of mixed lengths on 2 vCPUs, the steady ratio went from
    0.74 to 0.84 without it, the device busy 99.7 % of its span, the rest being padding
    (``benchmarks/simulated_device.py``; benchmarks/RESULTS.md).
    Object-store backpressure still bounds what runs ahead."""
    import ray.data

    if "RAY_DATA_ENABLE_OP_RESOURCE_RESERVATION" not in os.environ:
        ray.data.DataContext.get_current().op_resource_reservation_enabled = False


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

    The decode stage's ``storage_retries`` column passes through, plus this actor's own retries
    (copying the model from S3)."""

    def __init__(
        self,
        config: ModelConfig,
        queue_depth: int = 2,
        simulate: dict | None = None,
        call_seconds: float | None = None,
    ):
        import asyncio
        import threading
        from concurrent.futures import ThreadPoolExecutor

        from hubert_ray.stages import extractor
        from hubert_ray.testing import faults

        _trace("model")
        simulated = None
        if simulate:  # benchmarks and tests only (pipeline.run's argument)
            from hubert_ray.model.device import SimulatedDevice

            simulated = SimulatedDevice(**simulate)
        self.faults = faults.from_env()  # None unless a test set a hook
        if self.faults:
            self.faults.check_start()
        self.stage = extractor.ModelStage(config, simulated=simulated)
        self.journal = Journal(config.report_uri)  # one journal per output
        self._launcher = ThreadPoolExecutor(1, thread_name_prefix="launch")
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="finish")
        self._slots = asyncio.Semaphore(queue_depth)
        self._retries_lock = threading.Lock()
        self._retries_seen = 0  # storage retries of this process already reported
        self.call_seconds = call_seconds  # most audio per call (None: no bound)

    def _new_retries(self) -> int:
        """Storage retries this process made since the last call reported them."""
        with self._retries_lock:
            now = storage.retry_count()
            new, self._retries_seen = now - self._retries_seen, now
            return new

    async def __call__(self, batch: pa.Table):
        """One output batch per sub-call (:meth:`_sub_calls`), in order; the sub-calls are
        launched as whole calls are (at most ``queue_depth`` at once)."""
        import asyncio

        upstream = 0
        if RETRIES_COLUMN in batch.column_names:
            upstream = int(pc.sum(batch.column(RETRIES_COLUMN)).as_py() or 0)
            batch = batch.drop_columns([RETRIES_COLUMN])
        loop = asyncio.get_running_loop()
        subs = [batch.slice(a, b - a) for a, b in self._sub_calls(batch)]
        outs = await asyncio.gather(*(self._call(loop, sub) for sub in subs))
        for k, out in enumerate(outs):
            yield _with_retries_column(out, (upstream if k == 0 else 0) + self._new_retries())

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


def _make_sink(cfg: ExtractConfig, metadata: dict, tally=None):
    """The Parquet sink; ``tally``: a ``progress.Tally`` actor it reports to."""
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    class FeatureSink(Datasink):
        """Writes each block's feature rows and error rows as Parquet parts."""

        storage_retries = 0  # summed over every write's return, on the driver
        audio_seconds = 0.0  # audio of the feature rows this run wrote (idem)

        def write(self, blocks, ctx):
            before = storage.retry_count()
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            if not tables:
                return {"ok": 0, "failed": 0, RETRIES_COLUMN: 0, "audio_seconds": 0.0}
            block = pa.concat_tables(tables)
            upstream = int(pc.sum(block.column(RETRIES_COLUMN)).as_py() or 0)
            ok, bad, checks = output.split_block(block.drop_columns([RETRIES_COLUMN]))

            # Part names are keyed by the segment ids they hold, so a retried write replaces
            # its own parts. Precision parts go first: a kill between parts can then only
            # repeat a check on resume (the summary counts each check once), never lose one.
            def put(table: pa.Table, directory: str) -> None:
                output.write_part(
                    table,
                    storage.join(cfg.output, directory),
                    metadata,
                    cfg.storage_options,
                    key=output.part_key(table.column("segment_id").to_pylist()),
                )

            if checks.num_rows:
                put(checks, output.PRECISION_DIR)
            for start, length in output.part_slices(
                ok, cfg.rows_per_file, cfg.part_size_mb * 2**20
            ):
                put(ok.slice(start, length), output.FEATURES_DIR)
            if bad.num_rows:
                put(bad, output.ERRORS_DIR)
            retries = upstream + storage.retry_count() - before
            audio = float(
                pc.sum(pc.subtract(ok.column("end_s"), ok.column("start_s"))).as_py() or 0
            )
            if tally is not None:
                tally.add.remote(ok.num_rows, bad.num_rows, audio)
            return {
                "ok": ok.num_rows,
                "failed": bad.num_rows,
                RETRIES_COLUMN: retries,
                "audio_seconds": audio,
            }

        def on_write_complete(self, write_result):
            returns = [r for r in write_result.write_returns if r]
            self.storage_retries = sum(r.get(RETRIES_COLUMN, 0) for r in returns)
            self.audio_seconds = sum(r.get("audio_seconds", 0.0) for r in returns)

        @property
        def min_rows_per_write(self):
            return cfg.rows_per_file

        def get_name(self) -> str:
            return "HubertFeatures"

    return FeatureSink()


def _spilled_mib() -> float | None:
    """MiB the cluster's object store has spilled to disk so far (Ray's memory summary; other
    jobs on the same cluster count too). ``None`` if Ray cannot say."""
    import re

    try:
        import ray
        from ray._private.internal_api import memory_summary

        # this job's cluster: other Ray instances may run on the same machine
        text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    except Exception:  # a private API: never fail the job over a statistic
        return None
    found = re.search(r"Spilled (\d+) MiB", text)
    return float(found.group(1)) if found else 0.0


def _quiet_ray() -> None:
    """What Ray Data would print that does not help this job's user:

    - its progress bars count blocks and rows of every operator; this job prints its own
      progress in segments and audio hours (hubert_ray.backend.progress). Ray logs a hint on how to
      turn its bars back on once per process (``log_once``): marked as given here.
    - Ray 2.60 deprecates the extra remote args of ``map_batches`` / ``write_datasink``
      (removal planned in 2.64) but names no replacement for ``max_retries`` /
      ``max_task_retries``, which bound the retries of a process that dies
      (:data:`MAX_PROCESS_DEATHS`). The job pins Ray below 2.61, so that warning says nothing
      a user could act on."""
    import warnings

    import ray.data
    from ray.util.annotations import RayDeprecationWarning
    from ray.util.debug import log_once

    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")
    warnings.filterwarnings("ignore", message=".*ray_remote_args", category=RayDeprecationWarning)


def init_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit``), else start local Ray.

    ``address="local"`` starts a new embedded instance even when another Ray cluster runs on
    this machine: a bare ``ray.init()`` would silently join the latest one started there."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False)


@dataclass(frozen=True)
class Placement:
    """Where the model stage runs: ``pool`` actors, each on one GPU or on CPU, called with
    ``rows_per_call`` rows at a time, ``calls_per_actor`` calls in flight on each."""

    pool: int
    gpu: bool
    model_config: ModelConfig
    rows_per_call: int
    calls_per_actor: int = 1
    call_seconds: float | None = None  # most audio per actor call (its sub-calls)


# Default calls in flight per model actor: Ray fetches the next call's input and ships the
# last call's output while the model computes (Ray's own recipe for GPU actors; the model still
# runs one call at a time, so its memory does not grow). On CPU no worse than 1 in any run
# (ten decode-bound hours: 378x against 372x; docs/performance.md). Not yet measured on a GPU:
# benchmarks/gpu_run.sh times 1 and 2 side by side.
GPU_CALLS_PER_ACTOR = 2
CPU_CALLS_PER_ACTOR = 2


def plan_placement(
    cfg: ExtractConfig,
    cluster_gpus: int,
    num_layers: int = 1,
    node_cpus: int = 0,
    mean_segment_s: float | None = None,
    **model_kwargs,
) -> Placement:
    """One model actor per GPU (all of the cluster's unless ``num_gpus`` says), else CPU.

    CPU actors run ``torch_threads`` forwards at once (one torch thread each: engine.Engine),
    by default every core of a node shared among the node's actors (``node_cpus``: the largest
    node's CPUs; 0 = unknown: the reserved CPUs). Ray reserves only ``cpus_per_actor`` for
    each, so decode tasks still get scheduled next to it: while decoding runs the two share
    the cores, and once the decoding is done (the model is the slower stage on a real model)
    the model has them all.
    ``model_kwargs`` go to :meth:`ExtractConfig.model_config` (sample rate, report place)."""
    if cfg.num_gpus and cfg.num_gpus > cluster_gpus:
        raise ConfigError(
            f"num_gpus={cfg.num_gpus} but the cluster has {cluster_gpus} GPU(s)", field="num_gpus"
        )
    n_gpu = cluster_gpus if cfg.num_gpus is None else cfg.num_gpus
    rows = cfg.rows_per_call(num_layers, mean_segment_s)
    seconds = cfg.call_seconds_bound(num_layers)
    if n_gpu:
        calls = cfg.calls_per_actor or GPU_CALLS_PER_ACTOR
        model = cfg.model_config("auto", **model_kwargs)
        return Placement(n_gpu, True, model, rows, calls, seconds)
    shared = node_cpus // max(1, min(cfg.num_cpu_actors, node_cpus or 1))
    threads = cfg.torch_threads or max(1, shared, int(cfg.cpus_per_actor))
    model = cfg.model_config("cpu", num_threads=threads, **model_kwargs)
    calls = cfg.calls_per_actor or CPU_CALLS_PER_ACTOR
    return Placement(cfg.num_cpu_actors, False, model, rows, calls, seconds)


def stage_args(
    stage: str, cfg: ExtractConfig, placement: Placement, simulate: dict | None = None
) -> dict:
    """The keyword arguments of every ``map_batches`` call, in one place."""
    import ray

    if stage == "decode":
        # 1-CPU tasks, placeable on any node (CPU-only ones included). The memory reservation
        # covers a block's decoded recordings; it also keeps Ray from fusing decode into the
        # model actors (on CPU both ask for 1 CPU and would be fused, moving all decoding into
        # the model actor).
        return dict(
            fn_kwargs={"config": cfg.decode_config()},
            # whole recordings per block (input_blocks); batches within a block stay in order
            # in one worker, so a recording spanning two batches is decoded once
            batch_size=cfg.decode_batch_size,
            batch_format="pyarrow",
            num_cpus=1,
            memory=cfg.decode_memory_mb * 2**20,
            max_retries=MAX_PROCESS_DEATHS,
        )
    if stage == "model":
        resources = {"num_gpus": 1} if placement.gpu else {"num_cpus": cfg.cpus_per_actor}
        return dict(
            fn_constructor_kwargs={
                "config": placement.model_config,
                "queue_depth": cfg.queue_depth,
                "simulate": simulate,
                "call_seconds": placement.call_seconds,
            },
            compute=ray.data.ActorPoolStrategy(
                size=placement.pool, max_concurrent_calls_per_actor=placement.calls_per_actor
            ),
            batch_size=placement.rows_per_call,
            batch_format="pyarrow",
            # a process-killing segment is isolated across restarts: one death per halving
            max_task_retries=MAX_PROCESS_DEATHS + math.ceil(math.log2(placement.rows_per_call)),
            **resources,
        )
    raise ValueError(f"unknown stage {stage!r}")


# Most expanding tasks (and so input blocks) of a run: Ray's per-block overhead made 5,000
# blocks take 14.2 s on 2 CPUs, and WenetSpeech cut into 128-segment blocks would be 50,000
# (docs/performance.md). Larger corpora get larger blocks; a decode task still decodes batches
# of ``decode_batch_size`` segments.
MAX_INPUT_BLOCKS = 2_000


def _write(ds, sink) -> None:
    """Execute the dataset into ``sink`` (write tasks retried as decode tasks are); a worker
    process that died past :data:`MAX_PROCESS_DEATHS` retries becomes a
    :class:`WorkerDeathError` naming its stage."""
    from ray.exceptions import OutOfMemoryError, RayActorError, WorkerCrashedError

    try:
        ds.write_datasink(sink, ray_remote_args={"max_retries": MAX_PROCESS_DEATHS})
    except (RayActorError, WorkerCrashedError, OutOfMemoryError) as exc:
        actor = isinstance(exc, RayActorError)  # died, or unreachable while restarting
        if actor and exc.actor_init_failed:
            # The model actor's constructor raised (its model load or self-test): the cause,
            # not a process death. A precision breach goes up as it is (its own exit code).
            from hubert_ray.core.precision import BREACH_MARKER

            if BREACH_MARKER in str(exc):
                raise
            inner = getattr(exc.args[0], "cause", None) if exc.args else None
            text = f"{type(inner).__name__}: {inner}" if inner is not None else str(exc)
            raise WorkerDeathError(
                f"the model actors could not start: {text.strip().splitlines()[0][:500]}"
            ) from exc
        what = "a model-stage call" if actor else "a decode or write task"
        cause = str(exc.args[0] if exc.args else exc).strip().splitlines()
        tries = "its retries" if actor else f"{MAX_PROCESS_DEATHS + 1} tries"
        raise WorkerDeathError(
            f"{what} failed {tries} because its worker process died or became unreachable "
            "each time, on every part of it (host or GPU memory, a lost node); the "
            "parts written so far are kept and a rerun resumes. Ray: "
            f"{type(exc).__name__}: {(cause or [''])[0][:300]}"
        ) from exc


MANIFEST_COPY = "_manifest.parquet"
"""A manifest that is not a validated canonical Parquet file (JSONL, TSV, one written by hand)
is checked on the driver and written here as one, which the job's tasks then read."""


def job_manifest(cfg: ExtractConfig) -> tuple[str, dict | None, pa.Table | None]:
    """``(uri the tasks read, its footer info, segment table still to write there)``: a
    validated canonical manifest is used as it is (its footer only is read here); any other is
    read and checked on the driver (exit 2 on a problem, before any Ray work) and returned for
    :func:`hubert_ray.corpus.segments.write_validated` into the output."""
    info = segments.manifest_info(cfg.manifest, cfg.storage_options)
    if info is not None:
        return cfg.manifest, info, None
    table = manifest.read_segments(cfg.manifest, cfg.storage_options)
    return storage.join(cfg.output, MANIFEST_COPY), None, table


def _upstream_retries(batch: pa.Table) -> tuple[pa.Table, int]:
    """The batch without its ``storage_retries`` column, and that column's sum."""
    if RETRIES_COLUMN not in batch.column_names:
        return batch, 0
    n = int(pc.sum(batch.column(RETRIES_COLUMN)).as_py() or 0)
    return batch.drop_columns([RETRIES_COLUMN]), n


def _read_manifest(batch: pa.Table, uri: str, storage_options: dict) -> pa.Table:
    """Task UDF: these row groups of the canonical manifest (its recording rows), read through
    the job's storage layer so its retries are counted (Ray's own Parquet reader's are not)."""
    before = storage.retry_count()
    rows = pa.concat_tables(
        segments.read_row_group(uri, int(g), storage_options)
        for g in batch.column("row_group").to_pylist()
    )
    return _with_retries_column(rows, storage.retry_count() - before)


def manifest_blocks(cfg: ExtractConfig, manifest_uri: str, info: dict, per_block: int):
    """The manifest's recording rows (read by Ray's tasks, a row group each) in blocks of
    ``per_block`` recordings: a streaming repartition, without which a row group's task would
    give one large block (i.e. one decode task for ~50,000 segments)."""
    import ray

    groups = ray.data.from_items([{"row_group": g} for g in range(info["row_groups"])])
    return groups.map_batches(
        _read_manifest,
        fn_kwargs={"uri": manifest_uri, "storage_options": cfg.storage_options},
        batch_size=1,
        batch_format="pyarrow",
        max_retries=MAX_PROCESS_DEATHS,
    ).repartition(target_num_rows_per_block=per_block)


def _todo(batch: pa.Table, base_dir: str, index, storage_options: dict) -> pa.Table:
    """Task UDF: manifest recordings → their segments not yet in the output (the retries of
    reading the manifest and the part files ride on the first row)."""
    batch, upstream = _upstream_retries(batch)
    before = storage.retry_count()
    out = segments.todo_segments(batch, base_dir, _resolve(index), storage_options)
    return _with_retries_column(out, upstream + storage.retry_count() - before)


INDEX_PARTS_PER_TASK = 2_000
"""Part files each task of :func:`done_index` reads (25 tasks for the 50,000 parts of a
100 M-segment output)."""


def done_index(cfg: ExtractConfig):
    """``(ref, rows, storage retries)``: a :class:`hubert_ray.corpus.segments.DoneIndex` of
    ``cfg.output`` built by Ray tasks (one lists the part files, one per
    :data:`INDEX_PARTS_PER_TASK` parts reads their recording ids, one combines) and left in the
    object store, where the tasks that expand or check the manifest get it; the rows it counts;
    the storage retries its tasks made. The driver holds neither the index nor the part list
    (at 100 M segments its peak grew by ~200 MiB building them itself)."""
    import ray

    opts = cfg.storage_options
    remote = {"num_cpus": 1, "max_retries": MAX_PROCESS_DEATHS}
    files, counts = ray.remote(num_returns=2, **remote)(_list_parts).remote(cfg.output, opts)
    count, retries = ray.get(counts)
    read = ray.remote(**remote)(_index_range)
    ranges = [
        read.remote(cfg.output, files, lo, min(count, lo + INDEX_PARTS_PER_TASK), opts)
        for lo in range(0, count, INDEX_PARTS_PER_TASK)
    ]
    combine = ray.remote(num_returns=2, **remote)(_combine_index)
    index, counts = combine.remote(cfg.output, files, *ranges)
    rows, more = ray.get(counts)
    return index, rows, retries + more


def _list_parts(uri: str, storage_options: dict) -> tuple[list[str], tuple[int, int]]:
    """Task of :func:`done_index`: the part files, and (their number, storage retries)."""
    before = storage.retry_count()
    files = segments.done_part_files(uri, storage_options)
    return files, (len(files), storage.retry_count() - before)


def _index_range(uri: str, files: list, lo: int, hi: int, storage_options: dict) -> tuple:
    """Task of :func:`done_index`: parts ``lo..hi`` per recording, and the storage retries."""
    before = storage.retry_count()
    table = segments.index_parts(uri, files, lo, hi, storage_options)
    return table, storage.retry_count() - before


def _combine_index(uri: str, files: list, *ranges: tuple) -> tuple:
    """Task of :func:`done_index`: the index, and (its rows, the range tasks' retries)."""
    index = segments.combine_index(uri, files, [table for table, _ in ranges])
    return index, (index.rows, sum(n for _, n in ranges))


def summarize_output(cfg: ExtractConfig) -> tuple[dict, int]:
    """:func:`hubert_ray.dataset.output.summarize_parts` of ``cfg.output`` in a task (it lists and
    reads every part file: at 100 M segments the driver's peak grew ~40 MiB doing it itself),
    and the storage retries it made."""
    import ray

    return ray.get(
        ray.remote(num_cpus=1, max_retries=MAX_PROCESS_DEATHS)(_summarize).remote(
            cfg.output, cfg.storage_options
        )
    )


def _summarize(uri: str, storage_options: dict) -> tuple[dict, int]:
    before = storage.retry_count()
    summary = output.summarize_parts(uri, storage_options)
    return summary, storage.retry_count() - before


def mean_segment_seconds(cfg: ExtractConfig, manifest_uri: str, info: dict) -> float | None:
    """The manifest's mean segment duration from a few of its row groups (a task: a row group
    of a large manifest holds millions of segments); ``None`` when unknown (then the model's
    calls are sized by the default rows)."""
    import ray

    if cfg.batch_size:  # rows set by the user: not needed
        return None
    task = ray.remote(num_cpus=1, max_retries=MAX_PROCESS_DEATHS)(segments.mean_segment_seconds)
    return ray.get(task.remote(manifest_uri, info["row_groups"], cfg.storage_options))


def _resolve(index):
    """A done index passed to a task as an object reference (:func:`done_index`), fetched."""
    import ray

    return ray.get(index) if isinstance(index, ray.ObjectRef) else index


def recordings_per_task(cfg: ExtractConfig, info: dict) -> int:
    """Manifest recordings per expanding task: about ``decode_batch_size`` segments, more for
    very large corpora (at most :data:`MAX_INPUT_BLOCKS` tasks)."""
    per_rec = max(1.0, info["segments"] / max(1, info["recordings"]))
    rows = max(cfg.decode_batch_size, -(-info["segments"] // MAX_INPUT_BLOCKS))
    return max(1, int(round(rows / per_rec)))


def build_manifest_dataset(
    cfg: ExtractConfig,
    manifest_uri: str,
    info: dict,
    index,
    placement: Placement,
    simulate: dict | None = None,
):
    """manifest recordings (read by Ray) → segments still to do → decode → model actors."""
    ds = manifest_blocks(cfg, manifest_uri, info, recordings_per_task(cfg, info))
    ds = ds.map_batches(
        _todo,
        fn_kwargs={
            "base_dir": segments.manifest_dir(manifest_uri),
            "index": index,
            "storage_options": cfg.storage_options,
        },
        batch_size=recordings_per_task(cfg, info),
        batch_format="pyarrow",
        max_retries=MAX_PROCESS_DEATHS,
    )
    ds = ds.map_batches(_decode, **stage_args("decode", cfg, placement))
    args = stage_args("model", cfg, placement, simulate)
    return ds.map_batches(ModelActor, **args)


CHECK_TASKS = 256
"""Most tasks of the summary's check: each reads the ids of its recordings from their part
files, so fewer, larger tasks read a part shared by neighbouring recordings fewer times."""


def check_output(cfg: ExtractConfig, manifest_uri: str, info: dict) -> dict:
    """Missing, duplicated and unexpected segments of the output against the manifest, in Ray
    tasks (each reads its recordings' ids from their part files); the driver holds one row per
    recording."""
    index, _, index_retries = done_index(cfg)
    per_task = max(recordings_per_task(cfg, info), -(-info["recordings"] // CHECK_TASKS))
    counts = _check_counts(cfg, manifest_uri, index, per_task)
    import ray

    task = ray.remote(num_cpus=1, max_retries=MAX_PROCESS_DEATHS)(_unexpected)
    stray, stray_retries = ray.get(task.remote(index, manifest_uri, cfg.storage_options))
    return {
        "segments_total": counts["segments"],
        "segments_missing": counts["segments"] - counts["written"],
        "segments_duplicated": counts["duplicated"],
        "segments_unexpected": counts["unexpected"] + stray,
        RETRIES_COLUMN: counts[RETRIES_COLUMN] + index_retries + stray_retries,
    }


# Tasks the summary's check splits a manifest row group (10,000 recordings) into: each reads
# the whole row group, so more slices spread it over more CPUs at the price of reading it again.
CHECK_SLICES_PER_ROW_GROUP = 4


def _check_counts(cfg: ExtractConfig, manifest_uri: str, index, per_task: int) -> dict:
    """The summary's counts over the whole manifest: plain Ray tasks over slices of the
    manifest's row groups (at least ``per_task`` recordings each; a Ray Data pipeline for the
    same work cost seconds of start-up per run), summed as they finish; the driver holds a few
    integers per task."""
    import ray

    opts = cfg.storage_options
    task = ray.remote(num_cpus=1, max_retries=MAX_PROCESS_DEATHS)(_check_slice)
    if not isinstance(index, ray.ObjectRef):
        index = ray.put(index)  # once, not with every task
    refs = []
    for g, n in enumerate(segments.row_group_sizes(manifest_uri, opts)):
        slices = min(-(-n // per_task), CHECK_SLICES_PER_ROW_GROUP)
        size = -(-n // max(1, slices))
        refs += [
            task.remote(manifest_uri, g, lo, min(n, lo + size), index, opts)
            for lo in range(0, n, size)
        ]
    keys = ("segments", "written", "duplicated", "unexpected", RETRIES_COLUMN)
    totals = dict.fromkeys(keys, 0)
    while refs:
        done, refs = ray.wait(refs, num_returns=len(refs), timeout=1.0)
        for counts in ray.get(done):
            for k in keys:
                totals[k] += counts[k]
    return totals


def _check_slice(uri: str, group: int, lo: int, hi: int, index, storage_options: dict) -> dict:
    """Task of :func:`_check_counts`: recordings ``lo..hi`` of row group ``group``."""
    before = storage.retry_count()
    rows = segments.read_row_group(uri, group, storage_options).slice(lo, hi - lo)
    counts = segments.check_segments(rows, _resolve(index), storage_options).to_pylist()[0]
    return counts | {RETRIES_COLUMN: storage.retry_count() - before}


def _unexpected(index, manifest_uri: str, storage_options: dict) -> tuple[int, int]:
    """Task of :func:`check_output` (it reads every recording id of the manifest): rows under
    recordings the manifest lacks, and the storage retries."""
    before = storage.retry_count()
    stray = segments.unexpected_recordings(index, manifest_uri, storage_options)
    return stray, storage.retry_count() - before


def run(cfg: ExtractConfig, overwrite: bool = False, simulate: dict | None = None) -> dict:
    """Run the whole job; returns the summary (also written to ``<output>/_summary.json``).

    ``simulate``: model actors on a simulated accelerator instead of the model, the keyword
    arguments of :class:`hubert_ray.model.device.SimulatedDevice` (``{"x_realtime": R}``; benchmarks
    and tests only, no CLI or config option selects it)."""
    t_start = time.time()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start))
    driver_retries = storage.retry_count()
    manifest_uri, info, to_convert = job_manifest(cfg)
    model_json = read_model_config(cfg.model, cfg.storage_options, cfg.allow_pickle_weights)
    layers = parse_layers(cfg.layers, int(model_json.get("num_hidden_layers", 12)))
    spec, prep = models.check_run(
        cfg.model,
        cfg.storage_options,
        model_json,
        cfg.normalize,
        cfg.model_config().chunk_samples,
        cfg.dtype,
    )
    fingerprint = model_fingerprint(cfg.model, cfg.storage_options)
    codebooks = units.check_files(  # a remote model's fingerprint is not its content hash
        cfg.units,
        layers=layers,
        hidden_size=model_json.get("hidden_size"),
        model_revision=None if storage.is_remote(cfg.model) else fingerprint,
        storage_options=cfg.storage_options,
    )
    identity = job_identity(cfg, layers, fingerprint, codebooks)
    identity["normalize"] = prep.normalize
    previous = prepare_output(cfg, overwrite, identity)
    if to_convert is not None:
        if not storage.is_remote(cfg.output):
            os.makedirs(storage.filesystem(cfg.output)[1], exist_ok=True)
        segments.write_validated(to_convert, manifest_uri, cfg.storage_options)
        del to_convert
        info = segments.manifest_info(manifest_uri, cfg.storage_options)
    retried = (
        output.retry_transient_errors(cfg.output, cfg.storage_options)
        if (cfg.retry_transient and not overwrite)
        else 0
    )
    if cfg.recompute_suspect and not overwrite:
        _drop_suspect(cfg)
    import ray

    init_ray()
    _quiet_ray()
    # a reference: the index stays in the object store
    index, done_rows, index_retries = done_index(cfg)
    log.info(
        "manifest: %d recordings, %d segments (%d rows already in the output, %d transient "
        "errors retried); layers %s",
        info["recordings"],
        info["segments"],
        done_rows,
        retried,
        list(layers),
    )
    if done_rows >= info["segments"] and not retried:
        finished = finished_summary(cfg)
        if finished is not None:
            log.info("nothing to do: %s is complete", cfg.output)
            return finished

    sample_rate = effective_rate(cfg.precision_sample_rate, info["segments"])
    placement = plan_placement(
        cfg,
        int(ray.cluster_resources().get("GPU", 0)),
        len(layers),
        node_cpus=max(
            (int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0
        ),
        mean_segment_s=mean_segment_seconds(cfg, manifest_uri, info),
        sample_rate=sample_rate,
        report_uri=storage.join(cfg.output, output.ACTORS_DIR),
    )
    log.info(
        "model actors: %d on %s, %d rows per call, at most %s s of audio per call",
        placement.pool,
        "GPU" if placement.gpu else "CPU",
        placement.rows_per_call,
        "unbounded" if placement.call_seconds is None else f"{placement.call_seconds:g}",
    )
    planned = compute_dtype(cfg.dtype, placement.gpu)
    identity["compute_dtype"] = planned
    check_identity(cfg, previous, identity)
    write_job_file(cfg, identity)  # before any part file
    _clear_completion(cfg)
    runs = output.read_runs(cfg.output, cfg.storage_options) if not overwrite else []
    this_run = {"started_at": started_at, "wall_seconds": None, "audio_seconds": 0.0}
    output.write_runs(cfg.output, [*runs, this_run], cfg.storage_options)

    metadata = {
        "config": redacted(cfg),
        "layers": list(layers),
        "format_version": 1,
        "preprocessing": prep.to_dict(),
        "model_family": spec.to_dict(),
    }
    if codebooks:
        metadata["units"] = identity["units"]
    sink_retries = 0
    run_audio = 0.0
    # Wall seconds of this run's parts: before the first segment is read (manifest, Ray, the
    # done index), writing, and the summary's reads and checks.
    phases: dict[str, float] = {}
    if done_rows < info["segments"] or retried:
        configure_retries()
        configure_scheduling()
        # The decode tasks get the resolved normalisation (auto -> on / off).
        resolved = dataclasses.replace(cfg, normalize="on" if prep.normalize else "off")
        ds = build_manifest_dataset(resolved, manifest_uri, info, index, placement, simulate)
        from hubert_ray.backend.progress import Reporter, Tally

        tally = ray.remote(num_cpus=0)(Tally).remote()
        sink = _make_sink(cfg, metadata, tally)
        t_write = time.time()
        with Reporter(tally, max(0, info["segments"] - done_rows), cfg.progress_seconds):
            _write(ds, sink)
        phases["prepare"], phases["write"] = t_write - t_start, time.time() - t_write
        sink_retries = sink.storage_retries
        run_audio = sink.audio_seconds
    del index

    t_check = time.time()
    summary, summary_retries = summarize_output(cfg)
    checked = check_output(cfg, manifest_uri, info)
    check_retries = checked.pop(RETRIES_COLUMN)
    summary.update(checked)
    wall = time.time() - t_start
    phases["summary"] = time.time() - t_check
    this_run.update(
        {
            "wall_seconds": round(wall, 3),
            "audio_seconds": round(run_audio, 3),
            "segments_retried": retried,
            "x_realtime": round(run_audio / wall, 2) if wall > 0 else None,
        }
    )
    runs = [*runs, this_run]
    output.write_runs(cfg.output, runs, cfg.storage_options)
    summary.update(
        {
            # This run: the audio it wrote (not what earlier runs into this output wrote).
            "wall_seconds": round(wall, 3),
            "phase_seconds": {k: round(v, 2) for k, v in phases.items()},
            "run_audio_seconds": round(run_audio, 3),
            "x_realtime": this_run["x_realtime"],
            "runs": runs,
            "cumulative": output.runs_totals(runs),
            "recordings_total": info["recordings"],
            "layers": list(layers),
            "store": cfg.stored,
            "unit_layers": [b["layer"] for b in codebooks],
            "model_actors": placement.pool,
            "device": "gpu" if placement.gpu else "cpu",
            "config": redacted(cfg),
            # Rows an earlier, interrupted run of this job had written (not redone).
            "segments_resumed": done_rows,
            "segments_retried_this_run": retried,
            "preprocessing": prep.to_dict(),
            "model_family": spec.to_dict(),
        }
    )
    # What the actors really computed in: an "auto" GPU placement whose actor found no CUDA runs
    # float32. Rows recomputed in FP32 (fallbacks) do not count; with no other rows, the request.
    counts = summary["compute_dtype_counts"]
    reduced = [d for d in counts if d != "float32"]
    if reduced:
        compute = max(reduced, key=counts.get)
    elif counts.get("float32", 0) > summary["precision"]["fallbacks"]:
        compute = "float32"
    else:
        compute = compute_dtype(cfg.dtype, placement.gpu)
    checking = compute != "float32" and cfg.precision_sample_rate > 0
    summary["precision"].update(
        {
            "compute_dtype": compute,
            "reference_dtype": "float32",
            "sample_rate": cfg.precision_sample_rate if checking else 0.0,
            # raised for small runs: at least MIN_CHECKED_SEGMENTS (or all) are checked
            "effective_sample_rate": sample_rate if checking else 0.0,
            "warn": cfg.precision_warn,
            "limit": cfg.precision_limit,
            "on_breach": cfg.on_precision_breach,
            # The FP32 reference model exists only while sampling is on: its weights' memory
            # on each model actor's device.
            "reference_weights_bytes": (
                fp32_weight_bytes(cfg.model, cfg.storage_options) if checking else 0
            ),
        }
    )
    # Retries by the decode tasks, model actors and writers (via the sink) and by this driver.
    summary["storage_retries"] = (
        sink_retries
        + index_retries
        + summary_retries
        + check_retries
        + storage.retry_count()
        - driver_retries
    )
    summary["object_store_spilled_mib"] = _spilled_mib()
    fs, path = storage.filesystem(cfg.output, cfg.storage_options)
    # Serialised first, written in one call: never a half-written summary.
    data = json.dumps(summary, indent=2).encode()
    storage.with_retries(fs.pipe_file, f"{path.rstrip('/')}/{output.SUMMARY_FILE}", data)
    # _summary.json marks the dataset complete; _SUCCESS (empty) is the conventional marker.
    storage.with_retries(fs.pipe_file, f"{path.rstrip('/')}/{output.SUCCESS_FILE}", b"")
    _write_report(cfg, summary)
    return summary


def _drop_suspect(cfg: ExtractConfig) -> None:
    """``--recompute-suspect``: remove from the output the rows an actor wrote in its reduced
    dtype before its checks switched it to FP32, so that this run recomputes them."""
    reports = output.actor_reports(cfg.output, cfg.storage_options)
    suspect = output.suspect_segment_ids(cfg.output, reports, cfg.storage_options)
    if not len(suspect):
        log.info("recompute-suspect: no suspect segments in %s", cfg.output)
        return
    dropped = output.drop_segments(
        storage.join(cfg.output, output.FEATURES_DIR), suspect, cfg.storage_options
    )
    log.info("recompute-suspect: %d suspect segments removed, recomputing them", dropped)


def finished_summary(cfg: ExtractConfig) -> dict | None:
    """The summary of a complete dataset in ``cfg.output`` (``None`` if unfinished)."""
    fs, path = storage.filesystem(cfg.output, cfg.storage_options)
    summary_path = f"{path.rstrip('/')}/{output.SUMMARY_FILE}"
    if not fs.exists(summary_path):
        return None
    with fs.open(summary_path, "r") as f:
        return json.load(f)


def _write_report(cfg: ExtractConfig, summary: dict) -> None:
    """``<output>/report.html`` from the finished output; a failure is logged, never fatal
    (the dataset and its summary are already complete)."""
    from hubert_ray.dataset.report import write_report

    try:
        log.info("report: %s", write_report(cfg.output, summary, cfg.storage_options))
    except Exception:
        log.exception("writing %s failed", storage.join(cfg.output, "report.html"))


# -- units of an existing feature dataset (python -m jobs.kmeans assign) -----------------------
UNITS_JOB = {"kind": "units", "format_version": 1}


def _assign_parts(batch: pa.Table, km: str, out_dir: str, storage_options, device) -> pa.Table:
    """Task UDF: units of each feature part named in ``batch`` (one output part each)."""
    from hubert_ray.units import kmeans

    book = units.load(km, storage_options)
    done = [
        kmeans.assign_part(src, out_dir, book, storage_options, device)
        for src in batch.column("path").to_pylist()
    ]
    return pa.Table.from_pylist(done)


def run_assign(
    features: str,
    km: str,
    out: str,
    storage_options: dict | None = None,
    num_gpus: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write ``<out>/units/part-*.parquet`` (``segment_id``, times, ``num_frames``,
    ``units_<layer>``) for every feature part of ``features``: one Ray task per part, each
    output part named after its input part, so a rerun skips the parts already written
    (resume). Refuses (ConfigError) centroids of another model revision or hidden size, a layer
    not stored, or an ``out`` holding units of other centroids."""
    from hubert_ray.units import kmeans

    prov = units.read_provenance(km, storage_options)
    try:
        info = kmeans.dataset_info(features, int(prov["layer"]), storage_options)
    except ValueError as exc:
        raise ConfigError(str(exc), field="km") from None
    units.check_codebook(
        prov, km, model_revision=info["model_revision"], hidden_size=info["hidden_size"]
    )
    identity = {
        **UNITS_JOB,
        "features": features,
        "layer": int(prov["layer"]),
        "k": int(prov["k"]),
        "centroids_sha": prov["centroids_sha"],
        "model_revision": info["model_revision"],
    }
    fs, path = storage.filesystem(out, storage_options)
    base = path.rstrip("/")
    job_path = f"{base}/{output.JOB_FILE}"
    if overwrite:
        for name in (kmeans.UNITS_DIR, output.JOB_FILE, output.SUMMARY_FILE):
            if fs.exists(f"{base}/{name}"):
                fs.rm(f"{base}/{name}", recursive=True)
    elif fs.exists(job_path):
        with fs.open(job_path, "r") as f:
            previous = json.load(f)
        diffs = [k for k in identity if previous.get(k) != identity[k]]
        if diffs:
            what = "; ".join(f"{k}: was {previous.get(k)!r}, now {identity[k]!r}" for k in diffs)
            raise ConfigError(
                f"output={out!r} holds units of another run ({what}); use another --output or "
                "--overwrite",
                field="output",
            )
    src_dir = kmeans.features_dir(features)
    _, src = kmeans.part_files(src_dir, storage_options)
    out_dir = storage.join(out, kmeans.UNITS_DIR)
    _, written = kmeans.part_files(out_dir, storage_options)
    have = {os.path.basename(p) for p in written}
    todo = [storage.join(src_dir, os.path.basename(p)) for p in src]
    todo = [p for p in todo if os.path.basename(p) not in have]
    log.info("units: %d feature parts, %d already assigned", len(src), len(src) - len(todo))
    if not storage.is_remote(out):
        os.makedirs(path, exist_ok=True)
    storage.with_retries(fs.pipe_file, job_path, json.dumps(identity, indent=2).encode())
    if fs.exists(f"{base}/{output.SUMMARY_FILE}"):
        fs.rm(f"{base}/{output.SUMMARY_FILE}")
    t0 = time.time()
    if todo:
        import ray

        init_ray()
        _quiet_ray()
        gpu = bool(num_gpus) and int(ray.cluster_resources().get("GPU", 0)) > 0
        resources = {"num_gpus": 1} if gpu else {"num_cpus": 1}
        ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            _assign_parts,
            fn_kwargs={
                "km": km,
                "out_dir": out_dir,
                "storage_options": storage_options,
                "device": "cuda" if gpu else "cpu",
            },
            batch_size=1,
            batch_format="pyarrow",
            max_retries=MAX_PROCESS_DEATHS,
            **resources,
        )
        ds.materialize()
    table = output.read_table(out_dir, ["segment_id", "num_frames"], storage_options)
    summary = {
        **identity,
        "parts": len(src),
        "parts_resumed": len(src) - len(todo),
        "segments": table.num_rows if table is not None else 0,
        "frames": int(pc.sum(table.column("num_frames")).as_py() or 0) if table else 0,
        "wall_seconds": round(time.time() - t0, 3),
    }
    data = json.dumps(summary, indent=2).encode()
    storage.with_retries(fs.pipe_file, f"{base}/{output.SUMMARY_FILE}", data)
    return summary

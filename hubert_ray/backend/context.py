"""Ray itself: joining or starting the cluster, Ray Data's context (retries, scheduling,
progress bars), bounded retries of dying processes, and what the object store spilled."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("hubert_ray")


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


def spilled_mib() -> float | None:
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


def quiet_ray() -> None:
    """What Ray Data would print that does not help this job's user:

    - its progress bars count blocks and rows of every operator; this job prints its own
      progress in segments and audio hours (``backend.progress``). Ray logs a hint on how to
      turn its bars back on once per process (``log_once``): marked as given here.
    - when a write task cannot write the output (:class:`OutputError`), Ray Data logs the
      task's whole traceback before aborting; the job ends with one line naming the output and
      the cause instead (exit 5), so that record is dropped.
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
    _OUTPUT_FAILURE_RECORDS.seen = False  # a new run
    for name in _OutputFailureRecords.LOGGERS:
        found = logging.getLogger(name)
        if not any(isinstance(f, _OutputFailureRecords) for f in found.filters):
            found.addFilter(_OUTPUT_FAILURE_RECORDS)


class _OutputFailureRecords(logging.Filter):
    """Drops what Ray Data logs when a write task raised :class:`OutputError` (Ray's wrapper
    subclasses it): the executor's record with the task's traceback, and the records that
    follow it from ``ray.data.exceptions`` (which call it an internal error)."""

    LOGGERS = ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions")

    def __init__(self):
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        from hubert_ray.core.errors import OutputError

        if record.exc_info and isinstance(record.exc_info[1], OutputError):
            self.seen = True
        return not (self.seen and record.levelno >= logging.ERROR)


_OUTPUT_FAILURE_RECORDS = _OutputFailureRecords()


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


TRACE_ENV = "HUBERT_RAY_TRACE_DIR"


def trace(stage: str) -> None:
    """Test hook: with ``$HUBERT_RAY_TRACE_DIR`` set, append the Ray node id that runs this
    decode task / model actor to ``<dir>/<stage>-<pid>.txt`` (tests check placement)."""
    trace_dir = os.environ.get(TRACE_ENV)
    if trace_dir:
        import ray

        with open(os.path.join(trace_dir, f"{stage}-{os.getpid()}.txt"), "a") as f:
            f.write(ray.get_runtime_context().get_node_id() + "\n")

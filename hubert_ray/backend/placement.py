"""Where the model stage runs and the arguments of every ``map_batches`` call."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from hubert_ray.backend.context import MAX_PROCESS_DEATHS
from hubert_ray.core.config import ExtractConfig, ModelConfig
from hubert_ray.core.errors import ConfigError

log = logging.getLogger("hubert_ray")


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

    CPU actors run their forwards on ``torch_threads`` threads (N at once on one torch thread
    each, or one at a time on all N: whichever the engine timed faster when it started,
    model.threads), by default every core of a node shared among the node's actors
    (``node_cpus``: the largest node's CPUs; 0 = unknown: the reserved CPUs). Ray reserves
    only ``cpus_per_actor`` for each, so decode tasks still get scheduled next to it: while
    decoding runs the two share the cores, and once the decoding is done (the model is the
    slower stage on a real model) the model has them all.
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


def stage_args(stage: str, cfg: ExtractConfig, placement: Placement, device=None) -> dict:
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
        # A GPU actor reserves no CPU: Ray Data would reserve one, which the actor (waiting on
        # its GPU, 0.03-0.2 of a core of host work) leaves idle while decode tasks queue for it
        # (on 2 vCPUs, Opus steady 298x -> 488x with the slot freed; benchmarks.host_capacity).
        resources = (
            {"num_gpus": 1, "num_cpus": 0} if placement.gpu else {"num_cpus": cfg.cpus_per_actor}
        )
        return dict(
            fn_constructor_kwargs={
                "config": placement.model_config,
                "queue_depth": cfg.queue_depth,
                "device": device,
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

"""The pipeline's placement plan (no Ray: the plan is computed from the configuration).

The rest of these tests, the whole job on local Ray, are in ``tests/ray/test_pipeline.py``.
"""

from __future__ import annotations

import pytest

from hubert_ray.core.config import ExtractConfig


def test_placement_plan():
    from hubert_ray.backend import placement
    from hubert_ray.core.errors import ConfigError

    cfg = ExtractConfig(manifest="m.jsonl", model="m", output="o")
    gpu = placement.plan_placement(cfg, cluster_gpus=4)
    assert gpu.gpu and gpu.pool == 4 and gpu.model_config.device == "auto"
    cpu = placement.plan_placement(cfg, cluster_gpus=0)
    assert not cpu.gpu and cpu.pool == 1 and cpu.model_config.device == "cpu"
    two = ExtractConfig(manifest="m.jsonl", model="m", output="o", num_gpus=2)
    assert placement.plan_placement(two, cluster_gpus=4).pool == 2
    with pytest.raises(ConfigError, match="num_gpus"):
        placement.plan_placement(two, cluster_gpus=1)
    forced_cpu = ExtractConfig(manifest="m.jsonl", model="m", output="o", num_gpus=0)
    assert not placement.plan_placement(forced_cpu, cluster_gpus=4).gpu
    # rows per call: 256 for one stored layer, fewer for more layers, or as configured
    assert [placement.plan_placement(cfg, 1, n).rows_per_call for n in (1, 3, 13, 40)] == [
        256,
        85,
        19,
        16,
    ]
    fixed = ExtractConfig(manifest="m.jsonl", model="m", output="o", batch_size=7)
    assert placement.plan_placement(fixed, 1, 13).rows_per_call == 7
    # CPU actors: torch threads = the node's cores shared among its actors (unknown: the
    # reserved CPUs) unless torch_threads says
    assert cpu.model_config.num_threads == 1
    assert placement.plan_placement(cfg, 0, node_cpus=16).model_config.num_threads == 16
    four = ExtractConfig(manifest="m.jsonl", model="m", output="o", num_cpu_actors=4)
    assert placement.plan_placement(four, 0, node_cpus=16).model_config.num_threads == 4
    more = ExtractConfig(manifest="m.jsonl", model="m", output="o", cpus_per_actor=3.0)
    assert placement.plan_placement(more, 0).model_config.num_threads == 3
    given = ExtractConfig(manifest="m.jsonl", model="m", output="o", torch_threads=2)
    assert placement.plan_placement(given, 0).model_config.num_threads == 2
    # calls in flight per model actor: by device unless calls_per_actor says
    assert placement.plan_placement(cfg, 1).calls_per_actor == placement.GPU_CALLS_PER_ACTOR
    assert cpu.calls_per_actor == placement.CPU_CALLS_PER_ACTOR
    three = ExtractConfig(manifest="m.jsonl", model="m", output="o", calls_per_actor=3)
    assert placement.plan_placement(three, 1).calls_per_actor == 3
    assert placement.plan_placement(three, 0).calls_per_actor == 3
    args = placement.stage_args("model", three, placement.plan_placement(three, 0))
    assert args["compute"].max_concurrent_calls_per_actor == 3
    # a GPU actor reserves its GPU and no CPU (the decode tasks get every core); a CPU actor
    # reserves cpus_per_actor
    on_gpu = placement.stage_args("model", cfg, gpu)
    assert (on_gpu["num_gpus"], on_gpu["num_cpus"]) == (1, 0)
    assert placement.stage_args("model", cfg, cpu)["num_cpus"] == cfg.cpus_per_actor
    # torch.compile: off unless asked, then in the model actors of either device
    assert cpu.model_config.compile == gpu.model_config.compile == "none"
    compiled = ExtractConfig(manifest="m.jsonl", model="m", output="o", compile="max-autotune")
    assert placement.plan_placement(compiled, 1).model_config.compile == "max-autotune"
    with pytest.raises(ConfigError, match="compile"):
        ExtractConfig(manifest="m.jsonl", model="m", output="o", compile="yes")

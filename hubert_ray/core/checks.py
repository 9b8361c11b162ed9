"""The validation of the job's options (:class:`hubert_ray.core.config.ExtractConfig`), by role.

Each check raises :class:`ConfigError` naming the option, the value and what is allowed; they
run in a fixed order, so a config with several bad options always reports the same one.
"""

from __future__ import annotations

import math

from hubert_ray.core.options import (
    require,
    require_choice,
    require_int,
    require_positive,
    require_storage_options,
)
from hubert_ray.core.stage_config import NORMALIZE_OPTIONS, STORE_CHOICES, UNITS_FORMS


def check_options(cfg) -> None:
    """Every option of ``cfg`` (an ExtractConfig) on its own and against the others; the
    stage configs it builds check themselves (ExtractConfig.__post_init__)."""
    _units(cfg)
    _paths(cfg)
    _calls(cfg)
    _actors(cfg)
    _decode_and_output(cfg)
    require_storage_options(cfg.storage_options)


def _units(cfg) -> None:
    require(
        cfg.store is None or cfg.store in STORE_CHOICES,
        "store",
        cfg.store,
        ", ".join(STORE_CHOICES),
    )
    require(
        bool(cfg.units) or cfg.store in (None, "features"),
        "store",
        cfg.store,
        "features unless --units names centroid files",
    )
    require_choice("units_form", cfg.units_form, UNITS_FORMS)


def _paths(cfg) -> None:
    for name in ("manifest", "model", "output"):
        value = getattr(cfg, name)
        require(
            isinstance(value, str) and bool(value.strip()),
            name,
            value,
            "a non-empty local path or URL",
        )


def _calls(cfg) -> None:
    """The model-actor calls' size (rows_per_call, call_seconds_bound)."""
    require(
        cfg.call_seconds is None
        or (
            isinstance(cfg.call_seconds, (int, float))
            and not isinstance(cfg.call_seconds, bool)
            and math.isfinite(cfg.call_seconds)
            and cfg.call_seconds > 0
        ),
        "call_seconds",
        cfg.call_seconds,
        "a number of seconds > 0 (unset: 640 / stored layers, at least 40; none with batch_size)",
    )
    require(
        cfg.batch_size is None or (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1),
        "batch_size",
        cfg.batch_size,
        "an integer >= 1 (unset: call_seconds / the manifest's mean segment duration, at "
        "most 4096)",
    )


def _actors(cfg) -> None:
    """Model actors: how many, on what, and what each runs at once (plan_placement)."""
    require(
        cfg.num_gpus is None or (isinstance(cfg.num_gpus, int) and cfg.num_gpus >= 0),
        "num_gpus",
        cfg.num_gpus,
        "an integer >= 0 (0 = run the model on CPU)",
    )
    require_int("num_cpu_actors", cfg.num_cpu_actors, 1)
    require_positive("cpus_per_actor", cfg.cpus_per_actor, "a number > 0")
    require_int(
        "torch_threads",
        cfg.torch_threads,
        0,
        "an integer >= 0 (0 = the node's cores / its CPU actors, at least cpus_per_actor)",
    )
    require(
        cfg.calls_per_actor is None
        or (isinstance(cfg.calls_per_actor, int) and cfg.calls_per_actor >= 1),
        "calls_per_actor",
        cfg.calls_per_actor,
        "an integer >= 1 (unset: 2)",
    )
    require(
        isinstance(cfg.queue_depth, int) and 1 <= cfg.queue_depth <= 8,
        "queue_depth",
        cfg.queue_depth,
        "an integer from 1 to 8",
    )


def _decode_and_output(cfg) -> None:
    require_int("decode_batch_size", cfg.decode_batch_size, 1)
    require_int("decode_memory_mb", cfg.decode_memory_mb, 64, "an integer number of MiB >= 64")
    require_int("part_size_mb", cfg.part_size_mb, 1, "an integer number of MiB >= 1")
    require_positive("progress_seconds", cfg.progress_seconds, "a number of seconds > 0")
    require_int("rows_per_file", cfg.rows_per_file, 1)
    require_choice("normalize", cfg.normalize, NORMALIZE_OPTIONS)
    require(
        isinstance(cfg.retry_transient, bool),
        "retry_transient",
        cfg.retry_transient,
        "true or false",
    )

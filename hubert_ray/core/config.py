"""The job's configuration: :class:`ExtractConfig`, every option of ``hubert-ray extract``.

Each option is defined once, here (:func:`hubert_ray.core.options.option`: its help, its
default as users read it and its group); the command line, the config file's keys and the
options tables are made from these definitions. The config validates itself at construction
and raises :class:`ConfigError` naming the option, the value and what is allowed, so bad
options fail before any Ray work starts (the checks: :mod:`hubert_ray.core.checks`). The stage
configs it builds (decode, model, precision) are in :mod:`hubert_ray.core.stage_config`; the
names most callers use are importable from here too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from hubert_ray.core.checks import check_options
from hubert_ray.core.options import option
from hubert_ray.core.stage_config import (
    CALL_SECONDS,
    MAX_ROWS_PER_CALL,
    MIN_CALL_SECONDS,
    SAMPLE_RATE_HZ,
    DecodeConfig,
    ModelConfig,
    PrecisionConfig,
    compute_dtype,
    parse_layers,
    unit_files,
)

__all__ = [
    "SAMPLE_RATE_HZ",
    "DecodeConfig",
    "ExtractConfig",
    "ModelConfig",
    "PrecisionConfig",
    "compute_dtype",
    "parse_layers",
]


@dataclass(frozen=True)
class ExtractConfig:
    """The whole job. Built by ``hubert-ray extract`` from the CLI and/or a YAML/JSON file."""

    manifest: str = option(
        help="JSONL, Parquet (raw or canonical) or fairseq TSV; path or URL",
        shown="required",
        group="primary",
    )
    model: str = option(
        help="a `save_pretrained` directory with safetensors weights; path or URL",
        shown="required",
        group="primary",
    )
    output: str = option(help="output directory; path or URL", shown="required", group="primary")
    layers: str = option(
        "last",
        help="`12`, `6,9,12`, `all`; layer 0 = projected CNN features (`hidden_states[0]`)",
        shown="`last`",
        group="primary",
    )
    dtype: str = option(
        "auto",
        help="`float16` on GPU / `float32` on CPU; also `bfloat16`, `float32`, `int8` (CPU)",
        shown="`auto`",
        group="primary",
    )
    storage_dtype: str = option(
        "float16",
        help="dtype of stored features (`float16` or `float32`)",
        shown="`float16`",
        group="output",
    )
    chunk_seconds: float = option(
        10.0,
        help="segments longer than this are split into chunks (see Segments, chunks and frames)",
        shown="`10`",
        group="tuning",
    )
    # Rows (segments) per model-actor call; None = the call's audio bound over the manifest's
    # mean segment duration (rows_per_call). Larger calls pack mixed lengths with less
    # padding; the call's output grows with the layers.
    batch_size: int | None = option(
        None,
        help=(
            "segments per model-actor call; the actor packs them into micro-batches of similar "
            "lengths"
        ),
        shown="`--call-seconds` ÷ mean segment duration (≤ 4,096)",
        group="tuning",
    )
    # Audio per model-actor call: the row count Ray hands an actor is this over the manifest's
    # mean segment duration, and an actor splits a call holding more audio (a few long segments
    # among short ones) into sub-calls of at most this much (one output batch each).
    call_seconds: float | None = option(
        None,
        help=(
            "most seconds of audio per model-actor call (a longer segment is a call of its own); "
            "segments per call follow from the manifest's mean segment duration"
        ),
        shown="640 ÷ stored layers (≥ 40); none with `--batch-size`",
        group="tuning",
    )
    max_batch_samples: int = option(
        64 * 10 * SAMPLE_RATE_HZ,
        help="padded samples per forward micro-batch (64 × 10 s): bounds GPU memory",
        shown="10,240,000",
        group="tuning",
    )
    micro_batch_cost_seconds: float | None = option(
        None,
        help=(
            "cost of one forward in seconds of padded audio: the packer trades padding against "
            "forwards (see Performance)"
        ),
        shown="1 (CPU), measured (GPU)",
        group="tuning",
    )
    pad_multiple_seconds: float | None = option(
        None,
        help=(
            "pad each forward micro-batch to a multiple of this many seconds, so shapes repeat "
            "(per-shape caches such as cuDNN's plans)"
        ),
        shown="0 (CPU), 0.25 (GPU)",
        group="tuning",
    )
    # torch.compile mode of the model actors' transformer layers (ModelConfig.compile)
    compile: str = option(
        "none",
        help=(
            "`torch.compile` the model actors' transformer layers: `default`, `reduce-overhead` "
            "(CUDA graphs, one per shape), `max-autotune`, `max-autotune-no-cudagraphs`; each "
            "actor compiles once (seconds to minutes); no gain measured on CPU, not yet measured "
            "on a GPU"
        ),
        shown="`none`",
        group="tuning",
    )
    # None = every GPU in the cluster (hubert_ray.backend.placement.plan_placement)
    num_gpus: int | None = option(
        None,
        help="model actors on GPUs, one model per GPU; `0` runs the model on CPU",
        shown="all GPUs",
        group="primary",
    )
    num_cpu_actors: int = option(
        1, help="CPU model actors (when the model runs on CPU)", shown="`1`", group="primary"
    )
    cpus_per_actor: float = option(
        1.0, help="Ray CPUs each CPU model actor reserves", shown="`1`", group="tuning"
    )
    # Forwards a CPU model actor runs at once, one torch thread each (engine.Engine); 0 = the
    # node's cores shared among its CPU actors (hubert_ray.backend.placement.plan_placement).
    # More threads than reserved CPUs lends the model the cores decode tasks leave idle.
    torch_threads: int = option(
        0,
        help=(
            "threads per CPU model actor, each running its own forward on one core; they share "
            "the cores with decode tasks while decoding runs"
        ),
        shown="the node's cores ÷ its CPU actors",
        group="tuning",
    )
    # Ray tasks each model actor runs at once (ActorPoolStrategy.max_concurrent_calls_per_actor).
    # The model still runs one call at a time; another call's input fetch and output
    # serialisation overlap it. None = 2 (docs/performance.md).
    calls_per_actor: int | None = option(
        None,
        help=(
            "Ray tasks in flight per model actor: the model runs one at a time while the others' "
            "input fetch and output shipping overlap it"
        ),
        shown="2",
        group="tuning",
    )
    # Calls a model actor has launched on its device and not yet finished: the device computes
    # call k+1 while the host finishes call k. Bounds the memory of calls in flight.
    queue_depth: int = option(
        2,
        help=(
            "calls a model actor keeps launched on its device while it finishes earlier ones "
            "(bounds their memory)"
        ),
        shown="`2`",
        group="tuning",
    )
    # Segments per decode batch. The manifest's recordings are cut into input blocks of whole
    # recordings holding about max(decode_batch_size, segments / MAX_INPUT_BLOCKS = 2,000)
    # segments (hubert_ray.backend.dataset.recordings_per_task); decode tasks take this many
    # segments of a block at a time. Small tasks starve the model actor: at 16, Ray's per-task
    # overhead left a CPU actor idle 20 % of the time (docs/performance.md).
    decode_batch_size: int = option(
        128,
        help=(
            "segments per decode batch; a decode task takes a block of whole recordings, this "
            "size or larger for corpora over 256,000 segments (at most 2,000 input blocks)"
        ),
        shown="`128`",
        group="decode",
    )
    # Memory reserved per decode task: the decode streams each recording, so it is bounded by
    # a window and the segments of a batch (measured ~350 MiB per worker process for a 3 h
    # or a 44.1 kHz stereo recording, benchmarks/decode_memory.py).
    decode_memory_mb: int = option(
        1024,
        help="memory Ray reserves per decode task (its streamed recordings)",
        shown="`1024`",
        group="decode",
    )
    rows_per_file: int = option(
        2_000, help="most rows per output Parquet file", shown="`2000`", group="output"
    )
    # Upper bound on a feature part's feature values, MiB (a file of --layers all would be
    # ~5 GB at 2,000 rows): parts are cut at whichever bound comes first.
    part_size_mb: int = option(
        256,
        help="most MiB of feature values per output Parquet file (whichever bound comes first)",
        shown="`256`",
        group="output",
    )
    progress_seconds: float = option(
        10.0,
        help=(
            "a progress line (segments, audio hours, x-realtime, ETA) this often; `--quiet` turns"
            " it off"
        ),
        shown="`10`",
        group="output",
    )
    retry_transient: bool = option(
        True,
        help=(
            "a rerun retries the segments of an earlier run's transient error rows (`read_error`);"
            " `--no-retry-transient` keeps them"
        ),
        shown="on",
        group="decode",
    )
    end_tolerance_s: float = option(
        0.1,
        help="a segment ending past its audio by at most this is clipped, else an error row",
        shown="`0.1`",
        group="decode",
    )
    normalize: str = option(
        "auto",
        help=(
            "input normalisation per segment (zero mean, unit variance, as "
            "`Wav2Vec2FeatureExtractor`'s `do_normalize`): `auto` follows the model's "
            "`preprocessor_config.json` (normalise when there is none, transformers' default), "
            "`on`, `off`; part of the run's identity (see Supported models)"
        ),
        shown="`auto`",
        group="decode",
    )
    precision_sample_rate: float = option(
        0.01,
        help="fraction of segments rechecked in FP32 (see Precision assurance)",
        shown="`0.01`",
        group="precision",
    )
    precision_warn: float = option(
        0.005,
        help="relative L2 error against FP32 that logs a warning",
        shown="`0.005`",
        group="precision",
    )
    precision_limit: float = option(
        0.02,
        help="relative L2 error that triggers `--on-precision-breach` (self-test, sampled checks)",
        shown="`0.02`",
        group="precision",
    )
    on_precision_breach: str = option(
        "fallback",
        help="`fallback` (recompute in FP32), `fail` (exit 3), `warn`",
        shown="`fallback`",
        group="precision",
    )
    # Recompute the segments an escalated actor wrote in its reduced dtype before switching to
    # FP32 (the summary's precision.suspect_segments): they are removed, then redone.
    recompute_suspect: bool = option(
        False,
        help=(
            "recompute the rows an actor wrote in a reduced dtype before its checks switched it "
            "to FP32 (see Precision assurance)"
        ),
        shown="off",
        group="precision",
    )
    # Centroid files (``hubert-ray kmeans learn``), one per layer: adds units_<layer> columns.
    units: tuple[str, ...] = option(
        (),
        help=(
            "centroid file (`hubert-ray kmeans learn`) adding a `units_<layer>` column "
            "computed next to the forward; repeatable or comma-separated, one per layer (see "
            "Units)"
        ),
        shown="—",
        group="primary",
    )
    # features | units | both; unset: both with --units, else features.
    store: str | None = option(
        None,
        help=("what feature parts hold: `features`, `units` (no continuous features) or `both`"),
        shown="`features` (`both` with `--units`)",
        group="primary",
    )
    # frames: units_<layer> (one id per frame); runs: units_<layer>_dedup + _durations; both.
    units_form: str = option(
        "frames",
        help=(
            "`frames` (`units_<layer>`, one id per frame), `runs` (`units_<layer>_dedup` + "
            "`units_<layer>_durations`: run-length form) or `both`"
        ),
        shown="`frames`",
        group="output",
    )
    allow_pickle_weights: bool = option(
        False,
        help=(
            "load pickle `.bin` weights (they can run code when loaded); otherwise only safetensors"
        ),
        shown="off",
        group="primary",
    )
    # fsspec options may hold credentials: never in repr() (logs, Ray task names, errors).
    storage_options: dict = option(
        default_factory=dict,
        repr=False,
        help="fsspec options as JSON (e.g. an S3 `endpoint_url`)",
        shown="`{}`",
        group="primary",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", unit_files(self.units))
        check_options(self)
        # Validate the nested stage configs now, so errors surface at construction.
        self.decode_config()
        self.model_config()

    @property
    def stored(self) -> str:
        """What the feature parts hold: features, units or both."""
        return self.store or ("both" if self.units else "features")

    def call_seconds_bound(self, num_layers: int) -> float | None:
        """Most audio seconds per model-actor call: ``call_seconds``; else none when
        ``batch_size`` sets the rows; else :data:`CALL_SECONDS` for one stored layer, less for
        more layers (at least 40 s), as the rows were before calls were sized in audio."""
        if self.call_seconds is not None:
            return float(self.call_seconds)
        if self.batch_size:
            return None
        return max(MIN_CALL_SECONDS, CALL_SECONDS / max(1, num_layers))

    def rows_per_call(self, num_layers: int, mean_segment_s: float | None = None) -> int:
        """Model-actor batch size (rows Ray hands an actor at once): ``batch_size``; else the
        call's audio bound over the manifest's mean segment duration (``mean_segment_s``);
        without it, 256 rows for one stored layer, fewer for more layers (at least 16), so one
        call's output stays ~200 MB at 10 s rows."""
        if self.batch_size:
            return self.batch_size
        seconds = self.call_seconds_bound(num_layers)
        if mean_segment_s and mean_segment_s > 0 and seconds:
            return max(1, min(MAX_ROWS_PER_CALL, int(math.ceil(seconds / mean_segment_s))))
        return max(16, 256 // max(1, num_layers))

    def decode_config(self) -> DecodeConfig:
        """The decode stage's config; ``normalize`` as resolved by the driver (``auto`` is
        replaced with ``on`` or ``off`` before the stages are built:
        ``hubert_ray.backend.extract.preflight``)."""
        return DecodeConfig(
            end_tolerance_s=self.end_tolerance_s,
            normalize=self.normalize != "off",
            storage_options=dict(self.storage_options),
        )

    def model_config(
        self,
        device: str = "auto",
        num_threads: int = 0,
        sample_rate: float | None = None,
        report_uri: str = "",
    ) -> ModelConfig:
        return ModelConfig(
            model_uri=self.model,
            layers=self.layers,
            dtype=self.dtype,
            storage_dtype=self.storage_dtype,
            chunk_seconds=self.chunk_seconds,
            max_batch_samples=self.max_batch_samples,
            micro_batch_cost_seconds=self.micro_batch_cost_seconds,
            pad_multiple_seconds=self.pad_multiple_seconds,
            compile=self.compile,
            device=device,
            num_threads=num_threads,
            allow_pickle_weights=self.allow_pickle_weights,
            units=self.units,
            store=self.stored,
            units_form=self.units_form,
            report_uri=report_uri,
            precision=self.precision_config(sample_rate),
            storage_options=dict(self.storage_options),
        )

    def precision_config(self, sample_rate: float | None = None) -> PrecisionConfig:
        """``sample_rate``: the run's effective rate (precision.effective_rate), if known."""
        return PrecisionConfig(
            precision_sample_rate=(
                self.precision_sample_rate if sample_rate is None else sample_rate
            ),
            precision_warn=self.precision_warn,
            precision_limit=self.precision_limit,
            on_precision_breach=self.on_precision_breach,
        )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

"""Plain, frozen, validated configuration objects.

Every config validates itself in ``__post_init__`` and raises :class:`ConfigError` naming the
field, the value and what is allowed, so bad options fail before any Ray work starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from hubert_ray.core.errors import ConfigError

SAMPLE_RATE_HZ = 16_000

CALL_SECONDS = 640.0
"""Default audio seconds per model-actor call for one stored layer: the 256 rows per call
measured against 64 (docs/performance.md, packing: 1,171x against 1,014x, tiny) on the
WenetSpeech-like mix of mean 2.5 s, as seconds. More stored layers: divided among them."""
MIN_CALL_SECONDS = 40.0  # 16 rows of 2.5 s: the old floor of 16 rows
MAX_ROWS_PER_CALL = 4096
"""Rows per call however short the segments: the per-row work of a call (ids, Arrow columns,
the packer's dynamic programme) stays bounded."""
MIN_SAMPLES = 400  # HuBERT's conv frontend: fewer samples give zero frames
DTYPES = ("auto", "float16", "bfloat16", "float32", "int8")
STORAGE_DTYPES = ("float16", "float32")
# Input normalisation: auto = the checkpoint's preprocessor_config.json (hubert_ray.model.families).
NORMALIZE_OPTIONS = ("auto", "on", "off")
# torch.compile of the model actor's forward: none, or a torch.compile mode.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_LAYERS_RE = re.compile(r"^(all|last|\d+(\s*,\s*\d+)*)$")


def _require(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r} is invalid; allowed: {allowed}", field=name)


def _require_storage_options(value: Any) -> None:
    # Names the type, not the value: storage options may hold credentials.
    _require(
        isinstance(value, dict), "storage_options", type(value).__name__, "a JSON object (dict)"
    )


STORE_CHOICES = ("features", "units", "both")
UNITS_FORMS = ("frames", "runs", "both")  # one id per frame and/or run-length form


def unit_files(value: Any) -> tuple[str, ...]:
    """Centroid files from a list and/or comma-separated strings (``--units a,b --units c``)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    _require(
        all(isinstance(v, str) for v in items),
        "units",
        value,
        "centroid file paths or URLs (a list, or comma-separated)",
    )
    return tuple(p.strip() for v in items for p in v.split(",") if p.strip())


def compute_dtype(dtype: str, gpu: bool) -> str:
    """The dtype ``dtype`` means on a GPU or a CPU: ``auto`` is float16 on GPUs, float32 on
    CPUs (the one place this default lives)."""
    if dtype != "auto":
        return dtype
    return "float16" if gpu else "float32"


def parse_layers(spec: str, num_hidden_layers: int) -> tuple[int, ...]:
    """Resolve a layer spec (``"12"``, ``"6,9,12"``, ``"all"``, ``"last"``) to sorted indices.

    Layer 0 is the projected CNN features before the first transformer layer
    (transformers' ``hidden_states[0]``); layer k is the output of transformer layer k.
    """
    spec = spec.strip().lower()
    if spec == "all":
        return tuple(range(num_hidden_layers + 1))
    if spec == "last":
        return (num_hidden_layers,)
    layers = sorted({int(p) for p in spec.split(",")})
    bad = [k for k in layers if k > num_hidden_layers]
    if bad:
        raise ConfigError(
            f"layers={spec!r} asks for layer(s) {bad}, but the model has "
            f"{num_hidden_layers} transformer layers; "
            f"allowed: 0..{num_hidden_layers}, 'all', 'last'",
            field="layers",
        )
    return tuple(layers)


@dataclass(frozen=True)
class DecodeConfig:
    """CPU decode stage: fsspec open → soundfile decode → mono → soxr → cut → normalise."""

    sample_rate_hz: int = SAMPLE_RATE_HZ
    min_samples: int = MIN_SAMPLES
    # A segment ending past the end of its audio by at most this much is clipped to the end;
    # further out it is an error row (segment_out_of_range).
    end_tolerance_s: float = 0.1
    # Zero mean / unit variance per segment (Wav2Vec2FeatureExtractor's do_normalize): the
    # setting resolved on the driver from the normalize option and the checkpoint.
    normalize: bool = True
    # fsspec options may hold credentials: never in repr() (logs, Ray task names, errors).
    storage_options: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        _require(isinstance(self.normalize, bool), "normalize", self.normalize, "true, false")
        _require(
            self.sample_rate_hz == SAMPLE_RATE_HZ,
            "sample_rate_hz",
            self.sample_rate_hz,
            f"{SAMPLE_RATE_HZ} (HuBERT is trained on 16 kHz audio)",
        )
        _require(
            self.min_samples >= MIN_SAMPLES,
            "min_samples",
            self.min_samples,
            f"an integer >= {MIN_SAMPLES}",
        )
        _require(
            0 <= self.end_tolerance_s <= 5,
            "end_tolerance_s",
            self.end_tolerance_s,
            "a number of seconds in [0, 5]",
        )
        _require_storage_options(self.storage_options)


@dataclass(frozen=True)
class PrecisionConfig:
    """Sampled FP32 rechecks and what to do when reduced precision strays too far."""

    precision_sample_rate: float = 0.01  # fraction of segments recomputed in FP32
    precision_warn: float = 0.005  # relative L2 error that logs a warning (the seed's 0.5 %)
    precision_limit: float = 0.02  # relative L2 error that triggers on_precision_breach
    on_precision_breach: str = "fallback"  # fallback (recompute in FP32) | fail | warn

    def __post_init__(self) -> None:
        _require(
            isinstance(self.precision_sample_rate, (int, float))
            and 0 <= self.precision_sample_rate <= 1,
            "precision_sample_rate",
            self.precision_sample_rate,
            "a fraction in [0, 1] (0 = no checks, 1 = check every segment)",
        )
        for name in ("precision_warn", "precision_limit"):
            value = getattr(self, name)
            _require(
                isinstance(value, (int, float)) and value > 0,
                name,
                value,
                "a relative error > 0, e.g. 0.005",
            )
        _require(
            self.precision_limit >= self.precision_warn,
            "precision_limit",
            self.precision_limit,
            f">= precision_warn ({self.precision_warn})",
        )
        _require(
            self.on_precision_breach in ("fallback", "fail", "warn"),
            "on_precision_breach",
            self.on_precision_breach,
            "fallback, fail, warn",
        )


@dataclass(frozen=True)
class ModelConfig:
    """Model stage: one model per actor, exact padded batching, chunking, dtype."""

    model_uri: str
    layers: str = "last"
    dtype: str = "auto"  # auto = float16 on CUDA, float32 on CPU
    storage_dtype: str = "float16"
    chunk_seconds: float = 10.0
    # Upper bound on padded samples in one forward micro-batch (rows x longest chunk).
    max_batch_samples: int = 64 * 10 * SAMPLE_RATE_HZ
    # Fixed cost of one forward micro-batch in seconds of padded audio: the packer trades
    # padding against micro-batch count (see chunking.pack_micro_batches). None = by device:
    # 1 s on CPU (measured best of 0/1/4/16 s at 256 rows per call); on a GPU each model actor
    # measures it (engine.ForwardCost).
    micro_batch_cost_seconds: float | None = None
    # Micro-batches are padded to a multiple of this many seconds (0 = to the longest item):
    # fewer distinct shapes for per-shape caches (cuDNN plans). None = by device: 0 on CPU,
    # 0.25 s on GPU (not yet measured there; benchmarks/gpu_run.sh sweeps it).
    pad_multiple_seconds: float | None = None
    # torch.compile the transformer layers (model.ExactEncoder.compile_layers): none or a
    # torch.compile mode. Off by default: each actor pays the compiles and needs a C++ compiler
    # (CPU) or Triton (GPU); no faster on CPU (docs/performance.md), not yet measured on a
    # GPU, where fusing the layers' elementwise work is what it is for.
    compile: str = "none"
    device: str = "auto"  # auto | cuda | cpu
    # CPU: forwards at once, one torch thread each (engine.Engine); 0 = the process's CPUs
    num_threads: int = 0
    # Pickle-based weights (pytorch_model.bin) can run code when loaded: refused unless set.
    allow_pickle_weights: bool = False
    # Centroid files (units.centroids): units_<layer> columns computed next to the forward.
    units: tuple[str, ...] = ()
    store: str = "features"  # features | units | both: which columns the stage emits
    units_form: str = "frames"  # frames | runs | both (UNITS_FORMS)
    # Where the actor writes its precision record (<output>/actors); empty: nowhere.
    report_uri: str = ""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    # fsspec options may hold credentials: never in repr() (logs, Ray task names, errors).
    storage_options: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        _require(
            isinstance(self.model_uri, str) and bool(self.model_uri),
            "model",
            self.model_uri,
            "a local path or URL of a transformers model directory",
        )
        _require(
            isinstance(self.layers, str) and bool(_LAYERS_RE.match(self.layers.strip().lower())),
            "layers",
            self.layers,
            "'all', 'last', or comma-separated layer indices like 6,9,12",
        )
        _require(self.dtype in DTYPES, "dtype", self.dtype, ", ".join(DTYPES))
        _require(
            self.storage_dtype in STORAGE_DTYPES,
            "storage_dtype",
            self.storage_dtype,
            ", ".join(STORAGE_DTYPES),
        )
        _require(
            isinstance(self.chunk_seconds, (int, float))
            and self.chunk_seconds * SAMPLE_RATE_HZ >= MIN_SAMPLES,
            "chunk_seconds",
            self.chunk_seconds,
            f"a number of seconds >= {MIN_SAMPLES / SAMPLE_RATE_HZ}",
        )
        _require(
            isinstance(self.max_batch_samples, int)
            and self.max_batch_samples >= self.chunk_samples,
            "max_batch_samples",
            self.max_batch_samples,
            f"an integer >= one chunk ({self.chunk_samples} samples)",
        )
        _require(
            self.micro_batch_cost_seconds is None
            or (
                isinstance(self.micro_batch_cost_seconds, (int, float))
                and self.micro_batch_cost_seconds >= 0
            ),
            "micro_batch_cost_seconds",
            self.micro_batch_cost_seconds,
            "a number of seconds >= 0 (unset: by device)",
        )
        _require(
            self.pad_multiple_seconds is None
            or (
                isinstance(self.pad_multiple_seconds, (int, float))
                and 0 <= self.pad_multiple_seconds <= self.chunk_seconds
            ),
            "pad_multiple_seconds",
            self.pad_multiple_seconds,
            "a number of seconds from 0 to chunk_seconds (unset: by device)",
        )
        _require(self.compile in COMPILE_MODES, "compile", self.compile, ", ".join(COMPILE_MODES))
        _require(self.device in ("auto", "cuda", "cpu"), "device", self.device, "auto, cuda, cpu")
        _require(self.store in STORE_CHOICES, "store", self.store, ", ".join(STORE_CHOICES))
        _require(
            self.units_form in UNITS_FORMS, "units_form", self.units_form, ", ".join(UNITS_FORMS)
        )
        _require(
            isinstance(self.num_threads, int) and self.num_threads >= 0,
            "num_threads",
            self.num_threads,
            "an integer >= 0",
        )

    @property
    def chunk_samples(self) -> int:
        return int(round(self.chunk_seconds * SAMPLE_RATE_HZ))


def option(default=dataclasses.MISSING, *, help: str, shown: str, **kwargs):
    """A job option: a dataclass field whose ``help`` (what it does) and ``shown`` (its default
    as users read it) make the command line (``jobs.extract``), the config file's keys and the
    README's options table: one definition per option."""
    return field(default=default, metadata={"help": help, "shown": shown}, **kwargs)


@dataclass(frozen=True)
class ExtractConfig:
    """The whole job. Built by ``jobs.extract`` from the CLI and/or a YAML/JSON file."""

    manifest: str = option(
        help="JSONL, Parquet (raw or canonical) or fairseq TSV; path or URL", shown="required"
    )
    model: str = option(
        help="a `save_pretrained` directory with safetensors weights; path or URL", shown="required"
    )
    output: str = option(help="output directory; path or URL", shown="required")
    layers: str = option(
        "last",
        help="`12`, `6,9,12`, `all`; layer 0 = projected CNN features (`hidden_states[0]`)",
        shown="`last`",
    )
    dtype: str = option(
        "auto",
        help="`float16` on GPU / `float32` on CPU; also `bfloat16`, `float32`, `int8` (CPU)",
        shown="`auto`",
    )
    storage_dtype: str = option(
        "float16", help="dtype of stored features (`float16` or `float32`)", shown="`float16`"
    )
    chunk_seconds: float = option(
        10.0, help="segments longer than this are split into chunks (see below)", shown="`10`"
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
    )
    max_batch_samples: int = option(
        64 * 10 * SAMPLE_RATE_HZ,
        help="padded samples per forward micro-batch (64 × 10 s): bounds GPU memory",
        shown="10,240,000",
    )
    # None: 1 s on CPU, measured on GPU
    micro_batch_cost_seconds: float | None = option(
        None,
        help=(
            "cost of one forward in seconds of padded audio: the packer trades padding against "
            "forwards (see Performance)"
        ),
        shown="1 (CPU), measured (GPU)",
    )
    # None: 0 on CPU, 0.25 s on GPU
    pad_multiple_seconds: float | None = option(
        None,
        help=(
            "pad each forward micro-batch to a multiple of this many seconds, so shapes repeat "
            "(per-shape caches such as cuDNN's plans)"
        ),
        shown="0 (CPU), 0.25 (GPU)",
    )
    # torch.compile mode of the model actors' forward (ModelConfig)
    compile: str = option(
        "none",
        help=(
            "`torch.compile` the model actors' transformer layers: `default`, `reduce-overhead` "
            "(CUDA graphs, one per shape), `max-autotune`, `max-autotune-no-cudagraphs`; each "
            "actor compiles once (seconds to minutes); no gain measured on CPU, not yet measured "
            "on a GPU"
        ),
        shown="`none`",
    )
    # model actors on GPUs; None = every GPU in the cluster, 0 = CPU
    num_gpus: int | None = option(
        None,
        help="model actors on GPUs, one model per GPU; `0` runs the model on CPU",
        shown="all GPUs",
    )
    # model actors when running on CPU
    num_cpu_actors: int = option(
        1, help="CPU model actors (when the model runs on CPU)", shown="`1`"
    )
    # Ray CPUs reserved per CPU model actor
    cpus_per_actor: float = option(1.0, help="Ray CPUs each CPU model actor reserves", shown="`1`")
    # Forwards a CPU model actor runs at once, one torch thread each (engine.Engine); 0 = the
    # node's cores shared among its CPU actors (pipeline.plan_placement). More threads than
    # reserved CPUs lends the model the cores decode tasks leave idle.
    torch_threads: int = option(
        0,
        help=(
            "threads per CPU model actor, each running its own forward on one core; they share "
            "the cores with decode tasks while decoding runs"
        ),
        shown="the node's cores ÷ its CPU actors",
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
    )
    # Segments per decode batch; a decode task gets a block of whole recordings of this size
    # (larger for very large corpora, see pipeline.input_blocks). Small tasks starve the model
    # actor: at 16, Ray's per-task overhead left a CPU actor idle 20 % of the time
    # (docs/performance.md).
    decode_batch_size: int = option(
        128,
        help=(
            "segments per decode batch; a decode task takes a block of whole recordings, this "
            "size or larger for corpora over 256,000 segments (at most 2,000 input blocks)"
        ),
        shown="`128`",
    )
    # Memory reserved per decode task: the decode streams each recording, so it is bounded by
    # a window and the segments of a batch (measured ~350 MiB per worker process for a 3 h
    # or a 44.1 kHz stereo recording, benchmarks/decode_memory.py).
    decode_memory_mb: int = option(
        1024, help="memory Ray reserves per decode task (its streamed recordings)", shown="`1024`"
    )
    # upper bound on rows per output Parquet file
    rows_per_file: int = option(2_000, help="most rows per output Parquet file", shown="`2000`")
    # Upper bound on a feature part's feature values, MiB (a file of --layers all would be
    # ~5 GB at 2,000 rows): parts are cut at whichever bound comes first.
    part_size_mb: int = option(
        256,
        help="most MiB of feature values per output Parquet file (whichever bound comes first)",
        shown="`256`",
    )
    # a progress line (segments, audio hours, ETA) this often
    progress_seconds: float = option(
        10.0,
        help=(
            "a progress line (segments, audio hours, x-realtime, ETA) this often; `--quiet` turns"
            " it off"
        ),
        shown="`10`",
    )
    # A rerun decodes again the segments whose error rows are transient (read errors); False
    # keeps them as errors (permanent errors are never retried).
    retry_transient: bool = option(
        True,
        help=(
            "a rerun retries the segments of an earlier run's transient error rows (`read_error`);"
            " `--no-retry-transient` keeps them"
        ),
        shown="on",
    )
    end_tolerance_s: float = option(
        0.1,
        help="a segment ending past its audio by at most this is clipped, else an error row",
        shown="`0.1`",
    )
    # Input normalisation: auto = the checkpoint's preprocessor_config.json do_normalize
    # (normalise when it has none, as Wav2Vec2FeatureExtractor does), on, off.
    normalize: str = option(
        "auto",
        help=(
            "input normalisation per segment (zero mean, unit variance, as "
            "`Wav2Vec2FeatureExtractor`'s `do_normalize`): `auto` follows the model's "
            "`preprocessor_config.json` (normalise when there is none, transformers' default), "
            "`on`, `off`; part of the run's identity (see Supported models)"
        ),
        shown="`auto`",
    )
    precision_sample_rate: float = option(
        0.01,
        help="fraction of segments rechecked in FP32 (see Precision assurance)",
        shown="`0.01`",
    )
    precision_warn: float = option(
        0.005, help="relative L2 error against FP32 that logs a warning", shown="`0.005`"
    )
    precision_limit: float = option(
        0.02,
        help="relative L2 error that triggers `--on-precision-breach` (self-test, sampled checks)",
        shown="`0.02`",
    )
    on_precision_breach: str = option(
        "fallback",
        help="`fallback` (recompute in FP32), `fail` (exit 3), `warn`",
        shown="`fallback`",
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
    )
    # Centroid files (``jobs.kmeans learn``), one per layer: adds units_<layer> columns.
    units: tuple[str, ...] = option(
        (),
        help=(
            "centroid file (`python -m jobs.kmeans learn`) adding a `units_<layer>` column "
            "computed next to the forward; repeatable or comma-separated, one per layer (see "
            "Units)"
        ),
        shown="—",
    )
    # features | units | both; unset: both with --units, else features.
    store: str | None = option(
        None,
        help=("what feature parts hold: `features`, `units` (no continuous features) or `both`"),
        shown="`features` (`both` with `--units`)",
    )
    # frames: units_<layer> (one id per frame); runs: units_<layer>_dedup + _durations; both.
    units_form: str = option(
        "frames",
        help=(
            "`frames` (`units_<layer>`, one id per frame), `runs` (`units_<layer>_dedup` + "
            "`units_<layer>_durations`: run-length form) or `both`"
        ),
        shown="`frames`",
    )
    # load pickle (.bin) weights; they can run code
    allow_pickle_weights: bool = option(
        False,
        help=(
            "load pickle `.bin` weights (they can run code when loaded); otherwise only safetensors"
        ),
        shown="off",
    )
    # fsspec options may hold credentials: never in repr() (logs, Ray task names, errors).
    storage_options: dict = option(
        default_factory=dict,
        repr=False,
        help="fsspec options as JSON (e.g. an S3 `endpoint_url`)",
        shown="`{}`",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", unit_files(self.units))
        _require(
            self.store is None or self.store in STORE_CHOICES,
            "store",
            self.store,
            ", ".join(STORE_CHOICES),
        )
        _require(
            bool(self.units) or self.store in (None, "features"),
            "store",
            self.store,
            "features unless --units names centroid files",
        )
        _require(
            self.units_form in UNITS_FORMS, "units_form", self.units_form, ", ".join(UNITS_FORMS)
        )
        for name in ("manifest", "model", "output"):
            value = getattr(self, name)
            _require(
                isinstance(value, str) and bool(value.strip()),
                name,
                value,
                "a non-empty local path or URL",
            )
        _require(
            self.call_seconds is None
            or (
                isinstance(self.call_seconds, (int, float))
                and not isinstance(self.call_seconds, bool)
                and math.isfinite(self.call_seconds)
                and self.call_seconds > 0
            ),
            "call_seconds",
            self.call_seconds,
            "a number of seconds > 0 (unset: 640 // stored layers, at least 40)",
        )
        _require(
            self.batch_size is None or (isinstance(self.batch_size, int) and self.batch_size >= 1),
            "batch_size",
            self.batch_size,
            "an integer >= 1 (unset: 256 // stored layers)",
        )
        _require(
            self.num_gpus is None or (isinstance(self.num_gpus, int) and self.num_gpus >= 0),
            "num_gpus",
            self.num_gpus,
            "an integer >= 0 (0 = run the model on CPU)",
        )
        _require(
            isinstance(self.num_cpu_actors, int) and self.num_cpu_actors >= 1,
            "num_cpu_actors",
            self.num_cpu_actors,
            "an integer >= 1",
        )
        _require(
            isinstance(self.cpus_per_actor, (int, float)) and self.cpus_per_actor > 0,
            "cpus_per_actor",
            self.cpus_per_actor,
            "a number > 0",
        )
        _require(
            isinstance(self.torch_threads, int) and self.torch_threads >= 0,
            "torch_threads",
            self.torch_threads,
            "an integer >= 0 (0 = cpus_per_actor)",
        )
        _require(
            self.calls_per_actor is None
            or (isinstance(self.calls_per_actor, int) and self.calls_per_actor >= 1),
            "calls_per_actor",
            self.calls_per_actor,
            "an integer >= 1 (unset: 2 on GPU, 1 on CPU)",
        )
        _require(
            isinstance(self.queue_depth, int) and 1 <= self.queue_depth <= 8,
            "queue_depth",
            self.queue_depth,
            "an integer from 1 to 8",
        )
        _require(
            isinstance(self.decode_batch_size, int) and self.decode_batch_size >= 1,
            "decode_batch_size",
            self.decode_batch_size,
            "an integer >= 1",
        )
        _require(
            isinstance(self.decode_memory_mb, int) and self.decode_memory_mb >= 64,
            "decode_memory_mb",
            self.decode_memory_mb,
            "an integer number of MiB >= 64",
        )
        _require(
            isinstance(self.part_size_mb, int) and self.part_size_mb >= 1,
            "part_size_mb",
            self.part_size_mb,
            "an integer number of MiB >= 1",
        )
        _require(
            isinstance(self.progress_seconds, (int, float)) and self.progress_seconds > 0,
            "progress_seconds",
            self.progress_seconds,
            "a number of seconds > 0",
        )
        _require(
            isinstance(self.rows_per_file, int) and self.rows_per_file >= 1,
            "rows_per_file",
            self.rows_per_file,
            "an integer >= 1",
        )
        _require(
            self.normalize in NORMALIZE_OPTIONS,
            "normalize",
            self.normalize,
            ", ".join(NORMALIZE_OPTIONS),
        )
        _require(
            isinstance(self.retry_transient, bool),
            "retry_transient",
            self.retry_transient,
            "true or false",
        )
        _require_storage_options(self.storage_options)
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
        replaced with ``on`` or ``off`` before the stages are built: pipeline.run)."""
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

"""The stage configs: plain, frozen, validated settings of the decode and model stages.

Built from the job's options (:class:`hubert_ray.core.config.ExtractConfig`) on the driver and
shipped to the stages. Every config validates itself in ``__post_init__`` and raises
:class:`ConfigError` naming the field, the value and what is allowed, so bad options fail
before any Ray work starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hubert_ray.core.errors import ConfigError
from hubert_ray.core.options import require, require_storage_options

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
STORE_CHOICES = ("features", "units", "both")
UNITS_FORMS = ("frames", "runs", "both")  # one id per frame and/or run-length form


def unit_files(value: Any) -> tuple[str, ...]:
    """Centroid files from a list and/or comma-separated strings (``--units a,b --units c``)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    require(
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
        require(isinstance(self.normalize, bool), "normalize", self.normalize, "true, false")
        require(
            self.sample_rate_hz == SAMPLE_RATE_HZ,
            "sample_rate_hz",
            self.sample_rate_hz,
            f"{SAMPLE_RATE_HZ} (HuBERT is trained on 16 kHz audio)",
        )
        require(
            self.min_samples >= MIN_SAMPLES,
            "min_samples",
            self.min_samples,
            f"an integer >= {MIN_SAMPLES}",
        )
        require(
            0 <= self.end_tolerance_s <= 5,
            "end_tolerance_s",
            self.end_tolerance_s,
            "a number of seconds in [0, 5]",
        )
        require_storage_options(self.storage_options)


@dataclass(frozen=True)
class PrecisionConfig:
    """Sampled FP32 rechecks and what to do when reduced precision strays too far."""

    precision_sample_rate: float = 0.01  # fraction of segments recomputed in FP32
    precision_warn: float = 0.005  # relative L2 error that logs a warning (the seed's 0.5 %)
    precision_limit: float = 0.02  # relative L2 error that triggers on_precision_breach
    on_precision_breach: str = "fallback"  # fallback (recompute in FP32) | fail | warn

    def __post_init__(self) -> None:
        require(
            isinstance(self.precision_sample_rate, (int, float))
            and 0 <= self.precision_sample_rate <= 1,
            "precision_sample_rate",
            self.precision_sample_rate,
            "a fraction in [0, 1] (0 = no checks, 1 = check every segment)",
        )
        for name in ("precision_warn", "precision_limit"):
            value = getattr(self, name)
            require(
                isinstance(value, (int, float)) and value > 0,
                name,
                value,
                "a relative error > 0, e.g. 0.005",
            )
        require(
            self.precision_limit >= self.precision_warn,
            "precision_limit",
            self.precision_limit,
            f">= precision_warn ({self.precision_warn})",
        )
        require(
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
    # measures it (hubert_ray.model.cost.ForwardCost).
    micro_batch_cost_seconds: float | None = None
    # Micro-batches are padded to a multiple of this many seconds (0 = to the longest item):
    # fewer distinct shapes for per-shape caches (cuDNN plans). None = by device: 0 on CPU,
    # 0.25 s on GPU (not yet measured there; benchmarks/gpu_run.sh sweeps it).
    pad_multiple_seconds: float | None = None
    # torch.compile the transformer layers (hubert_ray.model.encoder.ExactEncoder.compile_layers):
    # none or a torch.compile mode. Off by default: each actor pays the compiles and needs a C++
    # compiler (CPU) or Triton (GPU); no faster on CPU (docs/performance.md), not yet measured
    # on a GPU, where fusing the layers' elementwise work is what it is for.
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
        require(
            isinstance(self.model_uri, str) and bool(self.model_uri),
            "model",
            self.model_uri,
            "a local path or URL of a transformers model directory",
        )
        require(
            isinstance(self.layers, str) and bool(_LAYERS_RE.match(self.layers.strip().lower())),
            "layers",
            self.layers,
            "'all', 'last', or comma-separated layer indices like 6,9,12",
        )
        require(self.dtype in DTYPES, "dtype", self.dtype, ", ".join(DTYPES))
        require(
            self.storage_dtype in STORAGE_DTYPES,
            "storage_dtype",
            self.storage_dtype,
            ", ".join(STORAGE_DTYPES),
        )
        require(
            isinstance(self.chunk_seconds, (int, float))
            and self.chunk_seconds * SAMPLE_RATE_HZ >= MIN_SAMPLES,
            "chunk_seconds",
            self.chunk_seconds,
            f"a number of seconds >= {MIN_SAMPLES / SAMPLE_RATE_HZ}",
        )
        require(
            isinstance(self.max_batch_samples, int)
            and self.max_batch_samples >= self.chunk_samples,
            "max_batch_samples",
            self.max_batch_samples,
            f"an integer >= one chunk ({self.chunk_samples} samples)",
        )
        require(
            self.micro_batch_cost_seconds is None
            or (
                isinstance(self.micro_batch_cost_seconds, (int, float))
                and self.micro_batch_cost_seconds >= 0
            ),
            "micro_batch_cost_seconds",
            self.micro_batch_cost_seconds,
            "a number of seconds >= 0 (unset: by device)",
        )
        require(
            self.pad_multiple_seconds is None
            or (
                isinstance(self.pad_multiple_seconds, (int, float))
                and 0 <= self.pad_multiple_seconds <= self.chunk_seconds
            ),
            "pad_multiple_seconds",
            self.pad_multiple_seconds,
            "a number of seconds from 0 to chunk_seconds (unset: by device)",
        )
        require(self.compile in COMPILE_MODES, "compile", self.compile, ", ".join(COMPILE_MODES))
        require(self.device in ("auto", "cuda", "cpu"), "device", self.device, "auto, cuda, cpu")
        require(self.store in STORE_CHOICES, "store", self.store, ", ".join(STORE_CHOICES))
        require(
            self.units_form in UNITS_FORMS, "units_form", self.units_form, ", ".join(UNITS_FORMS)
        )
        require(
            isinstance(self.num_threads, int) and self.num_threads >= 0,
            "num_threads",
            self.num_threads,
            "an integer >= 0",
        )

    @property
    def chunk_samples(self) -> int:
        return int(round(self.chunk_seconds * SAMPLE_RATE_HZ))

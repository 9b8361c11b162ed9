"""The model families this job runs and the checkpoint's own preprocessing, checked from the
model directory's files before any Ray work (pure: no torch or Ray at import; only
:func:`expected_shapes` imports torch and transformers, to build the model on the meta device).

Supported (``config.json``'s ``model_type``): ``hubert``, ``wav2vec2``, ``wavlm``,
``data2vec-audio``, each with the group-norm or layer-norm conv frontend and, where the family
has one, the stable-layer-norm (pre-LN) encoder. :class:`hubert_ray.model.encoder.ExactEncoder` runs
each of them with exact padded batching. Anything else is refused with a message naming the
file and field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from hubert_ray.core.chunking import Geometry
from hubert_ray.core.errors import ConfigError
from hubert_ray.core.stage_config import NORMALIZE_OPTIONS, SAMPLE_RATE_HZ

# model_type -> transformers class
FAMILIES: dict[str, str] = {
    "hubert": "HubertModel",
    "wav2vec2": "Wav2Vec2Model",
    "wavlm": "WavLMModel",
    "data2vec-audio": "Data2VecAudioModel",
}
# Why some neighbouring model types are refused (the message names the reason).
REFUSED_WHY: dict[str, str] = {
    "wav2vec2-conformer": "its conformer blocks' depthwise convolutions (and batch norm) run "
    "over time inside every layer, so padded frames would need masking there: not implemented",
    "wav2vec2-bert": "its input is log-mel features (SeamlessM4TFeatureExtractor), not raw "
    "16 kHz samples",
    "whisper": "an encoder-decoder on log-mel features, not a wav2vec2-style encoder",
    "sew": "it squeezes the frame sequence (pooling over time), which padding would change",
    "sew-d": "it squeezes the frame sequence (pooling over time), which padding would change",
    "unispeech": "not implemented or tested here",
    "unispeech-sat": "not implemented or tested here",
}
# Families whose transformers encoder has a stable-layer-norm (pre-LN) variant.
STABLE_LAYER_NORM = ("hubert", "wav2vec2", "wavlm")
# transformers' defaults (the same for every family above).
DEFAULT_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
DEFAULT_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)
PREPROCESSOR_FILE = "preprocessor_config.json"
# Wav2Vec2FeatureExtractor's default: a checkpoint without preprocessor_config.json is
# normalised (zero mean, unit variance per segment), as transformers' own extractor would.
DEFAULT_NORMALIZE = True


@dataclass(frozen=True)
class ModelSpec:
    """What the job needs to know about a checkpoint, from its ``config.json``."""

    model_type: str
    class_name: str
    feat_extract_norm: str  # group | layer
    stable_layer_norm: bool
    geometry: Geometry
    num_hidden_layers: int
    hidden_size: int

    @property
    def variant(self) -> str:
        encoder = "stable-layer-norm (pre-LN)" if self.stable_layer_norm else "post-LN"
        return f"{self.feat_extract_norm}-norm frontend, {encoder} encoder"

    def to_dict(self) -> dict:
        """As recorded in the summary and the part metadata: what ``num_frames`` counts."""
        hop = self.geometry.hop
        return {
            "model_type": self.model_type,
            "variant": self.variant,
            "frame_hop_samples": hop,
            "receptive_field_samples": self.geometry.receptive_field,
            "frame_rate_hz": SAMPLE_RATE_HZ / hop,
        }


def _int_list(cfg: dict, key: str, default, where: str) -> tuple[int, ...]:
    value = cfg.get(key, default)
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise ConfigError(f"{where}: {key}={value!r} is invalid; expected positive integers")
    return tuple(value)


def model_spec(cfg: dict, where: str = "config.json") -> ModelSpec:
    """Check a model's ``config.json`` (``cfg``, read from ``where``) names a supported family
    and variant; raise :class:`ConfigError` (field ``model``) naming the file and field."""

    def refuse(message: str):
        raise ConfigError(f"{where}: {message}", field="model")

    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        why = f" ({REFUSED_WHY[model_type]})" if model_type in REFUSED_WHY else ""
        refuse(
            f"model_type={model_type!r} is not supported{why}; supported: "
            f"{', '.join(FAMILIES)} (transformers {', '.join(FAMILIES.values())})"
        )
    if model_type == "data2vec-audio":
        norm = "layer"  # every conv layer has a LayerNorm over channels
    else:
        norm = cfg.get("feat_extract_norm", "group")
        if norm not in ("group", "layer"):
            refuse(f"feat_extract_norm={norm!r} is invalid; allowed: 'group', 'layer'")
    stable = bool(cfg.get("do_stable_layer_norm", False)) and model_type in STABLE_LAYER_NORM
    try:
        kernels = _int_list(cfg, "conv_kernel", DEFAULT_CONV_KERNEL, where)
        strides = _int_list(cfg, "conv_stride", DEFAULT_CONV_STRIDE, where)
    except ConfigError as exc:
        raise ConfigError(str(exc), field="model") from None
    if len(kernels) != len(strides):
        refuse(
            f"conv_kernel has {len(kernels)} layers but conv_stride has {len(strides)}; "
            "they must match"
        )
    conv_dim = cfg.get("conv_dim")
    if conv_dim is not None and (
        not isinstance(conv_dim, (list, tuple)) or len(conv_dim) != len(kernels)
    ):
        refuse(f"conv_dim={conv_dim!r} must list one width per conv layer ({len(kernels)})")
    for key in ("num_hidden_layers", "hidden_size"):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            refuse(f"{key}={value!r} is invalid; expected a positive integer")
    return ModelSpec(
        model_type=model_type,
        class_name=FAMILIES[model_type],
        feat_extract_norm=norm,
        stable_layer_norm=stable,
        geometry=Geometry.from_convs(kernels, strides),
        num_hidden_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
    )


def check_chunking(spec: ModelSpec, chunk_samples: int) -> None:
    """A chunk must hold at least one frame of the model's frontend."""
    rf = spec.geometry.receptive_field
    if chunk_samples < rf:
        raise ConfigError(
            f"chunk_seconds={chunk_samples / SAMPLE_RATE_HZ:g} is shorter than one frame of "
            f"this model ({rf} samples = {rf / SAMPLE_RATE_HZ:g} s of receptive field)",
            field="chunk_seconds",
        )


# -- weights ---------------------------------------------------------------------------------
_LEGACY_NAMES = (
    (re.compile(r"\.weight_g$"), ".parametrizations.weight.original0"),
    (re.compile(r"\.weight_v$"), ".parametrizations.weight.original1"),
)
# Parameters a checkpoint may lack without changing the features (training-time only).
_OPTIONAL = re.compile(r"(^|\.)masked_spec_embed$")


def expected_shapes(cfg: dict, spec: ModelSpec) -> tuple[dict[str, list[int]], str]:
    """Tensor names and shapes the transformers model of ``cfg`` has (built on the meta
    device: no memory, no weights), and its base-model prefix."""
    import torch
    import transformers

    cls = getattr(transformers, spec.class_name)
    config = cls.config_class.from_dict(cfg)
    with torch.device("meta"):
        model = cls(config)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return shapes, cls.base_model_prefix


def check_weights(
    cfg: dict, spec: ModelSpec, found: dict[str, list[int]], where: str = "model.safetensors"
) -> None:
    """Refuse weights (``found``: tensor name -> shape, from the safetensors headers in
    ``where``) that do not fit the model ``config.json`` describes: missing tensors, tensors of
    another shape, or base-model tensors the config's model does not have (transformers would
    load such weights with a warning, leaving missing tensors random and dropping extra ones)."""
    expected, prefix = expected_shapes(cfg, spec)
    got: dict[str, list[int]] = {}
    for name, shape in found.items():
        if name.startswith(prefix + "."):
            name = name[len(prefix) + 1 :]
        for pattern, new in _LEGACY_NAMES:
            name = pattern.sub(new, name)
        got[name] = list(shape)
    missing = sorted(k for k in expected if k not in got and not _OPTIONAL.search(k))
    wrong = sorted(k for k in expected if k in got and got[k] != expected[k])
    # Tensors of the base model that this config's model does not have (e.g. layer norms of a
    # layer-norm frontend under feat_extract_norm="group", conv biases under conv_bias=false):
    # transformers would drop them. Those of a task head (lm_head, projector, quantizer, ...)
    # lie outside the base model and are not loaded anyway.
    modules = {k.split(".", 1)[0] for k in expected}
    extra = sorted(k for k in got if k not in expected and k.split(".", 1)[0] in modules)
    if not missing and not wrong and not extra:
        return
    sizes = ", ".join(
        f"{k}={cfg.get(k)!r}"
        for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "conv_dim")
        if k in cfg
    )
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} tensor(s) have another shape than config.json implies, e.g. "
            f"{k!r} is {got[k]} in the weights, {expected[k]} for config.json"
        )
    if missing:
        layers = sorted({int(m) for m in re.findall(r"layers\.(\d+)\.", " ".join(missing))})
        hint = ""
        if layers and all(k.startswith("encoder.layers.") for k in missing):
            hint = f" (transformer layers {layers[0]}..{layers[-1]}: check num_hidden_layers)"
        parts.append(f"{len(missing)} tensor(s) are missing, e.g. {missing[0]!r}{hint}")
    if extra:
        parts.append(
            f"{len(extra)} tensor(s) are not part of the model config.json describes, "
            f"e.g. {extra[0]!r}"
        )
    raise ConfigError(
        f"{where}: the weights do not match config.json ({sizes}): {'; '.join(parts)}",
        field="model",
    )


def safetensors_shapes(fs, paths: list[str], where=str) -> dict[str, list[int]]:
    """Tensor name -> shape from the headers of safetensors files (a few KiB read each); a
    header that does not parse, or data that the file is too short to hold (a truncated copy
    or upload), raises :class:`ConfigError` naming the file (``where(path)``)."""
    shapes: dict[str, list[int]] = {}
    for name in paths:
        file_size = fs.size(name)
        with fs.open(name, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            try:
                if size > file_size - 8:
                    raise ValueError(f"a {size}-byte header in a {file_size}-byte file")
                header = json.loads(f.read(size))
                tensors = {k: v for k, v in header.items() if k != "__metadata__"}
                end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
                shapes.update({k: list(v["shape"]) for k, v in tensors.items()})
            except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
                raise ConfigError(
                    f"{where(name)}: not a readable safetensors file ({exc})", field="model"
                ) from None
        if 8 + size + end > file_size:
            raise ConfigError(
                f"{where(name)}: truncated: its header describes {8 + size + end} bytes, the "
                f"file has {file_size}",
                field="model",
            )
    return shapes


# -- preprocessing ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocessing:
    """The input normalisation a run uses and where that came from."""

    normalize: bool
    option: str  # the normalize option: auto | on | off
    source: str  # preprocessor_config.json | default (no preprocessor_config.json) | option

    def to_dict(self) -> dict:
        return {"normalize": self.normalize, "option": self.option, "source": self.source}


def resolve_preprocessing(option: str, preprocessor: dict | None, where: str) -> Preprocessing:
    """Check the checkpoint's ``preprocessor_config.json`` (``preprocessor``, read from
    ``where``; ``None`` when absent) and resolve the ``normalize`` option: ``auto`` follows
    its ``do_normalize`` (Wav2Vec2FeatureExtractor's default, normalise, when the file or
    the field is absent); ``on`` / ``off`` override it."""
    if option not in NORMALIZE_OPTIONS:
        raise ConfigError(
            f"normalize={option!r} is invalid; allowed: {', '.join(NORMALIZE_OPTIONS)}",
            field="normalize",
        )
    do_normalize = DEFAULT_NORMALIZE
    source = f"default (no {PREPROCESSOR_FILE})"
    if preprocessor is not None:

        def refuse(message: str):
            raise ConfigError(f"{where}: {message}", field="model")

        if not isinstance(preprocessor, dict):
            refuse("expected a JSON object")
        kind = preprocessor.get("feature_extractor_type")
        if kind is not None and kind != "Wav2Vec2FeatureExtractor":
            refuse(
                f"feature_extractor_type={kind!r} is not supported; this job computes "
                "Wav2Vec2FeatureExtractor's input (raw 16 kHz samples, optionally normalised)"
            )
        rate = preprocessor.get("sampling_rate", SAMPLE_RATE_HZ)
        if rate != SAMPLE_RATE_HZ:
            refuse(
                f"sampling_rate={rate!r}: the model expects audio at that rate, but this job "
                f"feeds {SAMPLE_RATE_HZ} Hz audio"
            )
        size = preprocessor.get("feature_size", 1)
        if size != 1:
            refuse(f"feature_size={size!r} is not supported; expected 1 (mono raw samples)")
        value = preprocessor.get("do_normalize", DEFAULT_NORMALIZE)
        if not isinstance(value, bool):
            refuse(f"do_normalize={value!r} is invalid; expected true or false")
        do_normalize = value
        source = PREPROCESSOR_FILE
    if option == "auto":
        return Preprocessing(do_normalize, option, source)
    return Preprocessing(option == "on", option, "option")


def read_preprocessor(fs, model_path: str) -> tuple[dict | None, str]:
    """The model directory's ``preprocessor_config.json`` (``None`` if absent) and its path."""
    path = f"{model_path.rstrip('/')}/{PREPROCESSOR_FILE}"
    if not fs.exists(path):
        return None, path
    with fs.open(path, "r") as f:
        try:
            return json.load(f), path
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc.msg})", field="model") from None


# -- the driver's checks ----------------------------------------------------------------------
def check_model_files(fs, path: str, cfg: dict, model_uri: str) -> ModelSpec:
    """``config.json`` names a supported family and variant, and the safetensors weights fit
    it (pickle-only weights are not inspected: reading them means unpickling)."""
    base = model_uri.rstrip("/")
    spec = model_spec(cfg, f"{base}/config.json")
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".safetensors"))
    if files:

        def where(p: str) -> str:
            return f"{base}/{p.rsplit('/', 1)[-1]}"

        shapes = safetensors_shapes(fs, files, where)
        check_weights(cfg, spec, shapes, ", ".join(where(p) for p in files))
    return spec


def check_run(
    model_uri: str,
    storage_options: dict | None,
    cfg: dict,
    normalize: str,
    chunk_samples: int,
    dtype: str,
) -> tuple[ModelSpec, Preprocessing]:
    """The per-run checks on the driver, before any Ray work: the model's geometry against
    the chunking, the dtype against the family, and the checkpoint's preprocessing. Returns
    the model's spec and the preprocessing (the ``normalize`` option resolved)."""
    from hubert_ray.io import storage

    spec = model_spec(cfg, f"{model_uri.rstrip('/')}/config.json")
    check_chunking(spec, chunk_samples)
    if dtype == "int8" and spec.model_type == "wavlm":
        raise ConfigError(
            "dtype='int8' is not supported for WavLM (its attention reads the projection "
            "weights directly, which dynamic quantisation replaces); use float32 on CPU",
            field="dtype",
        )
    fs, path = storage.filesystem(model_uri, storage_options)
    preprocessor, where = read_preprocessor(fs, path)
    if preprocessor is not None:
        where = f"{model_uri.rstrip('/')}/{PREPROCESSOR_FILE}"
    return spec, resolve_preprocessing(normalize, preprocessor, where)

"""Forward pass of the wav2vec2 family (HuBERT, wav2vec2, WavLM, data2vec-audio) with exact
padded batching (imports torch; load it only in actors/tests).

Why this exists: HuBERT-base's first conv layer normalises with GroupNorm over *time*, so zero
padding changes every output frame of a padded item (the reason the model card says "no attention
mask" and fairseq's dumper runs batch 1). :class:`ExactEncoder` makes a padded batch give the
same features as each item run alone, for every supported family and variant:

1. group-norm frontends: first-layer GroupNorm statistics are computed over each item's valid
   conv frames only (the stock fused kernel, which accumulates in float32 for float16/bfloat16
   inputs); layer-norm frontends (large / stable-layer-norm models, data2vec-audio) normalise
   each time step over its channels, with no statistics over time: nothing to mask;
2. the conv layers have no padding, so a valid frame only sees valid samples (padded frames,
   non-zero after a conv with bias, are never read by a valid one);
3. padded frames are zeroed before the positional convolution, and before each of
   data2vec-audio's stacked positional convolutions (and after HuBERT's optional positional
   batch norm): an item run alone sees zeros there, the convolution's own zero padding;
4. the transformer gets an attention mask over the padded frames (WavLM: its key padding mask;
   its relative position bias depends only on the distance between two frames).

Layer numbering follows transformers' ``hidden_states``: layer 0 is the input of the first
transformer layer, layer k the output of transformer layer k. For post-LN encoders (base
models, data2vec-audio) layer 0 is after the encoder's layer norm; for stable-layer-norm
encoders (HuBERT/wav2vec2/WavLM large) layer 0 is the projected features plus positional
embedding with no layer norm, and the last layer is the last transformer layer's output
*before* the encoder's final layer norm (``last_hidden_state`` is after it).
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import nn

from hubert_ray.core.chunking import Geometry

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def conv_output_lengths(lengths: list[int], kernel: int, stride: int) -> list[int]:
    return [max((n - kernel) // stride + 1, 0) for n in lengths]


def masked_group_norm(h: torch.Tensor, lengths: list[int], norm: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm over ``h`` [B, C, T] (in place) using only the first ``lengths[b]`` time steps
    of item b for its statistics, as if each item ran alone. Padded steps are zeroed; no valid
    output frame of the later (unpadded) convs reads them.

    The same ~25 operators whatever the batch size, 5 of them passes over the activation (one
    stock call per item took 3 operators each: 192 launches for 64 items; measured by
    ``benchmarks/group_norm.py``): padded steps are zeroed in place, so the
    per-(item, group) sums over the padded width are sums over the valid steps; sum and sum
    of squares are accumulated in float32 (as the stock kernel does for float16/bfloat16
    inputs), and the affine normalisation is one in-place multiply-add (float32 arithmetic
    on CUDA). No float32 copy of the activation (the largest of the model) is made. The
    lengths are host integers, copied without waiting for the device."""
    import torch.nn.functional as F

    b, c, t = h.shape
    if all(n == t for n in lengths):
        return F.group_norm(h, norm.num_groups, norm.weight, norm.bias, norm.eps)
    g = norm.num_groups
    valid = to_device(torch.tensor([max(n, 0) for n in lengths]), h.device)
    keep = (torch.arange(t, device=h.device) < valid[:, None]).to(h.dtype)[:, None, None, :]
    grouped = h.view(b, g, c // g, t)
    grouped.mul_(keep)  # (twice as fast as masked_fill_ on CPU)
    count = (valid * (c // g)).clamp(min=1)[:, None]
    mean = grouped.sum((2, 3), dtype=torch.float32) / count  # [B, G]
    sq = torch.linalg.vector_norm(grouped, dim=(2, 3), dtype=torch.float32).square() / count
    rstd = torch.rsqrt((sq - mean.square()).clamp(min=0) + norm.eps)
    scale = rstd[:, :, None] * norm.weight.float().view(g, -1)  # [B, G, C / G]
    shift = (norm.bias.float().view(g, -1) - mean[:, :, None] * scale)[..., None]
    scale = scale[..., None]
    if h.dtype == torch.float32 or h.is_cuda:  # float32 arithmetic, one rounding
        torch.addcmul(shift, grouped, scale, out=grouped)
    else:  # (a CPU kernel would first copy a reduced-dtype h to float32)
        grouped.mul_(scale.to(h.dtype)).add_(shift.to(h.dtype))
    grouped.mul_(keep)
    return h


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for the device's queued work (a
    pageable host-to-CUDA copy synchronises the stream; a pinned one does not)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def input_dtype(net) -> torch.dtype:
    """The dtype a model's input is cast to: its parameters' (float32 for an int8 model)."""
    param = next(net.parameters())
    return param.dtype if param.dtype.is_floating_point else torch.float32


def _masked(h: torch.Tensor, keep: torch.Tensor | None, time_dim: int) -> torch.Tensor:
    """``h`` with the padded frames (``keep`` [B, T] False) zeroed; ``time_dim``: 1 for
    [B, T, C], 2 for [B, C, T]."""
    if keep is None:
        return h
    return h.masked_fill(~(keep[..., None] if time_dim == 1 else keep[:, None, :]), 0.0)


class ExactEncoder(nn.Module):
    """Wraps a transformers ``HubertModel``, ``Wav2Vec2Model``, ``WavLMModel`` or
    ``Data2VecAudioModel`` for exact padded batches.

    ``forward(x, lengths, layers)`` returns ``{layer: [B, F, H]}`` and the valid frame counts;
    layers are numbered as transformers' ``hidden_states`` (see the module docstring).
    Layers above the highest requested one are not computed. ``geometry``: the conv
    frontend's receptive field and hop (from the config).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        self.model_type = getattr(self.config, "model_type", "hubert")
        encoder = model.encoder
        # Pre-LN encoder (HubertEncoderStableLayerNorm, ...): its layer norm comes last.
        self.stable = "StableLayerNorm" in type(encoder).__name__
        self.wavlm = self.model_type == "wavlm"
        # The positional convolution's weights and arithmetic in float32 (positional_conv_fp32)
        self.pos_conv_fp32 = False
        convs = list(model.feature_extractor.conv_layers)
        # The first conv layer of a group-norm frontend normalises over time: per item, above.
        self._time_norm = None
        if isinstance(getattr(convs[0], "layer_norm", None), nn.GroupNorm):
            self._time_norm, convs = convs[0], convs[1:]
        if any(isinstance(m, nn.GroupNorm) for c in convs for m in c.modules()):
            raise ValueError("a GroupNorm after the first conv layer is not supported")
        if any(isinstance(m, (nn.BatchNorm1d, nn.InstanceNorm1d)) for m in model.modules()) and (
            self.model_type != "hubert"
        ):
            raise ValueError(f"{self.model_type}: unexpected batch/instance norm layer")
        self._convs = tuple(convs)  # (not registered twice)
        self.geometry = Geometry.from_convs(self.config.conv_kernel, self.config.conv_stride)
        self.compiled = None

    def compile_layers(self, mode: str) -> None:
        """``torch.compile`` the transformer layers (``mode``: ``default``, ``reduce-overhead``
        = CUDA graphs, ``max-autotune``, ...). Only those: their graphs settle after a few
        shapes (batch size 1, 2, then dynamic; with and without a padding mask: 5 graphs over
        a stream of mixed-length batches), while compiling the strided convolutions recompiles
        for every power-of-two range of lengths (cuDNN's backend choice guards on sizes) and
        hits dynamo's recompile limit. ``reduce-overhead`` records a CUDA graph per distinct
        shape (see ``pad_multiple_seconds``)."""
        self._layers = torch.compile(self._layers, mode=None if mode == "default" else mode)
        self.compiled = mode

    @property
    def num_hidden_layers(self) -> int:
        return self.config.num_hidden_layers

    def _feature_lengths(self, lengths: list[int]) -> list[int]:
        for k, s in zip(self.config.conv_kernel, self.config.conv_stride, strict=True):
            lengths = conv_output_lengths(lengths, k, s)
        return lengths

    def _positional(self, h: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The encoder's positional embedding of ``h`` [B, F, C] (padded frames already
        zero), with padded frames zeroed again wherever a stock layer would make them
        non-zero before a convolution reads them; in float32 when ``pos_conv_fp32``."""
        if self.pos_conv_fp32:
            return self._positional_in(h.float(), keep).to(h.dtype)
        return self._positional_in(h, keep)

    def _positional_in(self, h: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        pos = self.model.encoder.pos_conv_embed
        if hasattr(pos, "layers"):  # data2vec-audio: stacked conv layers
            p = h.transpose(1, 2)
            for i, layer in enumerate(pos.layers):
                p = layer(p if i == 0 else _masked(p, keep, 2))
            return p.transpose(1, 2)
        if getattr(pos, "batch_norm", None) is not None:  # HuBERT conv_pos_batch_norm
            p = _masked(pos.batch_norm(h.transpose(1, 2)), keep, 2)
            p = pos.activation(pos.padding(pos.conv(p)))
            return p.transpose(1, 2)
        return pos(h)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, lengths, layers: tuple[int, ...]):
        """``lengths``: valid samples per item, host integers (a list) or a tensor (read back
        to the host: on CUDA pass a list, so that launching the forward never waits for the
        device). Returns ``{layer: [B, F, H]}`` and the valid frames per item (a CPU tensor)."""
        from transformers.masking_utils import create_bidirectional_mask

        if isinstance(lengths, torch.Tensor):
            lengths = lengths.tolist()
        lengths = [int(n) for n in lengths]
        h = x[:, None, :]
        if self._time_norm is not None:
            first = self._time_norm
            l0 = conv_output_lengths(
                lengths, self.config.conv_kernel[0], self.config.conv_stride[0]
            )
            # The largest activations of the model (512 channels at 3,200 frames per second):
            # never three of them alive at once (the conv output is freed once normalised).
            h = masked_group_norm(first.conv(h), l0, first.layer_norm)
            h = first.activation(h)
        frame_lengths = self._feature_lengths(lengths)
        t = self._feature_lengths([x.shape[1]])[0]  # frames of the padded width
        frame_mask = attn_mask = None
        if any(n < t for n in frame_lengths):
            valid = to_device(torch.tensor(frame_lengths), h.device)
            frame_mask = torch.arange(t, device=h.device)[None, :] < valid[:, None]
            if self.wavlm:  # WavLM's attention takes the [B, F] mask (its key padding mask)
                attn_mask = frame_mask
            else:
                # Padded, so the mask can never be skipped: no check of its values (reading
                # them back would wait for the device).
                attn_mask = create_bidirectional_mask(
                    config=self.config,
                    inputs_embeds=torch.empty((h.shape[0], t, 0), dtype=h.dtype, device=h.device),
                    attention_mask=frame_mask,
                    allow_is_bidirectional_skip=False,
                )
        for conv in self._convs:
            h = conv(h)
        h = self.model.feature_projection(h.transpose(1, 2))  # [B, F, C]
        if isinstance(h, tuple):  # (hidden, normed extract features)
            h = h[0]
        h = _masked(h, frame_mask, 1)
        encoder = self.model.encoder
        h = h + self._positional(h, frame_mask)
        if not self.stable:
            h = encoder.layer_norm(h)
        return self._layers(h, attn_mask, tuple(sorted(layers))), torch.tensor(frame_lengths)

    def _layers(self, h, attn_mask, layers: tuple[int, ...]) -> dict:
        """The transformer layers up to the highest requested one (what :meth:`compile_layers`
        compiles). Returns the requested ones; 0 is their input."""
        out = {0: h} if 0 in layers else {}
        position_bias = None
        for i, layer in enumerate(self.model.encoder.layers[: max(layers)], start=1):
            if self.wavlm:
                kwargs = {} if self.stable else {"index": i - 1}
                h, position_bias = layer(
                    h, attention_mask=attn_mask, position_bias=position_bias, **kwargs
                )
            else:
                h = layer(h, attention_mask=attn_mask)
                if isinstance(h, tuple):
                    h = h[0]
            if i in layers:
                out[i] = h
        return out


def model_revision(model_dir: str) -> str:
    """Short content hash of the weights and config, recorded with every feature row."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name.endswith((".safetensors", ".json", ".bin")):
            digest.update(name.encode())
            with open(os.path.join(model_dir, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def num_hidden_layers(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return int(json.load(f).get("num_hidden_layers", 12))


def model_name(model_dir: str) -> str:
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    name = cfg.get("_name_or_path") or ""
    return name if name and not os.path.isabs(name) else os.path.basename(model_dir.rstrip("/"))


class Fp32(nn.Module):
    """Runs ``module`` in float32 whatever the model's dtype; input and output keep theirs."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float()).to(x.dtype)


def keep_layer_norms_fp32(model: nn.Module) -> int:
    """Wrap every ``nn.LayerNorm`` of ``model`` in :class:`Fp32` (as fairseq does for FP16);
    returns how many. (The first conv layer's GroupNorm accumulates in float32 already: see
    masked_group_norm.)"""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.LayerNorm)
    ]
    for parent, name, child in targets:
        setattr(parent, name, Fp32(child))
    return len(targets)


def freeze_weight_norms(model: nn.Module) -> int:
    """Replace every weight-normalised weight of ``model`` (the positional convolution's:
    ``weight = g * v / ||v||``, a parametrization torch recomputes at every forward) by its
    value, computed once, by torch's own operator on one thread; returns how many.

    Recomputed per forward, the norm is a parallel reduction whose rounding depends on the
    number of torch threads running it, so the same micro-batch gave different features on one
    thread and on two (the CPU engine runs either: :mod:`hubert_ray.model.threads`). Computed
    once on one thread, it is the value a one-thread forward computes (the same features as
    before it was frozen), whatever the threads, and the recomputation is saved."""
    from torch.nn.utils import parametrize

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    frozen = 0
    try:
        with torch.no_grad():
            for module in list(model.modules()):
                norms = getattr(getattr(module, "parametrizations", None), "weight", None)
                if norms is not None and len(norms) == 1 and hasattr(norms[0], "dim"):
                    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
                elif hasattr(module, "weight_g") and hasattr(module, "weight_v"):  # legacy hook
                    torch.nn.utils.remove_weight_norm(module)
                else:
                    continue
                frozen += 1
    finally:
        torch.set_num_threads(threads)
    return frozen


def positional_conv_fp32(device: torch.device, dtype: str) -> bool:
    """Whether the positional convolution runs in float32 by default.

    On CPU, yes for float16/bfloat16: torch 2.13's oneDNN bfloat16 path on CPUs with AMX
    computes this grouped convolution (kernel 128, 16 groups) ~100 % wrong while every other
    layer stays within 0.4 %; in float32 it is exact, at a cost measured by
    ``benchmarks/precision_study.py`` (docs/precision.md). On CUDA no: nothing is known to be
    wrong there, and it is one of the larger matmuls of the forward; the self-test checks it."""
    return device.type == "cpu" and dtype in ("float16", "bfloat16")


def load_model(
    model_dir: str,
    device: str | torch.device,
    dtype: str = "float32",
    allow_pickle: bool = False,
    fp32_norms: bool = False,
    fp32_pos_conv: bool | None = None,
) -> ExactEncoder:
    """``from_pretrained`` on a local directory (safetensors) with the transformers class its
    ``config.json`` names (:data:`hubert_ray.model.families.FAMILIES`), eval mode, on ``device``.
    ``fp32_pos_conv``: run the positional convolution in float32 (None: see
    :func:`positional_conv_fp32`)."""
    import transformers

    from hubert_ray.model.families import model_spec

    with open(os.path.join(model_dir, "config.json")) as f:
        spec = model_spec(json.load(f), os.path.join(model_dir, "config.json"))
    cls = getattr(transformers, spec.class_name)
    model = cls.from_pretrained(
        model_dir,
        use_safetensors=not allow_pickle,
        attn_implementation="sdpa" if cls._supports_sdpa else "eager",
    )
    model.eval()
    freeze_weight_norms(model)
    if torch.device(device).type == "cuda":
        # FP32 must mean FP32: cuDNN convolutions default to TF32 on Ampere and newer, which
        # measured 4.6e-4 relative error on an H200 (the FP32 reference of precision checks).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if dtype == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    else:
        model = model.to(device=device, dtype=TORCH_DTYPES[dtype])
        if fp32_norms and dtype != "float32":
            keep_layer_norms_fp32(model)
    encoder = ExactEncoder(model)
    if dtype not in ("float32", "int8"):
        if fp32_pos_conv is None:
            fp32_pos_conv = positional_conv_fp32(torch.device(device), dtype)
        if fp32_pos_conv:
            model.encoder.pos_conv_embed.float()
            encoder.pos_conv_fp32 = True
    return encoder

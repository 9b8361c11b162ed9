"""The driver's checks of a model directory (hubert_ray.model.families): supported families, frame
geometry, the checkpoint's preprocessing and weights that fit the config; bad input exits 2
before any Ray work, naming the file and the field.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/integration/test_model_checks.py``.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pyarrow as pa
import pytest

from hubert_ray.core.chunking import HUBERT, Geometry, num_frames, plan_chunks
from hubert_ray.core.config import DecodeConfig, ExtractConfig
from hubert_ray.core.errors import ConfigError
from hubert_ray.model import families as models


# -- config.json -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_type, cfg, norm, stable",
    [
        ("hubert", {}, "group", False),
        ("hubert", {"feat_extract_norm": "layer", "do_stable_layer_norm": True}, "layer", True),
        ("wav2vec2", {"feat_extract_norm": "layer", "do_stable_layer_norm": True}, "layer", True),
        ("wavlm", {"feat_extract_norm": "group"}, "group", False),
        # data2vec-audio has one architecture (transformers ignores do_stable_layer_norm there)
        ("data2vec-audio", {"do_stable_layer_norm": True}, "layer", False),
    ],
)
def test_model_spec_of_each_family(model_type, cfg, norm, stable):
    spec = models.model_spec(
        {"model_type": model_type, "hidden_size": 1024, "num_hidden_layers": 24, **cfg}
    )
    assert spec.class_name == models.FAMILIES[model_type]
    assert (spec.feat_extract_norm, spec.stable_layer_norm) == (norm, stable)
    assert spec.geometry == HUBERT  # transformers' default conv stack: 400 / 320 samples


@pytest.mark.parametrize(
    "cfg, words",
    [
        ({"model_type": "whisper"}, ["model_type='whisper'", "not supported", "wavlm"]),
        ({"model_type": "wav2vec2-conformer"}, ["not supported (its conformer blocks"]),
        ({}, ["model_type=None", "not supported"]),
        ({"model_type": "hubert", "feat_extract_norm": "batch"}, ["feat_extract_norm='batch'"]),
        ({"model_type": "hubert", "conv_kernel": [10, 3]}, ["conv_kernel has 2", "conv_stride"]),
        ({"model_type": "wav2vec2", "conv_stride": [5, 0, 2, 2, 2, 2, 2]}, ["conv_stride="]),
        ({"model_type": "wavlm", "hidden_size": "big"}, ["hidden_size='big'"]),
    ],
)
def test_model_spec_refuses_naming_file_and_field(cfg, words):
    full = {"hidden_size": 32, "num_hidden_layers": 2, **cfg}
    with pytest.raises(ConfigError) as info:
        models.model_spec(full, "s3://b/m/config.json")
    assert info.value.field == "model"
    assert "s3://b/m/config.json: " in str(info.value)
    for w in words:
        assert w in str(info.value)


def test_geometry_equals_the_conv_stack():
    rng = random.Random(0)
    for _ in range(200):
        layers = rng.randrange(1, 8)
        kernels = [rng.randrange(1, 12) for _ in range(layers)]
        strides = [rng.randrange(1, 6) for _ in range(layers)]
        g = Geometry.from_convs(kernels, strides)
        for n in [rng.randrange(0, 20000) for _ in range(30)] + [g.receptive_field - 1]:
            frames = n
            for k, s in zip(kernels, strides, strict=True):
                frames = max((frames - k) // s + 1, 0)
            assert g.num_frames(n) == frames, (kernels, strides, n)
    assert Geometry.from_convs((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)) == HUBERT


@pytest.mark.parametrize(
    "kernels, strides",
    [((10, 3, 3, 3, 3, 3), (5, 2, 2, 2, 2, 2)), ((7, 5), (3, 4)), ((400,), (320,)), ((3,), (1,))],
)
def test_plan_chunks_exact_for_any_geometry(kernels, strides):
    g = Geometry.from_convs(kernels, strides)
    rng = random.Random(g.hop)
    for chunk_samples in (g.receptive_field, 2 * g.receptive_field + 7, 8000):
        for n in [rng.randrange(0, 30 * chunk_samples) for _ in range(60)]:
            chunks = plan_chunks(n, chunk_samples, g)
            assert chunks[0][0] == 0 and chunks[-1][1] == n
            for i, (s, e) in enumerate(chunks):
                assert s % g.hop == 0
                if i < len(chunks) - 1:
                    assert e - s <= chunk_samples
                    assert chunks[i + 1][0] == e - (g.receptive_field - g.hop)
            assert sum(g.num_frames(e - s) for s, e in chunks) == g.num_frames(n)
    assert num_frames(16000) == 49 and plan_chunks(16000, 8000) == plan_chunks(16000, 8000, HUBERT)


def test_chunk_shorter_than_a_frame_refused():
    spec = models.model_spec(
        {
            "model_type": "hubert",
            "hidden_size": 8,
            "num_hidden_layers": 1,
            "conv_kernel": [800],
            "conv_stride": [320],
            "conv_dim": [8],
        }
    )
    with pytest.raises(ConfigError, match="chunk_seconds=0.025 is shorter than one frame"):
        models.check_chunking(spec, 400)
    models.check_chunking(spec, 800)


# -- preprocessor_config.json ----------------------------------------------------------------
@pytest.mark.parametrize(
    "option, pre, normalize, source",
    [
        ("auto", None, True, "default (no preprocessor_config.json)"),
        ("auto", {"do_normalize": False}, False, "preprocessor_config.json"),
        ("auto", {"do_normalize": True}, True, "preprocessor_config.json"),
        ("auto", {"sampling_rate": 16000}, True, "preprocessor_config.json"),
        ("on", {"do_normalize": False}, True, "option"),
        ("off", None, False, "option"),
        ("off", {"do_normalize": True}, False, "option"),
    ],
)
def test_normalize_resolution(option, pre, normalize, source):
    p = models.resolve_preprocessing(option, pre, "m/preprocessor_config.json")
    assert (p.normalize, p.option, p.source) == (normalize, option, source)
    assert p.to_dict() == {"normalize": normalize, "option": option, "source": source}


@pytest.mark.parametrize(
    "pre, words",
    [
        ({"sampling_rate": 8000}, ["sampling_rate=8000", "16000 Hz"]),
        ({"feature_extractor_type": "WhisperFeatureExtractor"}, ["feature_extractor_type="]),
        ({"feature_size": 80}, ["feature_size=80"]),
        ({"do_normalize": "yes"}, ["do_normalize='yes'"]),
    ],
)
def test_preprocessor_refused_naming_file_and_field(pre, words):
    with pytest.raises(ConfigError) as info:
        models.resolve_preprocessing("auto", pre, "s3://b/m/preprocessor_config.json")
    assert str(info.value).startswith("s3://b/m/preprocessor_config.json: ")
    assert info.value.field == "model"
    for w in words:
        assert w in str(info.value)


def test_normalize_option_validated():
    with pytest.raises(ConfigError, match="normalize='maybe'") as info:
        ExtractConfig(manifest="m", model="d", output="o", normalize="maybe")
    assert info.value.field == "normalize"
    cfg = ExtractConfig(manifest="m", model="d", output="o")
    assert cfg.normalize == "auto" and cfg.decode_config().normalize is True
    off = ExtractConfig(manifest="m", model="d", output="o", normalize="off")
    assert off.decode_config().normalize is False


def test_decode_stage_follows_the_normalize_setting(tmp_path):
    from hubert_ray.corpus.audio import DecodeStage, normalise
    from hubert_ray.testing.synth import synth_signal, write_audio

    x = synth_signal(1.0, 16000, 1, seed=3)
    path = str(tmp_path / "a.wav")
    write_audio(path, x, 16000, "wavf32")
    batch = pa.table(
        {
            "segment_id": ["a"],
            "recording_id": ["a"],
            "audio_uri": [path],
            "start_s": [0.0],
            "end_s": [None],
        }
    )
    raw = DecodeStage(DecodeConfig(normalize=False))(batch).column("audio")[0].values
    normed = DecodeStage(DecodeConfig(normalize=True))(batch).column("audio")[0].values
    np.testing.assert_array_equal(raw.to_numpy(), x[:, 0])
    np.testing.assert_allclose(normed.to_numpy(), normalise(x[:, 0]), rtol=1e-6)
    assert abs(float(np.std(raw.to_numpy())) - 1.0) > 0.1  # really not normalised


# -- weights -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def large_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from hubert_ray.testing.synth import make_tiny_family_model

    return make_tiny_family_model(str(tmp_path_factory.mktemp("m") / "large"), "hubert", "large")


def _with_config(src: str, dst, **changes) -> str:
    shutil.copytree(src, dst)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


def test_weights_fit_the_config(large_dir):
    from hubert_ray.model import files

    assert files.read_model_config(large_dir)["do_stable_layer_norm"] is True


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"num_hidden_layers": 3}, ["missing", "encoder.layers.2.", "num_hidden_layers"]),
        ({"intermediate_size": 48}, ["another shape", "is [64] in the weights, [48] for"]),
        ({"conv_bias": False}, ["not part of", "conv_layers.0.conv.bias"]),
        ({"feat_extract_norm": "group"}, ["not part of", "conv_layers.1.layer_norm"]),
        ({"model_type": "wavlm"}, ["missing", "gru_rel_pos"]),
        # HuBERT large and wav2vec2 large have the same tensors: the weights fit.
        ({"model_type": "wav2vec2"}, []),
    ],
)
def test_weights_not_matching_the_config_refused(large_dir, tmp_path, changes, words):
    from hubert_ray.model import files

    d = _with_config(large_dir, tmp_path / "m", **changes)
    if not words:
        files.read_model_config(d)
        return
    with pytest.raises(ConfigError) as info:
        files.read_model_config(d)
    msg = str(info.value)
    assert msg.startswith(f"{d}/model.safetensors: the weights do not match config.json")
    for w in words:
        assert w in msg, msg


def test_weights_of_a_task_model_and_legacy_names_accepted(large_dir, tmp_path):
    """A checkpoint saved from HubertForCTC (tensors under ``hubert.``) with the positional
    conv's weight norm under its pre-parametrisation names (``weight_g`` / ``weight_v``)."""
    from safetensors.numpy import load_file, save_file

    from hubert_ray.model import files

    d = tmp_path / "ctc"
    shutil.copytree(large_dir, d)
    tensors = load_file(str(d / "model.safetensors"))
    renamed = {}
    for k, v in tensors.items():
        k = k.replace("parametrizations.weight.original0", "weight_g")
        k = k.replace("parametrizations.weight.original1", "weight_v")
        renamed["hubert." + k] = v
    renamed["lm_head.weight"] = np.zeros((5, 32), np.float32)
    save_file(renamed, str(d / "model.safetensors"))
    files.read_model_config(str(d))
    del renamed["hubert.encoder.pos_conv_embed.conv.weight_v"]
    save_file(renamed, str(d / "model.safetensors"))
    with pytest.raises(ConfigError, match="pos_conv_embed.conv.parametrizations.weight.original1"):
        files.read_model_config(str(d))

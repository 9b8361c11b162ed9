"""Precision assurance: deterministic sampling, metrics, warn / fallback / fail, INT8.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/ray/test_precision.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hubert_ray.core.chunking import plan_chunks
from hubert_ray.core.config import ModelConfig, PrecisionConfig
from hubert_ray.core.errors import ConfigError
from hubert_ray.core.precision import PrecisionBreach, compare, is_sampled, summarize_layers
from hubert_ray.model.encoder import load_model
from hubert_ray.stages.extractor import ModelStage
from tests.unit.test_model import _audio, _decoded_batch, _features

LAYERS = (0, 1, 2)


# -- pure ---------------------------------------------------------------------------------------
def test_sampling_is_deterministic_and_hits_the_rate():
    ids = [f"rec{i // 7}-{i % 7}" for i in range(20_000)]
    first = [s for s in ids if is_sampled(s, 0.25)]
    assert first == [s for s in reversed(ids) if is_sampled(s, 0.25)][::-1]  # order-free
    assert 0.235 < len(first) / len(ids) < 0.265
    assert not any(is_sampled(s, 0.0) for s in ids)
    assert all(is_sampled(s, 1.0) for s in ids)
    # a higher rate checks a superset: raising the rate never drops an already-checked id
    assert set(first) <= {s for s in ids if is_sampled(s, 0.5)}


def test_metrics_equal_an_independent_computation():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((50, 16)).astype(np.float32)
    got = (ref + 0.01 * rng.standard_normal(ref.shape)).astype(np.float16)
    m = compare(got, ref)
    a, b = torch.from_numpy(got.astype(np.float64)), torch.from_numpy(ref.astype(np.float64))
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert m["cos_mean"] == pytest.approx(cos.mean().item(), rel=1e-12)
    assert m["cos_min"] == pytest.approx(cos.min().item(), rel=1e-12)
    assert m["rel_l2"] == pytest.approx((torch.linalg.norm(a - b) / torch.linalg.norm(b)).item())
    assert m["max_abs"] == pytest.approx((a - b).abs().max().item())
    assert 0.005 < m["rel_l2"] < 0.02


def test_layer_summary_statistics():
    rows = [{"layer": 2, "rel_l2": r, "cos_min": 1 - r} for r in np.linspace(0, 0.1, 101)]
    out = summarize_layers(rows)["2"]
    assert out["segments"] == 101
    assert out["rel_l2_mean"] == pytest.approx(0.05)
    assert out["rel_l2_p50"] == pytest.approx(0.05)
    assert out["rel_l2_p99"] == pytest.approx(0.099)
    assert out["rel_l2_max"] == pytest.approx(0.1)
    assert out["cos_min"] == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"precision_sample_rate": 1.5}, "precision_sample_rate"),
        ({"precision_warn": 0}, "precision_warn"),
        ({"precision_warn": 0.1, "precision_limit": 0.05}, "precision_limit"),
        ({"on_precision_breach": "ignore"}, "on_precision_breach"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as exc:
        PrecisionConfig(**kwargs)
    assert exc.value.field == field and field in str(exc.value)


# -- the model stage ------------------------------------------------------------------------------
LENGTHS = {"short": 900, "mid": 6000, "long": 20_000}  # "long" is chunked (0.5 s chunks)


def _batch():
    return _decoded_batch(
        [(sid, _audio(n, seed), None) for seed, (sid, n) in enumerate(LENGTHS.items())]
        + [("bad", None, "too_short")]
    )


def _stage(model_dir, dtype="bfloat16", self_test=False, **precision):
    """The model stage; without its self-test unless asked (these tests are about the
    sampled checks, which a breaching self-test would replace by FP32 throughout)."""
    prec = {
        "precision_sample_rate": 1.0,
        "precision_warn": 0.5,
        "precision_limit": 0.9,
        **precision,
    }
    return ModelStage(
        ModelConfig(
            model_uri=model_dir,
            layers="all",
            dtype=dtype,
            device="cpu",
            chunk_seconds=0.5,
            precision=PrecisionConfig(**prec),
        ),
        self_test=self_test,
    )


def _fp32_alone(model_dir):
    """Independent FP32 reference: each item alone, chunked like the stage, no batching."""
    net = load_model(model_dir, "cpu", "float32")
    out = {}
    for seed, (sid, n) in enumerate(LENGTHS.items()):
        x = _audio(n, seed)
        parts = {k: [] for k in LAYERS}
        for s, e in plan_chunks(n, 8000):
            res, _ = net(torch.from_numpy(x[s:e])[None], torch.tensor([e - s]), LAYERS)
            for k in LAYERS:
                parts[k].append(res[k][0])
        out[sid] = {k: torch.cat(parts[k]).numpy() for k in LAYERS}
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hubert_ray.testing.synth import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("prec") / "tiny"))


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_reported_metrics_equal_independent_computation(tiny, dtype):
    out = _stage(tiny, dtype)(_batch())
    ref = _fp32_alone(tiny)
    checked = out.column("precision_checked").to_pylist()
    assert checked == [True, True, True, False]
    assert out.column("compute_dtype").to_pylist()[:3] == [dtype] * 3
    for row, sid in enumerate(LENGTHS):
        reported = {r["layer"]: r for r in out.column("precision")[row].as_py()}
        assert sorted(reported) == list(LAYERS)
        for k in LAYERS:
            stored = _features(out, k, row)
            a = torch.from_numpy(stored.astype(np.float64))
            b = torch.from_numpy(ref[sid][k].astype(np.float64))
            rel = (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
            assert reported[k]["rel_l2"] == pytest.approx(rel, rel=1e-3, abs=1e-6)
            assert reported[k]["cos_min"] == pytest.approx(cos.min().item(), abs=1e-6)
            assert reported[k]["max_abs"] == pytest.approx(
                (a - b).abs().max().item(), rel=1e-3, abs=1e-5
            )
            assert reported[k]["checked_dtype"] == dtype and reported[k]["action"] == "none"
            assert rel > 0  # reduced precision really differs (how much is hardware's)


def test_rate_zero_checks_nothing(tiny):
    out = _stage(tiny, precision_sample_rate=0.0)(_batch())
    assert out.column("precision_checked").to_pylist() == [False] * 4
    assert out.column("precision").null_count == 4


def test_breach_falls_back_to_float32(tiny):
    out = _stage(tiny, precision_warn=1e-9, precision_limit=1e-9)(_batch())
    ref = _fp32_alone(tiny)
    assert out.column("compute_dtype").to_pylist()[:3] == ["float32"] * 3
    assert out.column("fallback_reason").to_pylist()[:3] == ["precision"] * 3
    for row, sid in enumerate(LENGTHS):
        assert {r["action"] for r in out.column("precision")[row].as_py()} == {"fallback"}
        for k in LAYERS:  # written features are the FP32 ones (float16 storage)
            diff = _features(out, k, row) - ref[sid][k]
            assert np.linalg.norm(diff) / np.linalg.norm(ref[sid][k]) < 2e-3


def test_breach_warn_keeps_reduced_precision(tiny):
    out = _stage(tiny, precision_warn=1e-9, precision_limit=1e-9, on_precision_breach="warn")(
        _batch()
    )
    assert out.column("compute_dtype").to_pylist()[:3] == ["bfloat16"] * 3
    assert out.column("fallback_reason").null_count == 4
    assert {r["action"] for r in out.column("precision")[0].as_py()} == {"breach_ignored"}


def test_breach_fail_names_segment_layer_and_error(tiny):
    stage = _stage(tiny, precision_warn=1e-9, precision_limit=1e-9, on_precision_breach="fail")
    with pytest.raises(PrecisionBreach, match=r"segment 'short' layer \d: relative L2 error"):
        stage(_batch())

"""Precision that holds on any hardware: the per-actor self-test, escalation of systematic
breaches, and the guarantee the job gives whatever the CPU computes (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hubert_ray.core import errors, selftest  # noqa: E402
from hubert_ray.core.config import ModelConfig, PrecisionConfig  # noqa: E402
from hubert_ray.core.precision import PrecisionBreach  # noqa: E402
from hubert_ray.model.encoder import load_model  # noqa: E402
from hubert_ray.model.engine import Escalation  # noqa: E402
from hubert_ray.stages.extractor import ModelStage  # noqa: E402
from tests.unit.test_model import _audio, _decoded_batch, _derive_model, _features, _rel  # noqa: E402

LIMIT = PrecisionConfig().precision_limit
LENGTHS = [900, 6000, 20_000, 3000]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hubert_ray.testing.synth import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("st") / "tiny"))


@pytest.fixture(scope="module")
def underflow(tiny, tmp_path_factory):
    """A model whose projected features underflow float16 (~1e-6): finite in every dtype, but
    ~80 % from FP32 in float16 on any hardware (IEEE half precision has ~1e-7 subnormals)."""

    def shrink(model):
        model.feature_projection.projection.weight.mul_(1e-6)
        model.feature_projection.projection.bias.mul_(1e-6)

    return _derive_model(tiny, str(tmp_path_factory.mktemp("uf") / "underflow"), shrink)


def _batch(n=4, offset=0):
    return _decoded_batch(
        [(f"s{offset + i}", _audio(LENGTHS[i % len(LENGTHS)], offset + i), None) for i in range(n)]
    )


def _stage(model, dtype, policy="fallback", rate=0.0, self_test=True, **kw):
    cfg = ModelConfig(
        model_uri=model,
        layers="all",
        dtype=dtype,
        device="cpu",
        chunk_seconds=0.5,
        precision=PrecisionConfig(precision_sample_rate=rate, on_precision_breach=policy),
        **kw,
    )
    return ModelStage(cfg, self_test=self_test)


def _fp32_rel(model, out, row, n, seed):
    """Worst layer's relative error of a stored row against FP32, item alone, same chunks."""
    from hubert_ray.core.chunking import plan_chunks

    net = load_model(model, "cpu", "float32")
    x = _audio(n, seed)
    worst = 0.0
    for k in (0, 1, 2):
        parts = []
        for s, e in plan_chunks(n, 8000):
            res, _ = net(torch.from_numpy(x[s:e])[None], torch.tensor([e - s]), (k,))
            parts.append(res[k][0])
        worst = max(worst, _rel(_features(out, k, row), torch.cat(parts).numpy()))
    return worst


# -- pure ---------------------------------------------------------------------------------------
def test_escalation_rule():
    rule = Escalation()
    assert not rule.record(checks=10, breaches=1)  # one outlier is not systematic
    assert rule.record(checks=1, breaches=1)  # a second one among 11 checks is
    rare = Escalation()
    assert not rare.record(checks=100, breaches=1)
    assert not rare.record(checks=100, breaches=1)  # 2 in 200: 1 %, below 5 %
    assert rare.record(checks=0, breaches=8)  # 10 in 200


def test_evaluate_flags_non_finite_and_limit():
    rng = np.random.default_rng(0)
    ref = {1: rng.standard_normal((20, 4)), 2: rng.standard_normal((20, 4))}
    close = {k: v * 1.001 for k, v in ref.items()}
    assert not selftest.evaluate(close, ref, 0.02)["breach"]
    off = {1: close[1], 2: ref[2] * 1.5}
    report = selftest.evaluate(off, ref, 0.02)
    assert report["breach"] and report["worst_layer"] == 2
    assert report["layers"]["2"]["rel_l2"] == pytest.approx(0.5)
    nan = {1: close[1], 2: np.full_like(ref[2], np.nan)}
    assert selftest.evaluate(nan, ref, 0.02)["worst_rel_l2"] == "inf"


def test_calibration_input_is_fixed_and_exercises_padding_and_chunking():
    a, b = selftest.calibration_signals(10.0), selftest.calibration_signals(10.0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    lengths = [len(x) for x in a]
    assert len(set(lengths)) == len(lengths)  # several lengths share micro-batches: padding
    assert max(lengths) > 10 * 16_000  # one item is chunked


# -- the underflowing float16 model: wrong on every CPU -----------------------------------------
def test_underflow_model_self_test_falls_back_to_fp32_for_the_whole_actor(underflow):
    stage = _stage(underflow, "float16")
    report = stage.engine.report()
    assert report["self_test"]["breach"] and report["self_test"]["action"] == "fallback"
    assert float(report["self_test"]["worst_rel_l2"]) > LIMIT
    assert report["compute_dtype"] == "float32" and report["demoted"] == "self_test"
    out = stage(_batch())
    assert out.column("compute_dtype").to_pylist() == ["float32"] * len(LENGTHS)
    assert out.column("fallback_reason").to_pylist() == ["self_test"] * len(LENGTHS)
    for row, n in enumerate(LENGTHS):
        assert _fp32_rel(underflow, out, row, n, row) < 2e-3  # FP32, stored as float16


def test_underflow_model_self_test_fail_raises_before_any_batch(underflow):
    with pytest.raises(PrecisionBreach, match=r"precision breach: self-test on cpu.* layer \d"):
        _stage(underflow, "float16", policy="fail")


def test_underflow_model_self_test_warn_keeps_the_dtype_and_records_it(underflow):
    stage = _stage(underflow, "float16", policy="warn")
    report = stage.engine.report()
    assert report["self_test"]["action"] == "breach_ignored"
    assert stage(_batch()).column("compute_dtype").to_pylist() == ["float16"] * len(LENGTHS)


def test_systematic_sampled_breaches_escalate_to_fp32(underflow):
    """With the self-test off, sampled checks alone find the fault: the second breaching
    check switches the actor to FP32; rows of the current call are recomputed, rows of earlier
    calls are counted as written in the suspect dtype."""
    stage = _stage(underflow, "float16", rate=1.0, self_test=False)
    first = stage(_batch(n=1))  # one check, one breach: micro-batch fallback only
    assert first.column("fallback_reason").to_pylist() == ["precision"]
    assert not stage.engine.report()["escalated"]
    stage.engine.precision = PrecisionConfig(precision_sample_rate=0.0)
    stage(_batch(n=2, offset=10))  # unchecked: written in float16
    stage.engine.precision = PrecisionConfig(precision_sample_rate=1.0)
    third = stage(_batch(n=3, offset=20))
    report = stage.engine.report()
    assert report["escalated"] and report["compute_dtype"] == "float32"
    assert report["reduced_rows_before_escalation"] == 2
    assert set(third.column("compute_dtype").to_pylist()) == {"float32"}
    after = stage(_batch(n=2, offset=30))
    assert after.column("fallback_reason").to_pylist() == ["escalated"] * 2
    assert after.column("precision_checked").to_pylist() == [False, False]  # FP32: no checks


# -- any CPU: what the job guarantees -------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_stored_features_are_within_the_limit_or_the_actor_acted(tiny, dtype):
    """Reduced precision is hardware dependent; the guarantee is not: either every stored row
    is within the precision limit of FP32, or the self-test caught it and the rows are FP32."""
    stage = _stage(tiny, dtype)
    out = stage(_batch())
    report = stage.engine.report()
    dtypes = out.column("compute_dtype").to_pylist()
    if report["self_test"]["breach"]:
        assert dtypes == ["float32"] * len(LENGTHS)
    else:
        assert dtypes == [dtype] * len(LENGTHS)
    for row, n in enumerate(LENGTHS):
        assert _fp32_rel(tiny, out, row, n, row) <= LIMIT


def test_float32_runs_no_self_test(tiny):
    stage = _stage(tiny, "float32")
    assert stage.engine.report()["self_test"] is None


def test_error_rows_pass_through_a_demoted_actor(underflow):
    batch = _decoded_batch([("a", _audio(5000, 0), None), ("b", None, errors.TOO_SHORT)])
    out = _stage(underflow, "float16")(batch)
    assert out.column("error_reason").to_pylist() == [None, errors.TOO_SHORT]


# -- the AMX bfloat16 positional convolution ------------------------------------------------------
@pytest.mark.skipif(
    not selftest.cpu_has_amx(), reason="this CPU has no AMX (amx_bf16): the fault is AMX-only"
)
def test_amx_bfloat16_positional_conv_is_wrong_in_stock_torch_and_ours_is_not(tiny):
    """Reproduces the fault with stock transformers (no project code), then shows the job's
    default (positional convolution in FP32 on CPU) avoids it."""
    from transformers import HubertModel

    stock = HubertModel.from_pretrained(tiny).eval()
    conv = stock.encoder.pos_conv_embed
    x = torch.randn(1, 200, stock.config.hidden_size)
    with torch.inference_mode():
        ref = conv(x)
        got = conv.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    if (got - ref).norm() / ref.norm() < 0.5:
        pytest.skip(f"this torch ({torch.__version__}) computes it correctly on this AMX CPU")
    ours = load_model(tiny, "cpu", "bfloat16").model.encoder.pos_conv_embed
    with torch.inference_mode():
        fixed = ours(x.to(torch.bfloat16)).float()
    assert (fixed - ref).norm() / ref.norm() < 0.02

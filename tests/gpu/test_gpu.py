"""Checks that need CUDA (marker ``gpu``; skipped without a GPU, run on the device machine)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """chinese-hubert-base's architecture (HubertConfig() defaults), random weights."""
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("base") / "base-random")
    HubertModel(HubertConfig()).eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-4), ("float16", 2e-2)])
def test_exact_padded_batch_on_cuda(base_model, dtype, tol):
    from hubert_ray.model.encoder import load_model

    net = load_model(base_model, "cuda", dtype)
    rng = np.random.default_rng(0)
    lengths = [400, 7_000, 32_000, 160_000]
    xs = [rng.standard_normal(n).astype(np.float32) for n in lengths]
    pad = torch.zeros(len(xs), max(lengths))
    for i, x in enumerate(xs):
        pad[i, : len(x)] = torch.from_numpy(x)
    tdt = getattr(torch, dtype)
    out, fl = net(pad.cuda().to(tdt), torch.tensor(lengths, device="cuda"), (6, 12))
    for i, x in enumerate(xs):
        alone, _ = net(
            torch.from_numpy(x)[None].cuda().to(tdt), torch.tensor([len(x)]).cuda(), (6, 12)
        )
        for k in (6, 12):
            a = out[k][i, : fl[i]].float().cpu().numpy()
            b = alone[k][0].float().cpu().numpy()
            assert np.isfinite(a).all()
            assert _rel(a, b) < tol, (dtype, lengths[i], k, _rel(a, b))


def test_stage_float16_on_cuda_with_precision_checks(base_model):
    from hubert_ray.core.config import ModelConfig, PrecisionConfig
    from hubert_ray.stages.extractor import ModelStage
    from tests.unit.test_model import _audio, _decoded_batch

    cfg = ModelConfig(
        model_uri=base_model,
        layers="6,12",
        dtype="auto",
        device="auto",
        precision=PrecisionConfig(precision_sample_rate=1.0),
    )
    stage = ModelStage(cfg)
    assert stage.engine.device.torch_device.type == "cuda" and stage.engine.dtype == "float16"
    rows = [(f"s{i}", _audio(n, i), None) for i, n in enumerate([16_000, 250_000, 3_000])]
    out = stage(_decoded_batch(rows))
    assert out.column("compute_dtype").to_pylist() in (["float16"] * 3, ["float32"] * 3)
    for row in range(3):
        for r in out.column("precision")[row].as_py():
            assert r["rel_l2"] < 0.05 and r["cos_min"] > 0.99


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_stage_on_cuda_matches_eager(tiny_model, mode):
    """torch.compile (``reduce-overhead``: CUDA graphs) of the FP16 forward: the features of
    padded mixed-length batches stay within FP16 noise of the eager forward's (tiny model:
    compiling the base one takes longer than this check is worth; the benchmark's
    ``_compile-*`` rows time and check it)."""
    from hubert_ray.core.config import ModelConfig, PrecisionConfig
    from hubert_ray.stages.extractor import ModelStage
    from tests.unit.test_model import _audio, _decoded_batch

    torch._dynamo.reset()  # dynamo's recompile limit counts every instance of ExactEncoder
    common = dict(
        model_uri=tiny_model, layers="2", precision=PrecisionConfig(precision_sample_rate=0)
    )
    eager = ModelStage(ModelConfig(**common))
    compiled = ModelStage(ModelConfig(compile=mode, **common))
    for lengths in ([16_000, 160_000, 3_000], [40_000, 40_000], [9_000, 70_000, 400, 120_000]):
        batch = _decoded_batch([(f"s{i}", _audio(n, i), None) for i, n in enumerate(lengths)])
        a, b = eager(batch), compiled(batch)
        for row in range(len(lengths)):
            fa = np.asarray(a.column("layer_2")[row].as_py(), np.float32)
            fb = np.asarray(b.column("layer_2")[row].as_py(), np.float32)
            assert fa.shape == fb.shape and np.isfinite(fb).all()
            assert _rel(fb, fa) < 1e-2, (mode, lengths[row], _rel(fb, fa))


@pytest.mark.ray
def test_pipeline_uses_the_gpu(ray_session, corpus, tiny_model, tmp_path):
    from hubert_ray.backend import extract
    from hubert_ray.core.config import ExtractConfig

    cfg = ExtractConfig(manifest=corpus, model=tiny_model, output=str(tmp_path / "o"))
    summary = extract.run(cfg)
    assert summary["device"] == "gpu" and summary["model_actors"] == 1
    assert summary["segments_missing"] == summary["segments_duplicated"] == 0
    assert set(summary["compute_dtype_counts"]) <= {"float16", "float32"}
    assert summary["compute_dtype_counts"].get("float16", 0) > 0


@pytest.fixture(scope="module")
def large_model(tmp_path_factory):
    """chinese-hubert-large's architecture (24 x 1024, layer-norm frontend with conv bias,
    stable layer norm), random weights."""
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    config = HubertConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        conv_bias=True,
    )
    path = str(tmp_path_factory.mktemp("large") / "large-random")
    HubertModel(config).eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize(
    "family",
    [
        "hubert-large",
        "wav2vec2-base",
        "wavlm-base",
        "wavlm-large",
        "data2vec-audio",
        "hubert-posbn",
    ],
)
@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-4), ("float16", 2e-2)])
def test_families_exact_padded_batch_on_cuda(tmp_path, family, dtype, tol):
    from hubert_ray.model.encoder import load_model
    from hubert_ray.testing.synth import make_tiny_family_model
    from tests.unit.test_families import VARIANTS

    model_type, variant, extra = VARIANTS[family]
    path = make_tiny_family_model(str(tmp_path / family), model_type, variant, **extra)
    net = load_model(path, "cuda", dtype)
    rng = np.random.default_rng(1)
    lengths = [400, 5_000, 23_456, 48_000]
    xs = [rng.standard_normal(n).astype(np.float32) for n in lengths]
    pad = torch.zeros(len(xs), max(lengths))
    for i, x in enumerate(xs):
        pad[i, : len(x)] = torch.from_numpy(x)
    tdt = getattr(torch, dtype)
    out, fl = net(pad.cuda().to(tdt), lengths, (0, 2))
    for i, x in enumerate(xs):
        alone, _ = net(torch.from_numpy(x)[None].cuda().to(tdt), [len(x)], (0, 2))
        for k in (0, 2):
            a = out[k][i, : fl[i]].float().cpu().numpy()
            b = alone[k][0].float().cpu().numpy()
            assert np.isfinite(a).all()
            assert _rel(a, b) < tol, (family, dtype, lengths[i], k, _rel(a, b))


def test_large_architecture_float16_on_cuda(large_model):
    """The large architecture in float16 against its FP32 reference (random weights: the
    error is printed, bounded loosely) and padded batching in float16."""
    from hubert_ray.model.encoder import load_model

    ref = load_model(large_model, "cuda", "float32")
    net = load_model(large_model, "cuda", "float16")
    assert net.stable and net._time_norm is None
    rng = np.random.default_rng(0)
    lengths = [16_000, 80_000, 160_000]
    xs = [rng.standard_normal(n).astype(np.float32) for n in lengths]
    pad = torch.zeros(len(xs), max(lengths))
    for i, x in enumerate(xs):
        pad[i, : len(x)] = torch.from_numpy(x)
    out16, fl = net(pad.cuda().half(), lengths, (12, 24))
    out32, _ = ref(pad.cuda(), lengths, (12, 24))
    for k in (12, 24):
        errs = [
            _rel(out16[k][i, : fl[i]].float().cpu().numpy(), out32[k][i, : fl[i]].cpu().numpy())
            for i in range(len(xs))
        ]
        print(f"\nlarge architecture float16 vs float32, layer {k}: rel L2 {errs}")
        assert all(np.isfinite(errs)) and max(errs) < 0.1


def test_sampled_checks_on_cuda_equal_the_host_metrics(base_model):
    """The FP32 recheck queued behind an FP16 call and compared on the GPU gives the host's
    float64 metrics of the stored features against a separate FP32 run (CUDA timing events
    account its device time)."""
    from hubert_ray.core.config import ModelConfig, PrecisionConfig
    from hubert_ray.core.precision import compare
    from hubert_ray.model.engine import Engine

    rng = np.random.default_rng(3)
    audio = [rng.standard_normal(int(s * 16_000)).astype(np.float32) for s in (0.7, 3.1, 12.0)]
    ids = ["a", "b", "c"]
    every = PrecisionConfig(precision_sample_rate=1.0, precision_warn=1.0, precision_limit=1.0)
    fp16 = ModelConfig(model_uri=base_model, layers="6,12", dtype="float16", precision=every)
    res = Engine(fp16, base_model, self_test=False).run(ids, audio)
    fp32 = ModelConfig(model_uri=base_model, layers="6,12", storage_dtype="float32")
    engine32 = Engine(fp32, base_model, self_test=False)
    ref = engine32.run(ids, audio)
    starts = np.concatenate([[0], np.cumsum(res.frames)])
    for i in range(len(ids)):
        for m in res.precision[i]:
            k, (a, b) = m["layer"], starts[i : i + 2]
            expected = compare(res.features[k][a:b].float().numpy(), ref.features[k][a:b].numpy())
            # the engine's FP32 reference runs the checked rows alone: not bit-equal to a run
            # packing them with others, so rel_l2 agrees to FP32's own batch-to-batch noise
            assert m["rel_l2"] == pytest.approx(expected["rel_l2"], rel=2e-2), (i, k)
            assert m["cos_min"] == pytest.approx(expected["cos_min"], abs=1e-5), (i, k)
    assert engine32.stats["audit_device_s"] == 0 and engine32.stats["forward_device_s"] > 0

"""ExactEncoder and ModelStage on tiny random models (CPU, no Ray).

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/integration/test_model.py``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hubert_ray.core import errors  # noqa: E402
from hubert_ray.core.chunking import num_frames, plan_chunks  # noqa: E402
from hubert_ray.core.config import ModelConfig, parse_layers  # noqa: E402
from hubert_ray.core.errors import ConfigError  # noqa: E402
from hubert_ray.corpus.audio import DECODED_SCHEMA  # noqa: E402
from hubert_ray.model.encoder import load_model  # noqa: E402
from hubert_ray.stages.extractor import ModelStage  # noqa: E402
from hubert_ray.testing.synth import make_tiny_model  # noqa: E402

HIDDEN = 32
NUM_LAYERS = 2
ALL_LAYERS = tuple(range(NUM_LAYERS + 1))


# -- helpers ----------------------------------------------------------------------------------
def _derive_model(src: str, dst: str, edit) -> str:
    """Load the model at ``src``, apply ``edit(model)`` to its weights, save it at ``dst``."""
    from transformers import HubertModel

    model = HubertModel.from_pretrained(src).eval()
    with torch.no_grad():
        edit(model)
    model.save_pretrained(dst, safe_serialization=True)
    return dst


def _random_group_norm(model) -> None:
    gen = torch.Generator().manual_seed(1)
    norm = model.feature_extractor.conv_layers[0].layer_norm
    norm.weight.copy_(1.0 + 0.5 * torch.randn(norm.weight.shape, generator=gen))
    norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=gen))


def _audio(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(n)
    return ((x - x.mean()) / x.std()).astype(np.float32)


def _rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _decoded_batch(rows: list[tuple[str, np.ndarray | None, str | None]]) -> pa.Table:
    """A batch in DECODED_SCHEMA. ``rows``: (segment_id, audio or None, error_reason)."""
    offsets = [0]
    pieces = []
    for _, audio, _ in rows:
        if audio is not None:
            pieces.append(audio)
        offsets.append(offsets[-1] + (0 if audio is None else len(audio)))
    values = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    audio_col = pa.LargeListArray.from_arrays(
        pa.array(offsets, pa.int64()), pa.array(values, pa.float32())
    )
    n = len(rows)
    reason = [r for _, _, r in rows]
    return pa.Table.from_arrays(
        [
            pa.array([s for s, _, _ in rows], pa.string()),
            pa.array([f"rec-{s}" for s, _, _ in rows], pa.string()),
            pa.array([0.0] * n, pa.float64()),
            pa.array([0 if a is None else len(a) / 16000 for _, a, _ in rows], pa.float64()),
            pa.array([0 if a is None else len(a) for _, a, _ in rows], pa.int64()),
            audio_col,
            pa.array([None if r is None else errors.STAGE_DECODE for r in reason], pa.string()),
            pa.array(reason, pa.string()),
            pa.array([None if r is None else f"decode failed: {r}" for r in reason], pa.string()),
        ],
        schema=DECODED_SCHEMA,
    )


def _features(table: pa.Table, layer: int, row: int) -> np.ndarray | None:
    value = table.column(f"layer_{layer}")[row]
    if not value.is_valid:
        return None
    flat = value.values.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, HIDDEN).astype(np.float32)


def _alone(net, audio: np.ndarray, layers=ALL_LAYERS) -> dict[int, np.ndarray]:
    x = torch.from_numpy(audio)[None]
    out, _ = net(x, torch.tensor([len(audio)]), layers)
    return {k: out[k][0].float().numpy() for k in layers}


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    plain = make_tiny_model(str(root / "plain"))
    affine = _derive_model(plain, str(root / "affine"), _random_group_norm)
    return {"plain": plain, "affine": affine}


@pytest.fixture(scope="module")
def nets(model_dirs):
    return {name: load_model(path, "cpu", "float32") for name, path in model_dirs.items()}


@pytest.fixture(scope="module")
def affine_dir(model_dirs):
    return model_dirs["affine"]


# -- ExactEncoder ------------------------------------------------------------------------------
def test_affine_model_has_nontrivial_group_norm(nets):
    norm = nets["affine"].model.feature_extractor.conv_layers[0].layer_norm
    assert isinstance(norm, torch.nn.GroupNorm)
    assert not torch.allclose(norm.weight, torch.ones_like(norm.weight))
    assert not torch.allclose(norm.bias, torch.zeros_like(norm.bias))


@pytest.mark.parametrize("name", ["plain", "affine"])
@pytest.mark.parametrize("n", [400, 16000, 37000])
def test_single_item_matches_transformers(nets, name, n):
    net = nets[name]
    audio = _audio(n, seed=n)
    ours = _alone(net, audio)
    with torch.no_grad():
        ref = net.model(torch.from_numpy(audio)[None], output_hidden_states=True).hidden_states
    assert len(ref) == NUM_LAYERS + 1
    for k in ALL_LAYERS:
        expected = ref[k][0].numpy()
        assert ours[k].shape == expected.shape == (num_frames(n), HIDDEN)
        np.testing.assert_allclose(ours[k], expected, rtol=1e-5, atol=2e-5)


def test_frozen_weight_norm_is_a_one_thread_forward_bit_for_bit(model_dirs):
    """load_model freezes the positional convolution's weight norm (computed once, on one
    thread, whatever torch's threads): the hidden states are those of transformers' own model
    (norm recomputed every forward) on one thread, to the bit."""
    import transformers

    stock = transformers.HubertModel.from_pretrained(model_dirs["affine"]).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        net = load_model(model_dirs["affine"], "cpu", "float32")  # frozen on 2 threads' watch
    finally:
        torch.set_num_threads(threads)
    conv = net.model.encoder.pos_conv_embed.conv
    assert not hasattr(conv, "parametrizations") and not hasattr(conv, "weight_g")
    x = torch.from_numpy(_audio(16000, 7))[None]
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ref = stock(x, output_hidden_states=True).hidden_states
            ours = net.model(x, output_hidden_states=True).hidden_states
    finally:
        torch.set_num_threads(threads)
    for k in ALL_LAYERS:
        assert torch.equal(ours[k], ref[k]), k


def test_only_requested_layers_returned(nets):
    net = nets["affine"]
    out, frames = net(torch.from_numpy(_audio(8000, 0))[None], torch.tensor([8000]), (1,))
    assert set(out) == {1}
    assert frames.tolist() == [num_frames(8000)]


@pytest.mark.parametrize("name", ["plain", "affine"])
def test_padded_batch_equals_items_alone(nets, name):
    net = nets[name]
    lengths = [400, 720, 7000, 16000, 40000]
    items = [_audio(n, seed=i) for i, n in enumerate(lengths)]
    x = np.zeros((len(items), max(lengths)), np.float32)
    for i, a in enumerate(items):
        x[i, : len(a)] = a
    out, frames = net(torch.from_numpy(x), torch.tensor(lengths), ALL_LAYERS)
    assert frames.tolist() == [num_frames(n) for n in lengths]

    worst = 0.0
    naive_short = []
    with torch.no_grad():
        naive = net.model(torch.from_numpy(x), output_hidden_states=True).hidden_states
    for i, a in enumerate(items):
        alone = _alone(net, a)
        f = num_frames(len(a))
        for k in ALL_LAYERS:
            err = _rel(out[k][i, :f].numpy(), alone[k])
            worst = max(worst, err)
            assert err < 1e-4, (name, lengths[i], k, err)
        if len(a) < max(lengths):
            naive_short.append(_rel(naive[NUM_LAYERS][i, :f].numpy(), alone[NUM_LAYERS]))
    print(
        f"\n[{name}] padded-vs-alone max rel err {worst:.2e}; naive zero-padded (no mask) "
        f"rel err of shorter items, last layer: {[f'{e:.3f}' for e in naive_short]}"
    )
    # The naive approach is visibly wrong for a short item: the test can detect padding effects.
    assert naive_short[0] > 0.01
    assert max(naive_short) > 0.01


def test_padded_batch_ignores_padding_values(nets):
    """Whatever sits in the padding (not just zeros), the valid frames are unchanged."""
    net = nets["affine"]
    lengths = [3000, 12000]
    items = [_audio(n, seed=10 + i) for i, n in enumerate(lengths)]
    x = np.random.default_rng(5).standard_normal((2, max(lengths))).astype(np.float32) * 10
    for i, a in enumerate(items):
        x[i, : len(a)] = a
    out, _ = net(torch.from_numpy(x), torch.tensor(lengths), ALL_LAYERS)
    alone = _alone(net, items[0])
    for k in ALL_LAYERS:
        assert _rel(out[k][0, : num_frames(lengths[0])].numpy(), alone[k]) < 1e-4


# -- ModelStage --------------------------------------------------------------------------------
def test_stage_chunk_stitching_and_passthrough(affine_dir, nets):
    net = nets["affine"]
    long_audio = _audio(32000, seed=1)  # 2 s: chunked at 0.5 s
    short_audio = _audio(6400, seed=2)  # 0.4 s: one chunk
    mid_audio = _audio(12345, seed=3)  # chunked, ragged tail
    batch = _decoded_batch(
        [
            ("long", long_audio, None),
            ("bad", None, errors.UNREADABLE_AUDIO),
            ("short", short_audio, None),
            ("mid", mid_audio, None),
        ]
    )
    cfg = ModelConfig(
        model_uri=affine_dir, layers="all", dtype="float32", chunk_seconds=0.5, device="cpu"
    )
    stage = ModelStage(cfg)
    out = stage(batch)

    assert out.num_rows == batch.num_rows
    assert out.column("segment_id").to_pylist() == ["long", "bad", "short", "mid"]
    for k in ALL_LAYERS:
        assert out.schema.field(f"layer_{k}").type == pa.list_(pa.list_(pa.float16(), HIDDEN))
    assert out.column("num_frames").to_pylist() == [
        num_frames(32000),
        0,
        num_frames(6400),
        num_frames(12345),
    ]
    # error row passes through untouched with null features
    assert out.column("error_reason").to_pylist() == [None, errors.UNREADABLE_AUDIO, None, None]
    assert out.column("error_stage")[1].as_py() == errors.STAGE_DECODE
    assert out.column("error_message")[1].as_py() == "decode failed: unreadable_audio"
    assert out.column("compute_dtype").to_pylist() == ["float32", None, "float32", "float32"]
    for k in ALL_LAYERS:
        assert _features(out, k, 1) is None

    # chunked rows equal the independently computed per-chunk outputs, stitched
    for row, audio in ((0, long_audio), (3, mid_audio)):
        chunks = plan_chunks(len(audio), cfg.chunk_samples)
        assert len(chunks) > 1
        per_chunk = [_alone(net, audio[s:e]) for s, e in chunks]
        for k in ALL_LAYERS:
            expected = np.concatenate([c[k] for c in per_chunk])
            got = _features(out, k, row)
            assert got.shape == expected.shape == (num_frames(len(audio)), HIDDEN)
            assert _rel(got, expected) < 2e-3, (row, k)

    # the unchunked row equals the model run alone
    alone = _alone(net, short_audio)
    for k in ALL_LAYERS:
        assert _rel(_features(out, k, 2), alone[k]) < 2e-3

    # how much does chunking (80-sample overlap, no extra context) change features?
    whole = _alone(net, long_audio)
    diffs = {k: _rel(_features(out, k, 0), whole[k]) for k in ALL_LAYERS}
    print(f"\nchunked (0.5 s) vs unchunked 2 s item, rel diff per layer: {diffs}")
    for d in diffs.values():
        assert 0 < d < 1.5  # loose sanity bound only


@pytest.mark.parametrize(
    "spec, expected", [("all", (0, 1, 2)), ("last", (2,)), ("0,2", (0, 2)), ("1", (1,))]
)
def test_layer_selection_columns(affine_dir, spec, expected):
    batch = _decoded_batch([("a", _audio(4000, 0), None)])
    cfg = ModelConfig(model_uri=affine_dir, layers=spec, dtype="float32", device="cpu")
    out = ModelStage(cfg)(batch)
    layer_cols = [c for c in out.column_names if c.startswith("layer_")]
    assert layer_cols == [f"layer_{k}" for k in expected]


def test_parse_layers_rejects_too_deep(affine_dir):
    assert parse_layers("all", 2) == (0, 1, 2)
    assert parse_layers("last", 2) == (2,)
    assert parse_layers("2, 0", 2) == (0, 2)
    with pytest.raises(ConfigError, match="layers") as info:
        parse_layers("3", 2)
    assert info.value.field == "layers"
    with pytest.raises(ConfigError, match="layers") as info:
        ModelStage(ModelConfig(model_uri=affine_dir, layers="0,5", dtype="float32", device="cpu"))
    assert info.value.field == "layers"


def test_small_max_batch_samples_gives_same_result(affine_dir):
    lengths = [400, 1000, 3000, 5000, 8000, 2500, 7999]
    batch = _decoded_batch([(f"s{i}", _audio(n, seed=i), None) for i, n in enumerate(lengths)])
    common = dict(
        model_uri=affine_dir,
        layers="all",
        dtype="float32",
        storage_dtype="float32",
        chunk_seconds=0.5,
        device="cpu",
    )
    small = ModelStage(ModelConfig(max_batch_samples=8000, **common))
    # a forward costing more than any padding: everything in one micro-batch
    big = ModelStage(ModelConfig(max_batch_samples=10**7, micro_batch_cost_seconds=1e3, **common))

    calls = {"small": 0, "big": 0}

    def counting(stage, key):
        micro_batch = stage.engine._micro_batch

        def wrapped(net, *args):
            calls[key] += 1
            return micro_batch(net, *args)

        stage.engine._micro_batch = wrapped

    counting(small, "small")
    counting(big, "big")
    out_small, out_big = small(batch), big(batch)
    assert calls["big"] == 1
    assert calls["small"] >= 4
    assert out_small.column("num_frames").to_pylist() == [num_frames(n) for n in lengths]
    for k in ALL_LAYERS:
        for i in range(len(lengths)):
            a, b = _features(out_small, k, i), _features(out_big, k, i)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_padding_to_a_multiple_gives_same_result(affine_dir):
    """Micro-batches padded to a multiple of 0.25 s (the GPU default) compute the same
    features as padding to the longest item: the extra padding is masked like any other."""
    lengths = [400, 1000, 3000, 5000, 8000, 2500, 7999, 16_000, 30_000]
    batch = _decoded_batch([(f"s{i}", _audio(n, seed=i), None) for i, n in enumerate(lengths)])
    common = dict(
        model_uri=affine_dir, layers="all", dtype="float32", storage_dtype="float32", device="cpu"
    )
    tight = ModelStage(ModelConfig(pad_multiple_seconds=0, **common))
    bucketed = ModelStage(ModelConfig(pad_multiple_seconds=0.25, **common))
    shapes = []  # (rows, longest item) of each micro-batch
    micro_batch = bucketed.engine._micro_batch

    def recording(net, w, group, *args):
        shapes.append((len(group), max(len(w.chunks[j]) for j in group)))
        return micro_batch(net, w, group, *args)

    bucketed.engine._micro_batch = recording
    a, b = tight(batch), bucketed(batch)
    # every micro-batch was padded to a whole number of 0.25 s (4000 samples)
    assert bucketed.engine.stats["padded_samples"] == sum(
        r * -(-n // 4000) * 4000 for r, n in shapes
    )
    assert bucketed.engine.stats["padded_samples"] > tight.engine.stats["padded_samples"]
    for k in ALL_LAYERS:
        for i in range(len(lengths)):
            np.testing.assert_allclose(_features(a, k, i), _features(b, k, i), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile on CPU needs a C++ compiler",
)
def test_compiled_stage_gives_same_result(affine_dir):
    """``compile=default``: the transformer layers run through torch.compile (really: dynamo
    records graphs) and every batch shape gives the eager features, padded or not, for new
    shapes too (dynamic shapes after the first recompile)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # dynamo's recompile limit counts every instance of ExactEncoder

    common = dict(
        model_uri=affine_dir, layers="all", dtype="float32", storage_dtype="float32", device="cpu"
    )
    eager = ModelStage(ModelConfig(**common))
    compiled = ModelStage(ModelConfig(compile="default", **common))
    assert compiled.engine.net.compiled == "default" and eager.engine.net.compiled is None
    graphs = counters["stats"]["unique_graphs"]
    for lengths in ([16_000, 16_000], [400, 7000, 16_000], [3000, 12_000, 30_000, 2000, 9000]):
        batch = _decoded_batch([(f"s{n}", _audio(n, seed=n), None) for n in lengths])
        a, b = eager(batch), compiled(batch)
        for k in ALL_LAYERS:
            for i in range(len(lengths)):
                np.testing.assert_allclose(
                    _features(b, k, i), _features(a, k, i), rtol=1e-5, atol=1e-5
                )
    assert counters["stats"]["unique_graphs"] > graphs


def test_storage_float32_type(affine_dir, nets):
    audio = _audio(5000, 0)
    cfg = ModelConfig(
        model_uri=affine_dir,
        layers="last",
        dtype="float32",
        storage_dtype="float32",
        device="cpu",
    )
    out = ModelStage(cfg)(_decoded_batch([("a", audio, None)]))
    assert out.schema.field("layer_2").type == pa.list_(pa.list_(pa.float32(), HIDDEN))
    expected = _alone(nets["affine"], audio, (2,))[2]
    np.testing.assert_allclose(_features(out, 2, 0), expected, rtol=1e-5, atol=1e-5)


# -- non-finite guard -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def overflow_dirs(affine_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("overflow")

    def scale(model):  # overflows float16 (max 65504), finite in float32
        model.feature_projection.projection.weight.mul_(1e6)

    def inf(model):  # non-finite in any dtype
        model.feature_projection.projection.weight[0, 0] = float("inf")

    return {
        "fp16_overflow": _derive_model(affine_dir, str(root / "big"), scale),
        "always_inf": _derive_model(affine_dir, str(root / "inf"), inf),
    }


def _all_finite(table: pa.Table) -> bool:
    for name in table.column_names:
        if name.startswith("layer_"):
            values = table.column(name).combine_chunks().values.flatten()
            arr = values.to_numpy(zero_copy_only=False).astype(np.float32)
            if not np.isfinite(arr).all():
                return False
    return True


def test_float16_overflow_falls_back_to_float32(overflow_dirs):
    lengths = [6000, 3000]
    batch = _decoded_batch(
        [(f"s{i}", _audio(n, seed=i), None) for i, n in enumerate(lengths)]
        + [("bad", None, errors.TOO_SHORT)]
    )
    cfg = ModelConfig(
        model_uri=overflow_dirs["fp16_overflow"],
        layers="all",
        dtype="float16",
        storage_dtype="float32",
        device="cpu",
    )
    stage = ModelStage(cfg, self_test=False)  # the per-batch guard, not the self-test
    out = stage(batch)
    assert out.num_rows == 3
    assert _all_finite(out)
    reasons = out.column("error_reason").to_pylist()
    dtypes = out.column("compute_dtype").to_pylist()
    assert reasons[2] == errors.TOO_SHORT
    for i in range(2):
        if reasons[i] is None:
            assert dtypes[i] == "float32"
            assert _features(out, 2, i).shape == (num_frames(lengths[i]), HIDDEN)
        else:
            assert reasons[i] == errors.NON_FINITE
            assert _features(out, 2, i) is None
    assert out.column("fallback_reason").to_pylist()[:2] == ["non_finite", "non_finite"]
    # this model is finite in float32, so the fallback rescues every row
    assert reasons[:2] == [None, None]
    # and the rescued features equal a plain float32 run
    ref = load_model(overflow_dirs["fp16_overflow"], "cpu", "float32")
    for i, n in enumerate(lengths):
        expected = _alone(ref, _audio(n, seed=i))
        for k in ALL_LAYERS:
            assert _rel(_features(out, k, i), expected[k]) < 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_non_finite_even_in_float32_becomes_error_row(overflow_dirs, dtype):
    batch = _decoded_batch(
        [("a", _audio(5000, 0), None), ("bad", None, errors.TOO_SHORT), ("b", _audio(900, 1), None)]
    )
    cfg = ModelConfig(
        model_uri=overflow_dirs["always_inf"], layers="0,2", dtype=dtype, device="cpu"
    )
    stage = ModelStage(cfg, self_test=False)  # the per-batch guard, not the self-test
    out = stage(batch)
    assert out.num_rows == 3
    assert out.column("segment_id").to_pylist() == ["a", "bad", "b"]
    assert out.column("error_reason").to_pylist() == [
        errors.NON_FINITE,
        errors.TOO_SHORT,
        errors.NON_FINITE,
    ]
    assert out.column("error_stage").to_pylist() == [
        errors.STAGE_MODEL,
        errors.STAGE_DECODE,
        errors.STAGE_MODEL,
    ]
    for i in (0, 2):
        assert "non-finite" in out.column("error_message")[i].as_py()
        for k in (0, 2):
            assert _features(out, k, i) is None
    assert _all_finite(out)
    if dtype != "float32":  # an FP32 retry was tried before giving up
        fallback = out.column("fallback_reason").to_pylist()
        assert [fallback[0], fallback[2]] == ["non_finite", "non_finite"]


# -- Arrow in and out ------------------------------------------------------------------------
def test_audio_views_of_sliced_chunks_are_zero_copy_rows():
    from hubert_ray.stages.extractor import audio_views

    rows = [np.arange(n, dtype=np.float32) + 10 * n for n in (3, 5, 2, 4)]
    arr = pa.array(rows[:3], pa.large_list(pa.float32()))
    column = pa.chunked_array([arr.slice(1), pa.array(rows[3:], pa.large_list(pa.float32()))])
    views = audio_views(column)
    assert [v.tolist() for v in views] == [r.tolist() for r in rows[1:]]
    # views share the column's memory: no copy of the batch's audio
    assert np.shares_memory(views[0], arr.values.to_numpy())


def test_features_array_rows_nulls_and_dropped_frames():
    from hubert_ray.stages.extractor import features_array

    hidden = 3
    values = np.arange(6 * hidden, dtype=np.float16).reshape(6, hidden)
    # row 0: 2 frames; row 1: null without frames (a decode error); row 2: 3 frames;
    # row 3: 1 frame
    arr = features_array(values[:6], [2, 0, 3, 1], [True, False, True, True], "float16")
    assert arr.type == pa.list_(pa.list_(pa.float16(), hidden))
    assert arr.null_count == 1 and arr[1].as_py() is None
    got = [None if a.as_py() is None else np.array(a.as_py()) for a in arr]
    np.testing.assert_array_equal(got[0], values[0:2])
    np.testing.assert_array_equal(got[2], values[2:5])
    np.testing.assert_array_equal(got[3], values[5:6])
    # nothing dropped: the column is the values buffer itself
    assert arr.values.values.buffers()[1].address == values.ctypes.data
    # row 2 failed after its frames were computed: null, and its frames are left out
    arr = features_array(values, [2, 0, 3, 1], [True, False, False, True], "float16")
    assert arr[2].as_py() is None and arr.null_count == 2
    np.testing.assert_array_equal(np.array(arr[3].as_py()), values[5:6])
    assert len(arr.values) == 3

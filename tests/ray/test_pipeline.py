"""Local-Ray pipeline tests: the whole job on a generated corpus with a tiny model.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/unit/test_pipeline.py``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hubert_ray import read_features
from hubert_ray.core.config import ExtractConfig
from hubert_ray.dataset import output

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def job(ray_session, corpus, tiny_model, tmp_path_factory):
    from hubert_ray.backend import extract

    out = str(tmp_path_factory.mktemp("out") / "features-run")
    cfg = ExtractConfig(
        manifest=corpus,
        model=tiny_model,
        output=out,
        layers="0,2",
        chunk_seconds=4.0,
        batch_size=8,
        rows_per_file=10,
        num_cpu_actors=2,
        decode_batch_size=6,
    )
    summary = extract.run(cfg)
    return cfg, summary


def expected_outcomes(corpus: str) -> dict[str, str]:
    with open(os.path.join(os.path.dirname(corpus), "expected.json")) as f:
        return json.load(f)


def test_every_segment_exactly_once(job, corpus):
    cfg, summary = job
    expected = expected_outcomes(corpus)
    feats = output.read_table(os.path.join(cfg.output, "features"), ["segment_id"])
    errs = output.read_table(os.path.join(cfg.output, "errors"))
    ids = feats.column("segment_id").to_pylist() + errs.column("segment_id").to_pylist()
    assert sorted(ids) == sorted(expected)  # each once, none missing, none extra
    assert summary["segments_total"] == len(expected)
    assert summary["segments_missing"] == summary["segments_duplicated"] == 0
    assert summary["segments_ok"] == sum(v == "ok" for v in expected.values())


def test_error_rows_carry_expected_reasons(job, corpus):
    cfg, summary = job
    expected = expected_outcomes(corpus)
    errs = output.read_table(os.path.join(cfg.output, "errors")).to_pylist()
    got = {r["segment_id"]: r["reason"] for r in errs}
    want = {k: v for k, v in expected.items() if v != "ok"}
    assert got == want
    assert all(r["stage"] == "decode" and r["message"] for r in errs)
    reasons: dict[str, int] = {}
    for v in want.values():
        reasons[v] = reasons.get(v, 0) + 1
    assert summary["errors_by_reason"] == reasons


def test_features_equal_direct_model_call(job, corpus, tiny_model):
    """Pipeline features == decoding the same audio and running ExactEncoder on each alone."""
    import torch

    from hubert_ray.core.chunking import plan_chunks
    from hubert_ray.corpus import manifest
    from hubert_ray.corpus.audio import cut_segment, normalise, read_audio, to_mono_16k
    from hubert_ray.model.encoder import load_model

    cfg, _ = job
    net = load_model(tiny_model, "cpu", "float32")
    got = read_features(cfg.output, layer=2)
    got0 = read_features(cfg.output, layer=0)
    checked = 0
    for rec in manifest.read_manifest(corpus):
        ok = [s for s in rec.segments if s.segment_id in got]
        if not ok:
            continue
        audio = to_mono_16k(*read_audio(rec.audio_uri))
        for seg in ok:
            x = normalise(cut_segment(audio, seg.start_s, seg.end_s, cfg.end_tolerance_s))
            feats = {0: [], 2: []}
            for s, e in plan_chunks(len(x), int(cfg.chunk_seconds * 16000)):
                out, _ = net(torch.from_numpy(x[s:e])[None], torch.tensor([e - s]), (0, 2))
                for k in feats:
                    feats[k].append(out[k][0])
            for k, table in ((2, got), (0, got0)):
                ref = torch.cat(feats[k]).numpy()
                val = table[seg.segment_id].astype(np.float32)
                assert val.shape == ref.shape
                rel = np.linalg.norm(val - ref) / max(np.linalg.norm(ref), 1e-6)
                assert rel < 2e-3, (seg.segment_id, k, rel)  # float16 storage
            checked += 1
    assert checked >= 20


def test_output_schema_and_metadata(job, tiny_model):
    cfg, _ = job
    files = sorted(f for f in os.listdir(os.path.join(cfg.output, "features")))
    assert len(files) >= 2 and all(f.endswith(".parquet") and not f.startswith(".") for f in files)
    schema = pq.read_schema(os.path.join(cfg.output, "features", files[0]))
    layer = schema.field("layer_2").type
    assert pa.types.is_list(layer) and pa.types.is_fixed_size_list(layer.value_type)
    assert layer.value_type.list_size == 32 and layer.value_type.value_type == pa.float16()
    for name, typ in [
        ("segment_id", "string"),
        ("recording_id", "string"),
        ("start_s", "double"),
        ("end_s", "double"),
        ("num_frames", "int32"),
        ("model", "string"),
        ("model_revision", "string"),
        ("compute_dtype", "string"),
        ("precision_checked", "bool"),
    ]:
        assert str(schema.field(name).type) == typ, name
    meta = output.run_metadata(cfg.output)
    assert meta["layers"] == [0, 2] and meta["config"]["chunk_seconds"] == 4.0
    table = output.read_table(os.path.join(cfg.output, "features"))
    assert set(table.column("compute_dtype").to_pylist()) == {"float32"}
    assert set(table.column("model").to_pylist()) == {"tiny-hubert"}
    frames = table.column("num_frames").to_pylist()
    durs = [
        e - s
        for s, e in zip(
            table.column("start_s").to_pylist(), table.column("end_s").to_pylist(), strict=True
        )
    ]
    for f, d in zip(frames, durs, strict=True):
        assert abs(f - ((round(d * 16000) - 400) // 320 + 1)) <= 1


def test_readable_with_pandas_without_ray(job):
    """A plain subprocess with pandas/pyarrow only: Ray is never imported."""
    import subprocess
    import sys

    cfg, _ = job
    code = (
        "import sys, pandas as pd, numpy as np\n"
        f"df = pd.read_parquet({os.path.join(cfg.output, 'features')!r})\n"
        "row = df.iloc[0]\n"
        "arr = np.stack(row['layer_2'])\n"
        "assert arr.shape == (row['num_frames'], 32), arr.shape\n"
        "assert 'ray' not in sys.modules\n"
        "print(len(df), arr.dtype)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[1] == "float16"


def test_read_features_helper(job):
    cfg, summary = job
    feats = read_features(cfg.output)
    assert len(feats) == summary["segments_ok"]
    some = sorted(feats)[:3]
    sub = read_features(cfg.output, segment_ids=some, layer=0)
    assert sorted(sub) == some
    assert all(v.dtype == np.float16 and v.shape[1] == 32 for v in sub.values())
    with pytest.raises(KeyError):
        read_features(cfg.output, layer=1)


def test_summary_file(job):
    cfg, summary = job
    with open(os.path.join(cfg.output, "_summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk == summary
    for key in (
        "segments_total",
        "segments_ok",
        "segments_failed",
        "errors_by_reason",
        "audio_seconds",
        "wall_seconds",
        "x_realtime",
    ):
        assert key in on_disk
    assert on_disk["segments_ok"] + on_disk["segments_failed"] == on_disk["segments_total"]
    assert on_disk["audio_seconds"] > 60 and on_disk["x_realtime"] > 0
    # One run: it wrote all the audio; its x-realtime is the cumulative one.
    assert len(on_disk["runs"]) == 1 and on_disk["runs"][0]["wall_seconds"] > 0
    assert on_disk["run_audio_seconds"] == pytest.approx(on_disk["audio_seconds"], abs=1e-2)
    cumulative = on_disk["cumulative"]
    assert cumulative["runs"] == 1 and cumulative["runs_interrupted"] == 0
    assert cumulative["audio_seconds"] == pytest.approx(on_disk["audio_seconds"], abs=1e-2)
    assert cumulative["x_realtime"] == pytest.approx(on_disk["x_realtime"], rel=1e-2)


def test_existing_output_resumed_then_overwritten(job, ray_session):
    """A rerun of a finished job does nothing (tests/integration/test_resume.py covers resume
    in depth)."""
    from hubert_ray.backend import extract

    cfg, summary = job
    assert extract.run(cfg) == json.load(open(os.path.join(cfg.output, "_summary.json")))
    again = extract.run(cfg, overwrite=True)
    assert again["segments_ok"] == summary["segments_ok"]
    assert again["segments_duplicated"] == 0


def test_decode_not_fused_into_model_actor(ray_session, corpus, tiny_model, tmp_path):
    """Decode must stay CPU tasks (placeable on CPU-only nodes), not run inside model actors."""
    from hubert_ray.backend import dataset, extract, placement
    from hubert_ray.corpus import canonical, manifest
    from hubert_ray.dataset import resume

    cfg = ExtractConfig(manifest=corpus, model=tiny_model, output=str(tmp_path / "o"))
    uri, table = extract.job_manifest(cfg)
    (tmp_path / "o").mkdir()
    canonical.write_validated(table, uri)
    info = canonical.manifest_info(uri)
    index = resume.build_done_index(cfg.output)
    placement = placement.plan_placement(cfg, cluster_gpus=0)
    ds = dataset.build_manifest_dataset(cfg, uri, info, index, placement).materialize()
    stats = ds.stats()
    assert "MapBatches(_decode)->MapBatches(ModelActor)" not in stats
    assert "MapBatches(_decode)" in stats and "MapBatches(ModelActor)" in stats
    assert ds.count() == sum(len(r.segments) for r in manifest.read_manifest(corpus))


def test_demo_sized_run_does_not_spill(job):
    """Features leave the actor as float16 in bounded batches: nothing spills to disk."""
    _, summary = job
    assert summary["object_store_spilled_mib"] == 0.0

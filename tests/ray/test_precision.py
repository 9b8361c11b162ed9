"""Precision assurance: deterministic sampling, metrics, warn / fallback / fail, INT8.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/unit/test_precision.py``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hubert_ray import read_features
from tests.unit.test_model import _derive_model
from tests.unit.test_precision import LAYERS


# -- the whole job, with a model that overflows float16 -----------------------------------------
@pytest.fixture(scope="module")
def overflow_model(tiny_model, tmp_path_factory):
    def scale(model):  # overflows float16 (max 65504); finite in float32
        model.feature_projection.projection.weight.mul_(1e6)

    return _derive_model(tiny_model, str(tmp_path_factory.mktemp("ovf") / "big"), scale)


@pytest.mark.ray
def test_overflow_model_job_falls_back_and_writes_no_non_finite(
    ray_session, corpus, overflow_model, tmp_path, capsys
):
    from jobs import extract

    out = tmp_path / "out"
    code = extract.main(
        [
            "--manifest",
            corpus,
            "--model",
            overflow_model,
            "--output",
            str(out),
            "--dtype",
            "float16",
            "--storage-dtype",
            "float32",
            "--layers",
            "all",
            "--quiet",
        ]
    )
    assert code == 0
    with open(out / "_summary.json") as f:
        summary = json.load(f)
    prec = summary["precision"]
    # The actor's self-test saw the overflow before the first batch: every row in FP32.
    assert prec["self_test_breaches"] == len(prec["self_test"]) == summary["model_actors"]
    assert {t["action"] for t in prec["self_test"]} == {"fallback"}
    assert prec["fallbacks_self_test"] == prec["fallbacks"] == summary["segments_ok"] > 0
    assert summary["compute_dtype_counts"] == {"float32": summary["segments_ok"]}
    assert prec["compute_dtype"] == "float16" and prec["reference_weights_bytes"] > 0
    for k in LAYERS:
        for arr in read_features(str(out), layer=k).values():
            assert np.isfinite(arr).all()
    assert os.path.isdir(out / "features")


@pytest.mark.ray
def test_overflow_model_job_fails_with_message(
    ray_session, corpus, overflow_model, tmp_path, capsys
):
    from jobs import extract

    code = extract.main(
        [
            "--manifest",
            corpus,
            "--model",
            overflow_model,
            "--output",
            str(tmp_path / "out"),
            "--dtype",
            "float16",
            "--quiet",
            "--on-precision-breach",
            "fail",
        ]
    )
    err = capsys.readouterr().err
    assert code == 3
    # the self-test's breach, before any feature was written
    assert "precision breach: self-test on cpu" in err and "layer" in err and "inf" in err
    assert not (tmp_path / "out" / "features").exists()


@pytest.mark.ray
def test_sampled_job_reports_precision_section(ray_session, corpus, tiny_model, tmp_path):
    from hubert_ray.backend import extract
    from hubert_ray.core.config import ExtractConfig
    from hubert_ray.dataset import output

    cfg = ExtractConfig(
        manifest=corpus,
        model=tiny_model,
        output=str(tmp_path / "o"),
        dtype="bfloat16",
        layers="1,2",
        # the reporting is under test, not this CPU's bfloat16: no fallback, whatever it is
        precision_warn=0.5,
        precision_limit=0.9,
    )
    summary = extract.run(cfg)
    prec = summary["precision"]
    # A small run is checked whole at the default 1 % (at least 64 segments are).
    assert prec["sample_rate"] == 0.01 and prec["effective_sample_rate"] == 1.0
    checks = output.read_table(str(tmp_path / "o" / "precision"))
    ids = set(checks.column("segment_id").to_pylist())
    feats = output.read_table(str(tmp_path / "o" / "features"), ["segment_id", "precision_checked"])
    flagged = {
        s
        for s, c in zip(
            feats.column("segment_id").to_pylist(),
            feats.column("precision_checked").to_pylist(),
            strict=True,
        )
        if c
    }
    assert ids == flagged == set(feats.column("segment_id").to_pylist())
    assert [t["action"] for t in prec["self_test"]] == ["none"] * summary["model_actors"]
    assert prec["sampled"] == len(ids) > 0
    assert sorted(prec["layers"]) == ["1", "2"]
    for layer in ("1", "2"):
        rel = [r["rel_l2"] for r in checks.to_pylist() if r["layer"] == int(layer)]
        assert prec["layers"][layer]["rel_l2_max"] == pytest.approx(max(rel))
        assert prec["layers"][layer]["segments"] == len(ids)
    # every segment rechecked in FP32: a real share of the device time, not all of it
    assert 0 < prec["audit_device_share"] < 1


@pytest.mark.ray
def test_recompute_suspect_redoes_exactly_the_rows_written_before_an_escalation(
    ray_session, corpus, tiny_model, tmp_path
):
    """Rows an actor wrote in float16 before its checks escalated it to float32 are listed in
    the summary; ``--recompute-suspect`` recomputes exactly those and nothing else."""
    from hubert_ray.backend import extract
    from hubert_ray.core.config import ExtractConfig
    from hubert_ray.dataset import output

    out = str(tmp_path / "o")
    common = dict(manifest=corpus, model=tiny_model, output=out, dtype="float16", layers="2")
    first = extract.run(ExtractConfig(**common, precision_limit=0.9, precision_warn=0.5))
    feats = output.read_table(f"{out}/features", ["segment_id", "actor_id", "compute_dtype"])
    (actor,) = set(feats.column("actor_id").to_pylist())
    assert set(feats.column("compute_dtype").to_pylist()) == {"float16"}
    # The record an actor writes when it escalates (Engine.report), for the first run's actor.
    path = tmp_path / "o" / "actors" / f"{actor}.json"
    report = json.loads(path.read_text())
    report.update(escalated=True, reduced_rows_before_escalation=first["segments_ok"])
    path.write_text(json.dumps(report))
    before = read_features(out, layer=2)

    summary = extract.run(ExtractConfig(**common, recompute_suspect=False))  # complete: no-op
    assert summary["segments_ok"] == first["segments_ok"]
    redo = extract.run(ExtractConfig(**common, recompute_suspect=True))
    assert redo["segments_missing"] == redo["segments_duplicated"] == 0
    assert redo["segments_ok"] == first["segments_ok"]
    assert redo["precision"]["suspect_segments"] == 0
    feats = output.read_table(f"{out}/features", ["segment_id", "actor_id"])
    assert actor not in set(feats.column("actor_id").to_pylist())  # every row recomputed
    after = read_features(out, layer=2)
    assert sorted(after) == sorted(before)
    for sid, x in after.items():  # same model and dtype: same features
        np.testing.assert_allclose(x.astype(np.float32), before[sid].astype(np.float32), atol=2e-2)

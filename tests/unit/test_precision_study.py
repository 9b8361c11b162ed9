"""``python -m benchmarks.precision_study`` on the tiny model (CPU): per-layer errors and the
split of the forward's time into phases (no timing assertions: only that every phase was
marked)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from benchmarks import precision_study  # noqa: E402


def test_precision_study_reports_errors_and_phases(tmp_path, tiny_model):
    out = tmp_path / "prec"
    args = ["--device", "cpu", "--model", tiny_model, "--batch", "3", "--seconds", "2"]
    assert precision_study.main([*args, "--iters", "2", "--out", str(out)]) == 0
    result = json.loads((out / "precision.json").read_text())
    by = {(r["dtype"], r["fp32_norms"]): r for r in result["results"]}
    assert set(by) >= {("float32", False), ("float16", False), ("float16", True)}
    for key in (("float32", False), ("bfloat16", False)):
        phases = by[key]["phases"]
        assert list(phases) == list(precision_study.PHASES)
        assert all(p["ms"] > 0 for p in phases.values()), phases
        assert sum(p["share"] for p in phases.values()) == pytest.approx(1.0)
    assert by[("bfloat16", True)]["phases"] is None  # one split per dtype
    assert by[("bfloat16", False)]["layers"]["2"]["rel_l2_mean"] > 0  # bound: hardware's
    assert "| float32 | " in (out / "precision.md").read_text().split("time goes")[1]


def test_phase_split_leaves_no_hooks_behind(tiny_model):
    import torch

    from hubert_ray.model.encoder import load_model

    net = load_model(tiny_model, "cpu")
    xs = precision_study.inputs(2, 1.0)
    phases = precision_study.phase_split(net, xs, torch.device("cpu"), "float32", 1)
    assert set(phases) == set(precision_study.PHASES)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())

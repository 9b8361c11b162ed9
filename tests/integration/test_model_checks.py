"""The driver's checks of a model directory (hubert_ray.model.families): supported families, frame
geometry, the checkpoint's preprocessing and weights that fit the config; bad input exits 2
before any Ray work, naming the file and the field.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/unit/test_model_checks.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.unit.test_model_checks import _with_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def large_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from hubert_ray.testing.synth import make_tiny_family_model

    return make_tiny_family_model(str(tmp_path_factory.mktemp("m") / "large"), "hubert", "large")


# -- through the CLI ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["model_type", "sampling_rate", "weights"])
def test_bad_model_directory_exits_2_before_ray(large_dir, tmp_path, bad):
    d = tmp_path / "m"
    if bad == "model_type":
        _with_config(large_dir, d, model_type="sew")
        words = ["config.json: model_type='sew' is not supported"]
    elif bad == "weights":
        _with_config(large_dir, d, hidden_size=48)
        words = ["model.safetensors: the weights do not match config.json (hidden_size=48"]
    else:
        shutil.copytree(large_dir, d)
        (d / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 8000}))
        words = ["preprocessor_config.json: sampling_rate=8000"]
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "a", "audio": "a.wav"}\n')
    res = subprocess.run(
        [sys.executable, "-m", "jobs.extract", "--manifest", str(m), "--model", str(d)]
        + ["--output", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.startswith("error: --model: "), res.stderr[-2000:]
    for w in words:
        assert w in res.stderr, res.stderr[-2000:]
    assert "ray" not in res.stderr.lower().replace("--manifest", "")
    assert not (tmp_path / "o").exists()

"""The command line: `hubert-ray` and its subcommands (installed, `python -m hubert_ray.cli`,
the old `python -m jobs.<name>`), option errors (exit 2, naming the option), option groups and
the tables made from them, config files, a real CLI run.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/integration/test_cli.py`` and ``tests/unit/test_cli.py``.
"""

from __future__ import annotations

import json

import pytest

from hubert_ray.cli import extract


@pytest.mark.ray
def test_config_file_run_in_process(ray_session, corpus, tiny_model, tmp_path, capsys):
    """Options from YAML; the command line overrides the file."""
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"manifest: {corpus}\nmodel: {tiny_model}\noutput: {tmp_path / 'out'}\n"
        "layers: '1'\nchunk-seconds: 5\n"
    )
    code = extract.main(["--config", str(cfg), "--layers", "2", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out[: out.rindex("}") + 1])
    assert summary["layers"] == [2]
    assert summary["config"]["chunk_seconds"] == 5 if "config" in summary else True
    with open(tmp_path / "out" / "_summary.json") as f:
        assert json.load(f)["config"]["chunk_seconds"] == 5

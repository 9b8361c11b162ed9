"""The entry point: option errors (exit 2, naming the option), config files, a real CLI run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jobs import extract

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "jobs.extract", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--layers", "x"], "--layers"),
        (["--layers", "7"], "--layers"),  # the tiny model has 2 layers
        (["--dtype", "fp8"], "--dtype"),
        (["--chunk-seconds", "0"], "--chunk-seconds"),
        (["--batch-size", "0"], "--batch-size"),
        (["--torch-threads", "-1"], "--torch-threads"),
        (["--micro-batch-cost-seconds", "-1"], "--micro-batch-cost-seconds"),
        (["--calls-per-actor", "0"], "--calls-per-actor"),
        (["--pad-multiple-seconds", "-1"], "--pad-multiple-seconds"),
        (["--compile", "fast"], "--compile"),
        (["--num-gpus", "-1"], "--num-gpus"),
        (["--storage-options", "{not json"], "--storage-options"),
        (["--storage-dtype", "int4"], "--storage-dtype"),
        (["--no-such-option", "1"], "unrecognized arguments"),
    ],
)
def test_bad_option_exits_2_naming_it(args, needle, corpus, tiny_model, tmp_path, capsys):
    base = ["--manifest", corpus, "--model", tiny_model, "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        code = extract.main(base + args)
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    assert not (tmp_path / "o").exists()  # nothing ran


def test_missing_required_option(tmp_path, capsys):
    assert extract.main(["--manifest", "m.jsonl", "--output", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err


def test_bad_manifest_exits_2_before_ray(tmp_path, tiny_model, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "audio": "a.wav"}\n{"id": "a", "audio": "b.wav"}\nnot json\n')
    code = extract.main(
        ["--manifest", str(bad), "--model", tiny_model, "--output", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.jsonl:2" in err and "bad.jsonl:3" in err


def test_model_without_safetensors_refused(tmp_path, corpus, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\0")
    code = extract.main(
        ["--manifest", corpus, "--model", str(tmp_path / "m"), "--output", str(tmp_path / "o")]
    )
    assert code == 2
    assert "safetensors" in capsys.readouterr().err


def test_config_file_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("manifest: m.jsonl\nmodel: m\noutput: o\nlayerz: 3\n")
    assert extract.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "layerz" in err and "--config" in err


def test_retry_transient_option(tmp_path, capsys):
    parser = extract.build_parser()
    base = ["--manifest", "m.jsonl", "--model", "m", "--output", "o"]
    cfg, _ = extract.config_from_args(parser.parse_args(base))
    assert cfg.retry_transient is True
    cfg, _ = extract.config_from_args(parser.parse_args([*base, "--no-retry-transient"]))
    assert cfg.retry_transient is False
    job = tmp_path / "job.yaml"
    job.write_text("manifest: m.jsonl\nmodel: m\noutput: o\nretry_transient: false\n")
    cfg, _ = extract.config_from_args(parser.parse_args(["--config", str(job)]))
    assert cfg.retry_transient is False
    job.write_text("manifest: m.jsonl\nmodel: m\noutput: o\nretry_transient: maybe\n")
    assert extract.main(["--config", str(job)]) == 2
    assert "retry_transient" in capsys.readouterr().err


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


@pytest.mark.parametrize("keep", ["header", "data"])
def test_truncated_weights_refused_before_ray(corpus, tiny_model, tmp_path, capsys, keep):
    """A safetensors file cut short (a partial copy or upload), in its header or in its data:
    exit 2 naming the file, before any Ray work."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[: header_end // 2 if keep == "header" else header_end + 100])
    out = tmp_path / "out"
    code = extract.main(["--manifest", corpus, "--model", str(model), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2, err
    assert err.startswith("error: --model: ") and "model.safetensors" in err, err
    assert ("truncated" if keep == "data" else "not a readable safetensors file") in err, err
    assert not out.exists()


def test_model_actor_that_cannot_start_exits_4_with_its_cause(corpus, tiny_model, tmp_path):
    """Model actors whose constructor raises (here an injected fault, as a load that fails on
    the workers would): the job stops with the cause in one line, no traceback of its own, and
    writes no completion marker."""
    out = tmp_path / "out"
    res = run_cli(
        "--manifest", corpus, "--model", tiny_model, "--output", str(out), "--quiet",
        env={"HUBERT_RAY_FAIL_MODE": "start"},
    )  # fmt: skip
    err = res.stderr.strip().splitlines()
    assert res.returncode == 4, res.stderr[-3000:]
    assert err[-1] == (
        "error: the model actors could not start: InjectedFault: injected failure at the "
        "model actor's start"
    ), err[-1]
    assert not (out / "_SUCCESS").exists()


def test_cli_subprocess_embedded_ray(corpus, tiny_model, tmp_path):
    """`python -m jobs.extract` as a user runs it: starts its own local Ray, prints the summary."""
    out = tmp_path / "out"
    res = run_cli(
        "--manifest",
        corpus,
        "--model",
        tiny_model,
        "--output",
        str(out),
        "--layers",
        "all",
        "--dtype",
        "float32",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert '"segments_total"' in res.stdout and "x_realtime" in res.stdout
    assert f"features: {out}/features" in res.stdout
    # progress in segments; a healthy run is quiet: no warning or error line of ours or of our
    # use of Ray (Ray 2.60's core worker logs one line about its own actor arguments, upstream
    # ray-project/ray#57733, which no option turns off)
    assert "progress: 43 / 43 segments (100.0 %)" in res.stderr
    loud = [
        line
        for line in res.stderr.splitlines()
        if ("WARNING" in line or "ERROR" in line or " W " in line or " E " in line)
        and "has constructor arguments in the object store" not in line
    ]
    assert not loud, loud
    with open(out / "_summary.json") as f:
        summary = json.load(f)
    assert summary["layers"] == [0, 1, 2]
    assert summary["segments_ok"] + summary["segments_failed"] == summary["segments_total"]


def test_readme_options_table_is_the_generated_one():
    """One definition per option: the README's table is what the CLI generates from the
    config's fields (regenerate it with ``python -m jobs.extract --options-table``)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert extract.options_table() in readme


def test_every_config_field_is_a_cli_option():
    import dataclasses

    from hubert_ray.core.config import ExtractConfig

    parser = extract.build_parser()
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(ExtractConfig)} <= flags

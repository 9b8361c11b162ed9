"""The command line: `hubert-ray` and its subcommands (installed, `python -m hubert_ray.cli`,
the old `python -m jobs.<name>`), option errors (exit 2, naming the option), option groups and
the tables made from them, config files, a real CLI run.

The rest of these tests, in other tiers (tests/conftest.py), are in ``tests/ray/test_cli.py``
and ``tests/unit/test_cli.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "hubert_ray.cli", "extract", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
    """`hubert-ray extract` as a user runs it: starts its own local Ray, prints the summary."""
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


def _installed(name: str) -> str:
    """A console script of the environment running the tests (``pip install -e .``)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: run `pip install -e .` (pyproject [project.scripts])")
    return path


def test_installed_command_lists_its_subcommands():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [_installed("hubert-ray"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    top = run("--help")
    assert top.returncode == 0, top.stderr
    assert top.stdout.startswith("usage: hubert-ray")
    for name in ("extract", "prepare", "plan", "kmeans", "demo"):
        assert f"    {name} " in top.stdout, name
    sub = run("extract", "--help")
    assert sub.returncode == 0, sub.stderr
    assert sub.stdout.startswith("usage: hubert-ray extract")
    for flag in ("--manifest", "--model", "--output", "--layers", "--config", "--help-all"):
        assert flag in sub.stdout, flag
    for group in ("precision", "decode", "output", "tuning"):
        assert f"{group} options:" in sub.stdout, group
    bad = run("extract", "--manifest", "m", "--model", "m", "--output", "o", "--dtype", "fp8")
    assert bad.returncode == 2 and "--dtype" in bad.stderr, bad.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--hours", "100", "--gpus", "2", "--decode-cores", "64", "--json"],
        ["extract", "--options-table", "groups"],
        ["prepare", "--manifest", "m.jsonl", "--output", "o.parquet", "--storage-options", "[1]"],
        ["kmeans"],
    ],
)
def test_old_entry_points_behave_as_the_command(argv):
    """`python -m jobs.<name>` (scheduled pipelines) = `python -m hubert_ray.cli <name>`: the
    same output and exit code."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    runs = [
        subprocess.run(
            [sys.executable, "-m", *cmd, *argv[1:]],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        for cmd in (["jobs." + argv[0]], ["hubert_ray.cli", argv[0]])
    ]
    assert runs[0].returncode == runs[1].returncode, (runs[0].stderr, runs[1].stderr)
    assert runs[0].stdout == runs[1].stdout
    assert runs[0].stderr == runs[1].stderr


def test_command_line_imports_neither_torch_nor_ray():
    """Parsing and --help stay light; `extract` sets Ray's auth mode before Ray is imported."""
    code = (
        "import sys, hubert_ray.cli.main, hubert_ray.cli.extract, hubert_ray.cli.plan, "
        "hubert_ray.cli.prepare, hubert_ray.cli.kmeans, hubert_ray.cli.demo, jobs.extract; "
        "sys.exit(int('torch' in sys.modules or 'ray' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0

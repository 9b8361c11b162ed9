"""Failures at the output end: a file system that fills up mid-run, a bucket that does not exist.
The job stops with one line naming the output and the cause and exit code 5; what it wrote is
whole, and a rerun once the cause is fixed completes with every segment once.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/unit/test_output_failures.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hubert_ray.core.config import ExtractConfig
from hubert_ray.core.errors import OutputError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _extract(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "jobs.extract", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs: the manifest copy and the job's files fit, the features (~1.2 MB) do
    not. Mounting needs root with CAP_SYS_ADMIN (as CI's machine has)."""
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    yield where
    subprocess.run(["umount", "-l", str(where)])


def test_a_full_file_system_stops_the_job_with_exit_5_and_a_rerun_resumes(
    corpus, tiny_model, small_fs
):
    out = str(small_fs / "out")
    args = ["--manifest", corpus, "--model", tiny_model, "--output", out]
    args += ["--rows-per-file", "4"]
    full = _extract(*args)
    assert full.returncode == 5, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write to the output"), full.stderr[-3000:]
    assert out in last and "no space left on the device" in last and "rerun" in last
    assert "Traceback" not in full.stderr
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))

    grown = subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)])
    assert grown.returncode == 0
    rerun = _extract(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    with open(os.path.join(out, "_summary.json")) as f:
        summary = json.load(f)
    assert summary["segments_missing"] == summary["segments_duplicated"] == 0
    assert summary["segments_resumed"] > 0  # parts written before the disk filled were kept
    assert summary["segments_ok"] + summary["segments_failed"] == summary["segments_total"]


@pytest.mark.s3
def test_a_missing_bucket_is_an_output_error_before_any_work(corpus, tiny_model):
    """Against a real S3 server (moto, loopback): the output's bucket does not exist."""
    pytest.importorskip("moto.server")
    from hubert_ray.backend import extract
    from tests.integration.s3_server import S3Server

    server = S3Server()
    try:
        opts = {"key": "AKIAHUBERTRAY", "secret": "not-a-secret", "endpoint_url": server.url}
        cfg = ExtractConfig(
            manifest=corpus,
            model=tiny_model,
            output="s3://no-such-bucket/out",
            storage_options=opts,
        )
        with pytest.raises(OutputError) as caught:
            extract.run(cfg)
    finally:
        server.stop()
    assert "s3://no-such-bucket/out" in str(caught.value)
    assert "does not exist" in str(caught.value) and "rerun" in str(caught.value)

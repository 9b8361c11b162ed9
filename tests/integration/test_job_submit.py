"""``ray job submit`` against a real local head (``ray start``), token authentication on.

The head runs in its own session (``start_new_session``) with its own ``--temp-dir`` and free
ports, and is stopped by signalling that process (``ray start --block`` stops its children)
and then killing whatever is left in that session by pid — never ``ray stop``, which would kill
every Ray on the machine, the test session's own included.

The job runs the synthetic WenetSpeech corpus end to end: ``hubert-ray prepare --wenetspeech``
then ``hubert-ray extract --config``, uploaded with ``--working-dir .`` (the repository) as in the
README: the installed command (the venv's ``hubert-ray``, on the head's ``PATH``) running the
uploaded code.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from hubert_ray.corpus import wenetspeech

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNTIME_ENV = {
    "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
    "excludes": [".venv", "demo_out", ".git", ".pytest_cache", ".ruff_cache", "*.egg-info"],
}


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _session_pids(sid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: session id
            pids.append(int(name))
    return pids


def _ray_bin(name: str = "ray") -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


@pytest.fixture(scope="module")
def head():
    """A local Ray head with the dashboard (job API) and token auth; yields (address, env)."""
    tmp = tempfile.mkdtemp(prefix="hrjob", dir="/tmp")  # short: Ray's socket paths are long
    token = os.path.join(tmp, "auth_token")
    with open(token, "w") as f:
        f.write(secrets.token_hex(32))
    gcs, dash, client, agent_grpc, agent_http, metrics, rtenv = _free_ports(7)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": token,
        # `hubert-ray` in the job's entrypoint must be this venv's (hubert_ray's dependencies).
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    }
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "HUBERT_RAY_TRACE_DIR"):
        env.pop(var, None)
    cmd = [
        _ray_bin(), "start", "--head", "--block", "--disable-usage-stats",
        "--num-cpus", "4", "--num-gpus", "0",
        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--port", str(gcs), "--dashboard-port", str(dash), "--include-dashboard", "true",
        "--ray-client-server-port", str(client),
        "--dashboard-agent-grpc-port", str(agent_grpc),
        "--dashboard-agent-listen-port", str(agent_http),
        "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rtenv),
        "--object-store-memory", str(200 * 2**20), "--temp-dir", os.path.join(tmp, "ray"),
    ]  # fmt: skip
    log = open(os.path.join(tmp, "head.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:  # the job API answers (401 without a token: auth is on)
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                status = 200
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError:
                status = None
            if status in (200, 401):
                break
            assert proc.poll() is None and time.time() < deadline, open(log.name).read()[-3000:]
            time.sleep(1)
        assert status == 401, "the dashboard answered without a token: auth is off"
        yield address, env
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for pid in _session_pids(proc.pid):  # anything of that head still alive
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.wait(timeout=5)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_job_submit_runs_prepare_and_extract(head, wenetspeech_corpus, tiny_model, tmp_path):
    address, env = head
    out = str(tmp_path / "features")
    manifest_path = str(tmp_path / "manifest_M.parquet")
    config = tmp_path / "job.yaml"
    config.write_text(
        f"manifest: {manifest_path}\nmodel: {tiny_model}\noutput: {out}\n"
        "layers: '2'\nbatch-size: 8\ndecode-batch-size: 6\nrows-per-file: 16\n"
        "decode-memory-mb: 256\n"
    )
    # Ray quotes each entrypoint word: two commands need their own shell.
    entrypoint = (
        f"hubert-ray prepare --wenetspeech {wenetspeech_corpus} --subset M "
        f"--output {manifest_path} && hubert-ray extract --config {config} --quiet"
    )
    proc = subprocess.run(
        [_ray_bin(), "job", "submit", "--address", address, "--working-dir", ".",
         "--runtime-env-json", json.dumps(RUNTIME_ENV), "--", "sh", "-c", entrypoint],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in logs, logs[-6000:]
    want = wenetspeech.prepare(wenetspeech_corpus, "M", str(tmp_path / "check.parquet"))
    assert f"wrote {want['recordings']} recordings, {want['segments']} segments" in logs
    with open(os.path.join(out, "_summary.json")) as f:
        summary = json.load(f)
    assert summary["segments_total"] == summary["segments_ok"] == want["segments"]
    assert summary["segments_missing"] == summary["segments_duplicated"] == 0
    assert summary["audio_seconds"] == pytest.approx(want["audio_seconds"], abs=0.01)
    assert '"segments_ok": ' in logs  # the job printed its summary into the job logs


def test_job_api_refuses_a_wrong_token(head):
    address, env = head
    bad = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    bad["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    proc = subprocess.run(
        [_ray_bin(), "job", "list", "--address", address],
        env=bad, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "token" in (proc.stdout + proc.stderr).lower()


def _job(address: str, env: dict, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_ray_bin(), "job", args[0], "--address", address, *args[1:]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_job_stop_keeps_parts_and_a_resubmit_resumes(head, tiny_model, tmp_path):
    """``ray job stop`` while parts are being written: the job ends STOPPED with no completion
    marker and its parts kept; the same job submitted again resumes (skips what was written)
    and ends with every segment exactly once."""
    from hubert_ray.testing.faults import DELAY_ENV
    from hubert_ray.testing.synth import synth_signal, write_audio

    address, env = head
    lines = []
    for r in range(40):  # 960 half-second segments, parts of 3 rows: long enough to stop
        write_audio(str(tmp_path / f"r{r}.wav"), synth_signal(12.0, 16000, seed=r), 16000, "wav16")
        segs = [{"id": f"r{r}-{i}", "start_s": 0.5 * i, "end_s": 0.5 * i + 0.5} for i in range(24)]
        lines.append({"id": f"r{r}", "audio": f"r{r}.wav", "segments": segs})
    manifest_path = tmp_path / "manifest.jsonl"
    manifest_path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    entrypoint = [
        "hubert-ray", "extract", "--manifest", str(manifest_path), "--model", tiny_model,
        "--output", str(out), "--num-gpus", "0", "--batch-size", "4", "--decode-batch-size", "8",
        "--rows-per-file", "3", "--quiet",
    ]  # fmt: skip

    def submit(runtime_env: dict) -> list[str]:
        return ["submit", "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env)]

    # The first run's model calls each take 0.25 s more (a slow device: 240 calls of 4 rows,
    # a minute at least), so that the stop lands mid-run however fast this machine is.
    slow = {**RUNTIME_ENV, "env_vars": {**RUNTIME_ENV["env_vars"], DELAY_ENV: "0.25"}}
    first = _job(
        address, env, *submit(slow), "--submission-id", "stop-me", "--no-wait", "--", *entrypoint
    )
    assert first.returncode == 0, first.stdout + first.stderr
    deadline = time.time() + 240
    parts = out / "features"
    while not (parts.is_dir() and any(p.suffix == ".parquet" for p in parts.iterdir())):
        status = _job(address, env, "status", "stop-me", timeout=60).stdout
        assert "RUNNING" in status or "PENDING" in status, status[-3000:]
        assert time.time() < deadline, "no part file appeared"
        time.sleep(0.5)
    stop = _job(address, env, "stop", "stop-me", timeout=120)  # waits until it has stopped
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status = _job(address, env, "status", "stop-me", timeout=60)
    assert "was stopped" in status.stdout + status.stderr, status.stdout + status.stderr
    assert not (out / "_SUCCESS").exists() and not (out / "_summary.json").exists()

    again = _job(address, env, *submit(RUNTIME_ENV), "--", *entrypoint)
    logs = again.stdout + again.stderr
    assert again.returncode == 0 and "succeeded" in logs, logs[-6000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert 0 < summary["segments_resumed"] < 960  # the stopped run's parts, kept and skipped
    assert summary["segments_total"] == summary["segments_ok"] == 960
    assert summary["segments_missing"] == summary["segments_duplicated"] == 0

"""Object storage end to end, against a real S3 server (moto's, on loopback;
``tests/integration/s3_server.py``).

Manifest, audio (relative to an ``s3://`` manifest and absolute ``s3://`` URLs), model and
output all on S3; the result must equal the same job on local files. A fault-injecting proxy
in front of the server checks retries (and their count in the summary) and permanent errors.

The rest of these tests, in other tiers (tests/conftest.py), are in ``tests/unit/test_s3.py``.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest

from hubert_ray.core.config import DecodeConfig, ExtractConfig
from hubert_ray.dataset import output
from hubert_ray.io import storage
from tests.integration.s3_server import FaultProxy, upload_dir
from tests.unit.test_s3 import KEY_ID, SECRET

pytest.importorskip("moto.server")
pytestmark = pytest.mark.s3

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUCKET = "hubert-ray-test"
JOB = dict(
    layers="0,2",
    chunk_seconds=4.0,
    batch_size=8,
    rows_per_file=10,
    num_cpu_actors=1,
    decode_batch_size=6,
)


def options(endpoint: str) -> dict:
    return {"key": KEY_ID, "secret": SECRET, "endpoint_url": endpoint}


@pytest.fixture(scope="module")
def data(s3, corpus, tiny_model):
    """The generated corpus and tiny model uploaded to the bucket. The S3 manifest gives every
    other recording as an absolute ``s3://`` URL, the rest relative to the manifest."""
    fs, _ = storage.filesystem(f"s3://{BUCKET}", options(s3.url))
    fs.mkdir(BUCKET)
    corpus_dir = os.path.dirname(corpus)
    upload_dir(fs, corpus_dir, f"{BUCKET}/corpus")
    with open(corpus) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    for i, rec in enumerate(lines):
        if i % 2:
            rec["audio"] = f"s3://{BUCKET}/corpus/{rec['audio']}"
    fs.pipe_file(
        f"{BUCKET}/corpus/manifest.jsonl", "".join(json.dumps(r) + "\n" for r in lines).encode()
    )
    upload_dir(fs, tiny_model, f"{BUCKET}/models/tiny-hubert")
    with open(os.path.join(corpus_dir, "expected.json")) as f:
        expected = json.load(f)
    return {
        "manifest": f"s3://{BUCKET}/corpus/manifest.jsonl",
        "model": f"s3://{BUCKET}/models/tiny-hubert",
        "local_manifest": corpus,
        "local_model": tiny_model,
        "lines": lines,
        "expected": expected,
    }


@pytest.fixture
def aws_env(monkeypatch, s3):
    """Credentials and endpoint from the standard AWS environment variables only."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_aws_chain_from_environment(aws_env, data):
    """No storage options at all: credentials and endpoint come from the AWS environment."""
    from hubert_ray.corpus import manifest
    from hubert_ray.model import files

    recs = manifest.read_manifest(data["manifest"])
    uris = [r.audio_uri for r in recs]
    assert all(u.startswith(f"s3://{BUCKET}/corpus/audio/") for u in uris)
    assert files.read_model_config(data["model"])["num_hidden_layers"] == 2
    fs, path = storage.filesystem(data["model"])
    assert fs.client_kwargs == {} and "endpoint_url" not in fs.storage_options


def test_canonical_manifest_on_s3_read_column_wise(s3, data):
    """A canonical Parquet manifest on S3 takes the column-wise path and gives the same
    segment rows as the per-record reader (relative audio paths resolve against the bucket)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hubert_ray.corpus import manifest

    opts = options(s3.url)
    recs = manifest.read_manifest(data["manifest"], opts)
    table = manifest.canonical_table(recs)
    # every other recording relative to the manifest's directory, as prepare's users may write
    rel = [
        u.split(f"s3://{BUCKET}/corpus/", 1)[1] if i % 2 else u
        for i, u in enumerate(table.column("audio_uri").to_pylist())
    ]
    table = table.set_column(1, "audio_uri", pa.array(rel, pa.string()))
    uri = f"s3://{BUCKET}/corpus/canonical.parquet"
    fs, path = storage.filesystem(uri, opts)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
    fast = manifest._canonical_segments(uri, opts)
    assert fast is not None and fast.num_rows == sum(len(r.segments) for r in recs)
    assert fast.equals(manifest.segment_table(manifest.read_manifest(uri, opts)))
    assert fast.equals(manifest.segment_table(recs))  # the same audio URLs as the JSONL


def test_decode_from_s3_equals_local(aws_env, data):
    """Every format that decodes locally decodes the same from S3; errors keep their reasons."""
    from hubert_ray.corpus.audio import DecodeError, read_audio

    corpus_dir = os.path.dirname(data["local_manifest"])
    checked = 0
    for rec in data["lines"]:
        rel = rec["audio"].split("/corpus/", 1)[-1]
        try:
            want = read_audio(os.path.join(corpus_dir, rel))
        except DecodeError as exc:
            with pytest.raises(DecodeError) as ei:
                read_audio(f"s3://{BUCKET}/corpus/{rel}")
            assert ei.value.reason == exc.reason
            continue
        got = read_audio(f"s3://{BUCKET}/corpus/{rel}")
        assert got[1] == want[1]
        np.testing.assert_array_equal(got[0], want[0])
        checked += 1
    assert checked >= 20


def test_model_cache_copy_once_atomic_and_concurrent(s3, data, tmp_path):
    opts = options(s3.url)
    root = tmp_path / "cache"
    os.makedirs(root)
    # Leftovers of a copy killed half-way must never be used.
    stale = root / ".partial-killed"
    os.makedirs(stale / "tiny-hubert")
    (stale / "tiny-hubert" / "config.json").write_text("{}")

    results, errors = [], []

    def call():
        try:
            results.append(storage.local_model_dir(data["model"], opts, cache_root=str(root)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    local = results[0]
    assert os.path.basename(local) == "tiny-hubert"  # model_name() sees the real name
    assert os.path.dirname(os.path.dirname(local)) == str(root)
    for name in os.listdir(data["local_model"]):
        with open(os.path.join(data["local_model"], name), "rb") as a:
            with open(os.path.join(local, name), "rb") as b:
                assert a.read() == b.read(), name
    entries = [p for p in os.listdir(root) if not p.startswith(".")]
    assert len(entries) == 1  # one copy, whoever won the race
    assert sorted(p for p in os.listdir(root) if p.startswith(".")) == [".partial-killed"]

    # A second call uses the cache: no object is read again.
    proxy = FaultProxy(s3.url)
    try:
        again = storage.local_model_dir(data["model"], options(proxy.url), cache_root=str(root))
        assert again == local
        assert proxy.requests(method="GET") == ["forward"]  # one listing, no downloads
    finally:
        proxy.stop()


def test_model_copy_failure_leaves_no_cache(s3, data, tmp_path):
    proxy = FaultProxy(s3.url, deny=(f"/{BUCKET}/models/tiny-hubert/model.safetensors",))
    try:
        with pytest.raises(PermissionError):
            storage.local_model_dir(data["model"], options(proxy.url), str(tmp_path))
    finally:
        proxy.stop()
    assert os.listdir(tmp_path) == []  # nothing half-copied left behind, nothing cached


def test_write_part_is_whole_or_absent(s3, data, monkeypatch):
    opts = options(s3.url)
    directory = f"s3://{BUCKET}/atomic/features"
    fs, path = storage.filesystem(directory, opts)
    table = output.ERROR_SCHEMA.empty_table()
    import pyarrow.parquet as pq

    real = pq.write_table

    def breaks_half_way(t, where, **kw):
        real(t, where, **kw)
        with open(where, "r+b") as f:
            f.truncate(10)
        raise OSError(errno.ENOSPC, "disk full half-way")

    monkeypatch.setattr(output.pq, "write_table", breaks_half_way)
    with pytest.raises(OSError):
        output.write_part(table, directory, {"k": 1}, opts)
    assert not fs.exists(path) or fs.ls(path, refresh=True) == []
    monkeypatch.setattr(output.pq, "write_table", real)
    url = output.write_part(table, directory, {"k": 1}, opts)
    assert fs.ls(path, refresh=True) == [url.split("://", 1)[1]]


def test_permanent_errors_become_error_rows(s3, data):
    """NoSuchKey → missing_file, AccessDenied → read_error; neither is retried."""
    import pyarrow as pa

    from hubert_ray.corpus.audio import DecodeStage, clear_cache

    ok = next(r for r in data["lines"] if r["id"] == "flac_16k_1ch")["audio"]
    ok_uri = ok if ok.startswith("s3://") else f"s3://{BUCKET}/corpus/{ok}"
    denied = f"s3://{BUCKET}/corpus/audio/wav16_8k_1ch.wav"
    missing = f"s3://{BUCKET}/corpus/audio/no-such-object.flac"
    proxy = FaultProxy(s3.url, deny=(f"/{BUCKET}/corpus/audio/wav16_8k_1ch.wav",))
    try:
        clear_cache()
        batch = pa.table(
            {
                "segment_id": ["ok", "denied", "missing"],
                "recording_id": ["ok", "denied", "missing"],
                "audio_uri": [ok_uri, denied, missing],
                "start_s": [0.0, 0.0, 0.0],
                "end_s": pa.array([None, None, None], pa.float64()),
            }
        )
        out = DecodeStage(DecodeConfig(storage_options=options(proxy.url)))(batch).to_pylist()
        assert [r["error_reason"] for r in out] == [None, "read_error", "missing_file"]
        assert SECRET not in json.dumps(out, default=str)
        assert len(proxy.requests(f"/{BUCKET}/corpus/audio/wav16_8k_1ch.wav")) == 1
        assert all(
            o != "deny" for o in proxy.requests(f"/{BUCKET}/corpus/audio/no-such-object.flac")
        )
    finally:
        clear_cache()
        proxy.stop()


# -- whole job on local Ray -------------------------------------------------------------------
def _run(cfg):
    from hubert_ray.backend import extract

    return extract.run(cfg, overwrite=True)


def _features(uri, opts=None):
    out = {}
    for layer in (0, 2):
        for sid, arr in output.read_features(uri, layer=layer, storage_options=opts).items():
            out[(sid, layer)] = arr
    return out


def _errors(uri, opts=None):
    table = output.read_table(storage.join(uri, output.ERRORS_DIR), None, opts)
    return {r["segment_id"]: r["reason"] for r in table.to_pylist()}


@pytest.fixture(scope="module")
def local_job(ray_session, data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("s3-local-ref") / "out")
    cfg = ExtractConfig(
        manifest=data["local_manifest"], model=data["local_model"], output=out, **JOB
    )
    summary = _run(cfg)
    return summary, _features(out), _errors(out)


@pytest.fixture(scope="module")
def s3_job(ray_session, s3, data):
    """The job S3 → S3 through a recording (fault-free) proxy."""
    proxy = FaultProxy(s3.url)
    opts = options(proxy.url)
    out = f"s3://{BUCKET}/runs/clean"
    cfg = ExtractConfig(
        manifest=data["manifest"], model=data["model"], output=out, storage_options=opts, **JOB
    )
    summary = _run(cfg)
    yield summary, proxy, out
    proxy.stop()


def assert_same_features(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == np.float16
        np.testing.assert_allclose(
            a[k].astype(np.float32), b[k].astype(np.float32), atol=1e-3, err_msg=str(k)
        )


@pytest.mark.ray
def test_s3_job_equals_local_job(local_job, s3_job, s3, data):
    ref_summary, ref_feats, ref_errs = local_job
    summary, proxy, out = s3_job
    opts = options(s3.url)
    assert summary["segments_total"] == len(data["expected"])
    assert summary["segments_missing"] == summary["segments_duplicated"] == 0
    for key in ("segments_ok", "segments_failed", "errors_by_reason", "frames", "audio_seconds"):
        assert summary[key] == ref_summary[key], key
    assert summary["storage_retries"] == 0
    assert _errors(out, opts) == ref_errs  # missing object → missing_file, as locally
    assert_same_features(_features(out, opts), ref_feats)
    fs, _ = storage.filesystem(out, opts)
    with fs.open(f"{BUCKET}/runs/clean/_summary.json") as f:
        assert json.load(f)["segments_ok"] == summary["segments_ok"]
    meta = output.run_metadata(out, opts)
    assert meta["config"]["storage_options"] == ["endpoint_url", "key", "secret"]


@pytest.mark.ray
def test_s3_job_reads_each_audio_object_once(s3_job, data):
    _, proxy, _ = s3_job
    for rec in data["lines"]:
        name = rec["audio"].rsplit("/", 1)[-1]
        path = f"/{BUCKET}/corpus/audio/{name}"
        gets, heads = proxy.requests(path, "GET"), proxy.requests(path, "HEAD")
        # The decode stream sizes the object (one HEAD; a missing object: its 404), then reads
        # it front to back in ranged GETs of READ_BLOCK_BYTES: at most one for these small
        # objects (none for a missing or empty one), nothing read twice.
        assert len(heads) == 1 and len(gets) <= 1, (path, gets, heads)


@pytest.mark.ray
def test_s3_job_survives_transient_faults(ray_session, s3_job, s3, data):
    clean_summary, _, clean_out = s3_job
    proxy = FaultProxy(s3.url, faults=True)
    try:
        out = f"s3://{BUCKET}/runs/faulty"
        # An old dataset there (replaced: the job runs with overwrite) whose listing this
        # driver has cached: the summary must see the new parts only.
        fs, _ = storage.filesystem(out, options(proxy.url))
        fs.pipe_file(f"{BUCKET}/runs/faulty/features/part-old.parquet", b"not parquet")
        fs.pipe_file(f"{BUCKET}/runs/faulty/_summary.json", b"{}")
        assert len(fs.ls(f"{BUCKET}/runs/faulty/features")) == 1
        base = proxy.injected(), proxy.injected(("slowdown", "internal"))
        cfg = ExtractConfig(
            manifest=data["manifest"],
            model=data["model"],
            output=out,
            storage_options=options(proxy.url),
            **JOB,
        )
        summary = _run(cfg)
        injected = proxy.injected() - base[0]
        http_errors = proxy.injected(("slowdown", "internal")) - base[1]
    finally:
        proxy.stop()
    assert injected >= 10 and http_errors > 0
    # Every 503/500 is retried by botocore and counted; a dropped connection is re-sent once
    # by aiohttp itself (not countable), so resets count only when they come twice in a row.
    assert http_errors <= summary["storage_retries"] <= injected, (summary, injected)
    assert summary["segments_missing"] == summary["segments_duplicated"] == 0
    assert summary["errors_by_reason"] == clean_summary["errors_by_reason"]
    opts = options(s3.url)
    assert _errors(out, opts) == _errors(clean_out, opts)
    assert_same_features(_features(out, opts), _features(clean_out, opts))
    _assert_no_secret_in_output(out, opts)
    # Nor in the Ray logs of the session (workers got the options through the stage configs).
    import ray

    session_dir = ray._private.worker._global_node.get_session_dir_path()
    _assert_no_secret_in_dir(session_dir)


@pytest.mark.ray
def test_read_error_is_retried_by_a_rerun(ray_session, s3, data):
    """An audio object the proxy refuses (AccessDenied): its segments are ``read_error`` rows
    marked transient. A rerun without the fault decodes them again: they end in features/ and
    no longer in errors/, and the summary counts them retried and recovered."""
    import pyarrow.compute as pc

    rec = next(r for r in data["lines"] if r["id"] == "flac_16k_1ch")
    name = rec["audio"].rsplit("/", 1)[-1]
    proxy = FaultProxy(s3.url, deny=(f"/{BUCKET}/corpus/audio/{name}",))
    out = f"s3://{BUCKET}/runs/retry"
    kwargs = dict(manifest=data["manifest"], model=data["model"], output=out, **JOB)
    try:
        first = pipeline_run(ExtractConfig(storage_options=options(proxy.url), **kwargs), True)
    finally:
        proxy.stop()
    opts = options(s3.url)
    errs = output.read_table(storage.join(out, output.ERRORS_DIR), None, opts)
    denied = errs.filter(pc.equal(errs.column("recording_id"), "flac_16k_1ch"))
    ids = sorted(denied.column("segment_id").to_pylist())
    assert ids and set(denied.column("reason").to_pylist()) == {"read_error"}
    assert all(denied.column("transient").to_pylist())
    others = errs.filter(pc.not_equal(errs.column("recording_id"), "flac_16k_1ch"))
    assert not any(others.column("transient").to_pylist())  # permanent: not retried
    assert first["errors_by_reason"]["read_error"] == len(ids)

    second = pipeline_run(ExtractConfig(storage_options=opts, **kwargs), False)
    errs = output.read_table(storage.join(out, output.ERRORS_DIR), None, opts)
    assert not set(ids) & set(errs.column("segment_id").to_pylist())
    assert sorted(errs.column("segment_id").to_pylist()) == sorted(
        others.column("segment_id").to_pylist()
    )
    feats = output.read_features(out, storage_options=opts)
    assert set(ids) <= set(feats)
    assert "read_error" not in second["errors_by_reason"]
    assert second["segments_retried"] == second["segments_recovered"] == len(ids)
    assert second["segments_retried_this_run"] == len(ids)
    assert second["segments_missing"] == second["segments_duplicated"] == 0
    assert second["segments_ok"] == first["segments_ok"] + len(ids)
    assert len(second["runs"]) == 2 and second["cumulative"]["runs"] == 2


def pipeline_run(cfg, overwrite):
    from hubert_ray.backend import extract

    return extract.run(cfg, overwrite=overwrite)


def _assert_no_secret_in_output(out: str, opts: dict):
    fs, path = storage.filesystem(out, opts)
    files = fs.find(path)
    assert any(f.endswith(".parquet") for f in files)
    for f in files:
        assert SECRET.encode() not in fs.cat_file(f), f


def _assert_no_secret_in_dir(directory: str):
    for f in glob.glob(os.path.join(directory, "**", "*"), recursive=True):
        if os.path.isfile(f) and not os.path.islink(f):
            try:
                with open(f, "rb") as fh:
                    assert SECRET.encode() not in fh.read(), f
            except OSError:  # sockets, vanished files
                pass


# -- the CLI as a user runs it ------------------------------------------------------------------
def test_cli_s3_to_s3_keeps_secrets_out(s3, data):
    """Endpoint from AWS_ENDPOINT_URL (reaching the job's Ray workers through the environment),
    credentials in --storage-options: the secret appears in no output, message or log."""
    out = f"s3://{BUCKET}/runs/cli"
    ray_tmp = tempfile.mkdtemp(prefix="hr-s3-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        RAY_TMPDIR=ray_tmp,
        AWS_ENDPOINT_URL=s3.url,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        HUBERT_RAY_MODEL_CACHE=os.path.join(ray_tmp, "models"),
    )
    args = [
        "--manifest",
        data["manifest"],
        "--model",
        data["model"],
        "--output",
        out,
        "--layers",
        "2",
        "--storage-options",
        json.dumps({"key": KEY_ID, "secret": SECRET}),
    ]
    try:
        res = subprocess.run(
            [sys.executable, "-m", "jobs.extract", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        shown = res.stdout[res.stdout.index("{\n") : res.stdout.rindex("\n}") + 2]
        summary = json.loads(shown)
        assert summary["segments_missing"] == 0 and summary["storage_retries"] == 0
        assert SECRET not in res.stdout and SECRET not in res.stderr
        _assert_no_secret_in_dir(ray_tmp)
        # A failing run prints its error without the secret either (here: a different layer
        # list into the finished output, refused).
        res2 = subprocess.run(
            [sys.executable, "-m", "jobs.extract", *args, "--layers", "1"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res2.returncode == 2 and "--overwrite" in res2.stderr, res2.stderr[-2000:]
        assert SECRET not in res2.stdout + res2.stderr
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
    opts = options(s3.url)
    _assert_no_secret_in_output(out, opts)
    import hubert_ray

    feats = hubert_ray.read_features(out, storage_options=opts)
    assert len(feats) == summary["segments_ok"]

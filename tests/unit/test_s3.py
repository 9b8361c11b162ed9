"""Object storage without a server: secrets kept out of reprs and messages, which errors are
transient, the retry loop, and ``file://`` URLs taking the same fsspec path as local files.

The rest of these tests, against moto's S3 server on loopback, are in
``tests/integration/test_s3.py``.
"""

from __future__ import annotations

import errno
import os

import pytest

from hubert_ray.core.config import DecodeConfig, ExtractConfig
from hubert_ray.dataset import output
from hubert_ray.io import storage

KEY_ID = "AKIAHUBERTRAYTEST"
SECRET = "hubert-ray-SECRET-4f9c1e7a"  # must never show up in any output or log


# -- no Ray ---------------------------------------------------------------------------------
def test_storage_options_never_in_repr():
    opts = {"key": KEY_ID, "secret": SECRET}
    cfg = ExtractConfig(manifest="m.jsonl", model="m", output="o", storage_options=opts)
    for obj in (cfg, cfg.decode_config(), cfg.model_config()):
        assert SECRET not in repr(obj) and SECRET not in str(obj)
    from hubert_ray.core.errors import ConfigError

    with pytest.raises(ConfigError) as ei:
        DecodeConfig(storage_options=[SECRET])  # not a dict: the message must not echo it
    assert SECRET not in str(ei.value)


@pytest.mark.parametrize("text", [f'{{"secret": "{SECRET}", oops}}', f'["{SECRET}"]'])
def test_bad_storage_options_are_not_echoed(text, capsys):
    from jobs import extract, prepare

    argv = ["--manifest", "m.jsonl", "--output", "o.parquet", "--storage-options", text]
    try:
        rc = extract.main([*argv, "--model", "m"])  # a list: the config rejects it
    except SystemExit as exc:  # invalid JSON: argparse rejects it
        rc = exc.code
    assert rc == 2
    assert prepare.main(argv) == 2
    captured = capsys.readouterr()
    assert "--storage-options" in captured.err
    assert SECRET not in captured.out + captured.err


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (OSError(errno.EBUSY, "Please reduce your request rate."), True),  # s3fs: SlowDown
        (OSError(errno.EREMOTEIO, "We encountered an internal error"), True),  # 500
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (TimeoutError("read timeout"), True),
        (FileNotFoundError("bkt/missing.flac"), False),
        (PermissionError("Access Denied"), False),
        (OSError(errno.EINVAL, "InvalidRange"), False),
        (ValueError("bad"), False),
    ],
)
def test_is_transient(exc, transient):
    assert storage.is_transient(exc) is transient


def test_is_transient_botocore_errors():
    from botocore.exceptions import ClientError, ConnectionClosedError, NoCredentialsError

    def client_error(code, status):
        return ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
        )

    assert storage.is_transient(client_error("SlowDown", 503))
    assert storage.is_transient(client_error("InternalError", 500))
    assert not storage.is_transient(client_error("NoSuchKey", 404))
    assert not storage.is_transient(client_error("AccessDenied", 403))
    assert storage.is_transient(ConnectionClosedError(endpoint_url="http://x"))
    assert not storage.is_transient(NoCredentialsError())


def test_with_retries_backoff_and_count():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.EBUSY, "SlowDown")
        return "ok"

    before = storage.retry_count()
    assert storage.with_retries(flaky, sleep=sleeps.append, base_delay_s=0.5) == "ok"
    assert len(calls) == 3 and storage.retry_count() - before == 2
    assert 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0  # full jitter, doubling cap

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.with_retries(missing, sleep=sleeps.append)
    assert len(calls) == 1  # permanent: not retried

    def always_busy():
        calls.append(1)
        raise OSError(errno.EBUSY, "SlowDown")

    calls.clear()
    with pytest.raises(OSError):
        storage.with_retries(always_busy, attempts=3, sleep=lambda s: None)
    assert len(calls) == 3


def test_file_urls_take_the_same_path(corpus, tiny_model, tmp_path):
    """``file://`` URLs work wherever a local path does, through the same fsspec code."""
    from hubert_ray.corpus import manifest
    from hubert_ray.corpus.audio import DecodeStage, clear_cache
    from hubert_ray.model import files

    recs = manifest.read_manifest("file://" + corpus)
    assert all(r.audio_uri.startswith("file://") for r in recs)
    clear_cache()
    via_url = DecodeStage()(manifest.segment_table(recs))
    clear_cache()
    via_path = DecodeStage()(manifest.segment_table(manifest.read_manifest(corpus)))
    for col in ("segment_id", "num_samples", "error_reason", "audio"):
        assert via_url.column(col) == via_path.column(col), col
    assert storage.local_model_dir("file://" + tiny_model) == tiny_model
    assert files.read_model_config("file://" + tiny_model)["num_hidden_layers"] == 2
    url = output.write_part(output.ERROR_SCHEMA.empty_table(), f"file://{tmp_path}/e", None)
    assert url.startswith("file://") and os.listdir(tmp_path / "e") == [url.rsplit("/", 1)[1]]

"""Sparse decoding from S3 (moto's server on loopback, tests/integration/s3_server.py): the
decoder seeks, the object is read in ranged GETs of the blocks it touches (never again from its
start), and the values equal decoding the local file whole. No Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

import hubert_ray.corpus.audio as audio_mod
import hubert_ray.corpus.objects as objects_mod
from hubert_ray.core.config import DecodeConfig
from hubert_ray.core.signal import synth_signal
from hubert_ray.corpus.audio import (
    DecodeStage,
    clear_cache,
    cut_segment,
    normalise,
    read_audio,
    to_mono_16k,
)
from hubert_ray.io import storage
from hubert_ray.testing.synth import FORMATS
from tests.integration.s3_server import FaultProxy

pytest.importorskip("moto.server")

BUCKET = "hubert-ray-sparse"
KEY_ID = "AKIAHUBERTRAYSPARSE"
SECRET = "hubert-ray-sparse-SECRET"
SECONDS = {"flac": 240.0, "opus": 600.0}
SPARSE = [(20.0, 22.5), (95.0, 96.2), (170.3, 173.0), (231.0, 233.5)]
INPUT_SCHEMA = pa.schema(
    [
        ("segment_id", pa.string()),
        ("recording_id", pa.string()),
        ("audio_uri", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
    ]
)


def options(endpoint: str) -> dict:
    return {"key": KEY_ID, "secret": SECRET, "endpoint_url": endpoint}


@pytest.fixture(scope="module")
def objects(s3, tmp_path_factory):
    """A long 16 kHz FLAC and Opus recording, locally and in the bucket: fmt -> (path, uri)."""
    tmp = tmp_path_factory.mktemp("sparse-s3")
    fs, _ = storage.filesystem(f"s3://{BUCKET}", options(s3.url))
    fs.mkdir(BUCKET)
    out = {}
    for fmt, seconds in SECONDS.items():
        container, subtype, ext = FORMATS[fmt]
        path = str(tmp / f"long.{ext}")
        x = synth_signal(seconds, 16000, seed=11)
        with sf.SoundFile(path, "w", 16000, 1, format=container, subtype=subtype) as f:
            for s in range(0, len(x), 16000 * 60):
                f.write(x[s : s + 16000 * 60])
        fs.put_file(path, f"{BUCKET}/audio/long.{ext}")
        out[fmt] = (path, f"s3://{BUCKET}/audio/long.{ext}")
    return out


@pytest.fixture
def streams(monkeypatch):
    clear_cache()
    opened = []
    real = audio_mod.open_recording

    def keeping(*args, **kwargs):
        opened.append(real(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(audio_mod, "open_recording", keeping)
    yield opened
    clear_cache()


def decode(uri: str, times, opts: dict) -> list[dict]:
    rows = [
        dict(segment_id=f"s{i}", recording_id="r", audio_uri=uri, start_s=a, end_s=b)
        for i, (a, b) in enumerate(times)
    ]
    stage = DecodeStage(DecodeConfig(storage_options=opts))
    return stage(pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)).to_pylist()


def assert_equals_local_whole(got: list[dict], path: str, times) -> None:
    audio = to_mono_16k(*read_audio(path))
    for (a, b), row in zip(times, got, strict=True):
        assert row["error_reason"] is None, row["error_message"]
        want = normalise(cut_segment(audio, a, b, DecodeConfig().end_tolerance_s))
        np.testing.assert_array_equal(np.asarray(row["audio"], np.float32), want)


@pytest.mark.parametrize("fmt", ["flac", "opus"])
def test_sparse_from_s3_equals_local_whole_decode(s3, objects, streams, monkeypatch, fmt):
    """Four 1-3 s segments a minute or more apart: seeks, a few small ranged GETs (counted by
    the reader and by a proxy in front of the server), far fewer bytes than the object."""
    if fmt == "opus":  # 3.5 KiB/s: blocks sized for FLAC would hold the whole object
        monkeypatch.setattr(objects_mod, "SEEK_READ_BLOCK_BYTES", 64 << 10)
        monkeypatch.setattr(objects_mod, "SEEK_BACK_BYTES", 8 << 10)
    path, uri = objects[fmt]
    size = storage.filesystem(uri, options(s3.url))[0].size(uri)
    proxy = FaultProxy(s3.url)
    try:
        got = decode(uri, SPARSE, options(proxy.url))
    finally:
        proxy.stop()
    assert_equals_local_whole(got, path, SPARSE)
    (stream,) = streams
    assert stream.seeks == len(SPARSE)
    assert stream.bytes_fetched < size / 2, (stream.bytes_fetched, size)
    gets = proxy.requests(f"/{BUCKET}/audio/{uri.rsplit('/', 1)[1]}", "GET")
    assert len(gets) == stream._reader.requests <= 4 * len(SPARSE) + 4, gets


def test_dense_from_s3_reads_each_byte_once(s3, objects, streams):
    """Every segment of the FLAC: front to back, one GET of at most 8 MiB, nothing again."""
    path, uri = objects["flac"]
    size = storage.filesystem(uri, options(s3.url))[0].size(uri)
    assert size <= objects_mod.READ_BLOCK_BYTES
    times = [(i * 2.0, (i + 1) * 2.0) for i in range(int(SECONDS["flac"] // 2))]
    got = decode(uri, times, options(s3.url))
    assert_equals_local_whole(got, path, times)
    (stream,) = streams
    assert stream.seeks == 0 and stream.bytes_fetched == size and stream._reader.requests == 1


def test_sparse_from_s3_through_transient_faults(s3, objects, streams):
    """503 / 500 / dropped connections on the ranged GETs: retried, the same values."""
    path, uri = objects["flac"]
    proxy = FaultProxy(s3.url, faults=True)
    try:
        got = decode(uri, SPARSE, options(proxy.url))
        assert proxy.injected() > 0
    finally:
        proxy.stop()
    assert_equals_local_whole(got, path, SPARSE)
    assert streams[0].seeks >= len(SPARSE) - 1

"""Decode throughput from S3 vs local disk (a benchmark, not a test).

    python -m benchmarks.bench_storage [--copies 4] [--rounds 3] [--workdir DIR]

Generates the demo corpus (hubert_ray.testing.synth.make_corpus; ``--copies`` times, under distinct
names, for more audio), starts moto's S3 server on loopback as a separate process (so it does
not share this process' GIL), uploads the corpus, then decodes every segment with
:class:`~hubert_ray.corpus.audio.DecodeStage` in one process — once reading the local files, once
reading ``s3://`` — alternating for ``--rounds`` rounds. Prints audio seconds decoded per wall
second for each source (best round) and their ratio. Needs the dev extras (``moto[server]``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pyarrow as pa

from benchmarks.workloads import recording_blocks

BUCKET = "bench"
OPTIONS = {"key": "bench", "secret": "bench"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("moto server exited; is moto[server] installed?") from None
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def make_manifest(work: str, copies: int) -> str:
    """The demo corpus ``copies`` times (recording/segment ids and files suffixed)."""
    from hubert_ray.testing.synth import make_corpus

    base = make_corpus(os.path.join(work, "corpus"))
    root = os.path.dirname(base)
    with open(base) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    out = []
    for c in range(copies):
        for rec in lines:
            rec = json.loads(json.dumps(rec))
            src = os.path.join(root, rec["audio"])
            stem, ext = os.path.splitext(rec["audio"])
            rec["audio"] = f"{stem}-c{c}{ext}"
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(root, rec["audio"]))
            rec["id"] = f"{rec['id']}-c{c}"
            for seg in rec.get("segments", []):
                seg["id"] = f"{seg['id']}-c{c}"
            out.append(rec)
    manifest = os.path.join(root, "bench.jsonl")
    with open(manifest, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in out)
    return manifest


def decode_all(manifest_uri: str, storage_options: dict | None) -> tuple[float, float, int]:
    """(audio seconds decoded, wall seconds, storage retries) for one pass over the manifest."""
    from hubert_ray.core.config import DecodeConfig
    from hubert_ray.corpus import manifest
    from hubert_ray.corpus.audio import DecodeStage, clear_cache
    from hubert_ray.io import storage

    table = manifest.read_segments(manifest_uri, storage_options)
    stage = DecodeStage(DecodeConfig(storage_options=dict(storage_options or {})))
    clear_cache()
    retries = storage.retry_count()
    t0 = time.perf_counter()
    samples = 0
    for block in recording_blocks(table, 16):
        out = stage(block)
        ok = out.filter(pa.compute.is_null(out.column("error_reason")))
        samples += int(pa.compute.sum(ok.column("num_samples")).as_py() or 0)
    wall = time.perf_counter() - t0
    return samples / 16_000, wall, storage.retry_count() - retries


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_storage", description=__doc__)
    p.add_argument("--copies", type=int, default=4, help="corpus copies (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--workdir", help="where the corpus goes (default: a temporary directory)")
    args = p.parse_args(argv)

    from hubert_ray.io import storage

    work = args.workdir or tempfile.mkdtemp(prefix="hubert-ray-bench-")
    manifest = make_manifest(work, args.copies)
    root = os.path.dirname(manifest)
    proc, url = start_moto()
    try:
        opts = {**OPTIONS, "endpoint_url": url}
        fs, _ = storage.filesystem(f"s3://{BUCKET}", opts)
        fs.mkdir(BUCKET)
        fs.put(root + "/", f"{BUCKET}/corpus/", recursive=True)
        s3_manifest = f"s3://{BUCKET}/corpus/{os.path.basename(manifest)}"
        best: dict[str, tuple[float, float]] = {}
        for r in range(args.rounds):
            for name, uri, so in (("local", manifest, None), ("s3", s3_manifest, opts)):
                audio_s, wall, retries = decode_all(uri, so)
                rate = audio_s / wall
                print(
                    f"round {r + 1} {name:5s}: {audio_s:8.1f} s of audio in {wall:6.2f} s "
                    f"= {rate:8.1f} audio s / wall s (storage retries: {retries})",
                    flush=True,
                )
                if name not in best or rate > best[name][0]:
                    best[name] = (rate, audio_s)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    ratio = best["s3"][0] / best["local"][0]
    print(
        f"decode throughput, best of {args.rounds}, one process: local {best['local'][0]:.1f}, "
        f"S3 (moto on loopback) {best['s3'][0]:.1f} audio s / wall s; S3/local = {ratio:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

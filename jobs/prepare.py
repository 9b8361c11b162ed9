"""Convert any supported manifest (JSONL, Parquet, fairseq TSV) to canonical Parquet.

    python -m jobs.prepare --manifest IN --output OUT.parquet [--storage-options JSON]

Exit codes: 0 written; 2 invalid manifest or options (the message is on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys

from hubert_ray.errors import ManifestError
from hubert_ray.manifest import read_manifest, write_canonical


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.prepare",
        description="Validate a speech manifest and write it as canonical Parquet "
        "(recording_id, audio_uri, duration_s, segments).",
    )
    p.add_argument(
        "--manifest",
        required=True,
        help="input manifest: .jsonl/.ndjson/.json, .parquet or fairseq .tsv "
        "(local path, file:// or s3:// URL)",
    )
    p.add_argument("--output", required=True, help="output Parquet path or URL")
    p.add_argument(
        "--storage-options",
        default=None,
        metavar="JSON",
        help="fsspec storage options as a JSON object, e.g. "
        '\'{"endpoint_url": "http://127.0.0.1:9000"}\'',
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    storage_options: dict = {}
    if args.storage_options is not None:
        try:
            storage_options = json.loads(args.storage_options)
        except json.JSONDecodeError as exc:
            print(
                f"error: --storage-options={args.storage_options!r} is not valid JSON "
                f"({exc.msg}); expected a JSON object",
                file=sys.stderr,
            )
            return 2
        if not isinstance(storage_options, dict):
            print(
                f"error: --storage-options={args.storage_options!r} is invalid; "
                "expected a JSON object",
                file=sys.stderr,
            )
            return 2

    try:
        recordings = read_manifest(args.manifest, storage_options)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    write_canonical(recordings, args.output, storage_options)
    n_segments = sum(len(r.segments) for r in recordings)
    print(f"wrote {len(recordings)} recordings, {n_segments} segments to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert any supported manifest (JSONL, Parquet, fairseq TSV) to canonical Parquet.

    hubert-ray prepare --manifest IN --output OUT.parquet [--storage-options JSON]
    hubert-ray prepare --wenetspeech WenetSpeech.json --subset M --output OUT.parquet

Exit codes: 0 written; 2 invalid manifest or options (the message is on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys

from hubert_ray.core.errors import ManifestError
from hubert_ray.corpus.manifest import read_manifest, write_canonical


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hubert-ray prepare",
        description="Validate a speech manifest and write it as canonical Parquet "
        "(recording_id, audio_uri, duration_s, segments).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--manifest",
        help="input manifest: .jsonl/.ndjson/.json, .parquet or fairseq .tsv "
        "(local path, file:// or s3:// URL)",
    )
    src.add_argument(
        "--wenetspeech",
        metavar="JSON",
        help="WenetSpeech.json (streamed; audio paths relative to its directory); needs --subset",
    )
    p.add_argument(
        "--subset",
        help="with --wenetspeech: L, M, S, DEV, TEST_NET or TEST_MEETING ('{M}' also accepted)",
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
                # Never echo the value: it may hold credentials.
                f"error: --storage-options is not valid JSON ({exc.msg} at column "
                f"{exc.colno}); expected a JSON object",
                file=sys.stderr,
            )
            return 2
        if not isinstance(storage_options, dict):
            print(
                f"error: --storage-options is a JSON {type(storage_options).__name__}; "
                "expected a JSON object",
                file=sys.stderr,
            )
            return 2

    if args.wenetspeech is not None:
        return _prepare_wenetspeech(args, storage_options)
    if args.subset is not None:
        print("error: --subset: only valid with --wenetspeech", file=sys.stderr)
        return 2

    try:
        recordings = read_manifest(args.manifest, storage_options)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    write_canonical(recordings, args.output, storage_options, validated=True)
    n_segments = sum(len(r.segments) for r in recordings)
    print(f"wrote {len(recordings)} recordings, {n_segments} segments to {args.output}")
    return 0


def _prepare_wenetspeech(args: argparse.Namespace, storage_options: dict) -> int:
    from hubert_ray.corpus import wenetspeech

    if args.subset is None:
        print(
            f"error: --subset: required with --wenetspeech; allowed: "
            f"{', '.join(wenetspeech.SUBSETS)}",
            file=sys.stderr,
        )
        return 2
    try:
        counts = wenetspeech.prepare(args.wenetspeech, args.subset, args.output, storage_options)
    except ManifestError as exc:
        option = "--subset" if str(exc).startswith("subset=") else "--wenetspeech"
        print(f"error: {option}: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {counts['recordings']} recordings, {counts['segments']} segments "
        f"({counts['audio_seconds'] / 3600:.2f} h) of subset {counts['subset']} to {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

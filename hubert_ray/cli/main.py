"""``hubert-ray COMMAND [options]``: dispatches to the subcommand's own command line.

    hubert-ray extract --manifest M --model DIR --output OUT     features (and units) of a corpus
    hubert-ray prepare --manifest IN --output OUT.parquet        a canonical, checked manifest
    hubert-ray plan --hours H --gpus G --decode-cores C          wall time and nodes of a run
    hubert-ray kmeans learn|assign|export ...                    discrete units
    hubert-ray demo                                              a generated corpus, run locally

``hubert-ray COMMAND --help`` shows that command's options; its exit codes are the command's.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "extract": "run the extraction job: features (and units) of a corpus, as Parquet",
    "prepare": "check a manifest and write it as canonical Parquet (WenetSpeech.json too)",
    "plan": "expected wall time and node counts of a corpus on a cluster",
    "kmeans": "discrete units: learn centroids, assign units, export fairseq labels",
    "demo": "generate a small corpus and a tiny model, and run the job locally",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hubert-ray")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hubert-ray",
        description="Distributed HuBERT feature extraction for large speech corpora on Ray Data.",
        epilog="Run 'hubert-ray COMMAND --help' for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    for name, help_ in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:  # the subcommand parses the rest with its own argparse
        command, rest = argv[0], argv[1:]
    else:  # --help, --version (exit 0), a usage error (exit 2), or a command after them
        args, rest = build_parser().parse_known_args(argv)
        command = args.command
    return importlib.import_module(f"hubert_ray.cli.{command}").main(rest)


if __name__ == "__main__":
    sys.exit(main())

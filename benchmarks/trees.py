"""Running one measurement in several source trees side by side (the ``--trees`` scripts here).

Each run is a fresh ``python -c CODE ARGS…`` process whose working directory is the tree and
whose ``PYTHONPATH`` starts with it, so ``hubert_ray`` (and Ray's workers, which inherit the
environment) import that tree's code; without ``RAY_ADDRESS``, so a child that starts Ray starts
it locally. The child reports by printing one ``RESULT`` line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this repository


def result_line(tree: str, code: str, *args: str) -> str:
    """What follows ``RESULT`` on the line ``code`` printed when run in ``tree``; raises
    ``RuntimeError`` with the end of its output if it failed or printed none."""
    tree = os.path.abspath(tree)
    env = {**os.environ, "PYTHONPATH": tree}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    if proc.returncode or not lines:
        tail = (proc.stdout[-2000:] + proc.stderr[-4000:]).strip()
        raise RuntimeError(f"{tree}: exit {proc.returncode}, no RESULT line\n{tail}")
    return lines[0][len("RESULT") :].strip()


def run_in_tree(tree: str, code: str, *args: str) -> list[str]:
    """The whitespace-separated fields of :func:`result_line`."""
    return result_line(tree, code, *args).split()


def run_json(code: str, *args: str, tree: str = ROOT) -> dict:
    """:func:`result_line` of a child that prints ``RESULT <json>``, parsed."""
    return json.loads(result_line(tree, code, *args))

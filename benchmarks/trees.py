"""Running one measurement in several source trees side by side (the ``--trees`` scripts here).

Each run is a fresh ``python -c CODE ARGS…`` process whose working directory is the tree and
whose ``PYTHONPATH`` starts with it, so ``hubert_ray`` (and Ray's workers, which inherit the
environment) import that tree's code; without ``RAY_ADDRESS``, so a child that starts Ray starts
it locally. The child reports by printing one ``RESULT`` line.
"""

from __future__ import annotations

import os
import subprocess
import sys


def run_in_tree(tree: str, code: str, *args: str) -> list[str]:
    """Fields of the ``RESULT`` line that ``code`` printed when run in ``tree``; raises
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
    return lines[0].split()[1:]

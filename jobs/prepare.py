"""``python -m jobs.prepare``: the same as ``hubert-ray prepare`` (:mod:`hubert_ray.cli.prepare`).

Kept for the pipelines that call it this way: same flags, output and exit codes.
"""

import sys

from hubert_ray.cli.prepare import main

if __name__ == "__main__":
    sys.exit(main())

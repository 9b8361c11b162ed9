"""``python -m jobs.demo``: the same as ``hubert-ray demo`` (:mod:`hubert_ray.cli.demo`).

Kept for the pipelines that call it this way: same flags, output and exit codes.
"""

import sys

from hubert_ray.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m jobs.kmeans``: the same as ``hubert-ray kmeans`` (:mod:`hubert_ray.cli.kmeans`).

Kept for the pipelines that call it this way: same flags, output and exit codes.
"""

import sys

from hubert_ray.cli.kmeans import main

if __name__ == "__main__":
    sys.exit(main())

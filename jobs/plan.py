"""``python -m jobs.plan``: the same as ``hubert-ray plan`` (:mod:`hubert_ray.cli.plan`).

Kept for the pipelines that call it this way: same flags, output and exit codes.
"""

import sys

from hubert_ray.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m jobs.extract``: the same as ``hubert-ray extract`` (:mod:`hubert_ray.cli.extract`).

Kept for the pipelines that call it this way: same flags, output and exit codes.
"""

import sys

from hubert_ray.cli.extract import main

if __name__ == "__main__":
    sys.exit(main())

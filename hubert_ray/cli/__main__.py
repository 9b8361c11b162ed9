"""``python -m hubert_ray.cli ...``: the ``hubert-ray`` command without the installed script."""

import sys

from hubert_ray.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

"""Pure unit tests for hubert_ray.corpus.manifest and jobs.prepare (no Ray, no torch).

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/unit/test_manifest.py``.
"""

from __future__ import annotations

import subprocess
import sys


def test_manifest_does_not_import_torch_or_ray():
    code = (
        "import sys, hubert_ray.corpus.manifest, jobs.prepare; "
        "sys.exit(int('torch' in sys.modules or 'ray' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

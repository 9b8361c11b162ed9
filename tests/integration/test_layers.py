"""The house's import rules (docs/design.md, "Packages and what each may import"), checked over
every import of every module of the package, at module level and inside functions: each
subpackage imports only the ones below it, third-party libraries only where they belong, and
no module imports another that imports it back.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/unit/test_layers.py``.
"""

from __future__ import annotations

import subprocess
import sys


def test_the_rules_hold_at_run_time():
    """What importing the lower layers really loads: no Ray below the backend, no torch in the
    core, the corpus and the dataset."""
    code = (
        "import sys, hubert_ray, hubert_ray.core.config, hubert_ray.core.chunking,"
        " hubert_ray.core.selftest, hubert_ray.corpus.audio, hubert_ray.dataset.resume,"
        " hubert_ray.dataset.summary, hubert_ray.stages.extractor, hubert_ray.model.engine\n"
        "print(' '.join(m for m in ('ray', 'torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == []

"""ExactEncoder and ModelStage on tiny random models (CPU, no Ray).

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/unit/test_model.py``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


# -- import hygiene ----------------------------------------------------------------------------
def test_import_does_not_pull_torch_or_ray():
    code = (
        "import sys, hubert_ray, hubert_ray.core.config, hubert_ray.core.chunking\n"
        "import hubert_ray.stages.extractor\n"
        "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr

"""The architecture's import rules (docs/design.md): the pure core imports no Ray and no Arrow,
and only the model modules import torch; Ray is imported by the wiring alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

CORE = ["chunking", "precision", "selftest", "config", "errors", "device", "engine", "units"]
NO_TORCH = ["chunking", "precision", "selftest", "config", "errors", "device", "engine"]
NO_RAY = [*CORE, "model", "models", "audio", "manifest", "segments", "output", "extractor"]


def _imported(module: str) -> set[str]:
    code = (
        f"import sys, hubert_ray.{module}\n"
        "print(' '.join(m for m in ('ray', 'pyarrow', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(out.stdout.split())


@pytest.mark.parametrize("module", sorted(set(CORE) | set(NO_RAY)))
def test_import_rules(module):
    found = _imported(module)
    assert "ray" not in found
    if module in CORE:
        assert "pyarrow" not in found
    if module in NO_TORCH:
        assert "torch" not in found

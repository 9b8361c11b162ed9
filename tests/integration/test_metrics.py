"""Job metrics: the per-batch counting (pure), no-op without Ray, and the metrics of a real
pipeline run read back from the Ray node's Prometheus endpoint.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/ray/test_metrics.py`` and ``tests/unit/test_metrics.py``.
"""

from __future__ import annotations

import subprocess
import sys


def test_noop_without_ray():
    """Without Ray (a fresh interpreter) recording does nothing and never imports Ray."""
    code = (
        "import sys, pyarrow as pa\n"
        "from hubert_ray.backend import metrics\n"
        "t = pa.table({'start_s': [0.0], 'end_s': [1.0], 'error_reason': pa.array([None], "
        "pa.string())})\n"
        "metrics.record_model_batch(t, 0.1)\n"
        "metrics.record_decode(0.2)\n"
        "assert 'ray' not in sys.modules and metrics._metrics is None\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr

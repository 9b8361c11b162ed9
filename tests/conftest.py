"""Shared fixtures and the test tiers.

The folders are the tiers, and each test gets the marker of its folder:

* ``tests/unit``: no Ray, no subprocess, no S3 server (``make test-fast``);
* ``tests/ray``: the job on local Ray, every test on the one session (``ray_session``);
* ``tests/integration``: CLI subprocesses, S3 on loopback (moto), multi-node Ray, ``ray job
  submit``, SIGKILL and resume;
* ``tests/gpu``: CUDA only (skipped without it).

A whole run takes them in that order. Any test that uses ``ray_session`` (directly or through
a fixture) is also marked ``ray``. The tiers are kept honest: a test file outside the four
folders stops the run, a unit test that requests ``ray_session`` errors at setup, and a session
that collects only unit tests stops if collecting them imported Ray.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

TIERS = ("unit", "ray", "integration", "gpu")  # also the order a whole run takes
# Every folder is a package (tests.unit, tests.ray, ...): tests/ itself must never be on
# sys.path, where tests/ray would shadow the ray package (Ray workers get the driver's sys.path).
_HERE = Path(__file__).resolve().parent


def _tier(item: pytest.Item) -> str | None:
    """The tier folder ``item`` is in; ``""`` for a test elsewhere under tests/; ``None`` for
    one outside tests/ (not ours to mark)."""
    try:
        top = Path(item.path).resolve().relative_to(_HERE).parts[0]
    except (ValueError, IndexError):
        return None
    return top if top in TIERS else ""


def pytest_collection_modifyitems(config, items):
    stray = sorted({str(item.path) for item in items if _tier(item) == ""})
    if stray:
        raise pytest.UsageError(
            "tests outside the tier folders (tests/unit, tests/ray, tests/integration, "
            "tests/gpu; see tests/conftest.py): " + ", ".join(stray)
        )
    # Fastest feedback first: unit, ray, integration, gpu (stable: files keep their order).
    items.sort(key=lambda item: TIERS.index(_tier(item)) if _tier(item) else len(TIERS))
    tiers = set()
    for item in items:
        tier = _tier(item)
        tiers.add(tier)
        if tier:
            item.add_marker(getattr(pytest.mark, tier))
        if tier != "ray" and "ray_session" in item.fixturenames:
            item.add_marker(pytest.mark.ray)
    if items and tiers == {"unit"} and "ray" in sys.modules:
        raise pytest.UsageError(
            "collecting tests/unit imported ray: a unit test module (or what it imports at "
            "module level, e.g. hubert_ray.backend) pulls in Ray. Import it inside the test, "
            "or move the test to tests/ray."
        )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _tier(item) == "unit" and "ray_session" in item.fixturenames:
        pytest.fail(
            f"{item.nodeid} is in tests/unit but uses the ray_session fixture: unit tests run "
            "without Ray; move it to tests/ray.",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from hubert_ray.testing.synth import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("model") / "tiny-hubert"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """Path of the generated corpus' JSONL manifest (expected.json lies beside it)."""
    from hubert_ray.testing.synth import make_corpus

    return make_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """Local Ray with enough logical CPUs for the decode tasks plus two CPU model actors."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    # Models on object storage are cached per node (hubert_ray.io.storage.local_model_dir): keep the
    # tests' copies out of ~/.cache. Workers inherit the driver's environment at ray.init.
    os.environ.setdefault("HUBERT_RAY_MODEL_CACHE", str(tmp_path_factory.mktemp("model-cache")))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def wenetspeech_corpus(tmp_path_factory) -> str:
    """Path of a small synthetic WenetSpeech.json: 2 x 60 s training + 3 x 15 s eval Opus."""
    from hubert_ray.testing.synth_wenetspeech import make_wenetspeech_corpus

    root = str(tmp_path_factory.mktemp("wenetspeech"))
    return make_wenetspeech_corpus(root, train_recording_s=(60.0, 60.0), eval_recording_s=15.0)

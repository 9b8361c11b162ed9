"""Shared fixtures: one local Ray session for the whole run, a tiny model, a generated corpus."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


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

"""The engine on a simulated accelerator (no Ray): launches queue work without waiting for
the device, a finish waits for exactly that call's work, results keep their rows."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("torch")

from hubert_ray.chunking import num_frames  # noqa: E402
from hubert_ray.config import ModelConfig  # noqa: E402
from hubert_ray.device import SimulatedDevice  # noqa: E402
from hubert_ray.engine import Engine  # noqa: E402

SR = 16_000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hubert_ray.synth import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("engine") / "tiny"))


def _audio(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(seconds * SR)).astype(np.float32)


def test_launch_returns_before_the_device_is_done_and_finish_waits(tiny):
    device = SimulatedDevice(x_realtime=4.0)  # 1 s of audio = 0.25 s of device time
    engine = Engine(ModelConfig(model_uri=tiny, layers="last"), tiny, simulated=device)
    first = engine.launch(["a", "b"], [_audio(1.0, 0), _audio(2.0, 1)])
    second = engine.launch(["c"], [_audio(1.5, 2)])
    queued_until = device.record()
    assert queued_until > time.monotonic()  # both calls launched, the device still busy
    assert device.busy_s >= 4.5 / 4.0  # the padded audio of both calls is queued
    res = engine.finish(first)
    assert time.monotonic() >= first.launched.done  # finish waited for its own call
    assert res.frames == [num_frames(SR), num_frames(2 * SR)]
    assert res.features[engine.layers[-1]].shape == (sum(res.frames), device.hidden)
    assert engine.finish(second).frames == [num_frames(int(1.5 * SR))]


def test_rows_without_audio_pass_through(tiny):
    engine = Engine(
        ModelConfig(model_uri=tiny, layers="last"), tiny, simulated=SimulatedDevice(1e6)
    )
    res = engine.run(["a", "gone", "b"], [_audio(0.5, 0), None, _audio(0.3, 1)])
    assert res.valid == [True, False, True]
    assert res.frames[1] == 0 and res.compute_dtype[1] is None

"""The engine on a simulated accelerator (no Ray): launches queue work without waiting for
the device, a finish waits for exactly that call's work, results keep their rows."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

pytest.importorskip("torch")

from hubert_ray.core.chunking import num_frames  # noqa: E402
from hubert_ray.core.config import ModelConfig  # noqa: E402
from hubert_ray.model.device import SimulatedDevice  # noqa: E402
from hubert_ray.model.engine import Engine  # noqa: E402

SR = 16_000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hubert_ray.testing.synth import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("engine") / "tiny"))


def _audio(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(seconds * SR)).astype(np.float32)


def test_launch_returns_before_the_device_is_done_and_finish_waits(tiny):
    spec = SimulatedDevice(x_realtime=4.0)  # 1 s of audio = 0.25 s of device time
    # The packing's cost given: measuring it at start would queue 144 s of audio (36 s here).
    config = ModelConfig(model_uri=tiny, layers="last", micro_batch_cost_seconds=0.0)
    engine = Engine(config, tiny, device=spec)
    device = engine.device
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


@pytest.mark.parametrize("forward_ms", [0.0, 4.0])
def test_forward_cost_is_measured_on_the_device(tiny, forward_ms):
    """A device of 1,000x with a fixed time per forward of 0 or 4 ms: the engine measures both
    (4 ms = 4 s of padded audio), not counting the measurement as work. The packing's cost is
    the larger of the device's fixed time and the host's time per micro-batch: with 4 ms,
    mixed lengths share padded micro-batches."""
    spec = SimulatedDevice(x_realtime=1000.0, forward_s=forward_ms / 1e3)
    engine = Engine(ModelConfig(model_uri=tiny, layers="last"), tiny, device=spec)
    device = engine.device
    cost = engine.forward_cost
    assert cost.device_fixed_s == pytest.approx(forward_ms / 1e3, abs=1e-6)
    assert cost.per_audio_s == pytest.approx(1e-3, rel=1e-6)
    assert device.busy_s == device.forwards == 0
    lengths = (1.0, 1.3, 1.7, 2.2, 2.9, 3.1)
    engine.run([f"s{i}" for i in range(6)], [_audio(s, i) for i, s in enumerate(lengths)])
    assert cost.host_s > 0  # observed while the call was launched
    expected = max(cost.device_fixed_s, cost.host_s) / cost.per_audio_s
    assert engine.report()["micro_batch_cost_seconds"] == pytest.approx(expected, abs=1e-3)
    if forward_ms:
        assert device.forwards < 6 and engine.stats["padded_samples"] > engine.stats["samples"]
    cost.host_s = 0.0  # the device's fixed time alone
    assert engine.batch_cost_samples == pytest.approx(forward_ms * SR, abs=1.0)


def test_rows_without_audio_pass_through(tiny):
    engine = Engine(ModelConfig(model_uri=tiny, layers="last"), tiny, device=SimulatedDevice(1e6))
    res = engine.run(["a", "gone", "b"], [_audio(0.5, 0), None, _audio(0.3, 1)])
    assert res.valid == [True, False, True]
    assert res.frames[1] == 0 and res.compute_dtype[1] is None


def test_simulated_device_is_a_picklable_spec_opened_per_engine(tiny):
    """The spec travels (a Ray actor's constructor argument); each engine opens its own device
    (its own queue and time); the stage adapter hands it to its engine, whose report carries
    the device's time."""
    import pickle

    from hubert_ray.model.device import SimulatedRun
    from hubert_ray.stages.extractor import ModelStage

    spec = SimulatedDevice(x_realtime=1e6, forward_s=1e-4, hidden=16)
    assert pickle.loads(pickle.dumps(spec)) == spec
    config = ModelConfig(model_uri=tiny, layers="last")
    a, b = Engine(config, tiny, device=spec), Engine(config, tiny, device=spec)
    assert isinstance(a.device, SimulatedRun) and a.device is not b.device
    a.run(["x"], [_audio(0.5, 0)])
    assert a.device.forwards == 1 and b.device.forwards == 0
    assert a.hidden == 16 and a.report()["simulated"]["calls"][0][1] == int(0.5 * SR)
    stage = ModelStage(config, device=spec)
    assert isinstance(stage.engine.device, SimulatedRun)
    assert stage.engine.report()["simulated"]["x_realtime"] == 1e6


def test_sampled_checks_are_computed_on_the_device_like_the_host_metrics(tiny):
    """The audit's on-device metrics (queued behind the call, read back with it) equal the
    host's float64 ``compare`` of the stored reduced-dtype features with a separate FP32 run;
    the audit's device time is accounted apart from the forward's."""
    from hubert_ray.core.config import PrecisionConfig
    from hubert_ray.core.precision import compare

    audio = [_audio(s, i) for i, s in enumerate((0.03, 0.7, 2.3, 1.1))]  # 0.03 s: 1 frame
    ids = [f"seg-{i}" for i in range(len(audio))]
    every = PrecisionConfig(precision_sample_rate=1.0, precision_warn=1.0, precision_limit=1.0)
    config = ModelConfig(
        model_uri=tiny, layers="1,2", dtype="bfloat16", chunk_seconds=1.0, precision=every
    )
    engine = Engine(config, tiny, self_test=False)
    res = engine.run(ids, audio)
    fp32 = ModelConfig(model_uri=tiny, layers="1,2", chunk_seconds=1.0, storage_dtype="float32")
    ref = Engine(fp32, tiny, self_test=False).run(ids, audio)
    starts = np.concatenate([[0], np.cumsum(res.frames)])
    for i in range(len(ids)):
        assert res.compute_dtype[i] == "bfloat16"
        assert [m["layer"] for m in res.precision[i]] == [1, 2]
        for m in res.precision[i]:
            k, (a, b) = m["layer"], starts[i : i + 2]
            expected = compare(res.features[k][a:b].float().numpy(), ref.features[k][a:b].numpy())
            for name, value in expected.items():
                assert m[name] == pytest.approx(value, rel=1e-4, abs=1e-6), (i, k, name)
            assert m["unit_flip_rate"] is None  # no centroids
    assert res.precision[2][0]["rel_l2"] > 0  # bfloat16 differs from float32
    assert engine.stats["audit_device_s"] > 0 and engine.stats["forward_device_s"] > 0
    assert engine.report()["device_s"]["audit"] > 0


def _mixed_call():
    lengths = (3.1, 7.4, 0.6, 12.0, 9.9, 4.2, 25.0, 1.3, 8.8, 6.5, 15.2, 2.7)
    return [f"s{i}" for i in range(len(lengths))], [_audio(s, i) for i, s in enumerate(lengths)]


def _recording(engine, seen: list, pause_s: float = 0.0):
    """Record the thread and torch's threads of every forward of ``engine``'s model."""
    import threading

    import torch

    forward = engine.net.forward

    def recording(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        time.sleep(pause_s)  # long enough for another thread to take the next micro-batch
        return forward(*args, **kwargs)

    engine.net.forward = recording
    return forward


@pytest.mark.parametrize("strategy", ["at_once", "threaded"])
def test_cpu_strategies_give_the_same_features(tiny, strategy):
    """On CPU an engine of N threads runs N micro-batches at once on one torch thread each
    (``at_once``), or one at a time on N torch threads (``threaded``); either way its features
    are the same bits as one engine thread's (the same micro-batches, the same arithmetic per
    micro-batch), and a failing micro-batch fails the call."""
    import itertools

    ids, audio = _mixed_call()
    config = ModelConfig(model_uri=tiny, layers="all", dtype="float32")
    serial = Engine(dataclasses.replace(config, num_threads=1), tiny, self_test=False)
    engine = Engine(
        dataclasses.replace(config, num_threads=2), tiny, self_test=False, cpu_strategy=strategy
    )
    assert serial.forwards is None and engine.forwards.strategy == strategy
    report = engine.report()
    assert report["cpu_strategy"] == {"chosen": strategy, "threads": 2, "forced": True}
    assert report["forwards_at_once"] == (2 if strategy == "at_once" else 1)

    seen: list = []
    forward = _recording(engine, seen, pause_s=0.05 if strategy == "at_once" else 0.0)
    got, want = engine.run(ids, audio), serial.run(ids, audio)
    assert len(seen) >= 3
    if strategy == "at_once":
        assert {n for _, n in seen} == {1}
        assert len({name for name, _ in seen}) == 2  # both of its threads computed
    else:
        assert {n for _, n in seen} == {2} and len({name for name, _ in seen}) == 1
    assert engine.stats["padded_samples"] == serial.stats["padded_samples"]  # same packing
    assert got.frames == want.frames and got.valid == want.valid
    for layer in engine.layers:
        assert torch_equal(got.features[layer], want.features[layer]), layer

    calls = itertools.count()

    def failing(x, lengths, layers):
        if next(calls) == 1:
            raise RuntimeError("out of memory in one micro-batch")
        return forward(x, lengths, layers)

    engine.net.forward = failing
    with pytest.raises(RuntimeError, match="one micro-batch"):
        engine.run(ids, audio)


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and torch.equal(a, b)


def test_cpu_strategy_is_timed_at_start_and_the_faster_kept(tiny):
    """An engine of N > 1 CPU threads times N forwards of the calibration micro-batch both
    ways when it starts, keeps the faster, reports both figures, and computes the same
    features as the other way would (whichever wins on this CPU); one thread: nothing to
    time."""
    ids, audio = _mixed_call()
    config = ModelConfig(model_uri=tiny, layers="last", dtype="float32", num_threads=2)
    engine = Engine(config, tiny, self_test=False)
    timed = engine.report()["cpu_strategy"]
    assert timed["threads"] == 2 and timed["rounds"] >= 1 and not timed["forced"]
    assert timed["at_once_s"] > 0 and timed["threaded_s"] > 0
    faster = "at_once" if timed["at_once_s"] <= timed["threaded_s"] else "threaded"
    assert timed["chosen"] == faster == engine.forwards.strategy
    assert engine.report()["forwards_at_once"] == (2 if faster == "at_once" else 1)
    assert engine.stats["batches"] == engine.stats["samples"] == 0  # not counted as work

    other = "threaded" if faster == "at_once" else "at_once"
    forced = Engine(config, tiny, self_test=False, cpu_strategy=other)
    got, want = engine.run(ids, audio), forced.run(ids, audio)
    layer = engine.layers[-1]
    assert torch_equal(got.features[layer], want.features[layer])

    one = Engine(dataclasses.replace(config, num_threads=1), tiny, self_test=False)
    assert one.forwards is None and one.report()["cpu_strategy"] is None
    assert one.report()["forwards_at_once"] == 1

"""Capacity planner arithmetic and CLI (hubert-ray plan)."""

from __future__ import annotations

import json
import math

import pytest

from hubert_ray.cli import plan as planner
from hubert_ray.core import rates


def test_wenetspeech_l_on_one_8_gpu_node():
    p = planner.plan(10_000, 8, 352, gpu_rate=9_720, decode_profile="reference")  # opus
    assert p["audio_seconds"] == 36_000_000
    assert p["model_stage_x_realtime"] == 8 * 9_720
    assert p["decode_rate_per_core"] == 3_500 / 16
    assert p["decode_stage_x_realtime"] == pytest.approx(352 * 218.75)
    assert p["bottleneck"] == "decode" and p["x_realtime"] == pytest.approx(77_000)
    assert p["wall_seconds"] == pytest.approx(36e6 / 77_000)
    assert p["gpu_busy_fraction"] == pytest.approx(77_000 / 77_760)
    assert p["gpu_hours"] == pytest.approx(8 * 36e6 / 77_000 / 3600)
    assert (p["gpu_nodes"], p["decode_nodes"]) == (1, 22)
    assert p["decode_cores_to_saturate_gpus"] == math.ceil(77_760 / 218.75) == 356
    assert p["decode_nodes_to_saturate_gpus"] == 23
    # write tasks: one stored layer at the measured per-core rate, at the plan's throughput
    assert p["write_cores"] == math.ceil(77_000 / rates.WRITE_RATE.x_realtime)


def test_gpu_bound_and_overrides():
    p = planner.plan(
        100, 3, 40, fmt="flac", gpu_rate=1_000, decode_rate=500, gpus_per_node=2, cores_per_node=8
    )
    assert p["bottleneck"] == "gpu" and p["x_realtime"] == 3_000  # 40 x 500 = 20,000 > 3,000
    assert p["wall_seconds"] == pytest.approx(360_000 / 3_000)
    assert p["gpu_busy_fraction"] == 1.0
    assert (p["gpu_nodes"], p["decode_nodes"]) == (2, 5)
    assert p["decode_cores_to_saturate_gpus"] == 6
    assert p["gpu_rate_source"] == "given (--gpu-rate)"
    assert p["decode_rate_source"] == "given (--decode-rate)"
    three = planner.plan(100, 3, 40, gpu_rate=1_000, decode_rate=500, layers=3, write_rate=700)
    assert three["write_cores"] == math.ceil(3_000 * 3 / 700) == 13
    assert three["write_rate_source"] == "given (--write-rate)"


def test_decode_profiles_and_formats():
    ref = planner.plan(1, 1, 16, fmt="flac", decode_profile="reference")
    assert ref["decode_stage_x_realtime"] == pytest.approx(26_000)  # reference: per 16-core node
    # the default: the whole job's measured host cost per audio hour, per format
    host = {fmt: planner.plan(1, 1, 1, fmt=fmt) for fmt in rates.FORMATS}
    for fmt, p in host.items():
        assert p["decode_rate_per_core"] == rates.DECODE_RATES["host"][fmt].x_realtime
        assert "host_capacity" in p["decode_rate_source"]
    assert host["flac"]["decode_rate_per_core"] > host["opus"]["decode_rate_per_core"]
    measured = planner.plan(1, 1, 1, fmt="opus", decode_profile="measured")
    assert measured["decode_rate_per_core"] == rates.DECODE_RATES["measured"]["opus"].x_realtime
    assert "measured" in measured["decode_rate_source"]


def test_every_rate_says_where_it_was_measured():
    for rate in rates.GPU_RATES.values():
        assert rate.unit == "gpu"
        assert rates.REFERENCE in rate.source or "measured" in rate.source
    default = planner.plan(1, 1, 1)
    assert default["gpu_rate"] == 3_254 and "H200" in default["gpu_rate_source"]
    for profile in rates.DECODE_RATES.values():
        assert set(profile) == set(rates.FORMATS)
        for rate in profile.values():
            assert rate.unit == "core" and rate.x_realtime > 0 and rate.source
    assert all("2-vCPU" in r.source for r in rates.DECODE_RATES["measured"].values())


def test_cli(capsys):
    assert planner.main(["--hours", "10000", "--gpus", "8", "--decode-cores", "128"]) == 0
    out = capsys.readouterr().out
    assert "wall time   : 23.0 min" in out and "bottleneck: gpu" in out
    assert "H200" in out and "host_capacity" in out
    assert "write tasks : 10 core(s) for 1 stored layer(s)" in out
    assert "benchmarks.write_rate" in out
    assert planner.main(["--hours", "5", "--gpus", "1", "--decode-cores", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hours"] == 5


@pytest.mark.parametrize(
    "args",
    [
        ["--hours", "0", "--gpus", "1", "--decode-cores", "1"],
        ["--hours", "1", "--gpus", "x", "--decode-cores", "1"],
        ["--hours", "1", "--gpus", "1", "--decode-cores", "1", "--format", "mp3"],
        ["--hours", "1", "--gpus", "1"],
    ],
)
def test_bad_options_exit_2(args):
    with pytest.raises(SystemExit) as exc:
        planner.main(args)
    assert exc.value.code == 2


def test_measure_decode_times_decode_and_decode_tasks(capsys):
    """``python -m benchmarks.measure_decode`` on short recordings: both formats, the decode
    alone and a decode task's whole work (cut into segments, normalised), as positive rates."""
    from benchmarks import measure_decode

    table = measure_decode.segment_table(["a.flac", "b.flac"], 10.0)
    for rec in ("r0", "r1"):  # back to back, covering each recording
        spans = [
            (b, e)
            for r, b, e in zip(table["recording_id"], table["start_s"], table["end_s"], strict=True)
            if r == rec
        ]
        assert spans[0][0] == 0.0 and spans[-1][1] == pytest.approx(10.0, abs=0.3)
        assert all(e1 == b2 for (_, e1), (b2, _) in zip(spans, spans[1:], strict=False))
    assert measure_decode.main(["--seconds", "3", "--recordings", "1", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    for fmt in ("opus", "flac"):
        rates = result["formats"][fmt]
        assert rates["x_realtime_median"] > 0 and rates["stage_x_realtime_median"] > 0

"""Model calls bounded in audio seconds: a few long segments among short ones are computed in
sub-calls of at most ``call_seconds`` (seen in the actors' reports), each segment written once.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/unit/test_call_seconds.py``.
"""

from __future__ import annotations

import json
import os

import pytest

from hubert_ray.core.config import ExtractConfig
from hubert_ray.dataset import output
from hubert_ray.testing.synth import synth_signal, write_audio

SHORT, LONG, BOUND = 2.0, 60.0, 61.0


@pytest.mark.ray
def test_long_segments_split_into_bounded_calls(ray_session, tiny_model, tmp_path):
    """3 recordings of 80 s: 2 s segments around one 60 s segment each (33 segments, mean
    7.3 s). With ``call_seconds=61`` Ray hands the actor 9 rows at a time from one block of
    33 (one decode batch): every such call holds a 60 s segment with 2 s ones (> 61 s), so
    only the actor's split keeps its calls within the bound."""
    from hubert_ray.backend import extract

    lines, ids = [], []
    for r in range(3):
        write_audio(str(tmp_path / f"r{r}.wav"), synth_signal(80.0, 16000, seed=r), 16000, "wav16")
        spans = [(2.0 * i, 2.0 * i + SHORT) for i in range(5)] + [(10.0, 10.0 + LONG)]
        spans += [(70.0 + 2.0 * i, 72.0 + 2.0 * i) for i in range(5)]
        segs = [{"id": f"r{r}-{k:02d}", "start_s": a, "end_s": b} for k, (a, b) in enumerate(spans)]
        ids += [s["id"] for s in segs]
        lines.append({"id": f"r{r}", "audio": f"r{r}.wav", "segments": segs})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = str(tmp_path / "out")
    cfg = ExtractConfig(
        manifest=str(manifest),
        model=tiny_model,
        output=out,
        call_seconds=BOUND,
        decode_batch_size=33,
        num_cpu_actors=1,
    )
    summary = extract.run(cfg)
    feats = output.read_table(os.path.join(out, output.FEATURES_DIR), ["segment_id"])
    assert sorted(feats.column("segment_id").to_pylist()) == sorted(ids)  # each once
    assert summary["segments_ok"] == 33 and summary["segments_duplicated"] == 0
    reports = output.actor_reports(out)
    calls = [r["largest_call"] for r in reports if r.get("largest_call", {}).get("rows")]
    assert calls, reports
    assert max(c["audio_seconds"] for c in calls) <= BOUND  # never above the bound
    assert max(c["audio_seconds"] for c in calls) >= LONG  # the long segments ran
    assert max(c["rows"] for c in calls) >= 5  # short segments still share calls

"""The whole job through the CLI on each model family (tiny random checkpoints, with and without
preprocessor_config.json) on a small mixed corpus, compared with the stock transformers model
run item by item on the checkpoint's own preprocessing (Wav2Vec2FeatureExtractor)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hubert_ray import read_features
from hubert_ray.dataset import output

pytestmark = pytest.mark.ray
pytest.importorskip("transformers")

# A frontend with another frame grid than HuBERT's (receptive field 320, hop 160).
ODD_GEOMETRY = dict(
    conv_dim=(32,) * 6, conv_kernel=(10, 3, 3, 3, 3, 3), conv_stride=(5, 2, 2, 2, 2, 2)
)
# name -> (model_type, variant, preprocessor_config.json arguments or None, extra config)
CASES = {
    "hubert-large-raw": ("hubert", "large", {"do_normalize": False}, {}),
    "wav2vec2-base-nofile": ("wav2vec2", "base", None, {}),
    "wavlm-large-normalised": ("wavlm", "large", {"do_normalize": True}, ODD_GEOMETRY),
    "data2vec-audio-raw": ("data2vec-audio", "base", {"do_normalize": False}, {}),
}
NUM_LAYERS = 2


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> tuple[str, dict]:
    """Mixed formats, rates, channels and lengths (0.3 s to 3.1 s): a few segments."""
    from hubert_ray.testing.synth import synth_signal, write_audio

    root = tmp_path_factory.mktemp("small-corpus")
    recs = [
        ("a", "wav16", 16000, 1, 3.1, [("a-0", 0.0, 1.7), ("a-1", 1.7, 3.1)]),
        ("b", "flac", 44100, 2, 2.3, None),
        ("c", "ogg", 24000, 1, 0.3, None),
        ("d", "wavf32", 16000, 1, 1.05, [("d-0", 0.2, 0.9)]),
    ]
    lines, segments = [], {}
    for k, (rid, fmt, sr, ch, dur, segs) in enumerate(recs):
        path = str(root / f"{rid}.{fmt}")
        write_audio(path, synth_signal(dur, sr, ch, seed=k) * (0.2 + 0.3 * k), sr, fmt)
        rec = {"id": rid, "audio": path}
        if segs:
            rec["segments"] = [{"id": s, "start_s": a, "end_s": b} for s, a, b in segs]
            segments.update({s: (path, a, b) for s, a, b in segs})
        else:
            segments[rid] = (path, 0.0, None)
        lines.append(rec)
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(manifest), segments


def _stock_features(model_dir: str, model_type: str, segments: dict) -> dict:
    """Every segment through transformers alone: the checkpoint's feature extractor (its
    defaults when it has no preprocessor_config.json), then the stock model."""
    import torch
    import transformers

    from hubert_ray.corpus.audio import cut_segment, read_audio, to_mono_16k
    from hubert_ray.model.families import FAMILIES

    if os.path.exists(os.path.join(model_dir, "preprocessor_config.json")):
        extractor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(model_dir)
    else:
        extractor = transformers.Wav2Vec2FeatureExtractor()
    model = getattr(transformers, FAMILIES[model_type]).from_pretrained(model_dir).eval()
    out = {}
    for sid, (path, start, end) in segments.items():
        audio = cut_segment(to_mono_16k(*read_audio(path)), start, end, 0.1)
        x = extractor(audio, sampling_rate=16000, return_tensors="pt").input_values
        with torch.no_grad():
            hs = model(x, output_hidden_states=True).hidden_states
        out[sid] = (len(audio), [h[0].numpy() for h in hs])
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_cli_features_equal_stock_transformers(ray_session, small_corpus, tmp_path, name):
    from hubert_ray.core.chunking import Geometry
    from hubert_ray.testing.synth import make_tiny_family_model
    from jobs.extract import main

    model_type, variant, pre, extra = CASES[name]
    model_dir = make_tiny_family_model(
        str(tmp_path / name), model_type, variant, preprocessor=pre, **extra
    )
    manifest, segments = small_corpus
    out = str(tmp_path / "out")
    args = ["--manifest", manifest, "--model", model_dir, "--output", out, "--layers", "all"]
    args += ["--storage-dtype", "float32", "--batch-size", "8", "--quiet"]
    assert main(args) == 0

    normalize = True if pre is None else pre["do_normalize"]
    source = "default (no preprocessor_config.json)" if pre is None else "preprocessor_config.json"
    expected_prep = {"normalize": normalize, "option": "auto", "source": source}
    with open(os.path.join(out, "_summary.json")) as f:
        summary = json.load(f)
    assert summary["preprocessing"] == expected_prep
    assert summary["segments_ok"] == len(segments)
    assert output.run_metadata(out)["preprocessing"] == expected_prep
    family = summary["model_family"]
    assert output.run_metadata(out)["model_family"] == family
    assert family["model_type"] == model_type
    assert family["frame_hop_samples"] == (160 if extra else 320)
    assert family["frame_rate_hz"] == 16000 / family["frame_hop_samples"]
    with open(os.path.join(out, "_job.json")) as f:
        assert json.load(f)["normalize"] is normalize

    stock = _stock_features(model_dir, model_type, segments)
    geometry = Geometry.from_convs(
        extra.get("conv_kernel", (10, 3, 3, 3, 3, 2, 2)),
        extra.get("conv_stride", (5, 2, 2, 2, 2, 2, 2)),
    )
    worst = 0.0
    for k in range(NUM_LAYERS + 1):
        got = read_features(out, layer=k)
        assert set(got) == set(segments)
        for sid, (n, ref) in stock.items():
            assert got[sid].shape == ref[k].shape == (geometry.num_frames(n), 32)
            err = float(np.linalg.norm(got[sid] - ref[k]) / np.linalg.norm(ref[k]))
            worst = max(worst, err)
            assert err <= 1e-5, (name, sid, k, err)
    print(f"\n[{name}] pipeline vs stock transformers item by item: max rel err {worst:.1e}")

    # A rerun into the same output with the other setting is refused before any work.
    flipped = "off" if normalize else "on"
    assert main(args + ["--normalize", flipped]) == 2

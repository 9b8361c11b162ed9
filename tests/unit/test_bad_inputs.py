"""Bad-input matrix: each generated input with its documented outcome. The decode
stage turns every bad input into error rows (stage ``decode``) with one reason, never an
exception; manifest problems stop the job before Ray with exit code 2.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/integration/test_bad_inputs.py``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf

from hubert_ray.core.config import DecodeConfig
from hubert_ray.corpus import manifest
from hubert_ray.corpus.audio import DecodeStage, clear_cache
from hubert_ray.testing.synth import synth_signal, write_audio


def _wav(path, x, sr, subtype="PCM_16"):
    sf.write(str(path), x, sr, format="WAV", subtype=subtype)


def _make(kind: str, d) -> tuple[str, float, float | None]:
    """Write input ``kind`` under ``d``; returns (file name, start_s, end_s)."""
    good = synth_signal(2.0, 16000)
    if kind == "corrupt":
        (d / "a.flac").write_bytes(b"fLaC" + os.urandom(3000))
    elif kind == "truncated":
        write_audio(str(d / "full.flac"), good, 16000, "flac")
        (d / "a.flac").write_bytes((d / "full.flac").read_bytes()[:200])
    elif kind == "zero_bytes":
        (d / "a.flac").write_bytes(b"")
    elif kind == "text_as_flac":
        (d / "a.flac").write_text("this is not audio\n" * 50)
    elif kind == "unknown_format":
        (d / "a.xyz").write_bytes(b"\x00\x01" * 4000)
        return "a.xyz", 0.0, None
    elif kind == "too_short":
        _wav(d / "a.wav", good[:399], 16000)
        return "a.wav", 0.0, None
    elif kind == "silent":
        _wav(d / "a.wav", np.zeros((16000, 1), np.float32), 16000)
        return "a.wav", 0.0, None
    elif kind == "nan_float_wav":
        x = good.copy()
        x[100, 0], x[200, 0] = np.nan, np.inf
        _wav(d / "a.wav", x, 16000, "FLOAT")
        return "a.wav", 0.0, None
    elif kind in ("6ch", "8k", "44k", "24bit", "32float"):
        sr = {"8k": 8000, "44k": 44100}.get(kind, 16000)
        x = synth_signal(2.0, sr, channels=6 if kind == "6ch" else 1)
        subtype = {"24bit": "PCM_24", "32float": "FLOAT"}.get(kind, "PCM_16")
        _wav(d / "a.wav", x, sr, subtype)
        return "a.wav", 0.0, None
    elif kind == "missing":
        return "nowhere.wav", 0.0, None
    elif kind in ("end_within_tolerance", "end_past_tolerance"):
        _wav(d / "a.wav", good, 16000)
        return "a.wav", 1.0, 2.05 if kind == "end_within_tolerance" else 2.5
    elif kind == "path_escape":
        return "../../etc/passwd", 0.0, None
    else:
        raise ValueError(kind)
    return "a.flac", 0.0, None


MATRIX = {  # input -> documented outcome (None = a feature row)
    "corrupt": "unreadable_audio",
    "truncated": "unreadable_audio",
    "zero_bytes": "unreadable_audio",
    "text_as_flac": "unreadable_audio",
    "unknown_format": "unreadable_audio",
    "too_short": "too_short",  # < 400 samples: HuBERT yields no frame
    "silent": None,  # zeros after normalisation
    "nan_float_wav": "non_finite",
    "6ch": None,  # downmixed by channel mean
    "8k": None,  # resampled to 16 kHz (soxr HQ)
    "44k": None,
    "24bit": None,
    "32float": None,
    "missing": "missing_file",
    "end_within_tolerance": None,  # clipped to the audio's end
    "end_past_tolerance": "segment_out_of_range",
    "path_escape": "path_escape",  # a relative path leaving the manifest's dir is never read
}


@pytest.mark.parametrize("kind", sorted(MATRIX))
def test_bad_input_outcome(kind, tmp_path):
    d = tmp_path / "corpus" / "sub"
    d.mkdir(parents=True)
    name, start, end = _make(kind, d)
    m = d / "manifest.jsonl"
    rec = {"id": "r", "audio": name, "segments": [{"id": "s", "start_s": start, "end_s": end}]}
    m.write_text(json.dumps(rec) + "\n")
    table = manifest.segment_table(manifest.read_manifest(str(m)))  # never a manifest error
    clear_cache()
    out = DecodeStage(DecodeConfig(end_tolerance_s=0.1))(table).to_pylist()[0]
    assert out["error_reason"] == MATRIX[kind], out["error_message"]
    if MATRIX[kind] is None:
        audio = np.asarray(out["audio"], np.float32)
        assert np.isfinite(audio).all() and out["num_samples"] == len(audio) >= 400
        if kind == "silent":
            assert not audio.any()
        if kind == "end_within_tolerance":
            assert out["end_s"] == pytest.approx(2.0) and len(audio) == 16000
        if kind in ("8k", "44k"):
            assert len(audio) == 32000
    else:
        assert out["error_stage"] == "decode" and out["error_message"]
        if kind == "path_escape":
            assert "etc/passwd" in out["error_message"]


def test_pickle_weights_refused_unless_allowed(tmp_path, tiny_model):
    import torch

    from hubert_ray.core.errors import ConfigError
    from hubert_ray.model import files
    from hubert_ray.model.encoder import load_model

    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(open(os.path.join(tiny_model, "config.json")).read())
    net = load_model(tiny_model, "cpu")
    torch.save(net.model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="allow-pickle-weights"):
        files.read_model_config(str(d))
    assert files.read_model_config(str(d), allow_pickle=True)["hidden_size"] == 32
    load_model(str(d), "cpu", allow_pickle=True)

"""WenetSpeech: streaming parser, subset filtering, validation, memory, synthetic statistics."""

from __future__ import annotations

import io
import json
import os
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest

from hubert_ray.core.errors import ManifestError
from hubert_ray.corpus import manifest, wenetspeech
from hubert_ray.testing.synth_wenetspeech import (
    audio_entry,
    iter_text_only_audios,
    make_wenetspeech_json_text_only,
    segment_durations,
    write_wenetspeech_json,
)
from jobs import prepare as prepare_cli


def test_segment_durations_follow_wenetspeech_statistics():
    d = segment_durations(2_000_000, np.random.default_rng(1))
    assert abs(d.mean() - 2.5) < 0.05
    assert abs(np.median(d) - 2.0) < 0.05
    assert abs(np.quantile(d, 0.99) - 8.4) < 0.2
    assert 100 < (d > 60).sum() < 1000  # "a few" (0.02 %) over a minute
    assert d.min() >= 0.2 and d.max() <= 120


@pytest.mark.parametrize("read_chars", [1, 7, 64, 1 << 18])
def test_iter_audios_equals_json_load(tmp_path, read_chars):
    """Any buffer size (numbers and strings split across refills) gives json.load's objects."""
    rng = np.random.default_rng(0)
    audios = [audio_entry(f"A{i}", f"audio/a{i}.opus", 40.0 + i, rng) for i in range(5)]
    audios[1]["duration"] = 1234567.125  # a long number likely to straddle a refill
    path = tmp_path / "WenetSpeech.json"
    write_wenetspeech_json(str(path), audios)
    with open(path, encoding="utf-8") as f:
        got = list(wenetspeech.iter_audios(f, read_chars=read_chars))
    assert got == json.load(open(path, encoding="utf-8"))["audios"] == audios


@pytest.mark.parametrize(
    "text, n",
    [
        ('{"audios": []}', 0),
        ("{}", 0),
        ('\ufeff {"x": {"audios": [1]}, "audios" : [ {"aid": "a"} , {"aid": "b"} ], "n": 1}', 2),
        ('{"audios": [{"aid": "a"}], "after": [1, 2, {"k": "v"}]}', 1),
    ],
)
def test_iter_audios_key_order_and_whitespace(text, n):
    got = list(wenetspeech.iter_audios(io.StringIO(text), read_chars=3))
    assert len(got) == n


@pytest.mark.parametrize(
    "text, needle",
    [
        ('{"audios": [{"aid": "a"}, {"aid": ', "invalid JSON"),  # truncated file
        ('{"audios": [{"aid": "a"} {"aid": "b"}]}', "',' or ']'"),
        ('["audios"]', "'{'"),
        ('{"audios": {"aid": "a"}}', "'['"),
    ],
)
def test_iter_audios_reports_malformed_json(text, needle):
    with pytest.raises(ManifestError, match="character") as exc:
        list(wenetspeech.iter_audios(io.StringIO(text), read_chars=4))
    assert needle in str(exc.value)


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    """A text-only WenetSpeech.json: 6 training recordings + the three evaluation sets."""
    root = tmp_path_factory.mktemp("wenet_text")
    rng = np.random.default_rng(3)
    audios = list(iter_text_only_audios(6, seed=3, recording_s=(120.0, 300.0)))
    for j, name in enumerate(("DEV", "TEST_NET", "TEST_MEETING")):
        audios.append(audio_entry(f"X{j}", f"audio/{name.lower()}/X{j}.opus", 60.0, rng, name))
    path = str(root / "WenetSpeech.json")
    write_wenetspeech_json(path, audios)
    return path, audios


def _expected(audios, subset):
    return {
        s["sid"]: (a["aid"], s["begin_time"], s["end_time"])
        for a in audios
        for s in a["segments"]
        if "{" + subset + "}" in s["subsets"]
    }


@pytest.mark.parametrize("subset", wenetspeech.SUBSETS)
def test_prepare_writes_the_subset_as_canonical_manifest(text_corpus, tmp_path, subset):
    path, audios = text_corpus
    out = str(tmp_path / "m.parquet")
    counts = wenetspeech.prepare(path, subset, out)
    recs = manifest.read_manifest(out)  # the canonical reader validates it
    got = {s.segment_id: (r.recording_id, s.start_s, s.end_s) for r in recs for s in r.segments}
    want = _expected(audios, subset)
    assert got == want and want
    assert counts["segments"] == len(want) and counts["recordings"] == len(recs)
    by_aid = {a["aid"]: a for a in audios}
    root = os.path.dirname(path)
    for r in recs:
        assert r.audio_uri == os.path.join(root, by_aid[r.recording_id]["path"])
        assert r.duration_s == by_aid[r.recording_id]["duration"]
    meta = pq.read_schema(out).metadata[wenetspeech.METADATA_KEY.encode()]
    assert json.loads(meta)["subset"] == subset
    assert pq.read_schema(out).remove_metadata().equals(manifest.CANONICAL_SCHEMA)


def test_subsets_nest_and_eval_sets_are_separate(text_corpus):
    _, audios = text_corpus
    sets = {s: set(_expected(audios, s)) for s in wenetspeech.SUBSETS}
    assert sets["S"] < sets["M"] < sets["L"]
    evals = [sets["DEV"], sets["TEST_NET"], sets["TEST_MEETING"]]
    assert all(e and not (e & sets["L"]) for e in evals)
    assert not (evals[0] & evals[1]) and not (evals[1] & evals[2])


def test_subset_names_accept_braces_and_case():
    assert wenetspeech.normalise_subset("{M}") == wenetspeech.normalise_subset("m") == "M"
    with pytest.raises(ManifestError, match="allowed: L, M, S"):
        wenetspeech.normalise_subset("XL")


def test_prepare_lists_every_problem_and_writes_nothing(tmp_path):
    good = {"sid": "a_0", "begin_time": 0.0, "end_time": 1.0, "subsets": ["{L}"]}
    audios = [
        {"aid": "a", "path": "a.opus", "duration": 10, "segments": [good, dict(good)]},  # dup
        {"aid": "", "path": "b.opus", "segments": [dict(good, sid="b_0")]},
        {"aid": "c", "path": "c.opus", "duration": -1, "segments": [dict(good, sid="c_0")]},
        {"aid": "d", "path": "d.opus", "segments": [dict(good, sid="d_0", end_time=0.0)]},
        {"aid": "e", "path": "e.opus", "segments": [dict(good, sid="e_0", subsets="L")]},
        {"aid": "f", "segments": [dict(good, sid="f_0")]},
        {"aid": "g", "path": "g.opus", "segments": [dict(good, sid="g_0", begin_time="x")]},
        {"aid": "h", "path": "h.opus", "segments": [dict(good, sid="h_0", subsets=["{S}"])]},
    ]
    path = str(tmp_path / "WenetSpeech.json")
    write_wenetspeech_json(path, audios)
    out = tmp_path / "m.parquet"
    with pytest.raises(ManifestError) as exc:
        wenetspeech.prepare(path, "L", str(out))
    msg = str(exc.value)
    for needle in (
        "audios[1].aid",
        "audios[2].duration",
        "audios[3].segments[0].end_time",
        "audios[4].segments[0].subsets",
        "audios[5].path",
        "audios[6].segments[0].begin_time",
        "duplicate sid 'a_0'",
    ):
        assert needle in msg
    assert "7 problems" in msg
    assert not out.exists()


def test_prepare_cli(text_corpus, tmp_path, capsys):
    path, audios = text_corpus
    out = str(tmp_path / "m.parquet")
    assert prepare_cli.main(["--wenetspeech", path, "--subset", "{M}", "--output", out]) == 0
    assert f"{len(_expected(audios, 'M'))} segments" in capsys.readouterr().out
    assert prepare_cli.main(["--wenetspeech", path, "--output", out]) == 2
    assert "--subset" in capsys.readouterr().err
    assert prepare_cli.main(["--wenetspeech", path, "--subset", "XL", "--output", out]) == 2
    assert "--subset" in capsys.readouterr().err
    assert prepare_cli.main(["--manifest", path, "--subset", "M", "--output", out]) == 2


def test_prepare_streams_in_memory_far_below_the_file_size(tmp_path):
    """A 50 MB WenetSpeech.json: a whole prepare (parse + write) allocates a few MB at most.

    (Python allocations, tracemalloc. Process RSS growth measured outside the tests: a constant
    ~100-150 MB of allocator/Arrow overhead for 20, 50 and 100 MB files alike.)
    """
    path = str(tmp_path / "WenetSpeech.json")
    counts = make_wenetspeech_json_text_only(path, 50_000_000)
    size = counts["bytes"]
    assert size >= 50_000_000

    small = str(tmp_path / "small.json")  # warm-up: first-time imports are not data
    write_wenetspeech_json(small, iter_text_only_audios(2))
    wenetspeech.prepare(small, "S", str(tmp_path / "small.parquet"))

    tracemalloc.start()
    try:
        # S (a fifth of the segments) keeps the traced run short; every code path still runs.
        got = wenetspeech.prepare(path, "S", str(tmp_path / "S.parquet"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    n = counts["segments"]
    assert 0.15 * n < got["segments"] < 0.25 * n
    print(f"file {size / 1e6:.0f} MB, {n} segments; prepare peak {peak / 1e6:.1f} MB")
    # Bounded by one row group (~10k segments) + the read buffer, not by the file: ~7 MB here,
    # the same for the 1.2 GB real file.
    assert peak < min(size / 5, 12e6)

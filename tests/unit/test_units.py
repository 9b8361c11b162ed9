"""Units without Ray: centroid files, assignment, run-length form, the bounded sample, k-means."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from hubert_ray.core.errors import ConfigError
from hubert_ray.dataset import output
from hubert_ray.stages.extractor import features_array
from hubert_ray.units import centroids as units
from hubert_ray.units import kmeans


def _prov(**kw):
    return {"model": "m", "model_revision": "rev1", "layer": 2, **kw}


def test_centroid_file_roundtrip_and_header_only_provenance(tmp_path):
    c = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    path = units.save(str(tmp_path / "km.safetensors"), c, _prov(seed=3, inertia=1.5))
    book = units.load(path)
    assert np.array_equal(book.centroids, c)
    assert (book.k, book.hidden, book.layer) == (7, 5, 2)
    prov = units.read_provenance(path)
    assert prov["seed"] == 3 and prov["inertia"] == 1.5 and prov["k"] == 7
    assert prov["hidden_size"] == 5 and prov["centroids_sha"] == units.centroid_sha(c)
    (tmp_path / "not.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage.......")
    with pytest.raises(ConfigError, match="not a centroid file"):
        units.read_provenance(str(tmp_path / "not.safetensors"))
    with pytest.raises(ConfigError, match="does not exist"):
        units.read_provenance(str(tmp_path / "missing.safetensors"))


def test_check_codebook_names_each_mismatch(tmp_path):
    prov = _prov(k=4, hidden_size=8)
    units.check_codebook(prov, "km", model_revision="rev1", hidden_size=8, layers=(1, 2))
    with pytest.raises(ConfigError, match=r"model revision 'rev1' != the model's 'rev2'"):
        units.check_codebook(prov, "km", model_revision="rev2")
    with pytest.raises(ConfigError, match=r"hidden size 8 != the model's 16"):
        units.check_codebook(prov, "km", hidden_size=16)
    with pytest.raises(ConfigError, match=r"layer 2 is not among --layers \[1\]"):
        units.check_codebook(prov, "km", layers=(1,))
    c = np.zeros((4, 8), np.float32)
    a = units.save(str(tmp_path / "a.safetensors"), c, _prov())
    b = units.save(str(tmp_path / "b.safetensors"), c + 1, _prov())
    with pytest.raises(ConfigError, match="both for layer 2"):
        units.check_files([a, b], layers=(2,), hidden_size=8, model_revision="rev1")
    books = units.check_files([a], layers=(2,), hidden_size=8, model_revision="rev1")
    assert books[0]["layer"] == 2 and books[0]["k"] == 4


def test_assign_is_exact_argmin_except_near_ties():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5000, 24)).astype(np.float32) * 3
    c = rng.standard_normal((300, 24)).astype(np.float32) * 3
    got = units.assign_numpy(x, c)
    assert got.dtype == np.uint16 and got.shape == (5000,)
    ref = units.sq_distances(x, c).argmin(1)
    differ = got != ref
    assert not (differ & ~units.near_ties(x, c)).any()
    assert differ.mean() <= 1e-4
    # float16 features: the same ids as their float32 values
    import torch

    h = torch.from_numpy(x).half()
    assert np.array_equal(units.assign(h, c).numpy(), units.assign_numpy(h.float().numpy(), c))


def test_assign_ids_above_int16():
    grid = np.stack(np.meshgrid(np.arange(200), np.arange(200), indexing="ij"), -1)
    c = grid.reshape(-1, 2).astype(np.float32)  # id = 200 * a + b for the point (a, b)
    x = np.array([[199.1, 199.2], [165.1, 0.1], [0.0, 5.2]], np.float32)
    assert units.assign_numpy(x, c).tolist() == [39_999, 33_000, 5]


def test_unit_flip_rate_and_run_length():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2000, 8)).astype(np.float32)
    c = rng.standard_normal((50, 8)).astype(np.float32)
    assert units.unit_flip_rate(x, x, c) == 0.0
    noisy = x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
    rate = units.unit_flip_rate(noisy, x, c)
    expect = (units.assign_numpy(noisy, c) != units.assign_numpy(x, c)).mean()
    assert 0 < rate == pytest.approx(expect)
    vals, durs = units.run_length(np.array([5, 5, 7, 7, 7, 5], np.uint16))
    assert vals.tolist() == [5, 7, 5] and durs.tolist() == [2, 3, 1]
    u = rng.integers(0, 3, 500).astype(np.uint16)
    vals, durs = units.run_length(u)
    assert np.array_equal(np.repeat(vals, durs), u) and (vals[1:] != vals[:-1]).all()
    assert units.run_length(np.zeros(0, np.uint16))[1].size == 0


def write_dataset(root, lengths, hidden=6, parts=3, seed=0, rows_per_rec=3):
    """A feature dataset in the job's layout: segment i has ``lengths[i]`` frames whose value
    in every dimension is ``i * 1000 + frame`` (so a sampled row names its segment and frame)."""
    n = len(lengths)
    ids = [f"seg{i:04d}" for i in range(n)]
    frames = [
        np.full((m, hidden), 0, np.float32) + (i * 1000 + np.arange(m))[:, None]
        for i, m in enumerate(lengths)
    ]
    flat = np.concatenate(frames)
    col = features_array(flat, list(lengths), [True] * n, "float32")
    table = pa.table(
        {
            "segment_id": ids,
            "recording_id": [f"rec{i // rows_per_rec}" for i in range(n)],
            "start_s": [0.0] * n,
            "end_s": [m / 50 for m in lengths],
            "num_frames": pa.array(lengths, pa.int32()),
            "layer_3": col,
            "model": ["tiny"] * n,
            "model_revision": ["revX"] * n,
        }
    )
    order = np.random.default_rng(seed).permutation(n)
    table = table.take(pa.array(order))
    step = -(-n // parts)
    for s in range(0, n, step):
        output.write_part(table.slice(s, step), f"{root}/features", {"layers": [3]})
    return ids


def test_sample_is_stratified_deterministic_and_independent_of_parts(tmp_path):
    lengths = np.random.default_rng(0).integers(1, 400, 60).tolist()
    write_dataset(tmp_path / "a", lengths, parts=2, seed=1)
    write_dataset(tmp_path / "b", lengths, parts=5, seed=2)  # other order, other parts
    total = sum(lengths)
    want = total // 10
    s1, info = kmeans.sample_features(str(tmp_path / "a"), 3, want, seed=7)
    s2, _ = kmeans.sample_features(str(tmp_path / "b"), 3, want, seed=7)
    assert np.array_equal(s1, s2)
    assert s1.dtype == np.float32 and s1.shape[1] == 6
    assert abs(len(s1) - want) <= len(lengths)
    d = info["sample"]
    assert d["dataset_frames"] == total and d["segments_total"] == 60
    assert d["recordings_total"] == 20 and d["rate"] == pytest.approx(want / total)
    seg, frame = (s1[:, 0] // 1000).astype(int), (s1[:, 0] % 1000).astype(int)
    per_seg = np.bincount(seg, minlength=60)
    for i, m in enumerate(lengths):  # every segment: its share within one frame
        assert abs(per_seg[i] - m * d["rate"]) < 1
        mine = np.sort(frame[seg == i])
        assert (mine < m).all() and len(set(mine.tolist())) == len(mine)
    s3, _ = kmeans.sample_features(str(tmp_path / "a"), 3, want, seed=8)
    assert not np.array_equal(s1, s3)
    whole, _ = kmeans.sample_features(str(tmp_path / "a"), 3, 10 * total)
    assert len(whole) == total
    with pytest.raises(ValueError, match="layer 4 is not stored"):
        kmeans.sample_features(str(tmp_path / "a"), 4, 10)


def test_learn_writes_provenance_and_finds_clusters(tmp_path):
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((4, 6)).astype(np.float32) * 20
    n = 40
    ids = [f"s{i}" for i in range(n)]
    lengths = [100] * n
    flat = np.concatenate(
        [centers[i % 4] + rng.standard_normal((100, 6)).astype(np.float32) for i in range(n)]
    )
    table = pa.table(
        {
            "segment_id": ids,
            "recording_id": ids,
            "start_s": [0.0] * n,
            "end_s": [2.0] * n,
            "num_frames": pa.array(lengths, pa.int32()),
            "layer_1": features_array(flat, lengths, [True] * n, "float16"),
            "model": ["tiny"] * n,
            "model_revision": ["revX"] * n,
        }
    )
    output.write_part(table, str(tmp_path / "ds" / "features"), None)
    km = str(tmp_path / "km.safetensors")
    prov = kmeans.learn(str(tmp_path / "ds"), 1, 4, 0.01, km, seed=0, n_init=3, backend="sklearn")
    assert prov["model_revision"] == "revX" and prov["layer"] == 1 and prov["k"] == 4
    assert prov["features_dtype"] == "float16" and prov["seed"] == 0
    assert prov["algorithm"]["name"] == "sklearn.cluster.MiniBatchKMeans"
    assert prov["algorithm"]["params"]["reassignment_ratio"] == 0.0
    assert prov["sample"]["frames"] == 1800
    book = units.load(km)
    # each true center has a learned centroid next to it; inertia ~ noise variance per frame
    d = units.sq_distances(centers, book.centroids).min(1)
    assert (d < 1.0).all()
    assert 3.0 < prov["inertia_per_frame"] < 9.0


def test_learn_and_assign_cli_exit_codes(tmp_path, capsys):
    from jobs import kmeans as cli

    ds = str(tmp_path / "ds")
    write_dataset(ds, [300] * 20)
    km = str(tmp_path / "km.safetensors")
    args = ["learn", "--features", ds, "--k", "4", "--sample-hours", "0.01", "--output", km]
    assert cli.main([*args, "--layer", "3", "--n-init", "2", "--seed", "5"]) == 0
    prov = units.read_provenance(km)
    assert prov["seed"] == 5 and prov["algorithm"]["params"]["n_init"] == 2
    assert prov["model_revision"] == "revX" and prov["sample"]["frames"] == 1800
    capsys.readouterr()
    assert cli.main([*args, "--layer", "4"]) == 2
    assert "layer 4 is not stored" in capsys.readouterr().err
    # Centroids of another model revision: refused before any Ray work.
    book = units.load(km)
    other = units.save(
        str(tmp_path / "other.safetensors"),
        book.centroids,
        {**book.provenance, "model_revision": "rev1"},
    )
    out = str(tmp_path / "units")
    assert cli.main(["assign", "--features", ds, "--km", other, "--output", out]) == 2
    err = capsys.readouterr().err
    assert "model revision 'rev1' != the model's 'revX'" in err and not os.path.exists(out)


def test_run_length_rows_equals_run_length_per_row():
    rng = np.random.default_rng(4)
    for _ in range(100):
        lengths = rng.integers(0, 7, rng.integers(0, 6))
        values = rng.integers(0, 3, int(lengths.sum())).astype(np.uint16)
        dedup, durations, counts = units.run_length_rows(values, lengths)
        assert counts.sum() == len(dedup) == len(durations) and durations.sum() == len(values)
        at = pos = 0
        for i, n in enumerate(lengths):
            want_u, want_d = units.run_length(values[at : at + n])
            assert counts[i] == len(want_u)
            assert np.array_equal(dedup[pos : pos + counts[i]], want_u)
            assert np.array_equal(durations[pos : pos + counts[i]], want_d)
            at, pos = at + n, pos + counts[i]

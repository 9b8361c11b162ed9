"""Units end to end on local Ray: learn on a job's features, units in the extraction pass,
assign an existing dataset (with resume), fairseq export, unit flips in precision checks,
and bad centroid files refused before any Ray work."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from hubert_ray import read_features, read_units
from hubert_ray.core.config import ExtractConfig
from hubert_ray.dataset import output
from hubert_ray.units import centroids as units
from hubert_ray.units import kmeans

pytestmark = pytest.mark.ray

K = 16


def _cfg(corpus, model, out, **kw):
    base = dict(
        manifest=corpus,
        model=model,
        output=out,
        layers="1,2",
        chunk_seconds=4.0,
        batch_size=8,
        rows_per_file=10,
        num_cpu_actors=1,
        decode_batch_size=6,
        dtype="float32",
        storage_dtype="float32",
    )
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture(scope="module")
def learned(ray_session, corpus, tiny_model, tmp_path_factory):
    """A float32 feature dataset and centroids learned on layers 2 (scikit-learn) and 1 (the
    torch backend, through the CLI) of it."""
    from hubert_ray.backend import extract
    from jobs import kmeans as cli

    root = tmp_path_factory.mktemp("units")
    feats = str(root / "features-run")
    extract.run(_cfg(corpus, tiny_model, feats))
    km2, km1 = str(root / "km2.safetensors"), str(root / "km1.safetensors")
    kmeans.learn(feats, 2, K, 0.02, km2, seed=0, n_init=4, backend="sklearn")
    args = ["learn", "--features", feats, "--layer", "1", "--k", str(K), "--sample-hours"]
    assert cli.main([*args, "0.02", "--output", km1, "--seed", "1", "--backend", "torch"]) == 0
    return root, feats, km2, km1


def test_learned_provenance_names_the_dataset(learned, tiny_model):
    from hubert_ray.model.encoder import model_revision

    _, feats, km2, km1 = learned
    prov = units.read_provenance(km2)
    assert prov["model_revision"] == model_revision(tiny_model)
    assert (prov["layer"], prov["k"], prov["hidden_size"]) == (2, K, 32)
    assert prov["features_dtype"] == "float32" and prov["compute_dtype"] == "float32"
    s = prov["sample"]
    assert s["features"] == feats and 0 < s["frames"] <= s["dataset_frames"]
    assert prov["inertia"] > 0 and prov["algorithm"]["params"]["batch_size"] == 10_000
    assert prov["algorithm"]["backend"] == "sklearn"
    torch_prov = units.read_provenance(km1)
    assert torch_prov["algorithm"]["backend"] == "torch" and torch_prov["layer"] == 1
    assert torch_prov["algorithm"]["device"] == "cpu" and torch_prov["seed"] == 1
    assert torch_prov["model_revision"] == prov["model_revision"] and torch_prov["inertia"] > 0


def test_extract_units_equal_argmin_of_stored_features(learned, corpus, tiny_model):
    from hubert_ray.backend import extract

    root, _, km2, km1 = learned
    out = str(root / "with-units")
    summary = extract.run(_cfg(corpus, tiny_model, out, units=(km2, km1)))
    assert summary["store"] == "both" and summary["unit_layers"] == [1, 2]
    table = output.read_table(os.path.join(out, "features"))
    assert table.schema.field("units_2").type == kmeans.UNIT_TYPE
    frames = total_differ = 0
    for layer, km in ((2, km2), (1, km1)):
        c = units.load(km).centroids
        stored = read_features(out, layer=layer)
        ids = table.column("segment_id").to_pylist()
        unit_rows = table.column(f"units_{layer}").to_pylist()
        nf = table.column("num_frames").to_pylist()
        for sid, u, n in zip(ids, unit_rows, nf, strict=True):
            x = stored[sid]
            assert len(u) == n == len(x)
            ref = units.sq_distances(x, c).argmin(1)
            differ = np.asarray(u) != ref
            assert not (differ & ~units.near_ties(x, c)).any(), sid
            frames += n
            total_differ += int(differ.sum())
    assert frames > 1000 and total_differ / frames <= 1e-4
    job = json.load(open(os.path.join(out, "_job.json")))
    assert job["store"] == "both" and [u["layer"] for u in job["units"]] == [1, 2]


def test_units_only_with_reduced_precision_and_flip_rate(learned, corpus, tiny_model):
    """--store units writes no feature columns; bfloat16 with every segment rechecked records
    each segment's unit flip rate against FP32, summed in the summary and report."""
    from hubert_ray.backend import extract

    root, feats, km2, _ = learned
    out = str(root / "units-only")
    cfg = _cfg(
        corpus,
        tiny_model,
        out,
        units=km2,
        store="units",
        units_form="both",
        dtype="bfloat16",
        storage_dtype="float16",
        precision_sample_rate=1.0,
        on_precision_breach="warn",
    )
    summary = extract.run(cfg)
    names = pq.read_schema(kmeans.part_files(os.path.join(out, "features"))[1][0]).names
    assert "units_2" in names and not any(n.startswith("layer_") for n in names)
    runs = output.read_table(os.path.join(out, "features"))
    for u, dedup, dur, n in zip(
        *(runs.column(c).to_pylist() for c in ("units_2", "units_2_dedup", "units_2_durations")),
        runs.column("num_frames").to_pylist(),
        strict=True,
    ):
        assert np.repeat(dedup, dur).tolist() == u and sum(dur) == n
        assert all(a != b for a, b in zip(dedup, dedup[1:], strict=False))
    checks = output.read_table(os.path.join(out, "precision")).to_pylist()
    by_layer = {r["layer"]: r for r in checks}
    assert by_layer[1]["unit_flip_rate"] is None  # no centroids for layer 1
    rows = [r for r in checks if r["layer"] == 2]
    assert rows and all(0.0 <= r["unit_flip_rate"] <= 1.0 for r in rows)
    layer2 = summary["precision"]["layers"]["2"]
    flips = sum(r["unit_flip_rate"] * r["num_frames"] for r in rows)
    assert layer2["unit_flips"] == round(flips)
    assert layer2["unit_frames"] == sum(r["num_frames"] for r in rows)
    assert "unit_flip_rate" not in summary["precision"]["layers"]["1"]
    # The FP32 reference's units are those of the float32 run's features (same model, same
    # audio): the recorded flip rate is the share of stored units that differ from them.
    c = units.load(km2).centroids
    ref = read_features(feats, layer=2)
    with pytest.raises(KeyError, match="store units"):
        read_features(out)
    table = read_units(out)
    assert table.column_names == ["segment_id", "start_s", "end_s", "num_frames", "units_2"]
    got = dict(
        zip(
            table.column("segment_id").to_pylist(), table.column("units_2").to_pylist(), strict=True
        )
    )
    recorded = {r["segment_id"]: r["unit_flip_rate"] for r in rows}
    for sid, rate in recorded.items():
        fp32_units = units.assign_numpy(ref[sid], c)
        measured = float((np.asarray(got[sid]) != fp32_units).mean())
        assert measured == pytest.approx(rate, abs=0.02), sid
    html = open(os.path.join(out, "report.html")).read()
    assert "unit flip rate" in html
    job = json.load(open(os.path.join(out, "_job.json")))
    assert job["store"] == "units"
    # The same output with features stored is another run: refused.
    from hubert_ray.core.errors import ConfigError

    with pytest.raises(ConfigError, match="store"):
        extract.run(ExtractConfig(**{**cfg.to_dict(), "store": "both"}))


def test_assign_job_resumes_and_matches_extract(learned, corpus, tmp_path):
    from hubert_ray.backend import assign

    root, feats, km2, _ = learned
    out = str(tmp_path / "assigned")
    first = assign.run_assign(feats, km2, out)
    parts = kmeans.part_files(os.path.join(out, "units"))[1]
    assert first["parts"] == len(parts) >= 2 and first["parts_resumed"] == 0
    c = units.load(km2).centroids
    stored = read_features(feats, layer=2)
    table = kmeans.read_units(out)
    for sid, u in zip(
        table.column("segment_id").to_pylist(), table.column("units_2").to_pylist(), strict=True
    ):
        assert np.array_equal(np.asarray(u), units.assign_numpy(stored[sid], c))
    assert sorted(table.column("segment_id").to_pylist()) == sorted(stored)
    # Resume: a lost part is redone, the others are kept as they are.
    keep = {p: os.path.getmtime(p) for p in parts[1:]}
    os.remove(parts[0])
    again = assign.run_assign(feats, km2, out)
    assert again["parts_resumed"] == len(parts) - 1 and again["segments"] == first["segments"]
    assert all(os.path.getmtime(p) == t for p, t in keep.items())
    assert os.path.exists(parts[0])

    # Export in the manifest's order, keyed by segment id.
    from hubert_ray.corpus import manifest
    from jobs import kmeans as cli

    prefix = str(tmp_path / "export" / "train")
    assert cli.main(["export", "--units", out, "--manifest", corpus, "--output", prefix]) == 1
    assert (
        cli.main(
            ["export", "--units", out, "--manifest", corpus, "--output", prefix, "--skip-missing"]
        )
        == 0
    )
    segs = manifest.read_segments(corpus)
    order = [s for s in segs.column("segment_id").to_pylist() if s in stored]
    ids = [line.split("\t")[0] for line in open(prefix + ".ids").read().splitlines()]
    assert ids == order
    km_lines = open(prefix + ".km").read().splitlines()
    tsv = open(prefix + ".tsv").read().splitlines()
    assert len(km_lines) == len(tsv) - 1 == len(order)
    by_id = dict(
        zip(
            table.column("segment_id").to_pylist(), table.column("units_2").to_pylist(), strict=True
        )
    )
    root_dir = tsv[0]
    for sid, line, row in zip(order, km_lines, tsv[1:], strict=True):
        assert [int(v) for v in line.split()] == by_id[sid]
        path, samples = row.split("\t")
        assert os.path.exists(os.path.join(root_dir, path))
        assert abs(int(samples) / 320 - len(by_id[sid])) < 2  # 50 Hz labels


def test_bad_centroid_files_exit_2_before_ray(learned, corpus, tiny_model, tmp_path, capsys):
    from jobs import extract

    root, _, km2, _ = learned
    book = units.load(km2)
    other_rev = units.save(
        str(tmp_path / "rev.safetensors"),
        book.centroids,
        {**book.provenance, "model_revision": "0123456789abcdef"},
    )
    other_dim = units.save(
        str(tmp_path / "dim.safetensors"), book.centroids[:, :16], book.provenance
    )
    base = ["--manifest", corpus, "--model", tiny_model, "--layers", "1,2"]
    cases = [
        (other_rev, "1,2", "model revision '0123456789abcdef'"),
        (other_dim, "1,2", "hidden size 16 != the model's 32"),
        (km2, "1", "layer 2 is not among --layers [1]"),
    ]
    for km, layers, message in cases:
        out = str(tmp_path / "never")
        args = [*base[:-1], layers, "--output", out, "--units", km]
        assert extract.main(args) == 2
        err = capsys.readouterr().err
        assert "--units" in err and message in err and km in err
        assert not os.path.exists(out)  # refused before anything was written
    assert extract.main([*base, "--output", str(tmp_path / "x"), "--store", "units"]) == 2
    assert "--store" in capsys.readouterr().err

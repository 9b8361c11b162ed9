"""The torch k-means backend on the CPU: determinism, quality against scikit-learn, empty
clusters, and the learn CLI's --backend / --device."""

from __future__ import annotations

import numpy as np
import pytest

from hubert_ray.core.errors import ConfigError
from hubert_ray.units import centroids as units
from hubert_ray.units import kmeans, kmeans_torch
from tests.unit.test_units import write_dataset


def _mixture(k=8, per=200, dim=16, seed=0, spread=6.0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim)).astype(np.float32) * spread
    lab = np.repeat(np.arange(k), per)
    x = centers[lab] + rng.standard_normal((lab.size, dim)).astype(np.float32)
    return x[rng.permutation(lab.size)], centers


def test_torch_kmeans_is_deterministic_for_a_seed():
    x, _ = _mixture(k=12, per=150, spread=1.0)  # overlapping: inits do matter
    a, algo_a = kmeans_torch.learn_torch(x, 12, seed=3, n_init=3, rows=500)
    b, algo_b = kmeans_torch.learn_torch(x, 12, seed=3, n_init=3, rows=500)
    assert np.array_equal(a, b) and algo_a["runs"] == algo_b["runs"]
    c, algo_c = kmeans_torch.learn_torch(x, 12, seed=4, n_init=3, rows=500)
    assert [r["inertia"] for r in algo_c["runs"]] != [r["inertia"] for r in algo_a["runs"]]
    # The run kept is the one of least inertia, and its inertia is the sample's.
    best = min(r["inertia"] for r in algo_a["runs"])
    assert algo_a["runs"][algo_a["best_run"]]["inertia"] == best
    assert kmeans.inertia(x, a) == pytest.approx(best, rel=1e-5)
    assert algo_a["backend"] == "torch" and algo_a["device"] == "cpu"


def test_torch_kmeans_recovers_separated_clusters_as_well_as_sklearn():
    x, centers = _mixture()
    c, algo = kmeans_torch.learn_torch(x, 8, seed=0, rows=700)  # several blocks per pass
    assert all(r["converged"] for r in algo["runs"]) and len(algo["runs"]) == 20
    # Every true centre has a learned centroid next to it (noise: 1 per dimension, 200
    # frames per cluster: the mean is within ~0.3 of the centre).
    assert (units.sq_distances(centers, c).min(1) < 0.5).all()
    sk, _ = kmeans.learn_sklearn(x, 8, seed=0)
    ours, theirs = kmeans.inertia(x, c), kmeans.inertia(x, sk)
    assert ours <= 1.01 * theirs
    assert ours / len(x) < 1.1 * x.shape[1]  # ~ the noise variance: the clusters were found


def test_cluster_sums_by_one_hot_matmul_equal_index_add():
    """CUDA's path (one-hot matmul: deterministic there) run on the CPU gives the sums of the
    CPU's path (index_add_)."""
    import torch

    x, _ = _mixture(k=6, per=100)
    xt = torch.from_numpy(x)
    x_sq = (xt * xt).sum(1)
    c = xt[:6].clone()
    out = {}
    for onehot in (False, True):
        labels = torch.full((len(x),), -1, dtype=torch.int32)
        mind = torch.empty(len(x))
        sums, counts = torch.zeros(6, x.shape[1]), torch.zeros(6, dtype=torch.int64)
        moved = kmeans_torch._assign_pass(
            xt, x_sq, c, labels, mind, 128, sums, counts, onehot=onehot
        )
        out[onehot] = (sums, counts, labels, int(moved))
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-5, atol=1e-3)
    assert torch.equal(out[True][1], out[False][1]) and int(out[True][1].sum()) == len(x)
    assert torch.equal(out[True][2], out[False][2]) and out[True][3] == len(x)


def test_empty_clusters_are_refilled_not_nan():
    """Three distinct frames and K = 5: k-means++ must pick duplicates, Lloyd leaves clusters
    empty; their centroids stay finite and the inertia is zero."""
    x = np.repeat(np.eye(3, 4, dtype=np.float32) * 10, 50, axis=0)
    c, algo = kmeans_torch.learn_torch(x, 5, seed=0, n_init=2)
    assert np.isfinite(c).all() and c.shape == (5, 4)
    assert kmeans.inertia(x, c) == pytest.approx(0.0, abs=1e-3)


def test_choose_backend_defaults_and_refusals():
    import torch

    cuda = torch.cuda.is_available()
    assert kmeans.choose_backend() == (("torch", "cuda") if cuda else (kmeans.CPU_BACKEND, "cpu"))
    assert kmeans.choose_backend("torch", "cpu") == ("torch", "cpu")
    assert kmeans.choose_backend("auto", "cpu") == (kmeans.CPU_BACKEND, "cpu")
    with pytest.raises(ConfigError, match="not one of auto, torch, sklearn") as e:
        kmeans.choose_backend("faiss")
    assert e.value.field == "backend"
    with pytest.raises(ConfigError, match="not one of auto, cpu, cuda"):
        kmeans.choose_backend("auto", "tpu")
    with pytest.raises(ConfigError, match="batch_size is not a parameter of the torch") as e:
        kmeans.choose_backend("torch", "cpu", {"batch_size": 10})
    assert e.value.field == "batch_size"
    with pytest.raises(ConfigError, match="init_size is not a parameter of the sklearn"):
        kmeans.choose_backend("sklearn", "cpu", {"init_size": 100})
    if not cuda:
        with pytest.raises(ConfigError, match="CUDA is not available") as e:
            kmeans.choose_backend("torch", "cuda")
        assert e.value.field == "device"


def test_learn_cli_torch_backend_and_bad_values(tmp_path, capsys):
    from jobs import kmeans as cli

    ds = str(tmp_path / "ds")
    write_dataset(ds, [300] * 20)
    km = str(tmp_path / "km.safetensors")
    args = ["learn", "--features", ds, "--layer", "3", "--k", "4", "--sample-hours", "0.01"]
    assert cli.main([*args, "--output", km, "--backend", "torch", "--n-init", "2"]) == 0
    prov = units.read_provenance(km)
    algo = prov["algorithm"]
    assert algo["backend"] == "torch" and algo["device"] == "cpu"
    assert algo["params"]["n_init"] == 2 and len(algo["runs"]) == 2
    assert prov["model_revision"] == "revX" and prov["sample"]["frames"] == 1800
    assert prov["inertia"] == pytest.approx(algo["runs"][algo["best_run"]]["inertia"], rel=1e-5)
    capsys.readouterr()
    never = str(tmp_path / "never.safetensors")
    with pytest.raises(SystemExit) as e:
        cli.main([*args, "--output", never, "--backend", "faiss"])
    assert e.value.code == 2
    assert "--backend: invalid choice: 'faiss'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main([*args, "--output", never, "--device", "tpu"])
    assert e.value.code == 2 and "--device: invalid choice" in capsys.readouterr().err
    bad = [
        (["--backend", "torch", "--batch-size", "100"], "--batch-size: batch_size is not"),
        (["--backend", "torch", "--max-no-improvement", "5"], "--max-no-improvement: max_no"),
    ]
    import torch

    if not torch.cuda.is_available():
        bad.append((["--device", "cuda"], "--device: CUDA is not available"))
    else:
        bad.append((["--device", "cuda", "--backend", "sklearn"], "--backend: scikit-learn"))
    for extra, message in bad:
        assert cli.main([*args, "--output", never, *extra]) == 2
        assert message in capsys.readouterr().err
    import os

    assert not os.path.exists(never)

"""The units job: units of an existing feature dataset (``hubert-ray kmeans assign``)."""

from __future__ import annotations

import logging
import os
import time

import pyarrow as pa
import pyarrow.compute as pc

from hubert_ray.backend.context import MAX_PROCESS_DEATHS, init_ray, quiet_ray
from hubert_ray.core.errors import ConfigError
from hubert_ray.dataset import identity as ident
from hubert_ray.dataset import output
from hubert_ray.io import storage
from hubert_ray.units import centroids as units

log = logging.getLogger("hubert_ray")


UNITS_JOB = {"kind": "units", "format_version": 1}


def _assign_parts(batch: pa.Table, km: str, out_dir: str, storage_options, device) -> pa.Table:
    """Task UDF: units of each feature part named in ``batch`` (one output part each)."""
    from hubert_ray.units import kmeans

    book = units.load(km, storage_options)
    done = [
        kmeans.assign_part(src, out_dir, book, storage_options, device)
        for src in batch.column("path").to_pylist()
    ]
    return pa.Table.from_pylist(done)


def run_assign(
    features: str,
    km: str,
    out: str,
    storage_options: dict | None = None,
    num_gpus: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write ``<out>/units/part-*.parquet`` (``segment_id``, times, ``num_frames``,
    ``units_<layer>``) for every feature part of ``features``: one Ray task per part, each
    output part named after its input part, so a rerun skips the parts already written
    (resume). Refuses (ConfigError) centroids of another model revision or hidden size, a layer
    not stored, or an ``out`` holding units of other centroids."""
    from hubert_ray.units import kmeans

    identity = _units_identity(features, km, storage_options)
    _prepare_output(out, identity, overwrite, storage_options)
    src_dir = kmeans.features_dir(features)
    _, src = kmeans.part_files(src_dir, storage_options)
    out_dir = storage.join(out, kmeans.UNITS_DIR)
    _, written = kmeans.part_files(out_dir, storage_options)
    have = {os.path.basename(p) for p in written}
    todo = [storage.join(src_dir, os.path.basename(p)) for p in src]
    todo = [p for p in todo if os.path.basename(p) not in have]
    log.info("units: %d feature parts, %d already assigned", len(src), len(src) - len(todo))
    storage.write_json(storage.join(out, output.JOB_FILE), identity, storage_options)
    ident.remove_entries(out, (output.SUMMARY_FILE,), storage_options)
    t0 = time.time()
    if todo:
        _assign(todo, km, out_dir, storage_options, num_gpus)
    table = output.read_table(out_dir, ["segment_id", "num_frames"], storage_options)
    summary = {
        **identity,
        "parts": len(src),
        "parts_resumed": len(src) - len(todo),
        "segments": table.num_rows if table is not None else 0,
        "frames": int(pc.sum(table.column("num_frames")).as_py() or 0) if table else 0,
        "wall_seconds": round(time.time() - t0, 3),
    }
    storage.write_json(storage.join(out, output.SUMMARY_FILE), summary, storage_options)
    return summary


def _units_identity(features: str, km: str, storage_options: dict | None) -> dict:
    """What a rerun into the same output must match: the features and the centroids, checked
    against each other (model revision, hidden size, a stored layer)."""
    from hubert_ray.units import kmeans

    prov = units.read_provenance(km, storage_options)
    try:
        info = kmeans.dataset_info(features, int(prov["layer"]), storage_options)
    except ValueError as exc:
        raise ConfigError(str(exc), field="km") from None
    units.check_codebook(
        prov, km, model_revision=info["model_revision"], hidden_size=info["hidden_size"]
    )
    return {
        **UNITS_JOB,
        "features": features,
        "layer": int(prov["layer"]),
        "k": int(prov["k"]),
        "centroids_sha": prov["centroids_sha"],
        "model_revision": info["model_revision"],
    }


def _prepare_output(out: str, identity: dict, overwrite: bool, storage_options) -> None:
    """With ``overwrite`` remove earlier units; otherwise refuse units of other centroids."""
    from hubert_ray.units import kmeans

    if overwrite:
        names = (kmeans.UNITS_DIR, output.JOB_FILE, output.SUMMARY_FILE)
        ident.remove_entries(out, names, storage_options)
        return
    previous = storage.read_json(storage.join(out, output.JOB_FILE), storage_options)
    diffs = [k for k in identity if previous is not None and previous.get(k) != identity[k]]
    if diffs:
        what = "; ".join(f"{k}: was {previous.get(k)!r}, now {identity[k]!r}" for k in diffs)
        raise ConfigError(
            f"output={out!r} holds units of another run ({what}); use another --output or "
            "--overwrite",
            field="output",
        )


def _assign(todo: list[str], km: str, out_dir: str, storage_options, num_gpus: int) -> None:
    """One Ray task per feature part still to assign (on a GPU when asked and present)."""
    import ray

    init_ray()
    quiet_ray()
    gpu = bool(num_gpus) and int(ray.cluster_resources().get("GPU", 0)) > 0
    resources = {"num_gpus": 1} if gpu else {"num_cpus": 1}
    ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        _assign_parts,
        fn_kwargs={
            "km": km,
            "out_dir": out_dir,
            "storage_options": storage_options,
            "device": "cuda" if gpu else "cpu",
        },
        batch_size=1,
        batch_format="pyarrow",
        max_retries=MAX_PROCESS_DEATHS,
        **resources,
    )
    ds.materialize()

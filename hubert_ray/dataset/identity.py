"""What an output holds and whether a run may add to it: the run's identity (``_job.json``),
preparing the output (overwrite or resume), completion markers."""

from __future__ import annotations

import json
import logging

from hubert_ray.core.config import ExtractConfig
from hubert_ray.core.errors import ConfigError
from hubert_ray.dataset import output
from hubert_ray.io import storage

log = logging.getLogger("hubert_ray")


def redacted(cfg: ExtractConfig) -> dict:
    """The run config as recorded in outputs: storage option values are never written."""
    d = cfg.to_dict()
    d["storage_options"] = sorted(d["storage_options"])
    d["units"] = list(d["units"])  # as JSON reads it back
    return d


# -- resume --------------------------------------------------------------------------------
# Resume is a home-made skip, not ``ray.data.checkpoint``: before building the dataset the
# job counts, per recording, the rows already present in ``features/`` and ``errors/`` (a
# small table, resume.DoneIndex, built by Ray tasks and left in the object store:
# hubert_ray.backend.checks.done_index); the tasks that expand the manifest's recordings
# into segments skip a recording whose rows are all there and drop, by id, the written segments
# of one partly there (read from its own part files). It is exact because (1) a part file
# appears whole or not at all (temporary name + rename locally, one upload on object storage),
# (2) each segment is exactly one row in exactly one part (the model stage is one row in, one
# row out), and (3) the skip is by id, so a part written just before a kill is simply not
# redone. Ray's checkpointing (beta) needs a Read datasource and a Write datasink, while this
# job writes through its own ``FeatureSink``; it also adds a filter actor reserving 1 CPU +
# 1 GiB that stalls small clusters (docs/design.md). ``tests/integration/test_resume.py``
# proves exactness with SIGKILLed runs. A finished run leaves ``_summary.json`` then
# ``_SUCCESS`` (completion markers); ``_job.json`` (the run's identity) is written before any
# work so a rerun with a different model, layers or dtype into the same output is refused
# instead of mixing features.
# Transient error rows (read errors) are taken out of ``errors/`` by a rerun
# (output.retry_transient_errors), so their segments count as not done and are decoded again.

_IDENTITY_OPTIONS = {
    "model": "model",
    "model_revision": "model",
    "layers": "layers",
    "dtype": "dtype",
    "compute_dtype": "dtype",
    "storage_dtype": "storage_dtype",
    "chunk_seconds": "chunk_seconds",
    "store": "store",
    "units": "units",
    "units_form": "units_form",
    "normalize": "normalize",
}


def job_identity(
    cfg: ExtractConfig, layers, model_revision: str, codebooks: list[dict] | None = None
) -> dict:
    """What must match for a rerun to add to an existing output (``<output>/_job.json``):
    ``codebooks`` are :func:`hubert_ray.units.centroids.check_files`' description of ``--units``."""
    return {
        "format_version": 1,
        "model": cfg.model,
        "model_revision": model_revision,
        "layers": list(layers),
        "dtype": cfg.dtype,
        "storage_dtype": cfg.storage_dtype,
        "chunk_seconds": float(cfg.chunk_seconds),
        "store": cfg.stored,
        "units_form": cfg.units_form,
        "units": [{k: b[k] for k in ("layer", "k", "centroids_sha")} for b in (codebooks or [])],
    }


def previous_identity(cfg: ExtractConfig, fs, base: str) -> dict | None:
    job_path = f"{base}/{output.JOB_FILE}"
    if fs.exists(job_path):
        with fs.open(job_path, "r") as f:
            ident = json.load(f)
        # Outputs written before the normalize option were always normalised.
        ident.setdefault("normalize", True)
        return ident
    meta = output.run_metadata(cfg.output, cfg.storage_options)  # a dataset without _job.json
    if not meta:
        return None
    old = meta.get("config", {})
    ident = {k: old[k] for k in ("model", "dtype", "storage_dtype") if k in old}
    if "chunk_seconds" in old:
        ident["chunk_seconds"] = float(old["chunk_seconds"])
    if "layers" in meta:
        ident["layers"] = list(meta["layers"])
    ident["normalize"] = meta.get("preprocessing", {}).get("normalize", True)
    return ident


def check_identity(cfg: ExtractConfig, previous: dict | None, identity: dict) -> None:
    """Refuse (ConfigError naming every difference) to add to a dataset of another run."""
    if not previous:
        return
    diffs = [
        k
        for k in _IDENTITY_OPTIONS
        if k in previous and k in identity and previous[k] != identity[k]
    ]
    if diffs:
        what = "; ".join(f"{k}: existing {previous[k]!r}, this run {identity[k]!r}" for k in diffs)
        raise ConfigError(
            f"output={cfg.output!r} holds features of a different run ({what}); resume needs "
            "the same model, layers, dtype, storage dtype, chunking and input normalisation: use "
            "another --output, "
            "or --overwrite to start over",
            field=_IDENTITY_OPTIONS[diffs[0]],
        )


def prepare_output(
    cfg: ExtractConfig, overwrite: bool, identity: dict | None = None
) -> dict | None:
    """Make ``cfg.output`` ready: with ``overwrite`` remove any dataset there; otherwise check
    an existing one is compatible (:func:`check_identity`) and return its identity. What it
    already holds is found per recording later (``resume.build_done_index``)."""
    if overwrite:
        remove_entries(
            cfg.output,
            (
                output.FEATURES_DIR,
                output.ERRORS_DIR,
                output.RETRIED_DIR,
                output.PRECISION_DIR,
                output.SUMMARY_FILE,
                output.SUCCESS_FILE,
                output.JOB_FILE,
                output.ACTORS_DIR,
                output.RUNS_FILE,
                MANIFEST_COPY,
                "report.html",
            ),
            cfg.storage_options,
        )
        return None
    fs, path = storage.filesystem(cfg.output, cfg.storage_options)
    previous = previous_identity(cfg, fs, path.rstrip("/"))
    if identity is not None:
        check_identity(cfg, previous, identity)
    return previous


def write_job_file(cfg: ExtractConfig, identity: dict) -> None:
    """``<output>/_job.json``: written before any part file."""
    storage.write_json(storage.join(cfg.output, output.JOB_FILE), identity, cfg.storage_options)


def clear_completion(cfg: ExtractConfig) -> None:
    """A run that has work to do first removes the completion markers of an earlier run."""
    remove_entries(cfg.output, (output.SUCCESS_FILE, output.SUMMARY_FILE), cfg.storage_options)


def remove_entries(uri: str, names, storage_options: dict | None = None) -> None:
    """Remove the files and folders ``names`` of the output ``uri`` that exist."""
    fs, path = storage.filesystem(uri, storage_options)
    for name in names:
        if fs.exists(f"{path.rstrip('/')}/{name}"):
            fs.rm(f"{path.rstrip('/')}/{name}", recursive=True)


MANIFEST_COPY = "_manifest.parquet"
"""A manifest that is not a validated canonical Parquet file (JSONL, TSV, one written by hand)
is checked on the driver and written here as one, which the job's tasks then read."""


def finished_summary(cfg: ExtractConfig) -> dict | None:
    """The summary of a complete dataset in ``cfg.output`` (``None`` if unfinished)."""
    return storage.read_json(storage.join(cfg.output, output.SUMMARY_FILE), cfg.storage_options)


def write_summary(cfg: ExtractConfig, summary: dict) -> None:
    """``_summary.json`` (the dataset is complete), then ``_SUCCESS`` (the conventional
    marker). Each is serialised first and written in one call: never half-written."""
    storage.write_json(storage.join(cfg.output, output.SUMMARY_FILE), summary, cfg.storage_options)
    fs, path = storage.filesystem(cfg.output, cfg.storage_options)
    storage.with_retries(fs.pipe_file, f"{path.rstrip('/')}/{output.SUCCESS_FILE}", b"")

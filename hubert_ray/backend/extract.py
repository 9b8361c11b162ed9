"""The extraction job as a short sequence of named steps: preflight (one resolved plan), prepare
the output, find what is done, place the model, write, check, summarise."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass

import pyarrow as pa

from hubert_ray.backend import checks, progress
from hubert_ray.backend.context import (
    configure_retries,
    configure_scheduling,
    init_ray,
    quiet_ray,
    spilled_mib,
)
from hubert_ray.backend.dataset import build_manifest_dataset
from hubert_ray.backend.placement import Placement, plan_placement
from hubert_ray.backend.sink import make_sink, write
from hubert_ray.core.config import ExtractConfig, compute_dtype, parse_layers
from hubert_ray.core.precision import effective_rate
from hubert_ray.corpus import canonical, manifest
from hubert_ray.dataset import identity as ident
from hubert_ray.dataset import output
from hubert_ray.dataset.summary import read_runs, run_summary, write_runs
from hubert_ray.io import storage
from hubert_ray.model import families
from hubert_ray.model.files import fp32_weight_bytes, model_fingerprint, read_model_config
from hubert_ray.units import centroids

log = logging.getLogger("hubert_ray")


@dataclass(frozen=True)
class Plan:
    """What the preflight resolved, once, before any Ray work: every later step reads it."""

    cfg: ExtractConfig  # as given (recorded in the outputs)
    stage_cfg: ExtractConfig  # what the stages get: normalisation resolved (auto -> on / off)
    manifest_uri: str  # the canonical manifest the tasks read
    layers: tuple[int, ...]
    spec: families.ModelSpec
    prep: families.Preprocessing
    codebooks: list[dict]
    identity: dict  # what a rerun into this output must match (``_job.json``)
    metadata: dict  # recorded in every part file


def run(cfg: ExtractConfig, overwrite: bool = False, device=None) -> dict:
    """Run the whole job; returns the summary (also written to ``<output>/_summary.json``).

    ``device``: the model actors' device, a :class:`hubert_ray.model.device.DeviceSpec` (e.g.
    ``SimulatedDevice(x_realtime=R)``: benchmarks and tests; no CLI or config option selects
    one); ``None``: a GPU when placed on one, else the CPU."""
    t_start = time.time()
    driver_retries = storage.retry_count()
    manifest_uri, to_convert = job_manifest(cfg)
    plan = preflight(cfg, manifest_uri)
    with storage.writing_to(cfg.output):
        previous = ident.prepare_output(cfg, overwrite, plan.identity)
        info = write_manifest(cfg, manifest_uri, to_convert)
        retried = _retry_earlier_errors(cfg, overwrite)
    del to_convert
    init_ray()
    quiet_ray()
    tally = progress.start_tally()
    index, done_rows = checks.done_index(cfg)  # a reference: it stays in the object store
    log.info(
        "manifest: %d recordings, %d segments (%d rows already in the output, %d transient "
        "errors retried); layers %s",
        *(info["recordings"], info["segments"], done_rows, retried, list(plan.layers)),
    )
    todo = done_rows < info["segments"] or retried
    if not todo and (finished := ident.finished_summary(cfg)) is not None:
        log.info("nothing to do: %s is complete", cfg.output)
        return finished
    sample_rate = effective_rate(cfg.precision_sample_rate, info["segments"])
    placement = place(plan, info, sample_rate)
    with storage.writing_to(cfg.output):
        runs = _start_run(plan, previous, placement.gpu, overwrite, t_start)
    phases: dict[str, float] = {}  # wall seconds: before the first read, writing, the summary
    run_audio = 0.0
    if todo:
        t_write = time.time()
        run_audio = write_features(plan, info, index, placement, tally, done_rows, device)
        phases["prepare"], phases["write"] = t_write - t_start, time.time() - t_write
    del index
    t_check = time.time()
    parts = checks.summarize_output(cfg) | checks.check_output(cfg, plan.manifest_uri, info)
    wall = time.time() - t_start
    phases["summary"] = time.time() - t_check
    job = dataclasses.asdict(placement) | {"info": info, "done_rows": done_rows, "retried": retried}
    summary = run_summary(
        parts,
        cfg,
        job=job | {k: getattr(plan, k) for k in ("layers", "prep", "spec", "codebooks")},
        runs=runs,
        wall=wall,
        phases=phases,
        run_audio=run_audio,
        sample_rate=sample_rate,
        reference_weights_bytes=lambda: fp32_weight_bytes(cfg.model, cfg.storage_options),
        storage_retries=_tally_retries(tally) + storage.retry_count() - driver_retries,
        spilled_mib=spilled_mib(),
    )
    with storage.writing_to(cfg.output):
        write_runs(cfg.output, summary["runs"], cfg.storage_options)
        ident.write_summary(cfg, summary)
    _write_report(cfg, summary)
    return summary


def preflight(cfg: ExtractConfig, manifest_uri: str) -> Plan:
    """The model and the options checked and resolved on the driver, before any Ray work (a
    problem exits 2 here)."""
    model_json = read_model_config(cfg.model, cfg.storage_options, cfg.allow_pickle_weights)
    layers = parse_layers(cfg.layers, int(model_json.get("num_hidden_layers", 12)))
    spec, prep = families.check_run(
        cfg.model,
        cfg.storage_options,
        model_json,
        cfg.normalize,
        cfg.model_config().chunk_samples,
        cfg.dtype,
    )
    fingerprint = model_fingerprint(cfg.model, cfg.storage_options)
    codebooks = centroids.check_files(  # a remote model's fingerprint is not its content hash
        cfg.units,
        layers=layers,
        hidden_size=model_json.get("hidden_size"),
        model_revision=None if storage.is_remote(cfg.model) else fingerprint,
        storage_options=cfg.storage_options,
    )
    identity = ident.job_identity(cfg, layers, fingerprint, codebooks)
    identity["normalize"] = prep.normalize
    metadata = {
        "config": ident.redacted(cfg),
        "layers": list(layers),
        "format_version": 1,
        "preprocessing": prep.to_dict(),
        "model_family": spec.to_dict(),
    }
    if codebooks:
        metadata["units"] = identity["units"]
    return Plan(
        cfg=cfg,
        stage_cfg=dataclasses.replace(cfg, normalize="on" if prep.normalize else "off"),
        manifest_uri=manifest_uri,
        layers=layers,
        spec=spec,
        prep=prep,
        codebooks=codebooks,
        identity=identity,
        metadata=metadata,
    )


def job_manifest(cfg: ExtractConfig) -> tuple[str, pa.Table | None]:
    """``(uri the tasks read, segment table still to write there)``: a validated canonical
    manifest is used as it is (its footer only is read here); any other is read and checked on
    the driver (exit 2 on a problem, before any Ray work) and returned for
    :func:`write_manifest` to write into the output."""
    if canonical.manifest_info(cfg.manifest, cfg.storage_options) is not None:
        return cfg.manifest, None
    table = manifest.read_segments(cfg.manifest, cfg.storage_options)
    return storage.join(cfg.output, ident.MANIFEST_COPY), table


def write_manifest(cfg: ExtractConfig, manifest_uri: str, to_convert: pa.Table | None) -> dict:
    """Write a manifest checked on the driver (``to_convert``) into the output as a canonical
    one; the manifest's footer info (recordings, segments, row groups)."""
    if to_convert is not None:
        if not storage.is_remote(cfg.output):
            os.makedirs(storage.filesystem(cfg.output)[1], exist_ok=True)
        canonical.write_validated(to_convert, manifest_uri, cfg.storage_options)
    return canonical.manifest_info(manifest_uri, cfg.storage_options)


def _retry_earlier_errors(cfg: ExtractConfig, overwrite: bool) -> int:
    """Resume options: transient error rows taken out (their segments are done again), and
    with ``--recompute-suspect`` the rows written before a precision escalation. Returns the
    transient rows taken out."""
    if overwrite:
        return 0
    retried = (
        output.retry_transient_errors(cfg.output, cfg.storage_options) if cfg.retry_transient else 0
    )
    if cfg.recompute_suspect:
        _drop_suspect(cfg)
    return retried


def place(plan: Plan, info: dict, sample_rate: float) -> Placement:
    """The model actors on this cluster: GPUs, the largest node's CPUs, calls sized on the
    manifest's mean segment duration."""
    import ray

    cfg = plan.cfg
    placement = plan_placement(
        cfg,
        int(ray.cluster_resources().get("GPU", 0)),
        len(plan.layers),
        node_cpus=max(
            (int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0
        ),
        mean_segment_s=checks.mean_segment_seconds(cfg, plan.manifest_uri, info),
        sample_rate=sample_rate,
        report_uri=storage.join(cfg.output, output.ACTORS_DIR),
    )
    log.info(
        "model actors: %d on %s, %d rows per call, at most %s s of audio per call",
        placement.pool,
        "GPU" if placement.gpu else "CPU",
        placement.rows_per_call,
        "unbounded" if placement.call_seconds is None else f"{placement.call_seconds:g}",
    )
    return placement


def _start_run(
    plan: Plan, previous: dict | None, gpu: bool, overwrite: bool, t_start: float
) -> list[dict]:
    """Record this run in the output before any part file: its identity (checked against the
    output's once the compute dtype is known), no completion markers, a new entry in the
    output's runs. Returns the runs, this one last."""
    cfg = plan.cfg
    identity = plan.identity | {"compute_dtype": compute_dtype(cfg.dtype, gpu)}
    ident.check_identity(cfg, previous, identity)
    ident.write_job_file(cfg, identity)
    ident.clear_completion(cfg)
    runs = read_runs(cfg.output, cfg.storage_options) if not overwrite else []
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start))
    runs = [*runs, {"started_at": started_at, "wall_seconds": None, "audio_seconds": 0.0}]
    write_runs(cfg.output, runs, cfg.storage_options)
    return runs


def write_features(plan, info, index, placement, tally, done_rows, device) -> float:
    """Build the dataset and write it through the sink, printing progress; the audio seconds
    this run wrote."""
    configure_retries()
    configure_scheduling()
    ds = build_manifest_dataset(plan.stage_cfg, plan.manifest_uri, info, index, placement, device)
    sink = make_sink(plan.cfg, plan.metadata, tally)
    todo = max(0, info["segments"] - done_rows)
    _settle_cpus()
    with progress.Reporter(tally, todo, plan.cfg.progress_seconds):
        write(ds, sink)
    return sink.audio_seconds


def _settle_cpus(timeout_s: float = 10.0) -> None:
    """Wait (at most ``timeout_s``) until Ray's resource view shows a free CPU. Ray Data warns,
    when the write starts, that a cluster with none "will hang"; the done index's tasks, just
    finished, can still show as holding theirs on a small or busy node for a moment, which made
    that warning appear on healthy runs. A cluster that really has no free CPU still gets it."""
    import ray

    deadline = time.monotonic() + timeout_s
    while not ray.available_resources().get("CPU") and time.monotonic() < deadline:
        time.sleep(0.1)


def _tally_retries(tally) -> int:
    """The storage retries the run's tasks and actors reported (0, with a warning, if the tally
    is lost: a statistic never fails a finished job); the tally is then removed."""
    import ray

    try:
        return int(ray.get(tally.get.remote(), timeout=30)["retries"])
    except Exception as e:  # a statistic never fails a finished job
        log.warning("storage retries of the run's workers unknown (%s)", type(e).__name__)
        return 0
    finally:
        ray.kill(tally)


def _drop_suspect(cfg: ExtractConfig) -> None:
    """``--recompute-suspect``: remove from the output the rows an actor wrote in its reduced
    dtype before its checks switched it to FP32, so that this run recomputes them."""
    reports = output.actor_reports(cfg.output, cfg.storage_options)
    suspect = output.suspect_segment_ids(cfg.output, reports, cfg.storage_options)
    if not len(suspect):
        log.info("recompute-suspect: no suspect segments in %s", cfg.output)
        return
    dropped = output.drop_segments(
        storage.join(cfg.output, output.FEATURES_DIR), suspect, cfg.storage_options
    )
    log.info("recompute-suspect: %d suspect segments removed, recomputing them", dropped)


def _write_report(cfg: ExtractConfig, summary: dict) -> None:
    """``<output>/report.html`` from the finished output; a failure is logged, never fatal
    (the dataset and its summary are already complete)."""
    from hubert_ray.dataset.report import write_report

    try:
        log.info("report: %s", write_report(cfg.output, summary, cfg.storage_options))
    except Exception:
        log.exception("writing %s failed", storage.join(cfg.output, "report.html"))

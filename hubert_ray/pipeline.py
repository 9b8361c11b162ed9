"""The one module that talks to Ray: wires the stages into a Ray Data pipeline and runs it.

read (segment rows, recording-ordered blocks) → DecodeStage (CPU tasks) → HubertStage (actor
pool: one model per GPU, or CPU actors) → FeatureSink (features/ and errors/ Parquet parts) →
summary pass over the written files → ``_summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass

import pyarrow as pa

from hubert_ray import manifest, output, storage
from hubert_ray.config import ExtractConfig, ModelConfig, parse_layers
from hubert_ray.errors import ConfigError

log = logging.getLogger("hubert_ray")


# -- checks that run before any Ray work -------------------------------------------------------
def read_model_config(model_uri: str, storage_options: dict | None = None) -> dict:
    """The model directory's ``config.json``, checking the weights are safetensors."""
    fs, path = storage.filesystem(model_uri, storage_options)
    cfg_path = f"{path.rstrip('/')}/config.json"
    if not fs.exists(cfg_path):
        raise ConfigError(
            f"model={model_uri!r} has no config.json; expected a directory written "
            "by save_pretrained (config.json + model.safetensors)",
            field="model",
        )
    names = [os.path.basename(p) for p in fs.ls(path, detail=False)]
    if not any(n.endswith(".safetensors") for n in names):
        raise ConfigError(
            f"model={model_uri!r} has no *.safetensors weights (found: "
            f"{sorted(names)}); pickle-based weights are not loaded",
            field="model",
        )
    with fs.open(cfg_path, "r") as f:
        return json.load(f)


def fp32_weight_bytes(model_uri: str, storage_options: dict | None = None) -> int:
    """Bytes of the model's parameters in float32, from the safetensors headers only."""
    fs, path = storage.filesystem(model_uri, storage_options)
    numel = 0
    for name in fs.ls(path, detail=False):
        if not name.endswith(".safetensors"):
            continue
        with fs.open(name, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for key, info in header.items():
            if key != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= dim
                numel += n
    return 4 * numel


def redacted(cfg: ExtractConfig) -> dict:
    """The run config as recorded in outputs: storage option values are never written."""
    d = cfg.to_dict()
    d["storage_options"] = sorted(d["storage_options"])
    return d


def segment_blocks(table: pa.Table, target_rows: int) -> list[pa.Table]:
    """Cut the recording-ordered segment table into blocks of about ``target_rows`` rows at
    recording boundaries, so each decode task decodes each of its recordings once."""
    rec = table.column("recording_id").to_pylist()
    blocks, start = [], 0
    for i in range(1, len(rec) + 1):
        if i == len(rec) or (i - start >= target_rows and rec[i] != rec[i - 1]):
            blocks.append(table.slice(start, i - start))
            start = i
    return blocks


def prepare_output(cfg: ExtractConfig, overwrite: bool) -> None:
    fs, path = storage.filesystem(cfg.output, cfg.storage_options)
    existing = [
        p
        for p in (output.FEATURES_DIR, output.ERRORS_DIR, output.PRECISION_DIR, output.SUMMARY_FILE)
        if fs.exists(f"{path.rstrip('/')}/{p}")
    ]
    if existing and not overwrite:
        raise ConfigError(
            f"output={cfg.output!r} already holds a dataset ({', '.join(existing)});"
            " pass --overwrite to replace it",
            field="output",
        )
    for p in existing:
        fs.rm(f"{path.rstrip('/')}/{p}", recursive=True)


# -- Ray wiring ---------------------------------------------------------------------------------
_DECODERS: dict[str, object] = {}


RETRIES_COLUMN = "storage_retries"
"""Per-row count of storage retries, carried from decode through the model stage to the sink
(the retries a task or actor made, on its batch's first row), summed into the summary."""


def _with_retries_column(table: pa.Table, retries: int) -> pa.Table:
    counts = [0] * table.num_rows
    if counts:
        counts[0] = retries
    return table.append_column(RETRIES_COLUMN, pa.array(counts, pa.int64()))


TRACE_ENV = "HUBERT_RAY_TRACE_DIR"


def _trace(stage: str) -> None:
    """Test hook: with ``$HUBERT_RAY_TRACE_DIR`` set, append the Ray node id that runs this
    decode task / model actor to ``<dir>/<stage>-<pid>.txt`` (tests check placement)."""
    trace_dir = os.environ.get(TRACE_ENV)
    if trace_dir:
        import ray

        with open(os.path.join(trace_dir, f"{stage}-{os.getpid()}.txt"), "a") as f:
            f.write(ray.get_runtime_context().get_node_id() + "\n")


def _decode(batch: pa.Table, config) -> pa.Table:
    """Task UDF: one DecodeStage per worker process (keeps its last-recording cache)."""
    from hubert_ray.audio import DecodeStage

    _trace("decode")

    # The whole config, storage options included (its repr leaves them out).
    key = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    if key not in _DECODERS:
        _DECODERS.clear()
        _DECODERS[key] = DecodeStage(config)
    before = storage.retry_count()
    out = _DECODERS[key](batch)
    return _with_retries_column(out, storage.retry_count() - before)


class HubertStage:
    """The model stage as Ray runs it (and names it: ``MapBatches(HubertStage)``):
    :class:`hubert_ray.extractor.HubertStage`, passing the decode stage's ``storage_retries``
    column through and adding this actor's own retries (copying the model from S3)."""

    def __init__(self, config: ModelConfig):
        from hubert_ray import extractor

        _trace("model")
        before = storage.retry_count()
        self.stage = extractor.HubertStage(config)
        self._pending = storage.retry_count() - before

    def __call__(self, batch: pa.Table) -> pa.Table:
        before = storage.retry_count()
        upstream = 0
        if RETRIES_COLUMN in batch.column_names:
            upstream = int(pa.compute.sum(batch.column(RETRIES_COLUMN)).as_py() or 0)
            batch = batch.drop_columns([RETRIES_COLUMN])
        out = self.stage(batch)
        own, self._pending = self._pending + storage.retry_count() - before, 0
        return _with_retries_column(out, upstream + own)


def _make_sink(cfg: ExtractConfig, metadata: dict):
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    class FeatureSink(Datasink):
        """Writes each block's feature rows and error rows as Parquet parts."""

        storage_retries = 0  # summed over every write's return, on the driver

        def write(self, blocks, ctx):
            before = storage.retry_count()
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            if not tables:
                return {"ok": 0, "failed": 0, RETRIES_COLUMN: 0}
            block = pa.concat_tables(tables)
            upstream = int(pa.compute.sum(block.column(RETRIES_COLUMN)).as_py() or 0)
            ok, bad, checks = output.split_block(block.drop_columns([RETRIES_COLUMN]))
            for start in range(0, ok.num_rows, cfg.rows_per_file):
                output.write_part(
                    ok.slice(start, cfg.rows_per_file),
                    storage.join(cfg.output, output.FEATURES_DIR),
                    metadata,
                    cfg.storage_options,
                )
            if checks.num_rows:
                output.write_part(
                    checks,
                    storage.join(cfg.output, output.PRECISION_DIR),
                    metadata,
                    cfg.storage_options,
                )
            if bad.num_rows:
                output.write_part(
                    bad, storage.join(cfg.output, output.ERRORS_DIR), metadata, cfg.storage_options
                )
            retries = upstream + storage.retry_count() - before
            return {"ok": ok.num_rows, "failed": bad.num_rows, RETRIES_COLUMN: retries}

        def on_write_complete(self, write_result):
            returns = [r for r in write_result.write_returns if r]
            self.storage_retries = sum(r.get(RETRIES_COLUMN, 0) for r in returns)

        @property
        def min_rows_per_write(self):
            return cfg.rows_per_file

        def get_name(self) -> str:
            return "HubertFeatures"

    return FeatureSink()


def init_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit``), else start local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False)


@dataclass(frozen=True)
class Placement:
    """Where the model stage runs: ``pool`` actors, each on one GPU or on CPU."""

    pool: int
    gpu: bool
    model_config: ModelConfig


def plan_placement(cfg: ExtractConfig, cluster_gpus: int) -> Placement:
    """One model actor per GPU (all of the cluster's unless ``num_gpus`` says), else CPU."""
    if cfg.num_gpus and cfg.num_gpus > cluster_gpus:
        raise ConfigError(
            f"num_gpus={cfg.num_gpus} but the cluster has {cluster_gpus} GPU(s)", field="num_gpus"
        )
    n_gpu = cluster_gpus if cfg.num_gpus is None else cfg.num_gpus
    if n_gpu:
        return Placement(n_gpu, True, cfg.model_config(device="auto"))
    threads = max(1, int(cfg.cpus_per_actor))
    return Placement(cfg.num_cpu_actors, False, cfg.model_config("cpu", num_threads=threads))


def stage_args(stage: str, cfg: ExtractConfig, placement: Placement) -> dict:
    """The keyword arguments of every ``map_batches`` call, in one place."""
    import ray

    if stage == "decode":
        # 1-CPU tasks, placeable on any node (CPU-only ones included). The memory reservation
        # covers a block's decoded recordings; it also keeps Ray from fusing decode into the
        # model actors (on CPU both ask for 1 CPU and would be fused, moving all decoding into
        # the model actor).
        return dict(
            fn_kwargs={"config": cfg.decode_config()},
            batch_size=None,  # one block = whole recordings, see segment_blocks
            batch_format="pyarrow",
            num_cpus=1,
            memory=cfg.decode_memory_mb * 2**20,
        )
    if stage == "model":
        resources = {"num_gpus": 1} if placement.gpu else {"num_cpus": cfg.cpus_per_actor}
        return dict(
            fn_constructor_kwargs={"config": placement.model_config},
            compute=ray.data.ActorPoolStrategy(size=placement.pool),
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            **resources,
        )
    raise ValueError(f"unknown stage {stage!r}")


def build_dataset(cfg: ExtractConfig, segments: pa.Table, placement: Placement):
    """segment rows → decode tasks → model actors (not yet executed)."""
    import ray

    ds = ray.data.from_arrow(segment_blocks(segments, cfg.decode_batch_size))
    ds = ds.map_batches(_decode, **stage_args("decode", cfg, placement))
    return ds.map_batches(HubertStage, **stage_args("model", cfg, placement))


def run(cfg: ExtractConfig, overwrite: bool = False) -> dict:
    """Run the whole job; returns the summary (also written to ``<output>/_summary.json``)."""
    t_start = time.time()
    driver_retries = storage.retry_count()
    recordings = manifest.read_manifest(cfg.manifest, cfg.storage_options)
    segments = manifest.segment_table(recordings)
    model_json = read_model_config(cfg.model, cfg.storage_options)
    layers = parse_layers(cfg.layers, int(model_json.get("num_hidden_layers", 12)))
    prepare_output(cfg, overwrite)
    log.info(
        "manifest: %d recordings, %d segments; layers %s",
        len(recordings),
        segments.num_rows,
        list(layers),
    )

    import ray

    init_ray()
    placement = plan_placement(cfg, int(ray.cluster_resources().get("GPU", 0)))
    log.info("model actors: %d on %s", placement.pool, "GPU" if placement.gpu else "CPU")

    metadata = {"config": redacted(cfg), "layers": list(layers), "format_version": 1}
    ds = build_dataset(cfg, segments, placement)
    sink = _make_sink(cfg, metadata)
    ds.write_datasink(sink)

    summary = output.summarize(
        cfg.output, segments.column("segment_id").to_pylist(), cfg.storage_options
    )
    wall = time.time() - t_start
    summary.update(
        {
            "wall_seconds": round(wall, 3),
            "x_realtime": round(summary["audio_seconds"] / wall, 2) if wall > 0 else None,
            "recordings_total": len(recordings),
            "layers": list(layers),
            "model_actors": placement.pool,
            "device": "gpu" if placement.gpu else "cpu",
            "config": redacted(cfg),
        }
    )
    compute = cfg.dtype if cfg.dtype != "auto" else ("float16" if placement.gpu else "float32")
    checking = compute != "float32" and cfg.precision_sample_rate > 0
    summary["precision"].update(
        {
            "compute_dtype": compute,
            "reference_dtype": "float32",
            "sample_rate": cfg.precision_sample_rate if checking else 0.0,
            "warn": cfg.precision_warn,
            "limit": cfg.precision_limit,
            "on_breach": cfg.on_precision_breach,
            # The FP32 reference model exists only while sampling is on: its weights' memory
            # on each model actor's device.
            "reference_weights_bytes": (
                fp32_weight_bytes(cfg.model, cfg.storage_options) if checking else 0
            ),
        }
    )
    # Retries by the decode tasks, model actors and writers (via the sink) and by this driver.
    summary["storage_retries"] = sink.storage_retries + storage.retry_count() - driver_retries
    fs, path = storage.filesystem(cfg.output, cfg.storage_options)
    # Serialised first, written in one call: never a half-written summary.
    data = json.dumps(summary, indent=2).encode()
    storage.with_retries(fs.pipe_file, f"{path.rstrip('/')}/{output.SUMMARY_FILE}", data)
    return summary

"""The Parquet sink and the write: blocks → features/, errors/, precision/ parts."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from hubert_ray.backend.context import MAX_PROCESS_DEATHS
from hubert_ray.core.config import ExtractConfig
from hubert_ray.core.errors import OutputError, WorkerDeathError
from hubert_ray.dataset import output
from hubert_ray.io import storage

log = logging.getLogger("hubert_ray")


def make_sink(cfg: ExtractConfig, metadata: dict, tally=None):
    """The Parquet sink; ``tally``: a ``progress.Tally`` actor it reports to."""
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    class FeatureSink(Datasink):
        """Writes each block's feature rows and error rows as Parquet parts."""

        audio_seconds = 0.0  # audio of the feature rows this run wrote (idem)

        def write(self, blocks, ctx):
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            if not tables:
                return {"ok": 0, "failed": 0, "audio_seconds": 0.0}
            ok, bad, checks = output.split_block(pa.concat_tables(tables))

            # Part names are keyed by the segment ids they hold, so a retried write replaces
            # its own parts. Precision parts go first: a kill between parts can then only
            # repeat a check on resume (the summary counts each check once), never lose one.
            def put(table: pa.Table, directory: str) -> None:
                output.write_part(
                    table,
                    storage.join(cfg.output, directory),
                    metadata,
                    cfg.storage_options,
                    key=output.part_key(table.column("segment_id").to_pylist()),
                )

            with storage.writing_to(cfg.output):
                if checks.num_rows:
                    put(checks, output.PRECISION_DIR)
                for start, length in output.part_slices(
                    ok, cfg.rows_per_file, cfg.part_size_mb * 2**20
                ):
                    put(ok.slice(start, length), output.FEATURES_DIR)
                if bad.num_rows:
                    put(bad, output.ERRORS_DIR)
            audio = float(
                pc.sum(pc.subtract(ok.column("end_s"), ok.column("start_s"))).as_py() or 0
            )
            if tally is not None:
                tally.add.remote(ok.num_rows, bad.num_rows, audio)
            return {
                "ok": ok.num_rows,
                "failed": bad.num_rows,
                "audio_seconds": audio,
            }

        def on_write_complete(self, write_result):
            returns = [r for r in write_result.write_returns if r]
            self.audio_seconds = sum(r.get("audio_seconds", 0.0) for r in returns)

        @property
        def min_rows_per_write(self):
            return cfg.rows_per_file

        def get_name(self) -> str:
            return "HubertFeatures"

    return FeatureSink()


def write(ds, sink) -> None:
    """Execute the dataset into ``sink`` (write tasks retried as decode tasks are); a worker
    process that died past :data:`MAX_PROCESS_DEATHS` retries becomes a
    :class:`WorkerDeathError` naming its stage, a part that could not be written an
    :class:`OutputError`."""
    from ray.exceptions import OutOfMemoryError, RayActorError, WorkerCrashedError

    try:
        ds.write_datasink(sink, ray_remote_args={"max_retries": MAX_PROCESS_DEATHS})
    except (RayActorError, WorkerCrashedError, OutOfMemoryError) as exc:
        _raise_worker_death(exc)
    except Exception as exc:
        failure = _output_error(exc)
        if failure is None:
            raise
        raise failure from None


def _output_error(exc: BaseException) -> OutputError | None:
    """The :class:`OutputError` a write task raised, wherever Ray wrapped it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OutputError):
            return OutputError(exc.output, exc.reason)
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def _raise_worker_death(exc) -> None:
    """A process that died past its retries as a :class:`WorkerDeathError` naming its stage;
    a model actor whose constructor raised as the cause."""
    from ray.exceptions import RayActorError

    actor = isinstance(exc, RayActorError)  # died, or unreachable while restarting
    if actor and exc.actor_init_failed:
        # The model actor's constructor raised (its model load or self-test): the cause,
        # not a process death. A precision breach goes up as it is (its own exit code).
        from hubert_ray.core.precision import BREACH_MARKER

        if BREACH_MARKER in str(exc):
            raise exc
        inner = getattr(exc.args[0], "cause", None) if exc.args else None
        text = f"{type(inner).__name__}: {inner}" if inner is not None else str(exc)
        raise WorkerDeathError(
            f"the model actors could not start: {text.strip().splitlines()[0][:500]}"
        ) from exc
    what = "a model-stage call" if actor else "a decode or write task"
    cause = str(exc.args[0] if exc.args else exc).strip().splitlines()
    tries = "its retries" if actor else f"{MAX_PROCESS_DEATHS + 1} tries"
    raise WorkerDeathError(
        f"{what} failed {tries} because its worker process died or became unreachable "
        "each time, on every part of it (host or GPU memory, a lost node); the "
        "parts written so far are kept and a rerun resumes. Ray: "
        f"{type(exc).__name__}: {(cause or [''])[0][:300]}"
    ) from exc

"""The measured paths of ``python -m benchmarks.benchmark``: the seed recipe, stock transformers,
the model stage (actor), a plain loop and the pipeline."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time

import numpy as np

from benchmarks.measure import Bench, PeakMemory, feature_rows, rel_l2
from benchmarks.workloads import decoded_table, make_lengths, make_raw, write_corpus

SR = 16_000
MIXED_MIN_S, MIXED_MAX_S = 0.3, 20.0


# -- the measured paths ---------------------------------------------------------------------------
def run_stock(bench: Bench, model_dir, items, refs, dist, name, recipe, dtype, budget, batch=1):
    """Stock transformers: ``HubertModel`` (``.half()`` for float16, the seed article's recipe)
    on ``batch`` utterances at a time in data order, zero-padded to the longest, no attention
    mask (the model card's advice), each item's valid frames kept. Batch 1 (the seed recipe and
    the plain FP32 reference) pads nothing; a larger batch is exact only where its lengths are
    equal (first-layer GroupNorm spans the padding): the error column shows the cost."""
    import torch
    from transformers import HubertModel

    from hubert_ray.core.chunking import num_frames

    bench.default_threads()

    dev = torch.device(bench.device)
    tdtype = {"float16": torch.float16, "float32": torch.float32}[dtype]
    try:
        model = HubertModel.from_pretrained(model_dir)
        model.eval()
        if dtype == "float16":
            model = model.half()  # the seed article's recipe
        model = model.to(dev)
        ctx = torch.no_grad if recipe == "seed" else torch.inference_mode

        def fn(xs):
            x = torch.zeros(len(xs), max(map(len, xs)), dtype=tdtype)
            for i, item in enumerate(xs):
                x[i, : len(item)] = torch.from_numpy(item)
            with ctx():
                h = model(x.to(dev)).last_hidden_state.float().cpu().numpy()
            return [h[i, : num_frames(len(item))] for i, item in enumerate(xs)]

        batches = [items[i : i + batch] for i in range(0, len(items), batch)]
        units = [(sum(map(len, b)) / SR, b) for b in batches]
        w = [bench.warm_item(x) for x in batches[0]]
        warm = (sum(map(len, w)) / SR, w)
        outs, audio_s, wall, peak, passes = bench.timed(units, fn, warm, budget)
    except Exception as exc:  # e.g. half precision unsupported on this device
        bench.add(
            dist=dist,
            name=name,
            path=recipe,
            dtype=dtype,
            batch_size=batch,
            status="failed",
            note=f"{type(exc).__name__}: {_first_line(exc)}",
        )
        return None
    finally:
        model = None
        bench.release()
    outs = [f for out in outs for f in out]
    n = len(outs)
    err = rel_l2(outs, refs[:n]) if refs is not None else 0.0
    bench.add(
        dist=dist,
        name=name,
        path=recipe,
        dtype=dtype,
        batch_size=batch,
        items=n,
        audio_s=audio_s,
        wall_s=wall,
        peak_mem_mib=peak,
        rel_l2_err=err,
        err_ref="plain_fp32_b1" if refs is not None else "self (reference)",
        note=_passes_note(n, len(items), passes),
    )
    return outs


def chunked_reference(model_dir, device, items, refs, chunk_samples):
    """FP32 batch-1 features of each item run on the same chunks as the actor (items with
    one chunk reuse ``refs``)."""
    import torch
    from transformers import HubertModel

    from hubert_ray.core.chunking import plan_chunks

    out = list(refs) if refs is not None else [None] * len(items)
    model = None
    for i, x in enumerate(items):
        plan = plan_chunks(len(x), chunk_samples)
        if len(plan) == 1 and out[i] is not None:
            continue
        if model is None:
            model = HubertModel.from_pretrained(model_dir).eval().to(device)
        parts = []
        with torch.inference_mode():
            for s, e in plan:
                xt = torch.from_numpy(np.ascontiguousarray(x[s:e]))[None].to(device)
                parts.append(model(xt).last_hidden_state[0].float().cpu().numpy())
        out[i] = np.concatenate(parts)
    return out


def model_config(
    bench: Bench,
    model_dir,
    dtype,
    batch_size,
    storage_dtype,
    cost_s=None,
    pad_s=None,
    compile_mode="none",
):
    from hubert_ray.core.config import ModelConfig

    chunk_s = bench.args.chunk_seconds
    # The micro-batch budget: the job's default (64 chunks of 10 s), or batch_size chunks when
    # that is smaller (so b1/b16 rows are batch-1/batch-16 forwards).
    budget = min(64 * 10 * SR, batch_size * int(round(chunk_s * SR)))
    return ModelConfig(
        model_uri=model_dir,
        layers="last",
        dtype=dtype,
        storage_dtype=storage_dtype,
        chunk_seconds=chunk_s,
        max_batch_samples=budget,
        micro_batch_cost_seconds=cost_s,
        pad_multiple_seconds=pad_s,
        compile=compile_mode,
        device=bench.device,
    )


class NullHubert:
    """Stands in for :class:`~hubert_ray.model.encoder.ExactEncoder`, no arithmetic: zero features
    of the right shape, dtype and device (the actor's own work is all that is left)."""

    def __init__(self, net, hidden: int):
        self._param = next(net.parameters())
        self.hidden = hidden

    def parameters(self):
        return iter([self._param])

    def __call__(self, x, lengths, layers):
        import torch

        from hubert_ray.core.chunking import num_frames

        frames = [num_frames(int(n)) for n in lengths]
        shape = (x.shape[0], max(frames), self.hidden)
        out = {k: torch.zeros(shape, dtype=x.dtype, device=x.device) for k in layers}
        return out, torch.tensor(frames)


def run_actor(
    bench: Bench,
    model_dir,
    items,
    refs,
    dist,
    dtype,
    batch_size,
    budget,
    cost_s=None,
    overlap=True,
    null_model=False,
    pad_s=None,
    compile_mode="none",
):
    """One actor row; ``overlap=False``: the host waits for the device after each micro-batch
    (vs the overlapped default); ``null_model``: the model replaced by :class:`NullHubert`, so
    the row measures the actor's own work around the model (its ceiling for any GPU);
    ``compile_mode``: torch.compile the forward (one untimed pass over the rows first pays the
    compiles; its wall time is in the note)."""
    from hubert_ray.stages.extractor import ModelStage

    name = f"actor_{dtype}_b{batch_size}" + ("" if cost_s is None else f"_cost{cost_s:g}")
    name += "" if pad_s is None else f"_pad{pad_s:g}"
    name += "" if compile_mode == "none" else f"_compile-{compile_mode}"
    row = dict(
        dist=dist,
        name=name + ("" if overlap else "_serial") + ("_nullmodel" if null_model else ""),
        path="actor",
        dtype=dtype,
        batch_size=batch_size,
        micro_batch_cost_s=cost_s,
        pad_multiple_s=pad_s,
        overlap=overlap,
        null_model=null_model,
        compile=compile_mode,
    )
    compile_note = ""
    try:
        stage = ModelStage(
            model_config(
                bench, model_dir, dtype, batch_size, "float32", cost_s, pad_s, compile_mode
            )
        )
        stage.engine.overlap = overlap
        if null_model:  # no model: no FP32 rechecks either
            stage.engine.net = NullHubert(stage.engine.net, stage.engine.hidden)
            stage.engine.audit = False
        layer = stage.layers[-1]
        batches = [
            items[i : i + batch_size] for i in range(0, len(items), batch_size)
        ]  # in data order: lengths mix inside a batch, the stage sorts them
        units = [
            (sum(map(len, b)) / SR, decoded_table(b, f"{dist}-{k}")) for k, b in enumerate(batches)
        ]
        w = [bench.warm_item(x) for x in batches[0]]
        warm = (sum(map(len, w)) / SR, decoded_table(w, "warm"))
        if compile_mode != "none":
            t = time.perf_counter()
            for _, x in units:
                stage(x)
            bench.sync()
            compile_note = f"compiles + first pass {time.perf_counter() - t:.1f} s untimed; "
        tables, audio_s, wall, peak, passes = bench.timed(units, stage, warm, budget)
        stats = {k: v for k, v in stage.stats.items() if k != "forward_s"}
        # the packing's cost it ran with (measured on a GPU: hubert_ray.model.cost.ForwardCost)
        engine = stage.engine
        packing = {"packing_cost_s": round(engine.batch_cost_samples / SR, 3)}
        if engine.forward_cost is not None:
            packing["forward_cost"] = dataclasses.asdict(engine.forward_cost)
    except Exception as exc:
        bench.add(**row, status="failed", note=f"{type(exc).__name__}: {_first_line(exc)}")
        return
    finally:
        stage = None
        bench.release()
        if compile_mode != "none":  # the next compiled row starts from an empty dynamo cache
            import torch._dynamo

            torch._dynamo.reset()
    outs = [f for t in tables for f in feature_rows(t, layer)]
    n = len(outs)
    bench.add(
        **row,
        items=n,
        audio_s=audio_s,
        wall_s=wall,
        peak_mem_mib=peak,
        rel_l2_err=None if null_model else rel_l2(outs, refs[:n]),
        err_ref="n/a: no model" if null_model else "plain_fp32_b1 on the same chunks",
        real_per_padded=_real_per_padded(stats),
        note=compile_note + _passes_note(n, len(items), passes),
        stage_stats=stats,
        **packing,
    )


ERROR_SAMPLE = 256  # loop/pipeline rows: segments whose error vs the FP32 reference is measured


def run_loop(bench: Bench, model_dir, manifest_path, dtype, batch_size):
    """Plain single process: manifest → DecodeStage → ModelStage, batch by batch (no Ray, no
    Parquet), one forward at a time on torch's default threads. Timed end to end, model load
    included (as the pipeline's wall time is). Keeps the decoded audio and features of an
    evenly spread sample of at most ERROR_SAMPLE segments.

    It runs in a process of its own (torch imported before the clock starts): once a CPU
    engine has run its forwards at once on one thread each in a process, a forward there on
    two torch threads used about one core (measured: 312-378x against 536-563x)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    spawn = mp.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=_import_model_code) as pool:
        return pool.submit(_loop, bench, model_dir, manifest_path, dtype, batch_size).result()


def _import_model_code() -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401


def _loop(bench: Bench, model_dir, manifest_path, dtype, batch_size):
    from hubert_ray.corpus import manifest
    from hubert_ray.corpus.audio import DecodeStage, clear_cache
    from hubert_ray.stages.extractor import ModelStage, audio_views

    clear_cache()
    feats, inputs = {}, {}
    with PeakMemory(bench.cuda) as mem:
        t0 = time.perf_counter()
        segments = manifest.read_segments(manifest_path)
        every = math.ceil(segments.num_rows / ERROR_SAMPLE)
        decode = DecodeStage()
        config = model_config(bench, model_dir, dtype, batch_size, "float16")
        stage = ModelStage(dataclasses.replace(config, num_threads=1))
        bench.default_threads()  # one forward at a time, on torch's default threads
        for s in range(0, segments.num_rows, batch_size):
            d = decode(segments.slice(s, batch_size))
            out = stage(d)
            keep = [r for r in range(d.num_rows) if (s + r) % every == 0]
            ids = d.column("segment_id").to_pylist()
            rows, audio = feature_rows(out, stage.layers[-1]), audio_views(d.column("audio"))
            feats.update((ids[r], rows[r].copy()) for r in keep)
            inputs.update((ids[r], np.array(audio[r])) for r in keep)
        bench.sync()
        wall = time.perf_counter() - t0
    pad = _real_per_padded(stage.stats)
    stage = None
    bench.release()
    return feats, inputs, segments.num_rows, wall, mem.peak_mib, pad


def run_pipeline(bench: Bench, model_dir, manifest_path, out_dir, dtype, calls=None):
    """``hubert_ray.backend.extract.run`` on the running local Ray, as the job runs by default (its
    batch size and micro-batch budget are the job's defaults; ``calls``: calls per model actor,
    None = the job's default); returns summary, wall, config."""

    from hubert_ray.backend import extract
    from hubert_ray.core.config import ExtractConfig

    # The job's defaults, as a user gets them; only what the benchmark varies is set.
    extra = {}
    if bench.args.pipeline_cpus_per_actor:
        extra["cpus_per_actor"] = float(bench.args.pipeline_cpus_per_actor)
    cfg = ExtractConfig(
        manifest=manifest_path,
        model=model_dir,
        output=out_dir,
        dtype=dtype,
        chunk_seconds=bench.args.chunk_seconds,
        num_gpus=None if bench.cuda else 0,
        calls_per_actor=calls,
        **extra,
    )
    t0 = time.perf_counter()
    summary = extract.run(cfg, overwrite=True)
    return summary, time.perf_counter() - t0, cfg


def measure_pipeline(bench: Bench, model_dir, work, d_i, dist, secs, mixed, dtype) -> None:
    """The same generated FLAC corpus through the plain loop and through the pipeline."""
    from hubert_ray import read_features

    args = bench.args
    chunk_samples = int(round(args.chunk_seconds * SR))
    total = args.pipeline_seconds or args.seconds
    lengths = make_lengths(secs, mixed, total, args.seed + 50 + d_i)
    raw = make_raw(lengths, seed=args.seed * 100_000 + 50_000 + d_i * 10_000)
    corpus = os.path.join(work, f"corpus-{dist}")
    manifest_path = write_corpus(corpus, raw, dist)
    audio_s = sum(lengths) / SR
    if d_i == 0:  # warm Ray's workers (imports, page cache); not measured
        warm = write_corpus(os.path.join(work, "corpus-warm"), raw[:2], "warm")
        t = time.perf_counter()
        run_pipeline(bench, model_dir, warm, os.path.join(work, "out-warm"), dtype)
        bench.pipeline_warmup_s = time.perf_counter() - t
    feats_l, inputs, n_items, wall_l, mem_l, pad_l = run_loop(
        bench, model_dir, manifest_path, dtype, args.batch_size
    )
    ids = sorted(inputs)
    ref = chunked_reference(model_dir, bench.device, [inputs[i] for i in ids], None, chunk_samples)
    common = dict(dist=dist, dtype=dtype, batch_size=args.batch_size, audio_s=audio_s)
    common["err_ref"] = (
        f"plain_fp32_b1 on the same decoded chunks (stored float16; {len(ids)} segments)"
    )
    bench.add(
        name=f"loop_{dtype}_b{args.batch_size}",
        path="loop",
        items=n_items,
        wall_s=wall_l,
        peak_mem_mib=mem_l,
        rel_l2_err=rel_l2([feats_l[i] for i in ids], ref),
        real_per_padded=pad_l,
        note="FLAC decode + model in 1 process; model load timed; no Parquet writing",
        **common,
    )
    out_dir = os.path.join(work, f"out-{dist}")
    for calls in [None, *bench.pipeline_calls]:
        summary, wall_p, cfg = run_pipeline(bench, model_dir, manifest_path, out_dir, dtype, calls)
        feats_p = read_features(out_dir, segment_ids=ids)
        lost = n_items - summary["segments_ok"]
        actor = (
            "1 GPU actor"
            if bench.cuda
            else f"1 CPU actor reserving {cfg.cpus_per_actor:g} CPUs, "
            f"torch threads {cfg.torch_threads or 'by default'}"
        )
        bench.add(
            name=f"pipeline_{dtype}_b{args.batch_size}"
            + ("" if calls is None else f"_calls{calls}"),
            path="pipeline",
            items=summary["segments_ok"],
            wall_s=wall_p,
            rel_l2_err=None if lost else rel_l2([feats_p[i] for i in ids], ref),
            status="failed" if lost else "ok",
            note=f"local Ray, {actor}, {placement_calls(cfg, bench.cuda)} calls in flight; "
            "model load + Parquet writing timed; peak mem n/a (model in another process)"
            + (f"; {lost} segments not written" if lost else ""),
            **common,
        )
    shutil.rmtree(corpus, ignore_errors=True)


def placement_calls(cfg, cuda: bool) -> int:
    """Calls in flight per model actor for ``cfg`` (the job's rule, on one GPU or on CPU)."""
    from hubert_ray.backend.placement import plan_placement

    return plan_placement(cfg, 1 if cuda else 0).calls_per_actor


def _real_per_padded(stats: dict) -> float | None:
    """Real audio samples per padded sample the model computed (1 = no padding)."""
    return stats["samples"] / stats["padded_samples"] if stats.get("padded_samples") else None


def _passes_note(done: int, total: int, passes: int) -> str:
    if done < total:
        return f"time budget: {done}/{total} items timed"
    return f"{passes} passes" if passes > 1 else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:200]


def start_ray(cuda: bool):
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # always local: this measures one machine
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    n_gpu = None if cuda else 0
    ray.init(num_cpus=os.cpu_count(), num_gpus=n_gpu, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    return ray

"""Throughput / memory / precision benchmark: the seed recipe vs our actor path vs the pipeline.

    python -m jobs.benchmark [--device auto|cpu|cuda] [--arch tiny|base] [--model DIR]
        [--seconds 60] [--utt-seconds 10,mixed] [--batch-size 256] [--skip-pipeline] [--out DIR]

Measured side by side in one run, for each utterance-length distribution:

* ``seed_*``: the seed article's recipe: ``HubertModel.from_pretrained(dir)`` (``.half()`` on
  GPU; on CPU the model as-is in float32 *and* a ``.half()`` attempt), one utterance at a time,
  ``model(x).last_hidden_state`` under ``torch.no_grad()``, no padding, no chunking;
* ``plain_fp32_b1``: a plain FP32 loop (batch 1, ``inference_mode``) — the FP32 reference;
* ``stock_<dtype>_b<N>``: stock transformers batched as a user would (``.half()`` on GPU, N
  utterances in data order zero-padded to the longest, no attention mask): exact on equal
  lengths only, its error column shows what padding does otherwise;
* ``actor_<dtype>_b<B>``: :class:`hubert_ray.extractor.ModelStage` called on pre-decoded
  batches in ``DECODED_SCHEMA`` (model only: exact padded batching, chunking, NaN guard);
* ``loop_<dtype>_b<B>`` / ``pipeline_<dtype>_b<B>``: the same generated corpus written as FLAC,
  once through a plain single-process loop (``DecodeStage`` then ``ModelStage``, no Ray, no
  Parquet writing) and once through ``hubert_ray.pipeline.run`` on local Ray (both timed end to
  end, model load included; Ray is started and warmed up before).

Each row reports x-realtime (audio seconds / wall seconds, after warm-up: a short input, then
one untimed pass over the same inputs when affordable, see ``Bench.timed``), peak memory
(GPU: ``torch.cuda.max_memory_allocated`` during the row, weights included; CPU: peak resident
set size sampled every 5 ms from ``/proc/self/statm`` minus the RSS at the row's start, i.e.
the row's working memory without the weights already loaded; n/a for the pipeline, whose model
runs in another process) and the relative L2 error ``sqrt(sum|a-b|^2 / sum|b|^2)`` of the last
layer's features vs the FP32 batch-1 reference on the same inputs (for chunked paths: the
reference run on the same chunks). Nothing is downloaded: ``--arch base`` is
``HubertConfig()`` (the chinese-hubert-base architecture) with random weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
import traceback

import numpy as np

from hubert_ray.config import COMPILE_MODES

SR = 16_000
MIXED_MIN_S, MIXED_MAX_S = 0.3, 20.0


# -- inputs ---------------------------------------------------------------------------------------
def numbers(text: str | None, kind: type) -> list:
    """A comma-separated option ("1,16,64") as a list of ``kind``; empty or unset: []."""
    return [kind(v) for v in (text or "").split(",") if v.strip()]


def parse_dists(spec: str) -> list[tuple[str, float, bool]]:
    """``"10,mixed"`` → [(name, seconds, is_mixed)]; ``mixed:MEAN`` sets the mean (default 2.5)."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part.startswith("mixed"):
            mean = float(part.split(":", 1)[1]) if ":" in part else 2.5
            out.append((f"mixed{mean:g}s", mean, True))
        else:
            out.append((f"fixed{float(part):g}s", float(part), False))
    if not out:
        raise ValueError(f"--utt-seconds {spec!r}: no distribution given")
    return out


def make_lengths(seconds: float, mixed: bool, total_s: float, seed: int) -> list[int]:
    """Utterance lengths in samples. Fixed: ``round(total/seconds)`` (at least 1) items.
    Mixed (WenetSpeech-like): gamma(shape 2) lengths with the given mean, clipped to
    [0.3 s, 20 s], until ``total_s`` is reached (at least 2 items)."""
    if not mixed:
        return [int(round(seconds * SR))] * max(1, int(round(total_s / seconds)))
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < total_s * SR or len(lengths) < 2:
        d = float(np.clip(rng.gamma(2.0, seconds / 2.0), MIXED_MIN_S, MIXED_MAX_S))
        lengths.append(int(round(d * SR)))
    return lengths


def make_raw(lengths: list[int], seed: int) -> list[np.ndarray]:
    """Speech-like mono 16 kHz signals (before normalisation)."""
    from hubert_ray.synth import synth_signal

    return [synth_signal(n / SR, SR, 1, seed=seed + i)[:, 0] for i, n in enumerate(lengths)]


def make_model(arch: str, path: str) -> str:
    if arch == "tiny":
        from hubert_ray.synth import make_tiny_model

        return make_tiny_model(path)
    import torch
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    model = HubertModel(HubertConfig()).eval()  # chinese-hubert-base architecture, random
    model.save_pretrained(path, safe_serialization=True)
    return path


# -- measurement helpers --------------------------------------------------------------------------
class PeakMemory:
    """GPU: ``max_memory_allocated`` (MiB, weights included). CPU: peak RSS sampled from
    ``/proc/self/statm`` every 5 ms minus the RSS at entry (MiB); falls back to
    ``ru_maxrss`` delta where ``/proc`` is missing (then only growth past the old peak shows)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.peak_mib: float | None = None

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.base = self._rss()
        self._peak = self.base or 0
        self._stop = threading.Event()
        if self.base is None:
            import resource

            self._ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            rss = self._rss()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
            return False
        if self.base is None:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024
            ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_mib = (ru - self._ru) * scale / 2**20
            return False
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss() or 0)
        self.peak_mib = (self._peak - self.base) / 2**20
        return False


def rel_l2(outs: list[np.ndarray], refs: list[np.ndarray]) -> float:
    num = den = 0.0
    for a, b in zip(outs, refs, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"feature shape {a.shape} != reference {b.shape}")
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        num += float(((a64 - b64) ** 2).sum())
        den += float((b64**2).sum())
    return math.sqrt(num / den) if den > 0 else float("nan")


def feature_rows(table, layer: int) -> list[np.ndarray]:
    """Per-row [frames, hidden] arrays of a ModelStage output column ``layer_<layer>``."""
    col = table.column(f"layer_{layer}").combine_chunks()
    hidden = col.type.value_type.list_size
    offsets = col.offsets.to_numpy()
    flat = col.values.values.to_numpy(zero_copy_only=False).reshape(-1, hidden)
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(col))]


def decoded_table(items: list[np.ndarray], prefix: str):
    """A pre-decoded batch in ``DECODED_SCHEMA`` (what the decode stage hands the actor)."""
    import pyarrow as pa

    from hubert_ray.audio import DECODED_SCHEMA

    lengths = np.array([len(x) for x in items], dtype=np.int64)
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    audio = pa.LargeListArray.from_arrays(
        pa.array(offsets), pa.array(np.concatenate(items).astype(np.float32))
    )
    n = len(items)
    ids = [f"{prefix}-{i}" for i in range(n)]
    return pa.Table.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.array(ids, pa.string()),
            pa.array([0.0] * n, pa.float64()),
            pa.array((lengths / SR).tolist(), pa.float64()),
            pa.array(lengths),
            audio,
            pa.nulls(n, pa.string()),
            pa.nulls(n, pa.string()),
            pa.nulls(n, pa.string()),
        ],
        schema=DECODED_SCHEMA,
    )


class Bench:
    def __init__(self, args, device: str):
        self.args = args
        self.device = device
        self.cuda = device == "cuda"
        self.rows: list[dict] = []
        self.pipeline_warmup_s: float | None = None  # wall of the 2-utterance warm-up run
        self.pipeline_calls = numbers(args.pipeline_calls, int)

    def sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def warm_item(self, x: np.ndarray) -> np.ndarray:
        """First warm-up input: the item itself on GPU; on CPU its first 2 s (slow CPU rows,
        e.g. float16 on the base model, would otherwise spend minutes warming up)."""
        return x if self.cuda else x[: 2 * SR]

    def release(self):
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()

    def timed(self, units, fn, warm_unit, budget_s: float | None):
        """Warm up, then run ``fn`` on ``units`` (each ``(audio_s, x)``) timed, in whole passes
        until ``--min-row-seconds`` have passed (short rows are repeated so timer noise
        matters less), stopping early once ``budget_s`` is spent (at least one unit runs).

        Warm-up: ``warm_unit`` (a short input on CPU), then one untimed pass over ``units``
        when it is estimated to take at most half the budget: the first call with a new input
        shape pays one-off kernel setup (oneDNN primitives on CPU, cuDNN/cuBLAS plans on GPU)
        that would otherwise be timed for whichever row sees the shapes first.
        Outputs are the first timed pass's. Returns (outputs, audio_s, wall_s, peak, passes).
        """
        outs, audio_s, passes, stop = [], 0.0, 0, False
        min_s = self.args.min_row_seconds
        # memory: over warm-up and timed passes (the warm-up is where allocators grow)
        with PeakMemory(self.cuda) as mem:
            t = time.perf_counter()
            fn(warm_unit[1])
            self.sync()
            per_audio_s = (time.perf_counter() - t) / max(warm_unit[0], 1e-3)
            pass_audio_s = sum(a for a, _ in units)
            if budget_s is None or per_audio_s * pass_audio_s <= budget_s / 2:
                for _, x in units:
                    fn(x)
            self.sync()
            t0 = time.perf_counter()
            while not stop:
                for a, x in units:
                    out = fn(x)
                    if passes == 0:
                        outs.append(out)
                    audio_s += a
                    if budget_s is not None and time.perf_counter() - t0 > budget_s:
                        stop = True
                        break
                passes += 1
                self.sync()
                stop = stop or time.perf_counter() - t0 >= min_s
            wall = time.perf_counter() - t0
        return outs, audio_s, wall, mem.peak_mib, passes

    def add(self, **row) -> dict:
        base = {
            "status": "ok",
            "items": None,
            "audio_s": None,
            "wall_s": None,
            "x_realtime": None,
            "peak_mem_mib": None,
            "rel_l2_err": None,
            "err_ref": None,
            "real_per_padded": None,
            "note": "",
        }
        base.update(row)
        if base["status"] == "ok" and base["wall_s"]:
            base["x_realtime"] = base["audio_s"] / base["wall_s"]
        for k in ("audio_s", "wall_s", "x_realtime", "peak_mem_mib", "rel_l2_err"):
            if isinstance(base[k], float):
                base[k] = float(f"{base[k]:.6g}")
        self.rows.append(base)
        shown = {k: base[k] for k in ("dist", "name", "x_realtime", "peak_mem_mib", "rel_l2_err")}
        print(f"[bench] {json.dumps(shown)}" + (f" {base['status']}: {base['note']}"), flush=True)
        return base


# -- the measured paths ---------------------------------------------------------------------------
def run_stock(bench: Bench, model_dir, items, refs, dist, name, recipe, dtype, budget, batch=1):
    """Stock transformers: ``HubertModel`` (``.half()`` for float16, the seed article's recipe)
    on ``batch`` utterances at a time in data order, zero-padded to the longest, no attention
    mask (the model card's advice), each item's valid frames kept. Batch 1 (the seed recipe and
    the plain FP32 reference) pads nothing; a larger batch is exact only where its lengths are
    equal (first-layer GroupNorm spans the padding): the error column shows the cost."""
    import torch
    from transformers import HubertModel

    from hubert_ray.chunking import num_frames

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

    from hubert_ray.chunking import plan_chunks

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
    from hubert_ray.config import ModelConfig

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
    """Stands in for :class:`hubert_ray.model.ExactHubert` with no arithmetic: zero features
    of the right shape, dtype and device (the actor's own work is all that is left)."""

    def __init__(self, net, hidden: int):
        self._param = next(net.parameters())
        self.hidden = hidden

    def parameters(self):
        return iter([self._param])

    def __call__(self, x, lengths, layers):
        import torch

        from hubert_ray.chunking import num_frames

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
    from hubert_ray.extractor import ModelStage

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
    )


def write_corpus(root: str, raw: list[np.ndarray], dist: str, max_rec_s: float = 60.0) -> str:
    """Items concatenated into FLAC recordings of up to ``max_rec_s`` (16 kHz, PCM_16), one
    segment per item; returns the JSONL manifest path."""
    from hubert_ray.synth import write_audio

    os.makedirs(os.path.join(root, "audio"), exist_ok=True)
    recs, cur, cur_n = [], [], 0
    for x in raw:
        if cur and cur_n + len(x) > max_rec_s * SR:
            recs.append(cur)
            cur, cur_n = [], 0
        cur.append(x)
        cur_n += len(x)
    if cur:
        recs.append(cur)
    lines = []
    k = 0
    for r, parts in enumerate(recs):
        rid = f"{dist}-rec{r:05d}"
        write_audio(os.path.join(root, "audio", f"{rid}.flac"), np.concatenate(parts), SR, "flac")
        segs, off = [], 0
        for x in parts:
            segs.append({"id": f"{rid}-{k:06d}", "start_s": off / SR, "end_s": (off + len(x)) / SR})
            off += len(x)
            k += 1
        lines.append({"id": rid, "audio": f"audio/{rid}.flac", "segments": segs})
    manifest = os.path.join(root, "manifest.jsonl")
    with open(manifest, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return manifest


ERROR_SAMPLE = 256  # loop/pipeline rows: segments whose error vs the FP32 reference is measured


def run_loop(bench: Bench, model_dir, manifest_path, dtype, batch_size):
    """Plain single process: manifest → DecodeStage → ModelStage, batch by batch (no Ray, no
    Parquet). Timed end to end, model load included (as the pipeline's wall time is). Keeps the
    decoded audio and features of an evenly spread sample of at most ERROR_SAMPLE segments."""
    from hubert_ray import manifest
    from hubert_ray.audio import DecodeStage, clear_cache
    from hubert_ray.extractor import ModelStage, audio_views

    clear_cache()
    feats, inputs = {}, {}
    with PeakMemory(bench.cuda) as mem:
        t0 = time.perf_counter()
        segments = manifest.read_segments(manifest_path)
        every = math.ceil(segments.num_rows / ERROR_SAMPLE)
        decode = DecodeStage()
        stage = ModelStage(model_config(bench, model_dir, dtype, batch_size, "float16"))
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
    """``hubert_ray.pipeline.run`` on the running local Ray, as the job runs by default (its
    batch size and micro-batch budget are the job's defaults; ``calls``: calls per model actor,
    None = the job's default); returns summary, wall, config."""
    import torch

    from hubert_ray import pipeline
    from hubert_ray.config import ExtractConfig

    ncpu = os.cpu_count() or 1
    cfg = ExtractConfig(
        manifest=manifest_path,
        model=model_dir,
        output=out_dir,
        dtype=dtype,
        chunk_seconds=bench.args.chunk_seconds,
        batch_size=bench.args.batch_size,
        num_gpus=None if bench.cuda else 0,
        cpus_per_actor=float(bench.args.pipeline_cpus_per_actor or max(1, ncpu - 1)),
        # as many torch threads as the loop's process has: decode is cheap next to the model
        torch_threads=0 if bench.cuda else torch.get_num_threads(),
        calls_per_actor=calls,
    )
    t0 = time.perf_counter()
    summary = pipeline.run(cfg, overwrite=True)
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
            f"{cfg.torch_threads} torch threads"
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
    from hubert_ray.pipeline import plan_placement

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


# -- report ---------------------------------------------------------------------------------------
def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "ray", "numpy", "pyarrow", "soundfile", "soxr"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed: recorded as missing
            out[mod] = None
    return out


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def device_name(cuda: bool) -> str:
    if cuda:
        import torch

        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(v, digits=3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:,.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"### {m['device_name']} ({m['device']}), arch `{m['arch']}`",
        "",
        f"- command: `{m['command']}`",
        f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
        f"- CPUs: {m['cpu_count']} (torch threads in-process: {m['torch_threads']}); "
        f"batch size {m['batch_size']}; chunk {m['chunk_seconds']:g} s; layer {m['layer']}",
        f"- peak memory: {m['memory_metric']}",
        f"- load average (1/5/15 min) at start / end: {m['load_average_start_end']}; "
        f"total wall {m['total_wall_s']} s"
        + (
            f"; pipeline warm-up run on 2 utterances (about its fixed cost): "
            f"{m['pipeline_warmup_wall_s']} s"
            if m.get("pipeline_warmup_wall_s")
            else ""
        ),
        "",
    ]
    for dist in m["distributions"]:
        rows = [r for r in result["rows"] if r["dist"] == dist]
        info = m["inputs"][dist]
        lines += [
            f"#### {dist}: {info['items']} utterances, {info['audio_s']:.1f} s of audio "
            f"(mean {info['mean_s']:.2f} s, max {info['max_s']:.2f} s)",
            "",
            "| row | dtype | batch | items | audio s | wall s | x realtime | peak mem MiB "
            "| rel. L2 err | vs | real/padded | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['name']} | {r['dtype']} | {r['batch_size']} | {fmt(r['items'])} "
                f"| {fmt(r['audio_s'])} | {fmt(r['wall_s'])} | {fmt(r['x_realtime'])} "
                f"| {fmt(r['peak_mem_mib'])} | {fmt(r['rel_l2_err'])} | {r['err_ref'] or ''} "
                f"| {fmt(r.get('real_per_padded'))} "
                f"| {r['status'] if r['status'] != 'ok' else ''} {r['note']} |"
            )
        lines.append("")
    if result["ratios"]:
        lines += [
            "#### Ratios (x-realtime)",
            "",
            "| ratio | dist | value | rows |",
            "|---|---|---|---|",
        ]
        for r in result["ratios"]:
            lines.append(f"| {r['name']} | {r['dist']} | {fmt(r['value'])} | {r['rows']} |")
        lines.append("")
    return "\n".join(lines)


def ratios(rows: list[dict], batch_size: int, pipeline_dtype: str) -> list[dict]:
    out = []

    def ok(r):
        return r["status"] == "ok" and r["x_realtime"]

    def ratio(name: str, dist: str, a: dict | None, b: dict | None) -> None:
        if a and b:
            out.append(
                {
                    "name": name,
                    "dist": dist,
                    "value": a["x_realtime"] / b["x_realtime"],
                    "rows": f"{a['name']} / {b['name']}",
                }
            )

    for dist in dict.fromkeys(r["dist"] for r in rows):
        rs = [r for r in rows if r["dist"] == dist and ok(r)]
        by = {r["name"]: r for r in rs}
        seeds = [r for r in rs if r["path"] == "seed"]
        # "best dtype": fastest actor row at the configured batch whose features stay within
        # 5 % of FP32 (random-weight int8 can be far off; it is not a fair winner).
        actors = [
            r
            for r in rs
            if r["path"] == "actor"
            and r["batch_size"] == batch_size
            and r.get("micro_batch_cost_s") is None  # the default packing only
            and r.get("pad_multiple_s") is None
            and r.get("compile", "none") == "none"
            and r.get("overlap", True)
            and not r.get("null_model")
            and r["rel_l2_err"] is not None
            and r["rel_l2_err"] < 0.05
        ]
        fastest = max(actors, key=lambda r: r["x_realtime"], default=None)
        seed = max(seeds, key=lambda r: r["x_realtime"], default=None)
        ratio("ours (best dtype) / seed recipe", dist, fastest, seed)
        # vs stock transformers batched (exact only on equal lengths: see its error column)
        stock = next((r for r in rs if r["path"] == "stock"), None)
        if stock:
            ours = by.get(f"actor_{stock['dtype']}_b{batch_size}")
            ratio(f"ours / stock batched ({stock['dtype']})", dist, ours, stock)
        for suffix, what in (
            ("_serial", "overlapped / serial micro-batches"),
            ("_nullmodel", "actor without the model / actor (host share: >> 1 is good)"),
        ):
            variant = next((r for r in rs if r["name"].endswith(suffix)), None)
            if variant:
                base = by.get(variant["name"].removesuffix(suffix))
                a, b = (base, variant) if suffix == "_serial" else (variant, base)
                ratio(what, dist, a, b)
        for r in rs:
            if r.get("compile", "none") != "none":
                base = by.get(r["name"].removesuffix(f"_compile-{r['compile']}"))
                ratio(f"compiled ({r['compile']}) / eager", dist, r, base)
        pipe = by.get(f"pipeline_{pipeline_dtype}_b{batch_size}")
        ratio("pipeline / actor only", dist, pipe, by.get(f"actor_{pipeline_dtype}_b{batch_size}"))
        ratio(
            "pipeline / plain loop (CPU goal >= 0.8)",
            dist,
            pipe,
            by.get(f"loop_{pipeline_dtype}_b{batch_size}"),
        )
    return out


# -- main -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.benchmark", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--arch",
        choices=("tiny", "base"),
        default="tiny",
        help="random-weight model to generate: tiny (synth.make_tiny_model) or base "
        "(HubertConfig() defaults = chinese-hubert-base architecture)",
    )
    p.add_argument("--model", help="use this save_pretrained directory instead of --arch")
    p.add_argument("--seconds", type=float, default=60.0, help="audio per measurement (s)")
    p.add_argument(
        "--utt-seconds",
        default="10,mixed",
        help="distributions: fixed lengths in s and/or mixed[:MEAN] (gamma, mean "
        "2.5 s, 0.3-20 s: WenetSpeech-like); default 10,mixed",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="rows per actor call (default 256, the job's default for one stored layer)",
    )
    p.add_argument(
        "--batch-sizes",
        default=None,
        help="extra actor batch sizes (FP16 on GPU, FP32 on CPU) to sweep (default 1,16,64 on "
        "GPU, none on CPU); "
        "below 64 rows the micro-batch budget is that many chunks",
    )
    p.add_argument(
        "--micro-batch-costs",
        default=None,
        help="extra actor rows (FP16 on GPU, FP32 on CPU) at these micro_batch_cost_seconds, "
        "e.g. 4,16,64 "
        "(default none: the rows use the job's default for the device)",
    )
    p.add_argument(
        "--dtypes",
        default=None,
        help="dtypes of the actor rows at --batch-size (default float32,float16,bfloat16, plus "
        "int8 on CPU; float16 is slow on most CPUs)",
    )
    p.add_argument(
        "--stock-batch",
        type=int,
        default=64,
        help="rows per forward of the stock-transformers batched row (stock_<dtype>_b<N>: "
        "zero-padded, no mask, as a user would batch; default 64; 0 or 1: no such row)",
    )
    p.add_argument("--chunk-seconds", type=float, default=10.0)
    p.add_argument(
        "--pipeline-dtype",
        default="auto",
        help="dtype of the loop/pipeline rows (auto: float16 GPU, float32 CPU)",
    )
    p.add_argument(
        "--pipeline-seconds",
        type=float,
        default=None,
        help="audio in the pipeline corpus per distribution (default --seconds)",
    )
    p.add_argument(
        "--pipeline-cpus-per-actor",
        type=float,
        default=None,
        help="CPU pipeline: Ray CPUs reserved by the model actor (default ncpu-1; its torch "
        "threads are the in-process loop's, ncpu by default)",
    )
    p.add_argument(
        "--max-row-seconds",
        type=float,
        default=120.0,
        help="stop a timed row after this wall time (x-realtime from what ran)",
    )
    p.add_argument(
        "--min-row-seconds",
        type=float,
        default=2.0,
        help="repeat a short timed row in whole passes until this wall time (default 2)",
    )
    p.add_argument(
        "--pad-multiples",
        default="",
        help="extra actor rows (FP16 on GPU, FP32 on CPU) padding micro-batches to multiples "
        "of these seconds, e.g. 0,0.25 (default none: the job's default for the device)",
    )
    p.add_argument(
        "--compile-modes",
        default="",
        help="extra actor rows (FP16 on GPU, FP32 on CPU) with the forward torch.compiled in "
        "these modes, e.g. default,reduce-overhead (default none)",
    )
    p.add_argument(
        "--pipeline-calls",
        default="",
        help="extra pipeline rows with these calls in flight per model actor, e.g. 1,2 "
        "(default none: the job's default only)",
    )
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out", help="writes results.json and results.md here")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    import torch

    try:  # no "Loading weights" progress bars per model load
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    device = (
        "cuda"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    cuda = device == "cuda"
    dists = parse_dists(args.utt_seconds)
    sweep = (
        numbers(args.batch_sizes, int)
        if args.batch_sizes is not None
        else ([1, 16, 64] if cuda else [])
    )
    costs = numbers(args.micro_batch_costs, float)
    pads = numbers(args.pad_multiples, float)
    compiles = numbers(args.compile_modes, str.strip)
    dtypes = ["float32", "float16", "bfloat16"] + ([] if cuda else ["int8"])
    if args.dtypes is not None:
        dtypes = numbers(args.dtypes, str.strip)
    if set(compiles) - set(COMPILE_MODES[1:]):
        print(f"error: --compile-modes: one of {', '.join(COMPILE_MODES[1:])}", file=sys.stderr)
        return 2
    pdtype = (
        args.pipeline_dtype if args.pipeline_dtype != "auto" else ("float16" if cuda else "float32")
    )
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="hubert-bench-")
    bench = Bench(args, device)
    t_start = time.time()
    load_start = _loadavg()
    try:
        if args.model:
            model_dir = os.path.abspath(args.model)
        else:
            model_dir = make_model(args.arch, os.path.join(work, f"{args.arch}-hubert"))
        with open(os.path.join(model_dir, "config.json")) as f:
            n_layers = json.load(f).get("num_hidden_layers", 12)
        chunk_samples = int(round(args.chunk_seconds * SR))
        inputs_meta = {}
        for d_i, (dist, secs, mixed) in enumerate(dists):
            from hubert_ray.audio import normalise

            lengths = make_lengths(secs, mixed, args.seconds, args.seed + d_i)
            raw = make_raw(lengths, seed=args.seed * 100_000 + d_i * 10_000)
            items = [normalise(x) for x in raw]
            inputs_meta[dist] = {
                "items": len(items),
                "audio_s": sum(lengths) / SR,
                "mean_s": float(np.mean(lengths)) / SR,
                "max_s": max(lengths) / SR,
            }
            print(f"[bench] {dist}: {inputs_meta[dist]}", flush=True)
            # 2. plain FP32 batch-1 loop: the reference (never cut short by the time budget)
            refs = run_stock(
                bench, model_dir, items, None, dist, "plain_fp32_b1", "plain", "float32", None
            )
            if refs is None:
                raise RuntimeError("the FP32 reference loop failed")
            # 1. the seed recipe
            bench_b = args.max_row_seconds
            run_stock(
                bench, model_dir, items, refs, dist, "seed_fp16_b1", "seed", "float16", bench_b
            )
            if not cuda:
                run_stock(
                    bench, model_dir, items, refs, dist, "seed_fp32_b1", "seed", "float32", bench_b
                )
            sweep_dt = "float16" if cuda else "float32"  # the device's default dtype
            if args.stock_batch > 1:  # stock transformers batched, as a user would
                name = f"stock_{sweep_dt}_b{args.stock_batch}"
                run_stock(
                    bench, model_dir, items, refs, dist, name, "stock", sweep_dt, bench_b,
                    batch=args.stock_batch,
                )  # fmt: skip
            # 3. our actor path on pre-decoded batches
            cref = chunked_reference(model_dir, device, items, refs, chunk_samples)
            for dt in dtypes:
                run_actor(bench, model_dir, items, cref, dist, dt, args.batch_size, bench_b)
            for b in sweep:
                if b != args.batch_size:
                    run_actor(bench, model_dir, items, cref, dist, sweep_dt, b, bench_b)
            # variants of the default row, in the device's default dtype
            variants = [{"cost_s": c} for c in costs] + [{"pad_s": p} for p in pads]
            variants += [{"overlap": False}, {"null_model": True}]
            variants += [{"compile_mode": m} for m in compiles]  # last: compiling takes long
            for variant in variants:
                run_actor(
                    bench,
                    model_dir,
                    items,
                    cref,
                    dist,
                    sweep_dt,
                    args.batch_size,
                    bench_b,
                    **variant,
                )
            del refs, cref
            bench.release()

        # 4. pipeline on local Ray vs a plain single-process loop, same FLAC corpus
        if not args.skip_pipeline:
            ray = start_ray(cuda)
            try:
                for d_i, (dist, secs, mixed) in enumerate(dists):
                    try:
                        measure_pipeline(bench, model_dir, work, d_i, dist, secs, mixed, pdtype)
                    except Exception as exc:  # record it and carry on with the other rows
                        traceback.print_exc()
                        done = {r["name"] for r in bench.rows if r["dist"] == dist}
                        for path in ("loop", "pipeline"):
                            name = f"{path}_{pdtype}_b{args.batch_size}"
                            if name not in done:
                                bench.add(
                                    dist=dist,
                                    name=name,
                                    path=path,
                                    dtype=pdtype,
                                    batch_size=args.batch_size,
                                    status="failed",
                                    note=f"{type(exc).__name__}: {_first_line(exc)}",
                                )
            finally:
                ray.shutdown()

        result = {
            "meta": {
                "command": shlex.join(["python", "-m", "jobs.benchmark", *argv]),
                "device": device,
                "device_name": device_name(cuda),
                "arch": "model dir " + args.model if args.model else args.arch,
                "num_hidden_layers": n_layers,
                "layer": n_layers,
                "versions": versions(),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "batch_size": args.batch_size,
                "batch_size_sweep": sweep,
                "chunk_seconds": args.chunk_seconds,
                "pipeline_dtype": pdtype,
                "distributions": [d[0] for d in dists],
                "inputs": inputs_meta,
                "memory_metric": (
                    "torch.cuda.max_memory_allocated during the row (MiB, weights included)"
                    if cuda
                    else "peak RSS sampled every 5 ms from /proc/self/statm minus RSS at the "
                    "row's start, over warm-up and timed passes (MiB: the row's working memory; "
                    "weights loaded before are not counted, except in the loop row, which "
                    "times its model load)"
                ),
                "pipeline_warmup_wall_s": bench.pipeline_warmup_s
                and round(bench.pipeline_warmup_s, 2),
                "total_wall_s": round(time.time() - t_start, 1),
                "load_average_start_end": [load_start, _loadavg()],
            },
            "rows": bench.rows,
            "ratios": ratios(bench.rows, args.batch_size, pdtype),
        }
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = markdown(result)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"[bench] wrote {args.out}/results.json and results.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Precision assurance of an engine against an FP32 reference of the same model on the same
device (torch inside, imported when used):

- the **self-test** before the first batch (:mod:`hubert_ray.core.selftest`);
- **sampled rechecks** of segments chosen by a hash of their id, queued on the device right
  behind their call's forward and compared there (:meth:`Assurance.launch_audit`);
- **escalation** when sampled breaches stop being rare (:class:`Escalation`): the engine then
  computes in FP32 for the rest of its life;
- the **non-finite guard**: a chunk whose output is NaN/inf (or overflows the storage dtype)
  is recomputed in FP32, else its segment fails with ``non_finite``;
- the **fallbacks**: rows recomputed in FP32 and why (the feature rows' ``fallback_reason``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hubert_ray.core import selftest
from hubert_ray.core.config import SAMPLE_RATE_HZ
from hubert_ray.core.precision import PrecisionBreach
from hubert_ray.model.calls import Audit

if TYPE_CHECKING:
    from hubert_ray.model.calls import Features, Launched, Work

log = logging.getLogger("hubert_ray")

# Fallback reasons (the feature rows' ``fallback_reason``).
FALLBACK_NON_FINITE = "non_finite"  # this segment's output was non-finite in the reduced dtype
FALLBACK_PRECISION = "precision"  # a sampled check of its micro-batch breached the limit
FALLBACK_SELF_TEST = "self_test"  # the actor's self-test breached: the actor runs FP32
FALLBACK_ESCALATED = "escalated"  # sampled breaches were systematic: the actor runs FP32


@dataclass
class Escalation:
    """When sampled breaches stop being rare, the actor stops trusting its reduced dtype.

    Rule: at least ``min_breaches`` breaching segments, and at least ``min_share`` of this
    actor's checked segments. Why: on sound hardware FP16 is ~0.2 % and BF16 ~1.5 % from FP32
    (docs/precision.md), so a breach of the 2 % limit is an outlier input and rare; a broken
    kernel or an underflowing model breaches on (nearly) every check. Two breaches at >= 5 % of
    the checks separates the two: two isolated outliers among the first 40 checks would need an
    outlier rate of several percent, far above what was measured, while a systematic fault is
    caught at its second check."""

    min_breaches: int = 2
    min_share: float = 0.05
    checks: int = 0
    breaches: int = 0

    def record(self, checks: int, breaches: int) -> bool:
        """Count a call's checks; True when the rule is met."""
        self.checks += checks
        self.breaches += breaches
        return self.breaches >= self.min_breaches and self.breaches >= self.min_share * self.checks


class Assurance:
    """The precision assurance of one :class:`hubert_ray.model.engine.Engine` (see the module
    docstring). It computes through the engine (its packed forward, its model and dtype) and
    switches the engine to FP32 when it demotes it."""

    def __init__(self, engine):
        self.engine = engine
        # The FP32 model (loaded when first needed, unless the engine computes in FP32).
        self._fp32 = engine.net if engine.dtype == "float32" else None
        # Why the engine computes in FP32 although a reduced dtype was asked for (None: it
        # does not): FALLBACK_SELF_TEST or FALLBACK_ESCALATED.
        self.demoted: str | None = None
        self.escalation = Escalation()
        # Segments the engine wrote in the reduced dtype (for the escalation report).
        self.reduced_rows = 0
        self.self_test_report: dict | None = None

    def reference(self):
        """The FP32 model on the engine's device."""
        if self._fp32 is None:
            e = self.engine
            self._fp32 = e.device.load(e.model_dir, "float32", e.config)
        return self._fp32

    def release_reference(self) -> None:
        """Unload the FP32 model unless sampled checks need it (it is reloaded on the first
        non-finite fallback otherwise)."""
        if not self.engine.checking and self._fp32 is not self.engine.net:
            self._fp32 = None

    def demote(self, why: str) -> None:
        """The engine computes in FP32 from now on (the reduced-precision model is released)."""
        self.engine.net = self.reference()
        self.engine.dtype = "float32"
        self.demoted = why

    def report(self) -> dict:
        """The assurance's part of the engine's report."""
        return {
            "demoted": self.demoted,
            "self_test": self.self_test_report,
            "checks": self.escalation.checks,
            "breaches": self.escalation.breaches,
            "escalated": self.demoted == FALLBACK_ESCALATED,
            "reduced_rows_before_escalation": (
                self.reduced_rows if self.demoted == FALLBACK_ESCALATED else 0
            ),
        }

    # -- self-test ----------------------------------------------------------------------------
    def self_test(self) -> dict:
        """Run the calibration input through the compute dtype and FP32 (the same packing,
        padding and chunking as real work); apply the breach policy to the whole engine."""
        import torch

        e = self.engine
        t0 = time.perf_counter()
        signals = selftest.calibration_signals(e.config.chunk_seconds)
        w = e._work([f"self-test-{i}" for i in range(len(signals))], signals)
        js = list(range(len(w.chunks)))
        got = e._forward(e.net, w, js, e.store)  # what would be stored
        ref = e._forward(self.reference(), w, js, torch.float32)
        report = selftest.evaluate(
            {k: got.host[k].numpy() for k in e.layers},
            {k: ref.host[k].numpy() for k in e.layers},
            e.precision.precision_limit,
        )
        report.update(
            {
                "device": e.device.name,
                "dtype": e.dtype,
                "audio_seconds": round(sum(len(s) for s in signals) / SAMPLE_RATE_HZ, 3),
                "seconds": None,
                "action": "none",
            }
        )
        if report["breach"]:
            report["action"] = self._self_test_breached(report)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        log.info(
            "precision self-test (%s on %s): worst layer %s relative error %.3g in %.2f s",
            report["dtype"],
            report["device"],
            report["worst_layer"],
            float(report["worst_rel_l2"]),
            report["seconds"],
        )
        self.self_test_report = report
        return report

    def _self_test_breached(self, report: dict) -> str:
        """Apply the breach policy to a breaching self-test; returns the action taken."""
        e = self.engine
        policy = e.precision.on_precision_breach
        msg = (
            f"precision breach: self-test on {report['device']} layer {report['worst_layer']}:"
            f" relative L2 error {float(report['worst_rel_l2']):.4g} > precision_limit "
            f"{e.precision.precision_limit:g} in {e.dtype}"
        )
        if policy == "fail":
            raise PrecisionBreach(
                f"{msg}; rerun with --dtype float32 or --on-precision-breach fallback"
            )
        if policy == "fallback":
            log.warning("%s: this model actor computes in float32 for the whole run", msg)
            self.demote(FALLBACK_SELF_TEST)
            return "fallback"
        log.warning("%s: kept (--on-precision-breach warn)", msg)
        return "breach_ignored"

    # -- a finished call ----------------------------------------------------------------------
    def review(
        self, w: Work, feats: Features, dtype: str, audit: Audit | None
    ) -> tuple[set[int], list[list[dict] | None]]:
        """A finished call launched in ``dtype``: the non-finite guard, its sampled checks
        and, if the engine was demoted since, its rows recomputed in FP32. Returns the rows
        left non-finite and the per-row precision records (the engine's lock is held)."""
        e = self.engine
        bad_rows = self.guard(w, feats, dtype)
        precision: list[list[dict] | None] = [None] * len(w.ids)
        if audit is not None and dtype == e.dtype:
            bad_rows |= self.check_precision(w, feats, bad_rows, precision, audit)
        if self.demoted and dtype != "float32":
            # launched before the engine switched to FP32: recompute what is left
            reduced = {i for i, d in w.row_dtype.items() if d == dtype}
            bad_rows |= self.recompute_rows(w, feats, reduced, self.demoted)
        self.reduced_rows += sum(1 for d in w.row_dtype.values() if d not in (None, "float32"))
        return bad_rows, precision

    def guard(self, w: Work, feats: Features, dtype: str) -> set[int]:
        """The non-finite guard: rows with NaN/inf (or storage overflow) are recomputed in FP32
        (all rows of their micro-batches); returns the rows non-finite even then."""
        bad = [j for j in range(len(w.chunks)) if not feats.finite[j]]
        bad_rows = {w.owner[j] for j in bad}
        if not bad or dtype == "float32":
            return bad_rows
        if self.engine.precision.on_precision_breach == "fail":
            j = bad[0]
            a, b = feats.span([j])
            layer = next(k for k, v in feats.host.items() if not bool(v[a:b].isfinite().all()))
            raise PrecisionBreach(
                f"precision breach: segment {w.ids[w.owner[j]]!r} layer {layer}: non-finite "
                f"output in {dtype}; rerun with --dtype float32 or "
                "--on-precision-breach fallback"
            )
        rows = {w.owner[j] for g in w.groups if set(g) & set(bad) for j in g}
        return (bad_rows - rows) | self.recompute_rows(w, feats, rows, FALLBACK_NON_FINITE)

    def recompute_rows(self, w: Work, feats: Features, rows: set[int], why: str) -> set[int]:
        """Recompute every chunk of ``rows`` in FP32 into ``feats`` (storage dtype) and mark
        those rows as float32. Returns the rows still non-finite."""
        e = self.engine
        chunks_of = w.chunks_of
        rows = {i for i in rows if i in chunks_of}
        js = sorted(j for i in rows for j in chunks_of[i])
        if not js:
            return set()
        again = e._forward(self.reference(), w, js, e.store)
        for i in rows:
            a, b = feats.span(chunks_of[i])
            c, d = again.span(chunks_of[i])
            for k in e.layers:
                feats.host[k][a:b] = again.host[k][c:d]
            for k in feats.units:
                feats.units[k][a:b] = again.units[k][c:d]
            w.row_dtype[i] = "float32"
            w.fallback.setdefault(i, why)
        return {i for i in rows if not again.all_finite(chunks_of[i])}

    # -- sampled rechecks ---------------------------------------------------------------------
    def launch_audit(self, w: Work, launched: Launched, rows: list[int]) -> Audit:
        """Queue the FP32 forward of ``rows`` and the comparison of its features with those
        of ``launched`` (still on the device, as stored) on the device: per row and layer the
        metrics of :func:`hubert_ray.core.precision.compare` and the frames whose unit differs.
        Nothing waits for the device; only the [rows, layers, 6] result is copied back."""
        import torch

        from hubert_ray.model.encoder import to_device

        e = self.engine
        device = e.device.torch_device
        chunks_of = w.chunks_of
        js = [j for i in rows for j in chunks_of[i]]
        ref = e._launch(self.reference(), w, js, torch.float32, host=False)
        # ref holds the rows' frames back to back; in ``launched`` (every chunk, in order)
        # row i's frames are starts[first chunk] : starts[last chunk + 1]
        starts = launched.starts
        spans = [(starts[chunks_of[i][0]], starts[chunks_of[i][-1] + 1]) for i in rows]
        counts = np.array([b - a for a, b in spans], dtype=np.int64)
        mine = np.concatenate([np.arange(a, b) for a, b in spans])
        mine = to_device(torch.from_numpy(mine), device)
        seg = to_device(torch.from_numpy(np.repeat(np.arange(len(rows)), counts)), device)
        frames = to_device(torch.from_numpy(counts.astype(np.float64)), device)
        zeros = torch.zeros(len(rows), dtype=torch.float64, device=device)

        def per_row(values, how="sum"):  # per-frame values -> per-row (float64)
            values = values.double()
            if how == "sum":
                return zeros.index_add(0, seg, values)
            start = zeros + (1.0 if how == "amin" else 0.0)
            return start.scatter_reduce(0, seg, values, how)

        per_layer = []
        for k in e.layers:
            a = launched.out[k].index_select(0, mine).float()
            b = ref.out[k]
            aa, bb, ab = (a * a).sum(-1), (b * b).sum(-1), (a * b).sum(-1)
            d = a - b
            denom = aa * bb
            cos = torch.where(denom > 0, ab / denom.clamp(min=1e-30).sqrt(), 1.0)
            err, norm = per_row((d * d).sum(-1)).sqrt(), per_row(bb).sqrt()
            rel = torch.where(norm > 0, err / norm.clamp(min=1e-300), err * torch.inf)
            rel = torch.nan_to_num(rel, nan=0.0)  # 0 / 0: both all zero
            flips = zeros
            if k in launched.units:
                flips = per_row(launched.units[k].index_select(0, mine) != ref.units[k])
            cos_mean = torch.where(frames > 0, per_row(cos) / frames.clamp(min=1), 1.0)
            metrics = [cos_mean, per_row(cos, "amin"), rel, per_row(d.abs().amax(-1), "amax")]
            per_layer.append(torch.stack([*metrics, flips, frames], dim=-1))
        return Audit(rows, torch.stack(per_layer, dim=1))

    def check_precision(
        self, w: Work, feats: Features, bad_rows, precision, audit: Audit
    ) -> set[int]:
        """Read the sampled rows' FP32 recheck (:meth:`launch_audit`); record metrics; warn /
        fall back / fail; escalate when breaches are systematic. Returns rows left non-finite
        by a recompute."""
        e = self.engine
        values = audit.metrics.numpy()
        sampled = [
            (p, i)
            for p, i in enumerate(audit.rows)
            if i not in bad_rows and w.row_dtype[i] == e.dtype
        ]
        if not sampled:
            return set()
        breached: set[int] = set()
        for p, i in sampled:
            metrics = self._row_metrics(values[p])
            action = self._judge(w.ids[i], metrics)
            if action in ("fallback", "breach_ignored"):
                breached.add(i)
            precision[i] = [
                {"layer": k, "checked_dtype": e.dtype, **m, "action": action}
                for k, m in metrics.items()
            ]
        if e.precision.on_precision_breach != "fallback":
            return set()
        return self._fall_back(w, feats, len(sampled), breached)

    def _row_metrics(self, values) -> dict[int, dict]:
        """One sampled row's metrics per layer from its [layers, 6] audit values."""
        e = self.engine
        metrics = {}
        for q, k in enumerate(e.layers):
            cos_mean, cos_min, rel_l2, max_abs, flips, frames = values[q].tolist()
            metrics[k] = {
                "cos_mean": cos_mean,
                "cos_min": cos_min,
                "rel_l2": rel_l2,
                "max_abs": max_abs,
                "unit_flip_rate": (
                    (flips / frames if frames else 0.0) if k in e.codebooks else None
                ),
            }
        return metrics

    def _judge(self, segment_id: str, metrics: dict[int, dict]) -> str:
        """The action for one sampled row (its worst layer against the warn and breach
        limits): ``none``, ``warn``, ``fallback`` or ``breach_ignored``; raises
        :class:`PrecisionBreach` under the ``fail`` policy."""
        e = self.engine
        cfg = e.precision
        worst_layer = max(metrics, key=lambda k: metrics[k]["rel_l2"])
        worst = metrics[worst_layer]["rel_l2"]
        action = "none"
        if worst > cfg.precision_warn:
            action = "warn"
            log.warning(
                "precision: %s layer %d relative error %.4g > warn %.4g (%s)",
                segment_id,
                worst_layer,
                worst,
                cfg.precision_warn,
                e.dtype,
            )
        if worst > cfg.precision_limit:
            if cfg.on_precision_breach == "fail":
                raise PrecisionBreach(
                    f"precision breach: segment {segment_id!r} layer {worst_layer}: "
                    f"relative L2 error {worst:.4g} > precision_limit "
                    f"{cfg.precision_limit:g} in {e.dtype}; rerun with --dtype float32 "
                    "or --on-precision-breach fallback"
                )
            action = "fallback" if cfg.on_precision_breach == "fallback" else "breach_ignored"
        return action

    def _fall_back(self, w: Work, feats: Features, checks: int, breached: set[int]) -> set[int]:
        """Under the ``fallback`` policy: escalate to FP32 when breaches are systematic (the
        call's rows recomputed), else recompute the breaching micro-batches. Returns rows
        left non-finite by a recompute."""
        e = self.engine
        if self.escalation.record(checks, len(breached)):
            log.warning(
                "precision: %d of %d checked segments breached the limit in %s: this model "
                "actor computes in float32 for the rest of the run (%d segments were written "
                "in %s before; see the summary's precision.escalations)",
                self.escalation.breaches,
                self.escalation.checks,
                e.dtype,
                self.reduced_rows,
                e.dtype,
            )
            reduced = {i for i, d in w.row_dtype.items() if d == e.dtype}
            self.demote(FALLBACK_ESCALATED)
            for i in breached:  # their reason stays "precision"
                w.fallback[i] = FALLBACK_PRECISION
            return self.recompute_rows(w, feats, reduced, FALLBACK_ESCALATED)
        if breached:
            # The affected micro-batches are recomputed and written in FP32 (all their rows).
            chunks_of = w.chunks_of
            group_of = {j: g for g, group in enumerate(w.groups) for j in group}
            hit = {group_of[j] for i in breached for j in chunks_of[i]}
            rows = {w.owner[j] for g in hit for j in w.groups[g]}
            return self.recompute_rows(w, feats, rows, FALLBACK_PRECISION)
        return set()

"""What one engine call carries from its launch to its result (no torch at import): the rows'
chunks (:class:`Work`), a forward queued on the device (:class:`Launched`), the features back
on the host (:class:`Features`), the sampled rows' FP32 recheck (:class:`Audit`), the call
between launch and finish (:class:`Pending`) and what the engine returns (:class:`Result`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


@dataclass
class Result:
    """What :meth:`hubert_ray.model.engine.Engine.run` returns, one entry per input row (in
    order).

    ``features[layer]`` holds every valid row's frames back to back ([sum of frames, hidden],
    host memory, the storage dtype): row i owns the next ``frames[i]`` of them when
    ``valid[i]``."""

    features: dict  # layer -> host torch tensor [N, H]
    frames: list[int]
    valid: list[bool]
    compute_dtype: list[str | None]
    fallback: list[str | None]
    precision: list[list[dict] | None]
    errors: dict[int, tuple[str, str]]  # row -> (reason, message) for rows the model failed
    units: dict = field(default_factory=dict)  # layer with centroids -> [N] int32 host tensor


@dataclass
class Work:
    """One call's chunks and what is known about them while the engine processes it."""

    ids: list[str]
    chunks: list[np.ndarray]  # every row's chunks, in row order
    owner: list[int]  # chunk j belongs to row owner[j]
    row_dtype: dict[int, str]  # dtype each row's features were computed in
    fallback: dict[int, str] = field(default_factory=dict)  # row -> why it was recomputed
    groups: list[list[int]] = field(default_factory=list)  # the micro-batches, chunk indices

    @cached_property
    def chunks_of(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for j, i in enumerate(self.owner):
            out.setdefault(i, []).append(j)
        return out


@dataclass
class Features:
    """Features of chunks ``js`` laid back to back in that order: per layer one host tensor
    [frames, hidden]; chunk ``js[p]`` is rows ``starts[p]:starts[p + 1]``."""

    js: list[int]
    starts: np.ndarray
    host: dict  # layer -> [N, H] CPU tensor
    finite: np.ndarray  # per chunk (position in js): every stored value finite in every layer
    groups: list[list[int]]  # the micro-batches that computed them (chunk indices)
    units: dict = field(default_factory=dict)  # layer with centroids -> [N] int32 host tensor

    @cached_property
    def pos(self) -> dict[int, int]:
        return {j: p for p, j in enumerate(self.js)}

    def span(self, js: list[int]) -> tuple[int, int]:
        """Row range of consecutive chunks ``js`` (e.g. all chunks of one segment)."""
        p = self.pos[js[0]]
        return int(self.starts[p]), int(self.starts[p + len(js)])

    def all_finite(self, js: list[int]) -> bool:
        return bool(all(self.finite[self.pos[j]] for j in js))


@dataclass
class Launched:
    """A forward queued on the device (:meth:`Engine._launch`), its results not yet read."""

    js: list[int]
    starts: np.ndarray
    frames: list[int]
    out: dict  # layer -> [N, H] tensor (host memory once ``done``)
    ok: object  # per frame: finite once stored (bool tensor)
    groups: list[list[int]]
    done: object  # the device's event: results on the host
    units: dict  # layer with centroids -> [N] int32 tensor (host memory once ``done``)


@dataclass
class Audit:
    """Sampled rows' FP32 recheck, queued right behind their call's forward
    (:meth:`hubert_ray.model.assurance.Assurance.launch_audit`): ``metrics`` [rows, layers, 6]
    (host memory once the call is done) holds per row and layer ``cos_mean, cos_min, rel_l2,
    max_abs, unit_flips, frames``, computed on the device."""

    rows: list[int]
    metrics: object


@dataclass
class Pending:
    """One call between :meth:`Engine.launch` and :meth:`Engine.finish`."""

    work: Work
    audio: list
    launched: Launched
    dtype: str  # the dtype it was launched in
    t0: float
    audit: Audit | None = None
    stamps: tuple = ()  # the device's stamps before the forward, after it, after the audit

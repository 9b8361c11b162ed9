"""Fault injection for tests: the one place where the job reads test hooks (off unless set).

Three hooks, read from the environment once when a model actor starts (Ray's local workers
inherit the driver's environment, so a test sets them before ``ray.init``):

- ``HUBERT_RAY_FAULT_SEGMENTS="raise:ID1,ID2;exit:ID3"``: the model stage raises when a call
  (or any part of it, while failures are being isolated) contains ID1 or ID2, and kills its
  own process when it contains ID3 — a poisoned segment and a segment that crashes its worker.
- ``HUBERT_RAY_FAIL_BATCH=k`` with ``HUBERT_RAY_FAIL_MODE=raise|exit|exit-every`` and
  ``HUBERT_RAY_FAIL_DIR``: the k-th model-stage call of a process fails; ``raise`` and ``exit``
  once per job (a marker file in the directory records that it did), ``exit-every`` every time.
  ``HUBERT_RAY_FAIL_MODE=start``: every model actor raises in its constructor.
- ``HUBERT_RAY_FAULT_DELAY_S=s``: every model-stage call first sleeps ``s`` seconds (a slow
  device: a test that stops or kills a job mid-run gets a run that lasts, whatever the CPU).

Production code calls :meth:`Faults.check` only when :func:`from_env` found a hook.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

SEGMENTS_ENV = "HUBERT_RAY_FAULT_SEGMENTS"
FAIL_BATCH_ENV = "HUBERT_RAY_FAIL_BATCH"
FAIL_MODE_ENV = "HUBERT_RAY_FAIL_MODE"
FAIL_DIR_ENV = "HUBERT_RAY_FAIL_DIR"
DELAY_ENV = "HUBERT_RAY_FAULT_DELAY_S"
EXIT_CODE = 17


class InjectedFault(RuntimeError):
    """The error a ``raise`` hook raises."""


@dataclass
class Faults:
    raise_ids: frozenset = frozenset()
    exit_ids: frozenset = frozenset()
    batch: int | None = None
    mode: str = "raise"
    fail_dir: str | None = None
    delay_s: float = 0.0
    calls: int = field(default=0)

    def check_call(self) -> None:
        """Count a model-stage call (after the delay, if one is set); fail it if it is the k-th."""
        if self.delay_s:
            time.sleep(self.delay_s)
        self.calls += 1
        if self.batch is None or self.calls != self.batch:
            return
        if self.mode != "exit-every":
            if not self.fail_dir:
                return
            try:
                marker = os.path.join(self.fail_dir, "failed-once")
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, f"{os.getpid()} call {self.calls}\n".encode())
            os.close(fd)
        if self.mode.startswith("exit"):
            os._exit(EXIT_CODE)
        raise InjectedFault(f"injected failure in model-stage call {self.calls}")

    def check_start(self) -> None:
        """Fail a model actor's start (``mode`` ``start``)."""
        if self.mode == "start":
            raise InjectedFault("injected failure at the model actor's start")

    def check_segments(self, ids) -> None:
        """Fail if ``ids`` holds a poisoned segment."""
        present = set(ids)
        if present & self.exit_ids:
            os._exit(EXIT_CODE)
        hit = sorted(present & self.raise_ids)
        if hit:
            raise InjectedFault(f"injected failure on segment(s) {hit}")


def from_env() -> Faults | None:
    """The hooks the environment sets, or ``None`` (the production case)."""
    spec = os.environ.get(SEGMENTS_ENV, "")
    batch = os.environ.get(FAIL_BATCH_ENV)
    delay_s = float(os.environ.get(DELAY_ENV) or 0)
    if not spec and not batch and not delay_s and os.environ.get(FAIL_MODE_ENV) != "start":
        return None
    ids: dict[str, set] = {"raise": set(), "exit": set()}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, _, names = part.partition(":")
        if kind not in ids:
            raise ValueError(f"{SEGMENTS_ENV}: {kind!r} is not raise or exit")
        ids[kind].update(n.strip() for n in names.split(",") if n.strip())
    return Faults(
        raise_ids=frozenset(ids["raise"]),
        exit_ids=frozenset(ids["exit"]),
        batch=int(batch) if batch else None,
        mode=os.environ.get(FAIL_MODE_ENV, "raise"),
        fail_dir=os.environ.get(FAIL_DIR_ENV),
        delay_s=delay_s,
    )

"""Accuracy against training progress (the paper's Fig 6: plain vs rank-16 arms of OPD and SFT).

`evaluate_snapshots` measures the eval accuracy of a run's trajectory snapshots with the study's
one accuracy protocol (`runs.evaluate`: avg@k on the eval split, standard error over problems);
accuracies already measured (the start model's, the final snapshot's) are passed in `known` and
reused, not measured again. The result is a typed `ProgressCurve`; `ProgressCurve.to_results()`
is the entry of results['progress_accuracy'][run] (schema: `reporting`).

Steps are counted in the frame of the run whose progress is plotted: a run that resumes another
at step s0 (a rank-16 arm) passes `step_offset=s0` and the resumed run's `total_steps`, so its
points land at (s0 + local step) / total.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping


@dataclasses.dataclass(frozen=True)
class SnapshotAccuracy:
  """The eval accuracy of one snapshot.

  Attributes:
    step: the snapshot's step in the plotted run's frame (offset included).
    progress: step / total_steps.
    acc: avg@k over the eval problems.
    stderr: its standard error over the problems.
    n: eval problems.
    k: samples per problem.
    measured: False when the value was passed in (`known`) rather than measured here.
  """

  step: int
  progress: float
  acc: float
  stderr: float
  n: int
  k: int
  measured: bool = True


@dataclasses.dataclass(frozen=True)
class ProgressCurve:
  """A run's accuracy at its snapshots, by step."""

  run: str
  total_steps: int
  points: tuple[SnapshotAccuracy, ...]

  def to_results(self) -> dict:
    """results['progress_accuracy'][run]: {total_steps, steps, progress, acc, stderr, n, k,
    measured} (lists by step; `k` one int: the protocol's)."""
    p = self.points
    return {"total_steps": self.total_steps, "steps": [x.step for x in p],
            "progress": [x.progress for x in p], "acc": [x.acc for x in p],
            "stderr": [x.stderr for x in p], "n": [x.n for x in p],
            "k": p[-1].k if p else None, "measured": [x.measured for x in p]}


def _point(step: int, total: int, ev: Mapping, measured: bool) -> SnapshotAccuracy:
  return SnapshotAccuracy(step=int(step), progress=step / total, acc=float(ev["acc"]),
                          stderr=float(ev.get("stderr", 0.0)), n=int(ev["n"]), k=int(ev["k"]),
                          measured=measured)


def evaluate_snapshots(run: str, cfg, model, snapshots: Mapping[int, str | os.PathLike],
                       ev, *, total_steps: int, step_offset: int = 0,
                       known: Mapping[int, Mapping] | None = None,
                       log: Callable[[str], None] = print) -> ProgressCurve:
  """The eval accuracy of each of a run's snapshots (`runs.evaluate`, the study's protocol).

  Args:
    run: the run's name (carried into the result).
    cfg: the TrainConfig `runs.evaluate` reads (the run's composed config with the study's
      data section, exactly as the run's own final evaluation gets it).
    model: the run's student `ModelSpec`; each snapshot is evaluated as
      `replace(model, source='checkpoint', path=snapshot)`.
    snapshots: {local step: snapshot path} to evaluate.
    ev: the study's `EvalConfig`.
    total_steps: the plotted run's length (progress = step / total_steps).
    step_offset: added to every local step (a run resumed at step `step_offset`).
    known: {step (plotted frame): eval dict with acc, n, k (and stderr)} already measured (the
      start model at step 0, the final snapshot): included as they are; a snapshot at such a
      step is not evaluated again.
    log: progress lines.

  Returns:
    The `ProgressCurve` over the union of the snapshots' and the known steps, by step.
  """
  from opd_jax.study import runs as runs_lib  # the protocol lives there (runs imports this)
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps}: must be >= 1")
  known = {int(s): e for s, e in (known or {}).items()}
  points = {s: _point(s, total_steps, e, measured=False) for s, e in known.items()}
  for local in sorted(int(s) for s in snapshots):
    step = local + step_offset
    if step in points:
      continue
    spec = dataclasses.replace(model, source="checkpoint", path=os.fspath(snapshots[local]))
    res = runs_lib.evaluate(cfg, spec, ev)
    points[step] = _point(step, total_steps, res, measured=True)
    log(f"[study] {run}: step {step}/{total_steps} eval accuracy {res['acc']:.3f}")
  return ProgressCurve(run=run, total_steps=int(total_steps),
                       points=tuple(points[s] for s in sorted(points)))

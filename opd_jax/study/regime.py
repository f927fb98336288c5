"""Scale by rule: the study's scale-dependent settings derived from the paper's by stated rules.

The update budget (paper_facts section 5)
-----------------------------------------
bf16 keeps 8 significant bits, so a weight w changes its bf16 code only after moving by about
half an ulp, h(w) = 2^(floor(log2 |w|) - 8). Adam moves a coordinate by about lr per step while
its gradient keeps its sign, so a run's update budget in half-ulps is

    B = sum_t lr_t / h(m) = lr * mean_schedule * steps / h(m),

with m the median |W| over the trained matrices (the transformer blocks' q, k, v, o, gate, up,
down; not the embedding or the head). The paper's runs (Qwen3-8B; `PAPER_RUNS`):

    OPD   lr 1e-6 constant, 299 steps                          B ~ 4.9
    RLVR  lr 1e-6 constant, 1023 steps                         B ~ 16.8
    SFT   lr 1e-5, 10% warmup, cosine to 1e-6, ~5,375 steps    B ~ 480

at the assumed median |W| of Qwen3-8B, `PAPER_MEDIAN_ABS_W` = 0.02 (h = 6.1e-5): the magnitude
paper_facts section 5 reasons with (and Qwen3's `initializer_range`); it is an assumption, not a
measurement -- no Qwen3-8B weights exist on the machines this was written on. A budget-matched
run keeps its own step count and schedule shape and takes the peak lr that gives the paper's B
(times `scale`) at its own starting weights' median |W|, measured when the run starts:

    lr = scale * B_paper * h(m_ours) / (mean_schedule_ours * steps_ours).

The projection rank (paper_facts section 5, the paper's Sec 4.2): K = 16 was chosen "close to,
but slightly below, the effective dimension observed near the projection point". Here:
K = max(1, floor(median over the q, k, v, o matrices of the stable rank ||dW||_F^2 / ||dW||_2^2
of OPD's update at the projection point)); the trajectories' Sim_K uses the same K.

Widths (paper_facts sections 1 and 5): the paper's principal-angle k = 512 and mask rank r = 64
are 1/8 and 1/64 of Qwen3-8B's width 4096; at width d they are max(1, d / 8) and max(1, d / 64).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import numpy as np

# The assumed median |W| of Qwen3-8B's block matrices (module docstring).
PAPER_MEDIAN_ABS_W = 0.02
PAPER_WIDTH = 4096
PAPER_ANGLE_K = 512
PAPER_MASK_RANK = 64
# The matrices whose median |W| sets the half-ulp: the transformer blocks' projections.
BLOCK_TYPES = ("q", "k", "v", "o", "gate", "up", "down", "router", "expert_gate", "expert_up",
               "expert_down")


@dataclasses.dataclass(frozen=True)
class PaperRun:
  """One of the paper's training runs (paper_facts sections 4 and 5)."""

  lr: float
  steps: int
  schedule: str = "constant"
  final_lr: float = 0.0
  warmup_frac: float = 0.0
  source: str = ""


PAPER_RUNS = {
    "opd": PaperRun(1e-6, 299, source="paper_facts s4: OPD lr 1e-6 constant, 299 steps"),
    "rlvr": PaperRun(1e-6, 1023, source="paper_facts s4: RLVR lr 1e-6 constant, 1023 steps"),
    "sft": PaperRun(1e-5, 5375, "cosine", 1e-6, 0.1,
                    source="paper_facts s5: SFT lr 1e-5, cosine to 1e-6, 10% warmup, ~5,375 "
                           "steps"),
}


def bf16_half_ulp(x) -> np.ndarray:
  """Half the bf16 ulp at |x|: 2^(floor(log2 |x|) - 8) (x != 0, finite)."""
  a = np.abs(np.asarray(x, np.float64))
  if not np.all(np.isfinite(a)) or np.any(a == 0):
    raise ValueError("bf16_half_ulp: needs finite non-zero values")
  return np.ldexp(1.0, np.floor(np.log2(a)).astype(np.int64) - 8)


def schedule_mean(schedule: str, steps: int, *, warmup_frac: float = 0.0,
                  final_ratio: float = 1.0) -> float:
  """Mean of the lr schedule over `steps` updates, relative to the peak lr: the schedule the loop
  runs (`optim.factory.make_schedule`, evaluated at every update)."""
  from opd_jax.optim import factory  # noqa: PLC0415 - keeps this module light for the config
  cfg = factory.OptimConfig(lr=1.0, schedule=schedule, final_lr=float(final_ratio),
                            warmup_frac=float(warmup_frac))
  fn = jax.jit(factory.make_schedule(cfg, total_steps=int(steps)))  # one program, not op by op
  return float(np.mean(np.asarray(fn(np.arange(int(steps))), np.float64)))


def budget(lr: float, steps: int, mean: float, half_ulp: float) -> float:
  """B = lr * mean * steps / h: the run's update budget in half-ulps (module docstring)."""
  return float(lr) * float(mean) * int(steps) / float(half_ulp)


def paper_budget(method: str, median_abs_w: float = PAPER_MEDIAN_ABS_W) -> float:
  run = PAPER_RUNS[method]
  mean = schedule_mean(run.schedule, run.steps, warmup_frac=run.warmup_frac,
                       final_ratio=run.final_lr / run.lr if run.schedule == "cosine" else 1.0)
  return budget(run.lr, run.steps, mean, float(bf16_half_ulp(median_abs_w)))


def median_abs_weight(params) -> float:
  """The median |W| over the block matrices of `params` (a params dict or a checkpoint path)."""
  from opd_jax.geometry import matrices  # noqa: PLC0415
  groups = matrices.matrix_groups(matrices.resolve_params(params), types=BLOCK_TYPES)
  values = [np.abs(np.asarray(g.leaf, np.float32)).ravel() for g in groups]
  if not values:
    raise ValueError("median_abs_weight: the params hold no transformer block matrices")
  return float(np.median(np.concatenate(values)))


@dataclasses.dataclass(frozen=True)
class BudgetMatch:
  """A run's learning rate matched to the paper's update budget (module docstring)."""

  method: str
  scale: float
  paper_budget: float
  paper_median_abs_w: float
  median_abs_w: float
  half_ulp: float
  steps: int
  schedule_mean: float
  lr: float
  final_lr: float

  @property
  def budget(self) -> float:
    return budget(self.lr, self.steps, self.schedule_mean, self.half_ulp)

  def to_metrics(self) -> dict[str, float | int | str]:
    return {"method": self.method, "scale": self.scale, "paper_budget": self.paper_budget,
            "paper_median_abs_w": self.paper_median_abs_w, "median_abs_w": self.median_abs_w,
            "half_ulp": self.half_ulp, "steps": self.steps, "schedule_mean": self.schedule_mean,
            "lr": self.lr, "final_lr": self.final_lr, "budget": self.budget,
            "lr_over_half_ulp": self.lr / self.half_ulp}


def match_budget(method: str, optim: Mapping[str, Any], steps: int, median_abs_w: float, *,
                 scale: float = 1.0, paper_median_abs_w: float = PAPER_MEDIAN_ABS_W
                 ) -> BudgetMatch:
  """The peak lr giving `scale` x the paper's `method` budget over `steps` updates of the
  schedule in `optim` (an optim section: schedule, warmup_frac, lr, final_lr; the ratio
  final_lr / lr is kept) from weights of median |W| `median_abs_w`."""
  from opd_jax.optim import factory  # noqa: PLC0415
  defaults = factory.OptimConfig()
  schedule = optim.get("schedule", defaults.schedule)
  lr0 = float(optim.get("lr", defaults.lr))
  ratio = float(optim.get("final_lr", defaults.final_lr)) / lr0 if lr0 else 0.0
  mean = schedule_mean(schedule, steps, warmup_frac=float(optim.get("warmup_frac",
                                                                    defaults.warmup_frac)),
                       final_ratio=ratio if schedule == "cosine" else 1.0)
  h = float(bf16_half_ulp(median_abs_w))
  target = float(scale) * paper_budget(method, paper_median_abs_w)
  lr = target * h / (mean * int(steps))
  return BudgetMatch(method=method, scale=float(scale), paper_budget=paper_budget(
      method, paper_median_abs_w), paper_median_abs_w=float(paper_median_abs_w),
      median_abs_w=float(median_abs_w), half_ulp=h, steps=int(steps), schedule_mean=mean,
      lr=lr, final_lr=lr * ratio)


def width_ranks(width: int) -> dict[str, int]:
  """The paper's angle k and mask rank as fractions of the width (module docstring)."""
  return {"angle_k": max(1, int(width) * PAPER_ANGLE_K // PAPER_WIDTH),
          "mask_rank": max(1, int(width) * PAPER_MASK_RANK // PAPER_WIDTH)}


def describe(m: BudgetMatch) -> str:
  """One line for the report's Settings."""
  return (f"{m.method}: lr = {m.scale:g} x B_paper {m.paper_budget:.3g} x h({m.median_abs_w:.3g})"
          f" {m.half_ulp:.3g} / (mean schedule {m.schedule_mean:.3f} x {m.steps} steps) = "
          f"{m.lr:.3g} (lr / h = {m.lr / m.half_ulp:.3g} per step; B_paper at the assumed "
          f"median |W| {m.paper_median_abs_w:g}: {PAPER_RUNS[m.method].source})")



def attention_stable_ranks(p0, p1) -> dict[str, float]:
  """{matrix name: stable rank of dW = p1 - p0} over the q, k, v, o matrices, in float64
  (params dicts or checkpoint paths); a matrix that did not move is left out."""
  from opd_jax.geometry import matrices  # noqa: PLC0415
  m0 = matrices.named_matrices(matrices.resolve_params(p0), types=matrices.ATTENTION_TYPES)
  m1 = {m.name: m for m in matrices.named_matrices(matrices.resolve_params(p1),
                                                   types=matrices.ATTENTION_TYPES)}
  out = {}
  for m in m0:
    d = np.asarray(m1[m.name].array, np.float64) - np.asarray(m.array, np.float64)
    top = np.linalg.norm(d, 2)
    if top > 0:
      out[m.name] = float(np.sum(d * d) / top ** 2)
  return out


def projection_rank(stable_ranks: Mapping[str, float]) -> int:
  """K = max(1, floor(median stable rank)) (module docstring)."""
  if not stable_ranks:
    raise ValueError("projection_rank: no attention matrix moved between the two checkpoints")
  return max(1, int(math.floor(float(np.median(list(stable_ranks.values()))))))

"""Trajectory diagnostics of the cumulative update dW_t = W_t - W_0 over saved snapshots
(paper_facts.md section 1).

    out = trajectory_metrics(params_0, [snap_1, ..., snap_T], steps=[63, 127, ...])
    out['matrices']['layers.0.attn.q_proj']['stable_rank']   # one value per snapshot
    out['overall']['sim_end']                                 # mean over matrices per snapshot

Per matrix and snapshot t (all float64):
  stable_rank  ||dW_t||_F^2 / ||dW_t||_2^2
  frobenius    ||dW_t||_F
  hill         [ (1/(k-1)) sum_{i<k} log(s_i / s_k) ]^-1 over the top-k singular values of dW_t
               (k = hill_k, default 16)
  sim_end      Sim_K(t, t_end) = (1/K) ||V_K(t)^T V_K(t_end)||_F^2, V_K the top-K input-side
               singular vectors of dW_t (K = sim_k, default 16; input side = rows of the (in, out)
               kernel, see `matrices.oriented`); t_end is the last snapshot (so its value is 1).
  sim_prev     Sim_K(t, t-1) between consecutive snapshots (NaN for the first).
  randomized   True where the randomized top-k converged, False where the exact path was used
               (small matrices, or no convergence within `max_iters`).
A matrix whose update is exactly zero gets NaN for every metric but `frobenius` (0).

Aggregates ('overall', 'by_type'): the unweighted mean over matrices at each snapshot (NaNs
skipped). The paper computes trajectories on the attention matrices, hence the default
`modules=('q', 'k', 'v', 'o')`.

Snapshots stream: each is resolved (params dict, HF directory or one of our checkpoint paths, or
any object a lazy `Sequence` returns) when reached and released after its matrices are reduced to
their top-K bases; memory is one snapshot plus [in, K] bases per matrix and snapshot. The top-k
singular triples come from randomized subspace iteration with an exact fallback (`linalg.top_k_svd`,
accuracy stated there).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.geometry import linalg, matrices


@dataclasses.dataclass(frozen=True)
class TrajectoryConfig:
  """Knobs of `trajectory_metrics`.

  Attributes:
    hill_k: number of top singular values in the Hill estimate (paper: not given; 16).
    sim_k: K of Sim_K (paper: 16).
    subspace_metrics: compute Hill and Sim_K (False: stable rank by power iteration and
      Frobenius only).
    oversample: extra columns of the randomized block.
    tol: residual tolerance of the randomized top-k (relative to s_1; see `linalg.top_k_svd`).
    max_iters: subspace iterations before the exact fallback.
    seed: seed of the random test matrices.
    max_batch_bytes: float64 working memory per call (layers batched up to it).
    progress: show a tqdm bar over snapshots x matrices.
  """

  hill_k: int = 16
  sim_k: int = 16
  subspace_metrics: bool = True
  oversample: int = 16
  tol: float = 1e-10
  max_iters: int = 40
  seed: int = 0
  max_batch_bytes: int = 1 << 27
  progress: bool = True

  def __post_init__(self):
    if self.hill_k < 2:
      raise ValueError(f"TrajectoryConfig.hill_k={self.hill_k}: must be >= 2")
    if self.sim_k < 1:
      raise ValueError(f"TrajectoryConfig.sim_k={self.sim_k}: must be >= 1")
    if not 0.0 < self.tol < 1.0:
      raise ValueError(f"TrajectoryConfig.tol={self.tol}: must be in (0, 1)")


METRICS = ("stable_rank", "frobenius", "hill", "sim_end", "sim_prev")


@jax.jit
def _delta(w_t, w_0):
  return w_t.astype(jnp.float64) - w_0.astype(jnp.float64)


@jax.jit
def _frobenius(d):
  return jnp.sqrt(jnp.sum(d * d, axis=(1, 2)))


def _batch_size(count: int, shape, budget: int) -> int:
  per = 16 * shape[0] * shape[1]
  for n in range(count, 0, -1):
    if count % n == 0 and n * per <= budget:
      return n
  return 1


def _reduce_snapshot(groups0, snap, cfg: TrajectoryConfig, bar, modules) -> dict:
  """{name: (frobenius, spectral norm, top singular values, V_K, randomized)} of a snapshot."""
  groups_t = {g.path: g for g in matrices.matrix_groups(snap, types=modules)}
  out = {}
  for g0 in groups0:
    gt = groups_t.get(g0.path)
    if gt is None or tuple(gt.leaf.shape) != tuple(g0.leaf.shape):
      raise ValueError(f"snapshot lacks {'/'.join(g0.path)} of shape {tuple(g0.leaf.shape)}")
    shape = g0.shape
    n_top = min(max(cfg.hill_k, cfg.sim_k), *shape)
    batch = _batch_size(g0.count, shape, cfg.max_batch_bytes)
    for start in range(0, g0.count, batch):
      d = _delta(jnp.asarray(gt.batch(start, start + batch)),
                 jnp.asarray(g0.batch(start, start + batch)))
      frob = np.asarray(_frobenius(d))
      if cfg.subspace_metrics:
        top = linalg.top_k_svd(d, n_top, oversample=cfg.oversample, max_iters=cfg.max_iters,
                               tol=cfg.tol, seed=cfg.seed)
        s = np.asarray(top.s)
        u = np.asarray(top.u[:, :, :min(cfg.sim_k, n_top)])
        s1, randomized = s[:, 0], top.converged
      else:
        s1, _ = linalg.spectral_norm(d, seed=cfg.seed)
        s1, s, u, randomized = np.asarray(s1), None, None, np.zeros(len(frob), bool)
      for i, name in enumerate(g0.names[start:start + batch]):
        out[name] = (float(frob[i]), float(s1[i]), None if s is None else s[i],
                     None if u is None else u[i], bool(randomized[i]))
      bar.update(len(g0.names[start:start + batch]))
  return out


def trajectory_metrics(params_0, snapshots: Sequence[Any], steps: Sequence[float] | None = None,
                       cfg: TrajectoryConfig = TrajectoryConfig(),
                       modules: Sequence[str] = matrices.ATTENTION_TYPES) -> dict:
  """Trajectory diagnostics of dW_t = W_t - W_0 (see the module docstring).

  Args:
    params_0: W_0 (params dict or checkpoint path).
    snapshots: W_t in training order (params dicts or checkpoint paths; any Sequence, resolved one
      at a time). The last one is t_end.
    steps: training step of each snapshot (default 1..T); reported with `progress` = step /
      last step.
    cfg: `TrajectoryConfig`.
    modules: module types to analyse (default the attention matrices).

  Returns:
    {'steps', 'progress', 'config', 'matrices': {name: {metric: [per snapshot]}, 'type', 'layer'},
     'overall': {metric: [per snapshot]}, 'by_type': {type: {metric: [...]}}}.
  """
  from tqdm.auto import tqdm

  n_snap = len(snapshots)
  if n_snap == 0:
    raise ValueError("trajectory_metrics: no snapshots")
  steps = list(range(1, n_snap + 1)) if steps is None else [float(s) for s in steps]
  if len(steps) != n_snap:
    raise ValueError(f"trajectory_metrics: {len(steps)} steps for {n_snap} snapshots")
  modules = tuple(modules)
  bad = set(modules) - set(matrices.MATRIX_TYPES)
  if bad:
    raise ValueError(f"modules={modules}: unknown {sorted(bad)}; valid: {matrices.MATRIX_TYPES}")
  p0 = matrices.resolve_params(params_0)
  groups0 = matrices.matrix_groups(p0, types=modules)
  names = [n for g in groups0 for n in g.names]
  if not names:
    raise ValueError(f"trajectory_metrics: params_0 has no matrices of types {modules}")
  types = {n: g.module_type for g in groups0 for n in g.names}
  layers = {n: g.member_layer(i) for g in groups0 for i, n in enumerate(g.names)}
  reduced = []
  with linalg.float64(), tqdm(total=n_snap * len(names), desc="trajectory", unit="matrix",
                              disable=not cfg.progress) as bar:
    for t in range(n_snap):
      snap = matrices.resolve_params(snapshots[t])
      reduced.append(_reduce_snapshot(groups0, snap, cfg, bar, modules))
      del snap
  with linalg.float64():
    per_matrix = _per_matrix(names, types, layers, reduced, cfg)
  present = [m for m in METRICS if m in next(iter(per_matrix.values()))]

  def mean_over(sel):
    return {m: [_nanmean([per_matrix[n][m][t] for n in sel]) for t in range(n_snap)]
            for m in present}

  by_type = {}
  for mtype in modules:
    sel = [n for n in names if types[n] == mtype]
    if sel:
      by_type[mtype] = mean_over(sel)
  last = steps[-1] if steps[-1] else 1.0
  return {"steps": steps, "progress": [s / last for s in steps], "modules": list(modules),
          "config": dataclasses.asdict(cfg), "matrices": per_matrix, "overall": mean_over(names),
          "by_type": by_type}


def _per_matrix(names, types, layers, reduced, cfg: TrajectoryConfig) -> dict:
  n_snap = len(reduced)
  per_matrix = {}
  for name in names:
    d = {m: [] for m in METRICS}
    v_end = reduced[-1][name][3]
    d["randomized"] = [reduced[t][name][4] for t in range(n_snap)]
    for t in range(n_snap):
      frob, s1, s, v, _ = reduced[t][name]
      zero = frob == 0.0
      d["frobenius"].append(frob)
      d["stable_rank"].append(math.nan if zero else frob ** 2 / s1 ** 2)
      if cfg.subspace_metrics:
        hk = min(cfg.hill_k, len(s))
        d["hill"].append(math.nan if zero else float(linalg.hill_estimate(np.asarray(s[:hk]))))
        end_zero = reduced[-1][name][0] == 0.0
        d["sim_end"].append(math.nan if zero or end_zero else
                            float(linalg.subspace_similarity(v, v_end)))
        prev = reduced[t - 1][name] if t else None
        d["sim_prev"].append(math.nan if prev is None or zero or prev[0] == 0.0 else
                             float(linalg.subspace_similarity(v, prev[3])))
    if not cfg.subspace_metrics:
      for m in ("hill", "sim_end", "sim_prev"):
        del d[m]
    d.update(type=types[name], layer=layers[name])
    per_matrix[name] = d
  return per_matrix


def _nanmean(values) -> float:
  vals = [v for v in values if not math.isnan(v)]
  return float(np.mean(vals)) if vals else math.nan

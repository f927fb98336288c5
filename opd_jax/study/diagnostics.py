"""The study's geometry: `opd_jax.geometry` endpoint and trajectory metrics, reduced to the report's
schema (`reporting` module docstring).

Endpoints (paper section 1 origins): SFT base -> anchor, OPD and RLVR anchor -> end. Trajectories:
dW_t = W_t - W_anchor at each saved snapshot of every trajectory run (OPD, RLVR, SFT continued and
the controls), over `DiagnosticsConfig.trajectory_types` (the attention matrices), the unweighted
mean over matrices per snapshot.

Choices where the paper is silent: the endpoint table's "max principal angle, representative
layer" is the larger of the input- and output-side maximum angles of the representative matrix
(the geometry default: the middle layer's query projection), and the angle-curve figure shows its
input-side curve (the paper's right singular vectors); `max_angle_mean_deg` is the mean over
matrices of the per-matrix maximum.

Adapter arms (beyond the paper): their merged endpoint (anchor -> end) goes through the same
endpoint metrics as OPD, and `adapter_update_metrics` adds, on the adapted matrices only, the
spectrum of the merged update dW that low-rank adapters constrain: stable rank, the share of
||dW||_F^2 in its top r and top 2r singular values (a LoRA update has rank <= r, a PiSSA update
rank <= 2r: dW = s (a_1 b_1 - a_0 b_0)), and the share in the anchor's top-r singular subspaces
(PiSSA trains those directions; a random rank-r subspace of an n-dim side holds r / n). These are
exact float64 SVDs on the host, one per adapted matrix and run: seconds at the CPU presets' widths,
far longer for 8B-size matrices (the qwen3_8b preset leaves the arms off).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Mapping

import numpy as np

from opd_jax.study.config import DiagnosticsConfig


def _finite(x):
  return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def endpoint_summary(out: Mapping, alpha: float) -> dict:
  """The report's endpoint entry from `geometry.endpoint.endpoint_metrics` output."""
  from opd_jax.geometry import matrices as geo_matrices
  overall, by_type, per = out["overall"], out["by_type"], out["matrices"]
  mats = {n: d for n, d in per.items() if d["type"] in geo_matrices.MATRIX_TYPES}
  rep = out.get("representative", {})
  rep_name = rep.get("name")
  rep_max = _finite(per[rep_name].get("max_angle_deg")) if rep_name in per else None
  return {
      "sparsity": float(overall["sparsity"]), "density": float(overall["density"]),
      "sparsity_per_type": {t: float(d["sparsity"]) for t, d in by_type.items()},
      "max_angle_deg": rep_max, "rep_matrix": rep_name,
      "angle_curve_deg": list(rep.get("angles_in_deg", [])),
      "max_angle_mean_deg": _finite(overall.get("max_angle_deg")),
      "max_angle_per_matrix": {n: _finite(d.get("max_angle_deg")) for n, d in mats.items()},
      "nss": _finite(overall.get("nss")),
      "nss_per_matrix": {n: _finite(d.get("nss")) for n, d in mats.items()},
      "principal_overlap": _finite(overall.get("overlap_principal")),
      "low_mag_overlap": _finite(overall.get("overlap_low")),
      "baseline": alpha,
      "realised_mask_fraction": {"principal": _finite(overall.get("frac_principal")),
                                 "low": _finite(overall.get("frac_low"))},
      "n_params": int(overall["n_params"]),
  }


def trajectory_summary(out: Mapping) -> dict:
  """The report's trajectory entry from `geometry.trajectory.trajectory_metrics` output."""
  ov = out["overall"]
  return {"steps": [int(s) for s in out["steps"]], "progress": list(out["progress"]),
          "stable_rank": ov["stable_rank"], "frobenius": ov["frobenius"],
          "hill": ov.get("hill", []), "sim_k": ov.get("sim_end", []),
          "sim_prev": ov.get("sim_prev", []),
          "by_type": {t: {"stable_rank": d["stable_rank"], "frobenius": d["frobenius"]}
                      for t, d in out["by_type"].items()}}


def compute(endpoint_pairs: Mapping[str, tuple], origin, trajectories: Mapping[str, Mapping],
            cfg: DiagnosticsConfig, log: Callable[[str], None] = print) -> dict:
  """Endpoint metrics per method and trajectory metrics per run.

  Args:
    endpoint_pairs: {method: (W_0 source, W_1 source)} (params dicts or checkpoint paths).
    origin: W_0 of every trajectory (the anchor).
    trajectories: {run: {step: snapshot source}}.
  """
  from opd_jax.geometry import endpoint as geo_endpoint
  from opd_jax.geometry import matrices as geo_matrices
  from opd_jax.geometry import trajectory as geo_trajectory
  ecfg = geo_endpoint.EndpointConfig(k=cfg.angle_k, mask_rank=cfg.mask_rank,
                                     alpha=cfg.mask_alpha, progress=False)
  tcfg = geo_trajectory.TrajectoryConfig(hill_k=cfg.hill_k, sim_k=cfg.sim_k, progress=False)
  out = {"endpoint": {}, "trajectory": {}}
  for method, (p0, p1) in endpoint_pairs.items():
    log(f"[study] diagnostics: endpoint {method}")
    out["endpoint"][method] = endpoint_summary(geo_endpoint.endpoint_metrics(p0, p1, ecfg),
                                               cfg.mask_alpha)
  origin_params = geo_matrices.resolve_params(origin)
  for run, snaps in trajectories.items():
    log(f"[study] diagnostics: trajectory {run}")
    steps = sorted(snaps)
    res = geo_trajectory.trajectory_metrics(origin_params, [snaps[s] for s in steps], steps,
                                            tcfg, modules=cfg.trajectory_types)
    out["trajectory"][run] = trajectory_summary(res)
  return out


def matrix_update_metrics(w0, w1, rank: int) -> dict:
  """Spectral metrics of dW = w1 - w0 for one (in, out) matrix, in float64.

  Returns {frobenius, sigma_max, stable_rank (||dW||_F^2 / sigma_max^2), energy_top_r and
  energy_top_2r (share of ||dW||_F^2 in the top r / 2r singular values of dW), principal_share_in /
  principal_share_out (share of ||dW||_F^2 in the span of the top-r left (input-side) / right
  (output-side) singular vectors of w0), baseline_in / baseline_out (r / in, r / out: the expected
  share of a random rank-r subspace)}. Shares are None when dW = 0.
  """
  w0 = np.asarray(w0, np.float64)
  d = np.asarray(w1, np.float64) - w0
  sigma = np.linalg.svd(d, compute_uv=False)
  energy = float(np.sum(sigma ** 2))
  u0, _, v0t = np.linalg.svd(w0, full_matrices=False)
  u_r, v_r = u0[:, :rank], v0t[:rank].T
  out = {"frobenius": math.sqrt(energy), "sigma_max": float(sigma[0]) if sigma.size else 0.0,
         "baseline_in": min(rank, d.shape[0]) / d.shape[0],
         "baseline_out": min(rank, d.shape[1]) / d.shape[1]}
  if energy == 0.0:
    return dict(out, stable_rank=None, energy_top_r=None, energy_top_2r=None,
                principal_share_in=None, principal_share_out=None)
  return dict(out, stable_rank=energy / float(sigma[0]) ** 2,
              energy_top_r=float(np.sum(sigma[:rank] ** 2)) / energy,
              energy_top_2r=float(np.sum(sigma[:2 * rank] ** 2)) / energy,
              principal_share_in=float(np.sum((u_r.T @ d) ** 2)) / energy,
              principal_share_out=float(np.sum((d @ v_r) ** 2)) / energy)


_MEAN_KEYS = ("stable_rank", "energy_top_r", "energy_top_2r", "principal_share_in",
              "principal_share_out", "baseline_in", "baseline_out")


def adapter_update_metrics(p0, p1, *, rank: int, targets: str) -> dict:
  """`matrix_update_metrics` of every matrix `targets` selects (`models.lora` naming), aggregated.

  Args:
    p0, p1: W_0 and W_1 (params dicts or checkpoint paths; an adapter run's snapshot is merged).
    rank: the adapter rank r.
    targets: the adapters' target regular expression (`lora.targets`).

  Returns {per_matrix: {name: metrics}, n_matrices, frobenius_total (sqrt of the summed
  ||dW||_F^2), <key>_mean (unweighted mean over matrices with dW != 0) for every share and the
  stable rank, stable_rank_max, energy_top_r_min, energy_top_2r_min}.
  """
  from opd_jax.geometry import matrices as geo_matrices
  from opd_jax.models import lora as lora_lib
  pattern = re.compile(targets)
  m0 = {m.name: m for m in geo_matrices.named_matrices(p0)
        if m.module_type in lora_lib.ADAPTABLE_TYPES and pattern.search(m.name)}
  m1 = {m.name: m for m in geo_matrices.named_matrices(p1) if m.name in m0}
  if not m0 or set(m1) != set(m0):
    raise ValueError(f"adapter targets {targets!r}: {len(m0)} matrices in W_0, "
                     f"{len(set(m1) & set(m0))} of them in W_1")
  per = {n: matrix_update_metrics(m0[n].array, m1[n].array, rank) for n in m0}

  def vals(key):
    return [v[key] for v in per.values() if v[key] is not None]

  out = {"per_matrix": per, "n_matrices": len(per), "rank": rank,
         "frobenius_total": math.sqrt(sum(v["frobenius"] ** 2 for v in per.values()))}
  for key in _MEAN_KEYS:
    xs = vals(key)
    out[f"{key}_mean"] = float(np.mean(xs)) if xs else None
  out["stable_rank_max"] = max(vals("stable_rank"), default=None)
  out["energy_top_r_min"] = min(vals("energy_top_r"), default=None)
  out["energy_top_2r_min"] = min(vals("energy_top_2r"), default=None)
  return out

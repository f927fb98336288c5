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
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

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

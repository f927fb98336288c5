"""The study's geometry: `opd_jax.geometry` endpoint and trajectory metrics, reduced to the report's
schema (`reporting` module docstring).

Endpoints (paper section 1 origins): SFT base -> anchor, OPD and RLVR anchor -> end. Trajectories:
dW_t = W_t - W_0 at each saved snapshot of every trajectory run, W_0 the model the run started
from (the base for the SFT runs, the anchor for OPD, RLVR and the controls), over
`DiagnosticsConfig.trajectory_types` (the attention matrices), the unweighted mean over matrices
per snapshot.

Choices where the paper is silent: the endpoint table's "max principal angle, representative
layer" is the larger of the input- and output-side maximum angles of the representative matrix
(the geometry default: the middle layer's query projection), and the angle-curve figure shows its
input-side curve (the paper's right singular vectors); `max_angle_mean_deg` is the mean over
matrices of the per-matrix maximum.

Beside the aggregates, each endpoint entry keeps what the figures draw: `per_matrix` (type, layer,
entry count, bf16 sparsity and the two mask overlaps of every weight: the per-layer localisation
heatmaps, the paper's Fig 3) and the singular values of the representative matrix's W_0, W_1
(`sigma0`, `sigma1`) and of its update dW (`sigma_dw`, float64 SVD of one matrix: the paper's Fig 2
panel).

Update-mask consensus (The Path Not Taken, Table 2 style; `mask_consensus`): the Jaccard index
|A & B| / |A | B| of the sets of bf16-changed entries of two runs from one origin (seeds of one
method; the first seeds of two methods), every weight pooled, beside the random baseline of masks
of the same sizes placed independently.

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

import dataclasses
import math
import re
from typing import Callable, Mapping

import numpy as np

from opd_jax.study.config import DiagnosticsConfig


def _finite(x):
  return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _per_matrix(per: Mapping) -> dict:
  """What the localisation heatmaps need of every analysed weight (1-D ones included: they
  enter sparsity): {name: {type, layer, n, sparsity, overlap_principal, overlap_low}}; the
  overlaps are None for 1-D weights and for matrices with no visible change."""
  out = {}
  for name, d in per.items():
    out[name] = {"type": d["type"], "layer": d.get("layer"), "n": int(d["n"]),
                 "sparsity": float(d["sparsity"]),
                 "overlap_principal": _finite(d.get("overlap_principal")),
                 "overlap_low": _finite(d.get("overlap_low"))}
  return out


def endpoint_summary(out: Mapping, alpha: float, sigma_dw: list[float] | None = None) -> dict:
  """The report's endpoint entry from `geometry.endpoint.endpoint_metrics` output.

  `sigma_dw`: the singular values of the representative matrix's update dW
  (`update_singular_values`), kept as `sigma_dw` when given.
  """
  from opd_jax.geometry import matrices as geo_matrices
  overall, by_type, per = out["overall"], out["by_type"], out["matrices"]
  mats = {n: d for n, d in per.items() if d["type"] in geo_matrices.MATRIX_TYPES}
  rep = out.get("representative", {})
  rep_name = rep.get("name")
  rep_max = _finite(per[rep_name].get("max_angle_deg")) if rep_name in per else None
  summary = {
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
      "per_matrix": _per_matrix(per),
  }
  if "sigma0" in rep:  # singular values of the representative W_0 and W_1, descending
    summary["sigma0"] = [float(x) for x in rep["sigma0"]]
    summary["sigma1"] = [float(x) for x in rep["sigma1"]]
  if sigma_dw is not None:
    summary["sigma_dw"] = [float(x) for x in sigma_dw]
  return summary


def update_singular_values(p0, p1, name: str) -> list[float]:
  """The singular values (descending, float64) of dW = W_1 - W_0 of the matrix `name`.

  Args:
    p0, p1: params dicts or checkpoint paths (`geometry.matrices.resolve_params`).
    name: a matrix name of `geometry.matrices.named_matrices` (e.g. 'layers.1.attn.q_proj').
  """
  from opd_jax.geometry import matrices as geo_matrices

  def find(params):
    for m in geo_matrices.named_matrices(params):
      if m.name == name:
        return np.asarray(m.array, np.float64)
    raise KeyError(f"no matrix {name!r} in the params")

  d_IxO = find(p1) - find(p0)
  return np.linalg.svd(d_IxO, compute_uv=False).tolist()


def trajectory_summary(out: Mapping) -> dict:
  """The report's trajectory entry from `geometry.trajectory.trajectory_metrics` output."""
  ov = out["overall"]
  return {"steps": [int(s) for s in out["steps"]], "progress": list(out["progress"]),
          "stable_rank": ov["stable_rank"], "frobenius": ov["frobenius"],
          "hill": ov.get("hill", []), "sim_k": ov.get("sim_end", []),
          "sim_prev": ov.get("sim_prev", []),
          "by_type": {t: {"stable_rank": d["stable_rank"], "frobenius": d["frobenius"]}
                      for t, d in out["by_type"].items()}}


def compute(endpoint_pairs: Mapping[str, tuple], origins: Mapping[str, object],
            trajectories: Mapping[str, Mapping], cfg: DiagnosticsConfig,
            log: Callable[[str], None] = print) -> dict:
  """Endpoint metrics per method and trajectory metrics per run.

  Args:
    endpoint_pairs: {method: (W_0 source, W_1 source)} (params dicts or checkpoint paths).
    origins: {run: W_0 source of the run's trajectory} for every run of `trajectories`.
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
    p0, p1 = geo_matrices.resolve_params(p0), geo_matrices.resolve_params(p1)
    res = geo_endpoint.endpoint_metrics(p0, p1, ecfg)
    rep = res.get("representative", {}).get("name")
    sigma_dw = update_singular_values(p0, p1, rep) if rep else None
    out["endpoint"][method] = endpoint_summary(res, cfg.mask_alpha, sigma_dw=sigma_dw)
  loaded = {}   # origins by path: most trajectories share one
  for run, snaps in trajectories.items():
    log(f"[study] diagnostics: trajectory {run}")
    src = origins[run]
    key = str(src) if not isinstance(src, Mapping) else id(src)
    if key not in loaded:
      loaded[key] = geo_matrices.resolve_params(src)
    steps = sorted(snaps)
    res = geo_trajectory.trajectory_metrics(loaded[key], [snaps[s] for s in steps], steps,
                                            tcfg, modules=cfg.trajectory_types)
    out["trajectory"][run] = dict(trajectory_summary(res), sim_k_rank=cfg.sim_k)   # Sim_K's K
  return out


def same_params(a, b) -> bool:
  """Whether two models (params dicts or checkpoint paths) hold bit-identical weights."""
  import jax  # noqa: PLC0415
  from opd_jax.geometry import matrices as geo_matrices
  pa, pb = geo_matrices.resolve_params(a), geo_matrices.resolve_params(b)
  la, lb = jax.tree_util.tree_leaves_with_path(pa), jax.tree_util.tree_leaves_with_path(pb)
  return (len(la) == len(lb) and all(
      ka == kb and np.shape(x) == np.shape(y) and np.array_equal(np.asarray(x), np.asarray(y))
      for (ka, x), (kb, y) in zip(la, lb)))


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


# -- update-mask consensus across runs (The Path Not Taken, Table 2 style) -------------------------
@dataclasses.dataclass(frozen=True)
class UpdateMask:
  """The bf16-visible update mask of one weight (`geometry.linalg.bf16_changed`), bit-packed.

  Attributes:
    name, module_type, layer: as `geometry.matrices.Matrix`.
    n: number of entries.
    bits_u8: `np.packbits` of the flattened boolean mask (ceil(n / 8) bytes, zero-padded).
  """

  name: str
  module_type: str
  layer: int | None
  n: int
  bits_u8: np.ndarray

  @property
  def changed(self) -> int:
    return int(np.bitwise_count(self.bits_u8).sum())


def update_masks(p0, p1) -> dict[str, UpdateMask]:
  """{name: UpdateMask} of every weight (1-D ones included, as in sparsity) of W_0 -> W_1.

  Args:
    p0, p1: params dicts or checkpoint paths of the same structure.
  """
  from opd_jax.geometry import linalg as geo_linalg
  from opd_jax.geometry import matrices as geo_matrices
  m0 = geo_matrices.named_matrices(p0, include_1d=True)
  m1 = {m.name: m for m in geo_matrices.named_matrices(p1, include_1d=True)}
  if set(m1) != {m.name for m in m0}:
    raise ValueError(f"update masks: W_0 and W_1 differ in structure "
                     f"({len(m0)} vs {len(m1)} weights)")
  out = {}
  for m in m0:
    a1 = m1[m.name].array
    if tuple(a1.shape) != tuple(m.shape):
      raise ValueError(f"{m.name}: shape {tuple(m.shape)} in W_0 vs {tuple(a1.shape)} in W_1")
    changed = np.asarray(geo_linalg.bf16_changed(m.array, a1)).ravel()
    out[m.name] = UpdateMask(m.name, m.module_type, m.layer, int(changed.size),
                             np.packbits(changed))
  return out


def _jaccard_counts(a: UpdateMask, b: UpdateMask) -> dict:
  """Counts of two masks of one weight and the random baseline's expected counts: masks of the
  same sizes placed independently and uniformly (E|A & B| = |A||B| / n,
  E|A | B| = |A| + |B| - |A||B| / n)."""
  ca, cb, n = a.changed, b.changed, a.n
  inter = int(np.bitwise_count(a.bits_u8 & b.bits_u8).sum())
  e_inter = ca * cb / n if n else 0.0
  return {"n": n, "changed_a": ca, "changed_b": cb, "intersection": inter,
          "union": ca + cb - inter, "expected_intersection": e_inter,
          "expected_union": ca + cb - e_inter}


def _jaccard_of(counts: list[dict]) -> dict:
  """Jaccard index and its random baseline over the pooled counts (None when no weight changed
  in either run)."""
  tot = {k: sum(c[k] for c in counts) for k in counts[0]}
  return dict(tot, jaccard=tot["intersection"] / tot["union"] if tot["union"] else None,
              baseline=(tot["expected_intersection"] / tot["expected_union"]
                        if tot["expected_union"] else None))


def mask_jaccard(masks_a: Mapping[str, UpdateMask], masks_b: Mapping[str, UpdateMask]) -> dict:
  """Jaccard index |A & B| / |A | B| of two runs' update masks from the same W_0.

  Returns {'matrices': {name: {type, layer, n, changed_a, changed_b, intersection, union,
  expected_intersection, expected_union, jaccard, baseline}}, 'overall': {... over every weight
  pooled: the index of the two sets of changed entries of the whole model}, 'by_type': {type:
  {... pooled over the weights of that type}}}. `baseline` is the random baseline's Jaccard
  (expected intersection / expected union, `_jaccard_counts`).
  """
  if set(masks_a) != set(masks_b):
    raise ValueError("mask_jaccard: the two runs' masks cover different weights")
  per = {}
  for name, a in masks_a.items():
    b = masks_b[name]
    if a.n != b.n:
      raise ValueError(f"{name}: {a.n} entries vs {b.n}")
    c = _jaccard_counts(a, b)
    per[name] = dict(_jaccard_of([c]), type=a.module_type, layer=a.layer)
  types: dict[str, list[dict]] = {}
  for d in per.values():
    types.setdefault(d["type"], []).append(d)
  strip = ("type", "layer", "jaccard", "baseline")

  def pooled(ds):
    return _jaccard_of([{k: v for k, v in d.items() if k not in strip} for d in ds])

  return {"matrices": per, "overall": pooled(list(per.values())),
          "by_type": {t: pooled(ds) for t, ds in types.items()}}


def update_mask_jaccard(w0, w1a, w1b) -> dict:
  """`mask_jaccard` of two runs W_0 -> W_1a and W_0 -> W_1b (params dicts or checkpoint paths):
  A = the entries whose bf16 code changed from W_0 to W_1a, B likewise for W_1b."""
  from opd_jax.geometry import matrices as geo_matrices
  w0 = geo_matrices.resolve_params(w0)
  return mask_jaccard(update_masks(w0, w1a), update_masks(w0, w1b))


def mask_consensus(origin, families: Mapping[str, Mapping[str, object]],
                   log: Callable[[str], None] = print) -> dict:
  """Update-mask consensus across runs from one origin: the Jaccard index of every pair of seeds
  of a family, and of the first runs of every two families (e.g. OPD vs RLVR: the consensus
  across methods, the comparison for the within-method values).

  Args:
    origin: W_0 of every run (params dict or checkpoint path).
    families: {family: {run name: W_1 source}} (first seed first).

  Returns {group: {kind ('seeds' | 'methods'), runs, pairs: [{a, b, jaccard, baseline,
  by_type: {type: jaccard}}], jaccard_mean, jaccard_min, jaccard_max, baseline_mean,
  by_type: {type: mean jaccard over pairs}}}; a family's group is its name, a cross-family
  group is '<a> vs <b>'. Families with one run contribute only to cross-family groups. Each
  run's mask is computed once (bit-packed: n / 8 bytes per run).
  """
  from opd_jax.geometry import matrices as geo_matrices
  origin = geo_matrices.resolve_params(origin)
  masks: dict[str, dict[str, UpdateMask]] = {}

  def get(run, src):
    if run not in masks:
      log(f"[study] diagnostics: update mask {run}")
      masks[run] = update_masks(origin, src)
    return masks[run]

  groups: dict[str, tuple[str, list[tuple[str, object]]]] = {}
  for fam, runs in families.items():
    if len(runs) >= 2:
      groups[fam] = ("seeds", list(runs.items()))
  firsts = [(fam, next(iter(runs.items()))) for fam, runs in families.items() if runs]
  for i in range(len(firsts)):
    for j in range(i + 1, len(firsts)):
      groups[f"{firsts[i][0]} vs {firsts[j][0]}"] = ("methods", [firsts[i][1], firsts[j][1]])
  out = {}
  for group, (kind, runs) in groups.items():
    pairs = []
    for i in range(len(runs)):
      for j in range(i + 1, len(runs)):
        (ra, sa), (rb, sb) = runs[i], runs[j]
        res = mask_jaccard(get(ra, sa), get(rb, sb))
        pairs.append({"a": ra, "b": rb, "jaccard": res["overall"]["jaccard"],
                      "baseline": res["overall"]["baseline"],
                      "by_type": {t: d["jaccard"] for t, d in res["by_type"].items()}})
    js = [p["jaccard"] for p in pairs if p["jaccard"] is not None]
    bs = [p["baseline"] for p in pairs if p["baseline"] is not None]
    types = list(dict.fromkeys(t for p in pairs for t in p["by_type"]))
    by_type = {}
    for t in types:
      vals = [p["by_type"].get(t) for p in pairs]
      vals = [v for v in vals if v is not None]
      by_type[t] = float(np.mean(vals)) if vals else None
    out[group] = {"kind": kind, "runs": [r for r, _ in runs], "pairs": pairs,
                  "jaccard_mean": float(np.mean(js)) if js else None,
                  "jaccard_min": min(js, default=None), "jaccard_max": max(js, default=None),
                  "baseline_mean": float(np.mean(bs)) if bs else None, "by_type": by_type}
  return out

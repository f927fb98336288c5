"""Verdicts computed from the study's results, one per claim in `paper.CLAIMS`, and the acceptance check.

Every verdict is `holds`, `does not hold`, or `not measured` (the data it needs is absent, e.g. a
preset that runs a single mixing alpha). Choices the paper leaves open, fixed here:

  * Orderings are strict on the measured aggregate values.
  * Accuracy comparisons use a noise tolerance `tol = z * sqrt(se_a^2 + se_b^2)` (z = 2) from the
    standard errors stored with each accuracy; "keeps" means `projected >= plain - tol`, "loses"
    means `projected < plain - tol`. "Raises above the anchor" (the acceptance) is strict `>`.
  * Trajectory similarity: the distance between two stable-rank trajectories is the mean absolute
    log-ratio over the checkpoints (trajectories of different lengths are compared at the shorter
    one's progress points by linear interpolation in progress). "OPD-like" means OPD is the nearest
    of the reference trajectories {SFT, OPD, RLVR}.
  * Stable-rank shapes: "expands" = last > first; "contracts" = last < first; "narrow band" = the
    smallest max/min ratio of the three methods.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from opd_jax.study import paper

HOLDS, FAILS, MISSING = "holds", "does not hold", "not measured"
Z = 2.0
REFERENCES = ("sft", "opd", "rlvr")


class _Missing(Exception):
  pass


def _get(d: Any, *keys):
  for k in keys:
    if not isinstance(d, dict) or k not in d or d[k] is None:
      raise _Missing("/".join(map(str, keys)))
    d = d[k]
  return d


def _fmt(x: float, pct: bool = False) -> str:
  if pct:
    return f"{100 * x:.1f}%"
  if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4):
    return f"{x:.2e}"
  return f"{x:.3g}"


def _order(results, key, increasing: bool, pct=False):
  vals = {m: float(_get(results, "endpoint", m, key)) for m in paper.METHODS}
  seq = [vals[m] for m in paper.METHODS]
  ok = all((a < b) if increasing else (a > b) for a, b in zip(seq, seq[1:]))
  return ok, ", ".join(f"{m.upper()} {_fmt(vals[m], pct)}" for m in paper.METHODS)


def _band(results, method, lo_hi):
  v = float(_get(results, "endpoint", method, "sparsity"))
  lo, hi = lo_hi
  return lo <= v <= hi, f"{method.upper()} {_fmt(v, True)}"


def _acc(results, run):
  a = _get(results, "accuracy", run)
  return float(a["acc"]), float(a.get("stderr", 0.0))


def _trajectory(results, run, key="stable_rank"):
  t = _get(results, "trajectory", run)
  x = np.asarray(t["progress"], float)
  y = np.asarray(t[key], float)
  if len(x) == 0 or len(x) != len(y):
    raise _Missing(f"trajectory/{run}/{key}")
  return x, y


def trajectory_distance(results, run_a: str, run_b: str, key="stable_rank") -> float:
  """Mean |log(y_a / y_b)| over the checkpoints of the shorter trajectory (interpolated in progress)."""
  xa, ya = _trajectory(results, run_a, key)
  xb, yb = _trajectory(results, run_b, key)
  if len(xb) < len(xa):
    xa, ya, xb, yb = xb, yb, xa, ya
  yb_at = np.interp(xa, xb, yb)
  eps = 1e-12
  return float(np.mean(np.abs(np.log((ya + eps) / (yb_at + eps)))))


def nearest_reference(results, run: str) -> tuple[str, dict[str, float]]:
  dists = {}
  for ref in REFERENCES:
    try:
      dists[ref] = trajectory_distance(results, run, ref)
    except _Missing:
      pass
  if "opd" not in dists or len(dists) < 2:
    raise _Missing(f"reference trajectories for {run}")
  return min(dists, key=dists.get), dists


def _dist_text(run, nearest, dists):
  return f"{run}: nearest {nearest.upper()} (" + ", ".join(
      f"d_{k}={v:.3f}" for k, v in dists.items()) + ")"


# -- one function per claim id: results -> (holds: bool, ours: str) ------------------------------
def _v_sparsity_order(r):
  return _order(r, "sparsity", increasing=True, pct=True)


def _v_opd_band(r):
  return _band(r, "opd", paper.OPD_VARIANT_SPARSITY)


def _v_sft_band(r):
  return _band(r, "sft", paper.PUBLISHED_SPARSITY["sft"])


def _v_rlvr_band(r):
  return _band(r, "rlvr", paper.PUBLISHED_SPARSITY["rlvr"])


def _v_density_order(r):
  return _order(r, "density", increasing=False, pct=True)


def _v_angle_order(r):
  ok, text = _order(r, "max_angle_deg", increasing=False)
  return ok, text.replace(",", " deg,") + " deg"


def _v_nss_order(r):
  return _order(r, "nss", increasing=False)


def _v_lowmag_order(r):
  return _order(r, "low_mag_overlap", increasing=True, pct=True)


def _v_principal(r):
  vals = {m: float(_get(r, "endpoint", m, "principal_overlap")) for m in paper.METHODS}
  base = float(_get(r, "endpoint", "opd", "baseline"))
  ok = (vals["sft"] == max(vals.values()) and vals["rlvr"] == min(vals.values())
        and vals["opd"] < base)
  text = ", ".join(f"{m.upper()} {_fmt(v, True)}" for m, v in vals.items())
  return ok, f"{text}; baseline {_fmt(base, True)}"


def _v_stable_rank_shapes(r):
  parts, ok = [], True
  band = {}
  for m in paper.METHODS:
    _, y = _trajectory(r, m)
    band[m] = float(np.max(y) / max(np.min(y), 1e-12))
    parts.append(f"{m.upper()} {_fmt(y[0])} -> {_fmt(y[-1])} (band x{band[m]:.2f})")
  _, sft = _trajectory(r, "sft")
  _, rl = _trajectory(r, "rlvr")
  ok = sft[-1] > sft[0] and rl[-1] < rl[0] and band["opd"] == min(band.values())
  return ok, "; ".join(parts)


def _v_sim16(r):
  first = {m: float(_trajectory(r, m, "sim_k")[1][0]) for m in paper.METHODS}
  ok = first["opd"] > first["sft"] and first["opd"] > first["rlvr"]
  return ok, ", ".join(f"{m.upper()} {v:.3f}" for m, v in first.items())


def _rank16(r, method):
  d = _get(r, "rank16", method)
  plain, se_p = _acc(r, d["plain_run"])
  proj, se_q = _acc(r, d["projected_run"])
  tol = Z * math.sqrt(se_p ** 2 + se_q ** 2)
  return plain, proj, tol


def _v_rank16_opd(r):
  plain, proj, tol = _rank16(r, "opd")
  return proj >= plain - tol, f"plain {plain:.3f}, rank-16 {proj:.3f} (noise tol {tol:.3f})"


def _v_rank16_sft(r):
  plain, proj, tol = _rank16(r, "sft")
  return proj < plain - tol, f"plain {plain:.3f}, rank-16 {proj:.3f} (noise tol {tol:.3f})"


def _v_sparsify(r):
  runs = list(_get(r, "controls", "sparsify"))
  if not runs:
    raise _Missing("controls/sparsify")
  texts, ok = [], True
  for run in runs:
    near, dists = nearest_reference(r, run)
    ok &= near == "opd"
    texts.append(_dist_text(run, near, dists))
  return ok, "; ".join(texts)


def _v_offpolicy(r):
  runs = list(_get(r, "controls", "offpolicy"))
  if not runs:
    raise _Missing("controls/offpolicy")
  near, dists = nearest_reference(r, runs[0])
  return near == "opd", _dist_text(runs[0], near, dists)


def _v_offpolicy_norm(r):
  runs = list(_get(r, "controls", "offpolicy"))
  if not runs:   # the control switched off (`controls.offpolicy=False`)
    raise _Missing("controls/offpolicy")
  run = runs[0]
  off = float(_trajectory(r, run, "frobenius")[1][-1])
  opd = float(_trajectory(r, "opd", "frobenius")[1][-1])
  return off > opd, f"||dW||_F off-policy {_fmt(off)} vs OPD {_fmt(opd)} (x{off / opd:.2f})"


def _mixing(r):
  mix = dict(_get(r, "controls", "mixing"))  # run -> alpha
  if not mix:
    raise _Missing("controls/mixing")
  return mix


def _v_mixing_dominant(r):
  runs = {k: a for k, a in _mixing(r).items() if a >= 0.5}
  if not runs:
    raise _Missing("mixing runs with alpha >= 0.5")
  texts, ok = [], True
  for run in sorted(runs, key=runs.get, reverse=True):
    near, dists = nearest_reference(r, run)
    ok &= near == "opd"
    texts.append(_dist_text(run, near, dists))
  return ok, "; ".join(texts)


def _v_mixing_small(r):
  mix = _mixing(r)
  run = min(mix, key=mix.get)
  if mix[run] >= 0.5:
    raise _Missing("a mixing run with alpha < 0.5")
  d_opd = trajectory_distance(r, run, "opd")
  d_rl = trajectory_distance(r, run, "rlvr")
  return d_rl < d_opd, f"{run} (alpha {mix[run]}): d_opd={d_opd:.3f}, d_rlvr={d_rl:.3f}"


def _improves(r, run):
  a, se_a = _acc(r, run)
  b, _ = _acc(r, "anchor")
  return a > b, f"{run.upper()} {a:.3f} vs anchor {b:.3f} (delta {a - b:+.3f}, se {se_a:.3f})"


VERDICTS: dict[str, Callable[[dict], tuple[bool, str]]] = {
    "sparsity_order": _v_sparsity_order,
    "opd_sparsity_band": _v_opd_band,
    "sft_sparsity_band": _v_sft_band,
    "rlvr_sparsity_band": _v_rlvr_band,
    "density_order": _v_density_order,
    "angle_order": _v_angle_order,
    "nss_order": _v_nss_order,
    "lowmag_order": _v_lowmag_order,
    "principal_overlap": _v_principal,
    "stable_rank_shapes": _v_stable_rank_shapes,
    "sim16_early": _v_sim16,
    "rank16_opd_keeps": _v_rank16_opd,
    "rank16_sft_loses": _v_rank16_sft,
    "sparsify_unchanged": _v_sparsify,
    "offpolicy_matches": _v_offpolicy,
    "offpolicy_norm": _v_offpolicy_norm,
    "mixing_opd_dominant": _v_mixing_dominant,
    "mixing_small_alpha": _v_mixing_small,
    "opd_improves": lambda r: _improves(r, "opd"),
    "rlvr_improves": lambda r: _improves(r, "rlvr"),
}
assert set(VERDICTS) == set(paper.CLAIM_IDS), "every claim needs exactly one verdict function"


def compute_verdicts(results: dict) -> list[dict]:
  """One dict per claim: id, section, claim, paper, ours, verdict."""
  out = []
  for c in paper.CLAIMS:
    try:
      ok, ours = VERDICTS[c.id](results)
      verdict = HOLDS if ok else FAILS
    except _Missing as e:
      ours, verdict = f"missing: {e}", MISSING
    out.append({"id": c.id, "section": c.section, "claim": c.text, "paper": c.paper,
                "ours": ours, "verdict": verdict})
  return out


# -- acceptance thresholds (`opd-jax study --check`) -----------------------------------------------
def check(results: dict) -> list[str]:
  """Failed acceptance thresholds, each a message naming the threshold; empty when all hold.

  Thresholds come from `results['thresholds']` (`teacher_min`, `base_min`, `base_max`); OPD and
  RLVR must be strictly above the anchor.
  """
  th = results.get("thresholds")
  if not isinstance(th, dict):
    return ["results.json has no 'thresholds' section"]
  acc = results.get("accuracy", {})
  fails = []

  def get(run):
    entry = acc.get(run)
    if not isinstance(entry, dict) or "acc" not in entry:
      fails.append(f"accuracy of {run!r} missing from results.json")
      return None
    return float(entry["acc"])

  teacher, base, anchor = get("teacher"), get("base"), get("anchor")
  opd, rlvr = get("opd"), get("rlvr")
  if teacher is not None and not teacher >= th["teacher_min"]:
    fails.append(f"teacher_min: teacher eval accuracy {teacher:.3f} < {th['teacher_min']}")
  if base is not None and not th["base_min"] <= base <= th["base_max"]:
    fails.append(f"base_range: base student accuracy {base:.3f} outside "
                 f"[{th['base_min']}, {th['base_max']}]")
  for name, v in (("opd", opd), ("rlvr", rlvr)):
    if v is not None and anchor is not None and not v > anchor:
      fails.append(f"{name}_above_anchor: {name.upper()} accuracy {v:.3f} not above the anchor's "
                   f"{anchor:.3f}")
  return fails

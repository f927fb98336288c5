"""Verdicts computed from the study's results under a stated noise model, one per claim in
`paper.CLAIMS`, and the acceptance check.

Every verdict is `holds`, `does not hold`, `not resolved` (the data cannot tell at z = 2 standard
errors, e.g. the seeds disagree), or `not measured` (the data it needs is absent, e.g. a preset that
runs a single mixing alpha). The rules (`RULES`; the report prints them in its header and names
the one each verdict used):

  * Estimates. A quantity measured on the n seeds of a seeded run family (`results['seeds']`) is
    their mean with standard error SE = sd / sqrt(n) (sd with n - 1 degrees of freedom). A quantity
    fixed by the shared runs (the anchor's, teacher's and base's accuracy) has no seed spread: SE 0
    (the study is conditional on its one anchor). A quantity that varies with the seed but was
    measured on one seed has an unknown spread: SE = infinity, so every comparison that needs it is
    NOT RESOLVED. Chosen over treating one seed as exact because a single run cannot separate an
    effect from seed noise (the issue that motivated this: orderings decided by 7.48% vs 7.99% on
    one seed); only comparisons between fixed quantities (SE 0 on both sides) are then decided
    exactly, by strict comparison.
  * Accuracy. SE = sqrt(SE_seeds^2 + SE_problems^2): SE_seeds as above over the per-seed avg@k;
    SE_problems = the mean over seeds of the avg@k standard error over the distinct eval problems
    (problems are the unit, not samples). Every seed is evaluated on the same problems, so the
    problem term is not divided by n (the mean of the per-seed problem SEs bounds the problem SE
    of the seed mean from above).
  * Ordering a < b: d = mean(b) - mean(a), SE_d = sqrt(SE_a^2 + SE_b^2) (independent runs,
    unpaired); HOLDS when d > z SE_d, DOES NOT HOLD when -d > z SE_d, else NOT RESOLVED (z = 2).
    A chain (SFT < OPD < RLVR) or a conjunction HOLDS when every link holds, DOES NOT HOLD when any
    link does not hold, else NOT RESOLVED.
  * Band [lo, hi]: HOLDS when [mean - z SE, mean + z SE] lies inside the band, DOES NOT HOLD when it
    lies entirely outside, else NOT RESOLVED.
  * Rank-16 "keeps": DOES NOT HOLD when the projected arm is below the plain arm beyond noise
    (ordering rule), HOLDS otherwise when the projected arm is above the anchor beyond noise (it
    still learns), else NOT RESOLVED. "Loses": the ordering projected < plain.
  * Controls run once (one seed). A trajectory distance from a control to a reference method is
    computed against every seed of the reference; its SE is the spread over the reference seeds
    (the control's own run-to-run spread is not measured). "Nearest reference is OPD" is the
    conjunction d_OPD < d_ref for the other references. The off-policy norm comparison gives the
    single off-policy run the per-run sd of OPD's seeds (same setup, one draw) as its spread.

Choices the paper leaves open, fixed here:

  * Trajectory similarity: the distance between two stable-rank trajectories is the mean absolute
    log-ratio over the checkpoints (trajectories of different lengths are compared at the shorter
    one's progress points by linear interpolation in progress).
  * Stable-rank shapes: "expands" = last - first > 0 (per seed); "contracts" = last - first < 0;
    "narrow band" = OPD's max/min ratio below SFT's and RLVR's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from opd_jax.study import paper

HOLDS, FAILS, UNRESOLVED, MISSING = "holds", "does not hold", "not resolved", "not measured"
Z = 2.0
REFERENCES = ("sft", "opd", "rlvr")
FIXED_RUNS = ("teacher", "base", "anchor")   # measured once by design: no seed spread

RULES = {
    "order": f"a < b HOLDS when mean(b) - mean(a) > {Z:g} SE_d, DOES NOT HOLD when "
             f"mean(a) - mean(b) > {Z:g} SE_d, else NOT RESOLVED; SE_d = sqrt(SE_a^2 + SE_b^2), "
             "SE = sd across seeds / sqrt(n) (0 for a quantity fixed by the shared anchor, "
             "infinite for one seed of a quantity that varies); a chain or conjunction holds "
             "when every link holds and does not hold when any link does not",
    "band": f"HOLDS when mean +- {Z:g} SE lies inside the band, DOES NOT HOLD when it "
            "lies entirely outside, else NOT RESOLVED (SE as for orderings)",
    "accuracy": "the ordering rule with SE = sqrt(SE_seeds^2 + "
                "SE_problems^2), SE_problems = mean over seeds of the avg@k standard error over "
                "distinct eval problems",
    "keeps": "DOES NOT HOLD when projected < plain beyond noise, HOLDS otherwise "
             "when projected > anchor beyond noise, else NOT RESOLVED (accuracy SEs)",
    "control": "d(control, reference seed) for every seed of each "
               "reference, SE across the reference seeds (the control runs once: its own "
               "spread is not measured); then the ordering rule",
    "control_norm": "the ordering rule, the single off-policy run given the per-run "
                    "sd of OPD's seeds as its spread",
}
RULE_SHORT = {
    "order": f"ordering, {Z:g} SE across seeds",
    "band": f"band, mean +- {Z:g} SE",
    "accuracy": f"accuracy ordering, {Z:g} SE (seeds + problems)",
    "keeps": f"rank-16 keeps, {Z:g} SE (seeds + problems)",
    "control": f"control distances, {Z:g} SE across reference seeds",
    "control_norm": f"ordering, {Z:g} SE (OPD seed sd for the control)",
}


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


# -- the noise model -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Estimate:
  """A measured quantity under the noise model (module docstring).

  Attributes:
    mean: the mean over seeds.
    se: its standard error: 0.0 for a quantity fixed by the shared runs, math.inf for one seed of
      a quantity that varies with the seed.
    n: the number of seeds measured.
    values: the per-seed values.
    fixed: fixed by the shared runs (no seed spread).
  """

  mean: float
  se: float
  n: int
  values: tuple[float, ...]
  fixed: bool = False

  def text(self, pct: bool = False) -> str:
    if self.fixed and self.se == 0:
      return f"{_fmt(self.mean, pct)} (fixed)"
    if math.isinf(self.se):
      return f"{_fmt(self.mean, pct)} (1 seed, spread unknown)"
    se = f"{100 * self.se:.1f}%" if pct else _fmt(self.se)
    return f"{_fmt(self.mean, pct)} +- {se} (n={self.n})"

  def to_dict(self) -> dict:
    return {"mean": self.mean, "se": None if math.isinf(self.se) else self.se, "n": self.n,
            "values": list(self.values), "fixed": self.fixed}


def seed_sd(values: Sequence[float]) -> float:
  """The sample standard deviation across seeds (n - 1 degrees of freedom); inf for one seed."""
  v = np.asarray(values, float)
  return float(np.std(v, ddof=1)) if v.size >= 2 else math.inf


def estimate(values: Sequence[float], fixed: bool = False) -> Estimate:
  """Mean and SE across seeds (module docstring); `fixed`: measured once by design (SE 0)."""
  v = tuple(float(x) for x in values)
  if not v:
    raise _Missing("no values")
  if fixed:
    if len(v) != 1:
      raise ValueError(f"a fixed quantity is measured once, got {len(v)} values")
    return Estimate(v[0], 0.0, 1, v, fixed=True)
  se = seed_sd(v) / math.sqrt(len(v))
  return Estimate(float(np.mean(v)), se, len(v), v)


def accuracy_estimate(entries: Sequence[dict], fixed: bool = False) -> Estimate:
  """Mean avg@k across seeds, SE = sqrt(SE_seeds^2 + SE_problems^2) (module docstring)."""
  accs = [float(e["acc"]) for e in entries]
  problems = float(np.mean([float(e.get("stderr", 0.0)) for e in entries]))
  seeds = estimate(accs, fixed)
  return dataclasses.replace(seeds, se=math.sqrt(seeds.se ** 2 + problems ** 2))


def less(a: Estimate, b: Estimate, z: float = Z) -> str:
  """The outcome of the claim a < b under the ordering rule."""
  d = b.mean - a.mean
  se = math.sqrt(a.se ** 2 + b.se ** 2)
  if d > z * se:
    return HOLDS
  if -d > z * se:
    return FAILS
  return UNRESOLVED


def within(a: Estimate, lo: float, hi: float, z: float = Z) -> str:
  """The outcome of the claim lo <= a <= hi under the band rule."""
  low, high = a.mean - z * a.se, a.mean + z * a.se
  if lo <= low and high <= hi:
    return HOLDS
  if high < lo or low > hi:
    return FAILS
  return UNRESOLVED


def all_of(outcomes: Sequence[str]) -> str:
  """A conjunction: holds when every part holds, does not hold when any part does not."""
  if outcomes and all(o == HOLDS for o in outcomes):
    return HOLDS
  if any(o == FAILS for o in outcomes):
    return FAILS
  return UNRESOLVED


# -- per-seed values out of a results dict ---------------------------------------------------------
def seed_runs(results: dict, family: str) -> list[str]:
  """The runs of a seeded family ('opd' -> ['opd', 'opd_seed1', ...]); [family] without seeds."""
  runs = results.get("seeds", {}).get("runs", {}).get(family)
  return list(runs) if runs else [family]


def endpoint_estimate(results: dict, method: str, key: str) -> Estimate:
  entries = results.get("endpoint_seeds", {}).get(method) or [_get(results, "endpoint", method)]
  fixed = method in results.get("seeds", {}).get("fixed_endpoints", ())
  return estimate([_get(e, key) for e in entries], fixed=fixed)


def acc_estimate(results: dict, family: str) -> Estimate:
  if family in FIXED_RUNS:
    return accuracy_estimate([_get(results, "accuracy", family)], fixed=True)
  return accuracy_estimate([_get(results, "accuracy", r) for r in seed_runs(results, family)])


def _trajectory(results, run, key="stable_rank"):
  t = _get(results, "trajectory", run)
  x = np.asarray(_get(t, "progress"), float)
  y = np.asarray(_get(t, key), float)
  if len(x) == 0 or len(x) != len(y):
    raise _Missing(f"trajectory/{run}/{key}")
  return x, y


def trajectory_estimate(results: dict, family: str, fn: Callable[[np.ndarray], float],
                        key: str = "stable_rank") -> Estimate:
  """`fn(trajectory values)` for every seed of `family`, as an Estimate."""
  return estimate([fn(_trajectory(results, r, key)[1]) for r in seed_runs(results, family)])


def trajectory_distance(results, run_a: str, run_b: str, key="stable_rank") -> float:
  """Mean |log(y_a / y_b)| over the checkpoints of the shorter trajectory (interpolated in progress)."""
  xa, ya = _trajectory(results, run_a, key)
  xb, yb = _trajectory(results, run_b, key)
  if len(xb) < len(xa):
    xa, ya, xb, yb = xb, yb, xa, ya
  yb_at = np.interp(xa, xb, yb)
  eps = 1e-12
  return float(np.mean(np.abs(np.log((ya + eps) / (yb_at + eps)))))


def reference_distances(results, run: str) -> dict[str, Estimate]:
  """Distance from `run` to every seed of each reference method (SE across reference seeds)."""
  out = {}
  for ref in REFERENCES:
    try:
      out[ref] = estimate([trajectory_distance(results, run, r)
                           for r in seed_runs(results, ref)])
    except _Missing:
      pass
  if "opd" not in out or len(out) < 2:
    raise _Missing(f"reference trajectories for {run}")
  return out


def nearest_reference(results, run: str) -> tuple[str, dict[str, float]]:
  """The reference with the smallest mean distance, and the mean distances."""
  dists = {k: e.mean for k, e in reference_distances(results, run).items()}
  return min(dists, key=dists.get), dists


def _nearest_opd(results, run) -> tuple[str, str]:
  d = reference_distances(results, run)
  outcome = all_of([less(d["opd"], e) for ref, e in d.items() if ref != "opd"])
  text = f"{run}: " + ", ".join(f"d_{k} {e.text()}" for k, e in d.items())
  return outcome, text


# -- one function per claim id: results -> (outcome, ours, rule) ---------------------------------
def _order(r, key, increasing: bool, pct=False):
  """The chain SFT < OPD < RLVR (increasing) or SFT > OPD > RLVR of an endpoint metric."""
  est = {m: endpoint_estimate(r, m, key) for m in paper.METHODS}
  links = []
  for a, b in zip(paper.METHODS, paper.METHODS[1:]):
    outcome = less(est[a], est[b]) if increasing else less(est[b], est[a])
    links.append((f"{a.upper()}{'<' if increasing else '>'}{b.upper()}", outcome))
  text = ", ".join(f"{m.upper()} {est[m].text(pct)}" for m in paper.METHODS)
  text += "; " + ", ".join(f"{name}: {o}" for name, o in links)
  return all_of([o for _, o in links]), text, "order"


def _band(r, method, lo_hi):
  est = endpoint_estimate(r, method, "sparsity")
  return within(est, *lo_hi), f"{method.upper()} {est.text(True)}", "band"


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
  outcome, text, rule = _order(r, "max_angle_deg", increasing=False)
  return outcome, text + " (deg)", rule


def _v_nss_order(r):
  return _order(r, "nss", increasing=False)


def _v_lowmag_order(r):
  return _order(r, "low_mag_overlap", increasing=True, pct=True)


def _v_principal(r):
  est = {m: endpoint_estimate(r, m, "principal_overlap") for m in paper.METHODS}
  base = estimate([float(_get(r, "endpoint", "opd", "baseline"))], fixed=True)
  links = {"SFT>OPD": less(est["opd"], est["sft"]), "SFT>RLVR": less(est["rlvr"], est["sft"]),
           "RLVR<OPD": less(est["rlvr"], est["opd"]), "OPD<baseline": less(est["opd"], base)}
  text = ", ".join(f"{m.upper()} {e.text(True)}" for m, e in est.items())
  text += f"; baseline {_fmt(base.mean, True)}; " + ", ".join(f"{k}: {o}" for k, o in
                                                            links.items())
  return all_of(list(links.values())), text, "order"


def _band_ratio(y):
  return float(np.max(y) / max(np.min(y), 1e-12))


def _v_stable_rank_shapes(r):
  zero = estimate([0.0], fixed=True)
  change = {m: trajectory_estimate(r, m, lambda y: float(y[-1] - y[0])) for m in paper.METHODS}
  band = {m: trajectory_estimate(r, m, _band_ratio) for m in paper.METHODS}
  links = {"SFT expands": less(zero, change["sft"]), "RLVR contracts": less(change["rlvr"], zero),
           "OPD band < SFT band": less(band["opd"], band["sft"]),
           "OPD band < RLVR band": less(band["opd"], band["rlvr"])}
  parts = [f"{m.upper()} last-first {change[m].text()}, band x{band[m].text()}"
           for m in paper.METHODS]
  text = "; ".join(parts) + "; " + ", ".join(f"{k}: {o}" for k, o in links.items())
  return all_of(list(links.values())), text, "order"


def _v_sim16(r):
  first = {m: trajectory_estimate(r, m, lambda y: float(y[0]), key="sim_k")
           for m in paper.METHODS}
  links = {"OPD>SFT": less(first["sft"], first["opd"]),
           "OPD>RLVR": less(first["rlvr"], first["opd"])}
  text = ", ".join(f"{m.upper()} {e.text()}" for m, e in first.items())
  text += "; " + ", ".join(f"{k}: {o}" for k, o in links.items())
  return all_of(list(links.values())), text, "order"


def _rank16(r, method):
  d = _get(r, "rank16", method)
  plain = acc_estimate(r, d["plain_run"])
  proj = acc_estimate(r, d["projected_run"])
  text = f"plain {plain.text()}, projected (K = {d.get('k')}) {proj.text()}"
  return plain, proj, text


def _v_rank16_opd(r):
  plain, proj, text = _rank16(r, "opd")
  anchor = acc_estimate(r, "anchor")
  loss = less(proj, plain)
  learns = less(anchor, proj)
  outcome = FAILS if loss == HOLDS else HOLDS if learns == HOLDS else UNRESOLVED
  return outcome, (f"{text}, anchor {anchor.text()}; loss beyond noise: "
                   f"{'yes' if loss == HOLDS else 'no'}, above the anchor beyond noise: "
                   f"{'yes' if learns == HOLDS else 'no'}"), "keeps"


def _v_rank16_sft(r):
  plain, proj, text = _rank16(r, "sft")
  return less(proj, plain), text, "accuracy"


def _controls(r, key):
  runs = list(_get(r, "controls", key))
  if not runs:   # the control switched off
    raise _Missing(f"controls/{key}")
  return runs


def _v_sparsify(r):
  outcomes, texts = [], []
  for run in _controls(r, "sparsify"):
    o, t = _nearest_opd(r, run)
    outcomes.append(o)
    texts.append(t)
  return all_of(outcomes), "; ".join(texts), "control"


def _v_offpolicy(r):
  o, t = _nearest_opd(r, _controls(r, "offpolicy")[0])
  return o, t, "control"


def _v_offpolicy_norm(r):
  run = _controls(r, "offpolicy")[0]
  opd = trajectory_estimate(r, "opd", lambda y: float(y[-1]), key="frobenius")
  off_v = float(_trajectory(r, run, "frobenius")[1][-1])
  off = Estimate(off_v, seed_sd(opd.values), 1, (off_v,))
  return (less(opd, off), f"||dW||_F off-policy {off.text()} vs OPD {opd.text()} "
          f"(x{off.mean / opd.mean:.3f})", "control_norm")


def _mixing(r):
  mix = dict(_get(r, "controls", "mixing"))  # run -> alpha
  if not mix:
    raise _Missing("controls/mixing")
  return mix


def _v_mixing_dominant(r):
  runs = {k: a for k, a in _mixing(r).items() if a >= 0.5}
  if not runs:
    raise _Missing("mixing runs with alpha >= 0.5")
  outcomes, texts = [], []
  for run in sorted(runs, key=runs.get, reverse=True):
    o, t = _nearest_opd(r, run)
    outcomes.append(o)
    texts.append(t)
  return all_of(outcomes), "; ".join(texts), "control"


def _v_mixing_small(r):
  mix = _mixing(r)
  run = min(mix, key=mix.get)
  if mix[run] >= 0.5:
    raise _Missing("a mixing run with alpha < 0.5")
  d = reference_distances(r, run)
  if "rlvr" not in d:
    raise _Missing("the RLVR reference trajectory")
  return (less(d["rlvr"], d["opd"]), f"{run} (alpha {mix[run]}): d_opd {d['opd'].text()}, "
          f"d_rlvr {d['rlvr'].text()}", "control")


def _improves(r, run):
  a = acc_estimate(r, run)
  b = acc_estimate(r, "anchor")
  return (less(b, a), f"{run.upper()} {a.text()} vs anchor {b.text()} "
          f"(delta {a.mean - b.mean:+.3f})", "accuracy")


VERDICTS: dict[str, Callable[[dict], tuple[str, str, str]]] = {
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
  """One dict per claim: id, section, claim, paper, ours, verdict, rule (a `RULES` key) and
  rule_text (its short form)."""
  out = []
  for c in paper.CLAIMS:
    try:
      verdict, ours, rule = VERDICTS[c.id](results)
    except _Missing as e:
      verdict, ours, rule = MISSING, f"missing: {e}", None
    out.append({"id": c.id, "section": c.section, "claim": c.text, "paper": c.paper,
                "ours": ours, "verdict": verdict, "rule": rule,
                "rule_text": RULE_SHORT.get(rule, "")})
  return out


def noise_model(results: dict) -> dict:
  """The noise model a results dict is judged under: seeds, z and the rules (for the report)."""
  seeds = results.get("seeds", {})
  return {"z": Z, "seeds": list(seeds.get("values", [])), "runs": dict(seeds.get("runs", {})),
          "fixed_endpoints": list(seeds.get("fixed_endpoints", [])),
          "fixed_runs": list(FIXED_RUNS), "rules": dict(RULES)}


AGGREGATE_ENDPOINT_KEYS = ("sparsity", "density", "max_angle_deg", "max_angle_mean_deg", "nss",
                           "principal_overlap", "low_mag_overlap")


def aggregate(results: dict) -> dict:
  """Mean and SE across seeds of every endpoint scalar, accuracy and trajectory end value."""
  out: dict[str, dict] = {"endpoint": {}, "accuracy": {}, "trajectory": {}}
  for m in paper.METHODS:
    for key in AGGREGATE_ENDPOINT_KEYS:
      try:
        out["endpoint"].setdefault(m, {})[key] = endpoint_estimate(results, m, key).to_dict()
      except _Missing:
        pass
  families = list(results.get("seeds", {}).get("runs", {})) or [
      r for r in ("opd", "rlvr", "sft", "opd_rank16", "sft_rank16")
      if r in results.get("accuracy", {})]
  for fam in list(FIXED_RUNS) + families:
    try:
      out["accuracy"][fam] = acc_estimate(results, fam).to_dict()
    except _Missing:
      pass
  for fam in families:
    for key, fn in (("stable_rank_last", lambda y: float(y[-1])),
                    ("frobenius_last", lambda y: float(y[-1])),
                    ("sim_k_first", lambda y: float(y[0]))):
      src = key.rsplit("_", 1)[0]
      try:
        out["trajectory"].setdefault(fam, {})[key] = trajectory_estimate(
            results, fam, fn, key=src).to_dict()
      except (_Missing, KeyError):
        pass
  return {k: v for k, v in out.items() if v}


# -- acceptance thresholds (`opd-jax study --check`) -----------------------------------------------
def check(results: dict) -> list[str]:
  """Failed acceptance thresholds, each a message naming the threshold; empty when all hold.

  Thresholds come from `results['thresholds']` (`teacher_min`, `base_min`, `base_max`); OPD and
  RLVR (their mean accuracy over seeds) must be strictly above the anchor; the first seed's SFT
  run (the anchor SFT with snapshots) must end on the anchor's weights bit for bit
  (`results['sft_is_anchor']`, when measured).
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

  def mean_over_seeds(family):
    vals = [get(run) for run in seed_runs(results, family)]
    return None if any(v is None for v in vals) else float(np.mean(vals))

  teacher, base, anchor = get("teacher"), get("base"), get("anchor")
  opd, rlvr = mean_over_seeds("opd"), mean_over_seeds("rlvr")
  if teacher is not None and not teacher >= th["teacher_min"]:
    fails.append(f"teacher_min: teacher eval accuracy {teacher:.3f} < {th['teacher_min']}")
  if base is not None and not th["base_min"] <= base <= th["base_max"]:
    fails.append(f"base_range: base student accuracy {base:.3f} outside "
                 f"[{th['base_min']}, {th['base_max']}]")
  if results.get("sft_is_anchor") is False:
    fails.append("sft_is_anchor: the first seed's SFT run did not end on the anchor's weights "
                 "(the same config from the same base must retrace it)")
  for name, v in (("opd", opd), ("rlvr", rlvr)):
    if v is not None and anchor is not None and not v > anchor:
      fails.append(f"{name}_above_anchor: {name.upper()} accuracy {v:.3f} (mean over seeds) not "
                   f"above the anchor's {anchor:.3f}")
  return fails

"""The study report: `WORKDIR/report/{report.md, results.json, *.png}` from one results dict.

Results schema (everything optional except where `verdicts.check` needs it)::

    preset: str                         # the study preset
    settings: {section: {key: value}}   # every chosen value (models, optimizers, steps, eval, ...)
    thresholds: {teacher_min, base_min, base_max}
    accuracy: {run: {acc, stderr, n, k}}            # avg@k on the eval split, every run
    seeds: {values: [seed], runs: {family: [run]},  # the seeded run families (first seed first)
            fixed_endpoints: [method]}              # endpoints measured once (no seed spread)
    endpoint_seeds: {sft|opd|rlvr: [endpoint entry per seed]}
    endpoint: {sft|opd|rlvr: {origin, sparsity, sparsity_per_type: {type: f}, density,
               max_angle_deg (representative matrix), max_angle_mean_deg, rep_matrix,
               angle_curve_deg: [...], max_angle_per_matrix: {name: f}, nss (mean over matrices),
               nss_per_matrix: {name: f}, principal_overlap, low_mag_overlap, baseline,
               per_matrix: {name: {type, layer, n, sparsity, overlap_principal,  # every weight
                                   overlap_low}},    # (overlaps None for 1-D / unchanged)
               sigma0, sigma1: [f],   # singular values of the representative W_0, W_1 (desc.)
               sigma_dw: [f]}}        # singular values of its update dW = W_1 - W_0 (desc.)
    sft_is_anchor: bool | None          # the first seed's SFT run ended on the anchor's weights
    mask_consensus: {group: {kind: seeds|methods, runs: [run],  # `diagnostics.mask_consensus`
                     pairs: [{a, b, jaccard, baseline, by_type: {type: f}}],
                     jaccard_mean, jaccard_min, jaccard_max, baseline_mean,
                     by_type: {type: mean jaccard}}}   # group: a family, or '<a> vs <b>'
    trajectory: {run: {steps, progress, stable_rank, frobenius, hill, sim_k}}  # q,k,v,o means
    live_geometry: {run: {steps, step: [int], "geometry/...": [f | None]}}  # the loop's monitor
                   # (`runs.live_series`), runs whose section sets geometry.every
    adapters: {rank, alpha, scale, targets, tolerance, seed,       # only with adapter arms
               runs: {full|lora|pissa: run},
               endpoint: {run: endpoint entry (as `endpoint`)},     # anchor -> end, merged
               update: {run: `diagnostics.adapter_update_metrics` output}}
    rank16: {opd|sft: {plain_run, projected_run, resume_step, k, where}}
    progress_accuracy: {run: {total_steps, steps: [int], progress: [f], acc: [f], stderr: [f],
                        n: [int], k, measured: [bool]}}  # plain opd / sft runs (every seed) at
                        # their snapshots (`progress.ProgressCurve.to_results`)
    regime_map: {scales, study_scale, anchor_acc,                # only with regime.map_scales
                 rows: [{method, scale, run, budget, lr, sparsity, density, max_angle_mean_deg,
                         nss, stable_rank, acc, acc_se, acc_gain}]}
    controls: {sparsify: [run], offpolicy: [run], mixing: {run: alpha}}
    phases: {phase: {wall_s, status}}

`endpoint` holds the first seed's entries (figures draw them); tables print the estimates over
seeds. `render(results, out_dir)` adds `verdicts` (computed by `verdicts.compute_verdicts`),
`aggregate` (mean and SE across seeds, `verdicts.aggregate`), `noise_model` (seeds, z, rules) and
`failed_thresholds` (by `verdicts.check`), writes the figures, `report.md` and `results.json`;
with adapter arms also `adapters.checks` (`adapter_checks`: properties that hold by construction,
beyond the paper; no paper verdicts).
"""

from __future__ import annotations

import json
import pathlib
import time

from opd_jax.study import figures, paper, verdicts

SECTIONS = (
    ("accuracy", "Accuracy of every run"),
    ("table1", "Table 1 analog: bf16 update sparsity"),
    ("endpoint", "Endpoint geometry"),
    ("trajectory", "Trajectories"),
    ("rank16", "Rank-16 subspace projection"),
    ("controls", "Controls"),
)
# Sections beyond the paper, rendered only when their data exists.
OPTIONAL_SECTIONS = (("adapters", "Adapters (beyond the paper)"),
                     ("regime_map", "Regime map (beyond the paper)"))
_FIGS_BY_SECTION = {
    "accuracy": ["accuracy"], "table1": ["sparsity_per_type"],
    "endpoint": ["spectral", "mask_overlap"], "trajectory": ["trajectories"],
    "rank16": ["rank16"],
    "controls": ["control_sparsify", "control_offpolicy", "control_mixing"],
}
REQUIRED_FIGURES = tuple(f for fs in _FIGS_BY_SECTION.values() for f in fs)
# Figures drawn when their data exists (each section renders without them): the endpoint's
# singular values, per-layer localisation and mask consensus; accuracy against progress.
_FIGS_BY_SECTION["endpoint"] = ["spectral", "singular_values", "mask_overlap", "localisation",
                                "mask_consensus"]
_FIGS_BY_SECTION["rank16"] = ["rank16", "progress_accuracy"]
_FIGS_BY_SECTION["trajectory"] = ["trajectories", "live_geometry"]
_FIGS_BY_SECTION["adapters"] = ["adapters"]
_FIGS_BY_SECTION["regime_map"] = ["regime_map"]
_MARK = {verdicts.HOLDS: "HOLDS", verdicts.FAILS: "DOES NOT HOLD",
         verdicts.UNRESOLVED: "NOT RESOLVED", verdicts.MISSING: "NOT MEASURED"}


def _pct(x):
  return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x):
  if x is None:
    return "n/a"
  x = float(x)
  return f"{x:.2e}" if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4) else f"{x:.3g}"


def _cell(x) -> str:
  """A markdown table cell: a '|' in the text (||dW||_F) would end the cell, so it is escaped."""
  return str(x).replace("|", "\\|")


def _table(header, rows):
  lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _verdict_lines(vs, section):
  out = []
  for v in vs:
    if v["section"] == section:
      rule = f" Rule: {v['rule_text']}." if v.get("rule_text") else ""
      out.append(f"- **{_MARK[v['verdict']]}**: {v['claim']}. Paper: {v['paper']}. "
                 f"Ours: {v['ours']}.{rule}")
  return "\n".join(out)


def _flatten(d, prefix=""):
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      yield from _flatten(v, key + ".")
    else:
      yield key, v


def _est(fn, *args, pct=False):
  """An estimate's text, or 'n/a' when its data is absent."""
  try:
    return fn(*args).text(pct)
  except verdicts._Missing:
    return "n/a"


def _section_accuracy(r):
  acc = r.get("accuracy", {})
  rows = [(run, f"{a['acc']:.3f}", f"{a.get('stderr', 0):.3f}", a.get("n", "?"), a.get("k", "?"))
          for run, a in acc.items()]
  th = r.get("thresholds", {})
  lines = [_table(["run", "accuracy", "std. error (over problems)", "eval problems", "samples k"],
                  rows)]
  fams = list(r.get("seeds", {}).get("runs", {}))
  if fams:
    lines.append("\nAcross seeds (mean +- SE; SE = sqrt(SE_seeds^2 + SE_problems^2)):\n")
    lines.append(_table(["run", "seeds", "accuracy"],
                        [(f, len(verdicts.seed_runs(r, f)), _est(verdicts.acc_estimate, r, f))
                         for f in fams]))
  if th:
    lines.append(f"\nAcceptance thresholds: teacher >= {th.get('teacher_min')}, base in "
                 f"[{th.get('base_min')}, {th.get('base_max')}], OPD and RLVR above the anchor.")
    fails = r.get("failed_thresholds", [])
    lines.append("Threshold check: " + ("all pass." if not fails else
                                         "FAILED: " + "; ".join(fails)))
  return "\n".join(lines)


def _section_table1(r):
  ep = r.get("endpoint", {})
  methods = [m for m in paper.METHODS if m in ep]
  types = []
  for m in methods:
    types += [t for t in ep[m]["sparsity_per_type"] if t not in types]
  types = [t for t in figures._TYPE_ORDER if t in types] + [t for t in types
                                                           if t not in figures._TYPE_ORDER]
  rows = []
  for m in methods:
    e = ep[m]
    rows.append([m.upper(), e.get("origin", ""),
                 _est(verdicts.endpoint_estimate, r, m, "sparsity", pct=True),
                 _pct(paper.TABLE1_SPARSITY[m])] +
                [_pct(e["sparsity_per_type"].get(t)) for t in types])
  return (_table(["method", "measured", "sparsity (ours, across seeds)", "sparsity (paper)"] +
                 [f"{t} (first seed)" for t in types], rows))


def _section_endpoint(r):
  ep = r.get("endpoint", {})
  rows = []
  for m in paper.METHODS:
    if m not in ep:
      continue
    def est(key, pct=False, m=m):
      return _est(verdicts.endpoint_estimate, r, m, key, pct=pct)

    rows.append([m.upper(),
                 f"{est('max_angle_deg')} deg ({paper.MAX_ANGLE_TEXT[m]})",
                 f"{est('max_angle_mean_deg')} deg",
                 f"{est('nss')} ({paper.NSS_TEXT[m]})",
                 f"{est('density', True)} ({_pct(paper.UPDATE_DENSITY[m])})",
                 f"{est('principal_overlap', True)} ({paper.PRINCIPAL_OVERLAP_TEXT[m]})",
                 f"{est('low_mag_overlap', True)} ({_pct(paper.LOW_MAG_OVERLAP[m])})"])
  rep = next((ep[m].get("rep_matrix") for m in paper.METHODS if m in ep), "?")
  base = next((ep[m].get("baseline") for m in paper.METHODS if m in ep), None)
  out = (_table(["method", f"max angle, {rep} (paper)", "max angle, mean over matrices",
                 "NSS (paper)", "density (paper)", "principal-mask overlap (paper)",
                 "low-mag-mask overlap (paper)"], rows) +
         f"\n\nMask-overlap random baseline: {_pct(base)}. Values are mean +- SE across "
         "seeds; (fixed) = measured once on the shared runs.")
  consensus = _consensus_table(r)
  return out + ("\n\n" + consensus if consensus else "")


def _consensus_table(r) -> str:
  """The update-mask consensus (Jaccard index across runs), or '' without its data."""
  cons = r.get("mask_consensus") or {}
  if not cons:
    return ""
  rows = []
  for g, d in cons.items():
    what = (f"{len(d['runs'])} seeds, {len(d['pairs'])} pairs" if d.get("kind") == "seeds"
            else "first seeds")
    rng = ("" if d.get("jaccard_min") is None or len(d["pairs"]) < 2 else
           f" (min {_num(d['jaccard_min'])}, max {_num(d['jaccard_max'])})")
    rows.append([" vs ".join(x.upper() for x in g.split(" vs ")), what,
                 f"{_num(d.get('jaccard_mean'))}{rng}", _num(d.get("baseline_mean"))])
  return ("Update-mask consensus (The Path Not Taken, Table 2 style): Jaccard index |A & B| / "
          "|A | B| of the sets of bf16-changed entries of two runs from the same origin, every "
          "weight pooled; the random baseline places masks of the same sizes independently "
          "(E|A & B| / E|A | B|).\n\n" +
          _table(["runs", "pairs", "Jaccard (mean over pairs)", "random baseline"], rows))


def _section_trajectory(r):
  tr = r.get("trajectory", {})
  rows = []
  for run, t in tr.items():
    rows.append([run, ", ".join(str(s) for s in t["steps"]),
                 " -> ".join(_num(x) for x in t["stable_rank"]),
                 _num(t["frobenius"][-1]), _num(t["hill"][-1]), _num(t["sim_k"][0]),
                 t.get("sim_k_rank", "")])
  return _table(["run", "snapshot steps", "stable rank", "final Frobenius norm of dW",
                 "final Hill", "Sim_K(first, end)", "K (the paper: 16)"], rows)


def _section_rank16(r):
  rows = []
  for m, d in r.get("rank16", {}).items():
    rows.append([m.upper(), d.get("resume_step"), d.get("k"), d.get("where"),
                 _est(verdicts.acc_estimate, r, d["plain_run"]),
                 _est(verdicts.acc_estimate, r, d["projected_run"])])
  out = _table(["method", "resume step", "k", "projection", "plain acc", "projected acc"], rows)
  prog = r.get("progress_accuracy") or {}
  if prog:
    lines = []
    for run, c in prog.items():
      pts = ", ".join(f"{p:.2f}: {a:.3f} +- {e:.3f}" for p, a, e in
                      zip(c["progress"], c["acc"], c["stderr"]))
      lines.append([run, pts])
    out += ("\n\nAccuracy against training progress (progress: avg@k +- SE over problems) of "
            "the plain runs at their snapshots:\n\n" + _table(["run", "points"], lines))
  return out


def _section_controls(r):
  c = r.get("controls", {})
  acc = r.get("accuracy", {})
  rows = []
  names = list(c.get("sparsify", [])) + list(c.get("offpolicy", [])) + list(c.get("mixing", {}))
  for run in names:
    t = r.get("trajectory", {}).get(run)
    d = "n/a"
    try:
      dists = verdicts.reference_distances(r, run)
      near = min(dists, key=lambda k: dists[k].mean)
      d = f"{near.upper()} ({', '.join(f'{k} {v.text()}' for k, v in dists.items())})"
    except Exception:  # noqa: BLE001 -- missing references print as n/a
      pass
    rows.append([figures.label(run, r), _num(acc.get(run, {}).get("acc")),
                 " -> ".join(_num(x) for x in t["stable_rank"]) if t else "n/a",
                 _num(t["frobenius"][-1]) if t and t.get("frobenius") else "n/a",
                 _num(t["hill"][-1]) if t and t.get("hill") else "n/a", d])
  return _table(["run", "accuracy", "stable rank trajectory", "final Frobenius norm of dW",
                 "final Hill", "nearest reference (distances)"], rows)


_ARM_LABEL = {"full": "full OPD", "lora": "LoRA", "pissa": "PiSSA"}


def adapter_checks(r: dict) -> list[dict]:
  """Computed checks of properties the adapters have by construction (beyond the paper).

  A LoRA update is (alpha / r) a_1 b_1 (b_0 = 0): rank <= r. A PiSSA update is
  (alpha / r)(a_1 b_1 - a_0 b_0): rank <= 2r. So the share of ||dW||_F^2 in the top r (LoRA) /
  top 2r (PiSSA) singular values of every adapted matrix is 1 up to the float round-off of the
  merge; a check passes when its minimum over matrices is >= 1 - `adapters.tolerance`, and the
  stable rank (<= the rank) is <= r / 2r.
  """
  ad = r.get("adapters") or {}
  out = []
  for arm, key, bound in (("lora", "energy_top_r_min", 1), ("pissa", "energy_top_2r_min", 2)):
    run = ad.get("runs", {}).get(arm)
    u = ad.get("update", {}).get(run)
    if u is None or u.get(key) is None:
      continue
    rank = bound * ad["rank"]
    share, sr = u[key], u["stable_rank_max"]
    out.append({"run": run, "arm": arm, "bound": rank, "min_share": share,
                "stable_rank_max": sr,
                "passes": bool(share >= 1 - ad["tolerance"] and sr <= rank + 1e-9),
                "text": f"{_ARM_LABEL[arm]}: rank(dW) <= {rank} by construction; min over "
                        f"{u['n_matrices']} adapted matrices of the ||dW||_F^2 share in the top "
                        f"{rank} singular values = {share:.6f} (tolerance {ad['tolerance']:g}), "
                        f"max stable rank {sr:.3g} (<= {rank})"})
  return out


def _section_adapters(r):
  ad = r["adapters"]
  acc = r.get("accuracy", {})
  runs = ad.get("runs", {})
  ep, upd = ad.get("endpoint", {}), ad.get("update", {})
  lines = [f"Beyond the paper: OPD from the same anchor with the full OPD settings and low-rank "
           f"adapters (rank r = {ad['rank']}, alpha = {_num(ad['alpha'])}, scale alpha / r = "
           f"{_num(ad['scale'])}, targets `{ad['targets']}`), one seed (loop.seed {ad['seed']}, "
           "the first seed's `opd`, which the full-OPD column shows). Every diagnostic reads the "
           "merged policy (base + scale a b). The paper makes no claim about adapters: the tables "
           "are descriptive.", "", "Endpoint geometry (anchor -> end, every matrix, as in the "
           "endpoint section):", ""]
  rows = []
  for arm, run in runs.items():
    e = ep.get(run, {})
    a = acc.get(run, {}).get("acc")
    rows.append([_ARM_LABEL.get(arm, arm), run, "n/a" if a is None else f"{a:.3f}",
                 _pct(e.get("sparsity")), _pct(e.get("density")),
                 _num(e.get("max_angle_deg")), _num(e.get("nss")),
                 _pct(e.get("principal_overlap")), _pct(e.get("low_mag_overlap"))])
  lines.append(_table(["arm", "run", "accuracy", "bf16 sparsity", "density",
                       "max angle (deg)", "NSS", "principal-mask overlap",
                       "low-mag-mask overlap"], rows))
  lines += ["", f"The merged update dW on the {next(iter(upd.values()), {}).get('n_matrices', '?')}"
            " adapted matrices (means over matrices; shares of ||dW||_F^2):", ""]
  rows = []
  r_ = ad["rank"]
  for arm, run in runs.items():
    u = upd.get(run, {})
    rows.append([_ARM_LABEL.get(arm, arm), _num(u.get("frobenius_total")),
                 _num(u.get("stable_rank_mean")), _num(u.get("stable_rank_max")),
                 _pct(u.get("energy_top_r_mean")), _pct(u.get("energy_top_2r_mean")),
                 f"{_pct(u.get('principal_share_in_mean'))} "
                 f"(random {_pct(u.get('baseline_in_mean'))})",
                 f"{_pct(u.get('principal_share_out_mean'))} "
                 f"(random {_pct(u.get('baseline_out_mean'))})"])
  lines.append(_table(["arm", "||dW||_F (total)", "stable rank (mean)", "stable rank (max)",
                       f"top-{r_} energy", f"top-{2 * r_} energy",
                       f"in anchor's top-{r_} input subspace",
                       f"in anchor's top-{r_} output subspace"], rows))
  checks = ad.get("checks", [])
  if checks:
    lines += ["", "Checks beyond the paper (properties the adapters have by construction; "
              "`reporting.adapter_checks`):", ""]
    lines += [f"- **{'PASSES' if c['passes'] else 'FAILS'}**: {c['text']}." for c in checks]
  return "\n".join(lines)


def regime_map_section(r):
  """The regime map's table (results['regime_map']) with its one-paragraph legend."""
  m = r["regime_map"]
  lines = [f"Beyond the paper: SFT, OPD and RLVR from the same anchor (first seed) at update "
           f"budgets {', '.join(f'{x:g}' for x in m['scales'])} x the paper's (at "
           f"{m['study_scale']:g} x, OPD and RLVR are the study's own first-seed runs; SFT here "
           "is SFT continued from the anchor at every budget, not the study's SFT arm, which is "
           "the anchor SFT from the base). The budget is in bf16 half-ulps at the "
           "anchor's median |W| (Settings, scale rules). Accuracy gain over the anchor "
           f"({_num(m.get('anchor_acc'))}); +- one SE over the eval problems.", ""]
  rows = [(row["method"].upper(), f"{row['scale']:g}", _num(row.get("budget")),
           _num(row.get("lr")), _pct(row.get("sparsity")), _pct(row.get("density")),
           _num(row.get("max_angle_mean_deg")), _num(row.get("nss")),
           _num(row.get("stable_rank")),
           "n/a" if row.get("acc_gain") is None else
           f"{row['acc_gain']:+.3f} +- {_num(row.get('acc_se'))}")
          for row in sorted(m["rows"], key=lambda x: (x["method"], x["scale"]))]
  lines.append(_table(["method", "x paper budget", "budget (half-ulps)", "lr", "sparsity",
                       "density", "max angle, mean (deg)", "NSS", "stable rank",
                       "accuracy gain"], rows))
  return "\n".join(lines)


def _section_settings(st: dict) -> str:
  """Study-level values, the scale rules (each with its inputs and result), a wide table of
  every TrainConfig field of the main runs, and each control's differences from the run it is
  derived from."""
  parts = []
  rules = st.get("rules", {})
  if rules:
    parts.append("Scale rules (`opd_jax/study/regime.py`; each setting that depends on scale, "
                 "derived from the paper's value):\n\n" +
                 "\n".join(f"- **{k}**: {v}" for k, v in rules.items()))
  plain = {k: v for k, v in st.items() if k not in ("runs", "derived_runs", "rules")}
  if plain:
    parts.append(_table(["key", "value"], [(k, f"`{v}`") for k, v in _flatten(plain)]))
  runs = st.get("runs", {})
  if runs:
    keys = []
    for flat in runs.values():
      keys += [k for k in flat if k not in keys]
    parts.append("Runs (TrainConfig fields; `-` = not applicable to the run):\n\n" + _table(
        ["field"] + list(runs), [[k] + [f"`{runs[n][k]}`" if k in runs[n] else "-" for n in runs]
                                 for k in keys]))
  diffs = st.get("derived_runs", {})
  if diffs:
    parts.append("Derived runs (fields that differ from the run they derive from):\n\n" + _table(
        ["run", "differences"], [(n, "; ".join(f"{k}=`{v}`" for k, v in d.items()) or "none")
                                 for n, d in diffs.items()]))
  return "\n\n".join(parts)


_SECTION_BODY = {"accuracy": _section_accuracy, "table1": _section_table1,
                 "endpoint": _section_endpoint, "trajectory": _section_trajectory,
                 "rank16": _section_rank16, "controls": _section_controls,
                 "adapters": _section_adapters, "regime_map": regime_map_section}


def verdict_counts(vs: list[dict]) -> str:
  """'a HOLD, b DO NOT HOLD, c NOT RESOLVED, d NOT MEASURED' (of len(vs) claims)."""
  n = {k: sum(v["verdict"] == k for v in vs) for k in _MARK}
  return (f"Of {len(vs)} paper claims: {n[verdicts.HOLDS]} HOLD, {n[verdicts.FAILS]} DO NOT "
          f"HOLD, {n[verdicts.UNRESOLVED]} NOT RESOLVED, {n[verdicts.MISSING]} NOT MEASURED")


def _sft_is_anchor(r: dict) -> str:
  same = r.get("sft_is_anchor")
  if same is None:
    return ""
  return (" The first seed's SFT run ends on the anchor's weights bit for bit: "
          f"{'yes' if same else 'NO (acceptance check failed)'}.")


def noise_section(r: dict) -> str:
  """The noise model: seeds, which runs they repeat, what is fixed, and every rule."""
  nm = r.get("noise_model") or verdicts.noise_model(r)
  seeds = nm.get("seeds") or []
  runs = nm.get("runs") or {}
  lines = [f"Seeds: {', '.join(map(str, seeds)) or 'none recorded'} "
           f"({len(seeds)} seed{'s' if len(seeds) != 1 else ''}); each repeats "
           f"{', '.join(runs) or 'no run'} (OPD and RLVR from the same anchor; SFT and its rank-16 "
           "arm are the anchor SFT from the base, the first seed's being the anchor itself; the "
           "seed sets the training data order and the rollout sampling). The teacher, base, "
           f"anchor and the controls run once.{_sft_is_anchor(r)} Fixed quantities (no seed spread): the accuracies of "
           f"{', '.join(nm.get('fixed_runs', []))}; the endpoints of "
           f"{', '.join(m.upper() for m in nm.get('fixed_endpoints', [])) or 'none'} (measured "
           "once on the shared runs). Every verdict applies one of these rules (z = "
           f"{nm.get('z', verdicts.Z):g}):", ""]
  lines += [f"- **{name}**: {text}." for name, text in nm.get("rules", {}).items()]
  lines += ["", f"The {nm.get('z', verdicts.Z):g}-SE rule marks differences larger than the "
            "seed-to-seed noise; with few seeds it is not a significance test at a stated "
            "level (a t quantile at n - 1 degrees of freedom is wider: 4.30 for 3 seeds at "
            "95%)."]
  if len(seeds) < 2:
    lines += ["", "With one seed the spread of every quantity that varies with the seed is "
              "unknown: each comparison that needs it is NOT RESOLVED."]
  return "\n".join(lines)


def markdown(r: dict, figs: dict[str, str]) -> str:
  vs = r["verdicts"]
  total = sum(p.get("wall_s", 0.0) for p in r.get("phases", {}).values())
  out = [f"# opd_jax geometry study: `{r.get('preset', '?')}`", "",
         f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}. Total phase wall time "
         f"{total / 60:.1f} min. {verdict_counts(vs)} at this scale (verdicts are computed from "
         "the data under the noise model below; `opd_jax/study/verdicts.py`).", "",
         "## Noise model", "", noise_section(r), ""]
  for key, title in SECTIONS + tuple(s for s in OPTIONAL_SECTIONS if r.get(s[0])):
    out += [f"## {title}", "", _SECTION_BODY[key](r), ""]
    for f in _FIGS_BY_SECTION[key]:
      if f in figs:
        out += [f"![{f}]({figs[f]})", ""]
    lines = _verdict_lines(vs, key if key != "table1" else "table1")
    if lines:
      out += ["Verdicts:", "", lines, ""]
  out += ["## All verdicts", "",
          _table(["claim", "paper", "ours", "verdict", "rule"],
                 [(v["claim"], v["paper"], v["ours"], _MARK[v["verdict"]],
                   v.get("rule_text") or "-") for v in vs]), ""]
  out += ["## Settings (every chosen value)", "", _section_settings(r.get("settings", {})), ""]
  cpu_total = sum(p.get("cpu_s") or 0.0 for p in r.get("phases", {}).values())
  out += ["## Run summary", "",
          "Wall time per phase as it ran (a resumed study shows the times of the runs that "
          "produced the outputs); CPU time is this process's (all threads).", "",
          _table(["phase", "status", "wall time (s)", "CPU time (s)"],
                 [(k, p.get("status", ""), f"{p.get('wall_s', 0.0):.1f}",
                   "n/a" if p.get("cpu_s") is None else f"{p['cpu_s']:.1f}")
                  for k, p in r.get("phases", {}).items()] +
                 [("**total**", "", f"{total:.1f}", f"{cpu_total:.1f}")]), ""]
  return "\n".join(out)


README_FIGURES = ("trajectories", "sparsity_per_type", "rank16", "accuracy")


def _machine(r: dict) -> str:
  m = r.get("machine") or {}
  return f" on {m['cpu_model']} ({m.get('cpu_count', '?')} cores)" if m.get("cpu_model") else ""


def readme_section(r: dict, fig_prefix: str = "", heading: bool = True) -> str:
  """A compact results section for the project README: the Table-1 analog beside the paper's
  numbers, accuracies, the projection-rank rule's result, the verdict list and the main figures
  (`fig_prefix` + file name); `heading`: start with a '### Results of ...' line."""
  vs = r["verdicts"]
  total = sum(p.get("wall_s", 0.0) for p in r.get("phases", {}).values())
  seeds = (r.get("noise_model") or verdicts.noise_model(r)).get("seeds") or []
  acc = r.get("accuracy", {})
  acc_line = ", ".join(f"{k} {a['acc']:.2f}" for k, a in acc.items()
                       if k in ("teacher", "base", "anchor", "opd", "rlvr", "sft"))
  rank_rule = r.get("settings", {}).get("rules", {}).get("projection rank K, Sim_K")
  out = ([f"### Results of the `{r.get('preset', '?')}` study", ""] if heading else []) + [
         f"All phases ran in {total / 60:.1f} min{_machine(r)}. Eval accuracy (avg@k): "
         f"{acc_line}. "
         f"{verdict_counts(vs)} at this scale, over {len(seeds)} seed(s); every verdict below "
         f"is computed from the data under the report's noise model (z = {verdicts.Z:g} standard "
         "errors across seeds; `opd_jax/study/verdicts.py`)."
         + (f" Projection rank (Settings, scale rules): {rank_rule}." if rank_rule else ""), "",
         _section_table1(r), "", _section_endpoint(r), "",
         _table(["claim", "paper", "ours", "verdict", "rule"],
                [(v["claim"], v["paper"], v["ours"], _MARK[v["verdict"]],
                  v.get("rule_text") or "-") for v in vs]), ""]
  for f in README_FIGURES:
    if f in r.get("figures", {}):
      out += [f"![{f}]({fig_prefix}{r['figures'][f]})", ""]
  return "\n".join(out)


def scales_section(reports: dict[str, dict]) -> str:
  """The README's side-by-side of studies at several scales: {label: results dict of a rendered
  report (`render`)} -> a settings table (models, steps, seeds, wall time, accuracies) and every
  claim's measurement and verdict at each scale. Every number comes from the results dicts."""
  labels = list(reports)

  def run_setting(r, key):
    return r.get("settings", {}).get("runs", {}).get("opd", {}).get(key)

  def model(r, who):
    d, n = run_setting(r, f"{who}.model.n_layers"), run_setting(r, f"{who}.model.d_model")
    return "n/a" if d is None or n is None else f"{d} x {n}"

  def steps(r):
    runs = r.get("settings", {}).get("runs", {})
    return ", ".join(f"{m.upper()} {runs[m]['loop.steps']}" for m in ("sft", "opd", "rlvr")
                     if m in runs and "loop.steps" in runs[m])

  def acc(r, run):
    fam = r.get("seeds", {}).get("runs", {})
    if run in fam:
      return _est(verdicts.acc_estimate, r, run)
    a = r.get("accuracy", {}).get(run)
    return "n/a" if a is None else f"{a['acc']:.3f}"

  rows = [("machine", *(_machine(reports[x]).removeprefix(" on ") or "n/a" for x in labels)),
          ("student (layers x width)", *(model(reports[x], "student") for x in labels)),
          ("teacher (layers x width)", *(model(reports[x], "teacher") for x in labels)),
          ("steps", *(steps(reports[x]) for x in labels)),
          ("seeds", *(len((reports[x].get("noise_model") or {}).get("seeds") or [])
                      for x in labels)),
          ("all phases, wall (min)", *(
              f"{sum(p.get('wall_s', 0.0) for p in reports[x].get('phases', {}).values()) / 60:.1f}"
              for x in labels))]
  rows += [(f"accuracy, {run}", *(acc(reports[x], run) for x in labels))
           for run in ("teacher", "base", "anchor", "sft", "opd", "rlvr")]
  rows.append(("acceptance check (`--check`)", *(
      "passes" if not reports[x].get("failed_thresholds") else
      "FAILS: " + "; ".join(reports[x]["failed_thresholds"]) for x in labels)))
  rows.append(("verdicts", *(verdict_counts(reports[x]["verdicts"]) for x in labels)))
  by_id = {x: {v["id"]: v for v in reports[x]["verdicts"]} for x in labels}
  ids = list(dict.fromkeys(i for x in labels for i in by_id[x]))
  claims = []
  for i in ids:
    first = next(by_id[x][i] for x in labels if i in by_id[x])
    row = [first["claim"], first["paper"]]
    for x in labels:
      v = by_id[x].get(i)
      row += ["n/a", "-"] if v is None else [v["ours"], _MARK[v["verdict"]]]
    claims.append(row)
  header = ["claim", "paper"]
  for x in labels:
    header += [f"{x}: ours", f"{x}: verdict"]
  return "\n".join([_table(["", *labels], rows), "", _table(header, claims)])


def render(results: dict, out_dir) -> dict:
  """Computes verdicts and the threshold check, writes figures, report.md and results.json."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  results = dict(results)
  results["verdicts"] = verdicts.compute_verdicts(results)
  results["aggregate"] = verdicts.aggregate(results)
  results["noise_model"] = verdicts.noise_model(results)
  results["failed_thresholds"] = verdicts.check(results)
  if results.get("adapters"):
    results["adapters"] = dict(results["adapters"], checks=adapter_checks(results))
  figs = figures.write_all(results, out_dir)
  results["figures"] = figs
  (out_dir / "report.md").write_text(markdown(results, figs))
  (out_dir / "README_section.md").write_text(readme_section(results))
  tmp = out_dir / ".results.json.tmp"
  tmp.write_text(json.dumps(results, indent=1, sort_keys=False, default=float))
  tmp.replace(out_dir / "results.json")
  return results

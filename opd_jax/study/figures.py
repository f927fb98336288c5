"""The study's figures (matplotlib, Agg backend, PNG): one method one colour in every figure.

Each `fig_*` function takes the results dict (schema in `reporting.py`) and an output path, draws
labelled axes with a legend, and returns the path, or None when the data it needs is absent.
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Fixed colours for the named runs; controls get theirs from `color`.
_FIXED = {
    "sft": "#1f77b4", "opd": "#ff7f0e", "rlvr": "#2ca02c", "teacher": "#7f7f7f",
    "base": "#bcbd22", "anchor": "#17becf", "opd_rank16": "#ff7f0e", "sft_rank16": "#1f77b4",
    "ctrl_offpolicy": "#d62728", "opd_lora": "#6a3d9a", "opd_pissa": "#b15928",
}
_SPARSIFY = {"ctrl_topkl_25": "#9467bd", "ctrl_topkl_50": "#c5b0d5", "ctrl_random_25": "#8c564b",
             "ctrl_random_50": "#e377c2"}
_MIXING = {0.75: "#8c6d31", 0.5: "#e7ba52", 0.25: "#843c39", 0.05: "#393b79", 0.01: "#000000"}
LABELS = {"sft": "SFT", "opd": "OPD", "rlvr": "RLVR", "teacher": "teacher", "base": "base",
          "anchor": "SFT anchor", "opd_rank16": "OPD rank-16", "sft_rank16": "SFT rank-16",
          "ctrl_offpolicy": "OPD off-policy (teacher rollouts)", "opd_lora": "OPD + LoRA",
          "opd_pissa": "OPD + PiSSA"}
_DPI = 110


def color(run: str, results: dict | None = None) -> str:
  """The colour of a run, the same in every figure."""
  if run in _FIXED:
    return _FIXED[run]
  if run in _SPARSIFY:
    return _SPARSIFY[run]
  mixing = (results or {}).get("controls", {}).get("mixing", {})
  if run in mixing:
    a = float(mixing[run])
    if a in _MIXING:
      return _MIXING[a]
    return matplotlib.colors.to_hex(matplotlib.colormaps["cividis"](a))
  cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  return cycle[sum(map(ord, run)) % len(cycle)]


def label(run: str, results: dict | None = None) -> str:
  if run.endswith("_rank16"):
    method = run[:-len("_rank16")]
    r16 = (results or {}).get("rank16", {})
    what = f"rank-{r16[method]['k']}" if method in r16 else "projected"
    return f"{LABELS.get(method, method)} {what}"
  if run in LABELS:
    return LABELS[run]
  mixing = (results or {}).get("controls", {}).get("mixing", {})
  if run in mixing:
    return f"OPD+RLVR mix alpha={mixing[run]}"
  if run.startswith("ctrl_"):
    kind, pct = run[5:].rsplit("_", 1)
    return f"OPD {'top-KL' if kind == 'topkl' else kind} tokens {pct}%"
  return run


def _save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  fig.tight_layout()
  fig.savefig(path, dpi=_DPI)
  plt.close(fig)
  return path


def _methods(results, section):
  return [m for m in ("sft", "opd", "rlvr") if m in results.get(section, {})]


def fig_sparsity_per_type(results: dict, path):
  methods = _methods(results, "endpoint")
  if not methods:
    return None
  types = sorted({t for m in methods for t in results["endpoint"][m]["sparsity_per_type"]})
  types = [t for t in _TYPE_ORDER if t in types] + [t for t in types if t not in _TYPE_ORDER]
  cols = ["overall"] + types
  fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(cols), 3.8))
  w = 0.8 / len(methods)
  x = np.arange(len(cols))
  for i, m in enumerate(methods):
    e = results["endpoint"][m]
    vals = [e["sparsity"]] + [e["sparsity_per_type"].get(t, np.nan) for t in types]
    ax.bar(x + (i - (len(methods) - 1) / 2) * w, 100 * np.asarray(vals), w, color=color(m),
           label=label(m))
  ax.set_xticks(x, cols)
  ax.set_xlabel("module type")
  ax.set_ylabel("bf16 update sparsity (% unchanged)")
  ax.set_title("Update sparsity per method and module type (Table 1 analog)")
  ax.legend()
  return _save(fig, path)


_TYPE_ORDER = ["q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm", "bias"]


def fig_spectral(results: dict, path):
  methods = _methods(results, "endpoint")
  if not methods:
    return None
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  rep = results["endpoint"][methods[0]].get("rep_matrix", "?")
  for m in methods:
    e = results["endpoint"][m]
    curve = np.asarray(e["angle_curve_deg"], float)
    axes[0].plot(np.arange(1, len(curve) + 1), curve, color=color(m), label=label(m))
    names = list(e["max_angle_per_matrix"])
    axes[1].plot(range(len(names)), [e["max_angle_per_matrix"][n] for n in names], "o-",
                 ms=3, color=color(m), label=label(m))
    names_n = list(e["nss_per_matrix"])
    axes[2].plot(range(len(names_n)), [e["nss_per_matrix"][n] for n in names_n], "o-", ms=3,
                 color=color(m), label=label(m))
  axes[0].set(xlabel="principal-angle index i (input side)", ylabel="angle (deg)",
              title=f"Principal angles, {rep}")
  axes[1].set(xlabel="matrix index", ylabel="max principal angle (deg)",
              title="Max principal angle per matrix")
  axes[2].set(xlabel="matrix index", ylabel="NSS", title="Normalized spectral shift per matrix")
  for ax in axes[1:]:
    ax.set_yscale("log")
  for ax in axes:
    ax.legend()
  return _save(fig, path)


def fig_mask_overlap(results: dict, path):
  methods = _methods(results, "endpoint")
  if not methods:
    return None
  fig, ax = plt.subplots(figsize=(6, 3.8))
  kinds = [("principal_overlap", "principal mask"), ("low_mag_overlap", "low-magnitude mask")]
  w = 0.8 / len(methods)
  x = np.arange(len(kinds))
  for i, m in enumerate(methods):
    e = results["endpoint"][m]
    ax.bar(x + (i - (len(methods) - 1) / 2) * w, [100 * e[k] for k, _ in kinds], w,
           color=color(m), label=label(m))
  base = results["endpoint"][methods[0]]["baseline"]
  ax.axhline(100 * base, color="k", ls="--", lw=1, label=f"random baseline ({100 * base:.0f}%)")
  ax.set_xticks(x, [t for _, t in kinds])
  ax.set_ylabel("overlap with update mask (%)")
  ax.set_title("Update-mask localisation")
  ax.legend()
  return _save(fig, path)


_TRAJ = [("stable_rank", "stable rank of dW_t"), ("frobenius", "||dW_t||_F"),
         ("hill", "Hill tail estimate"), ("sim_k", "Sim_16(t, t_end)")]


def _seed_runs(results: dict, family: str) -> list[str]:
  """Every seed's run of a seeded family (the first seed's run first)."""
  return list(results.get("seeds", {}).get("runs", {}).get(family) or [family])


def _later_seed_runs(results: dict) -> set[str]:
  """The runs of every seed after the first (figures draw them with their family)."""
  return {r for runs in results.get("seeds", {}).get("runs", {}).values() for r in runs[1:]}


def _acc_bar(results: dict, run: str) -> tuple[float, float, list[float]]:
  """(mean over seeds, its SE under the noise model, per-seed values) of a run's accuracy; a run
  measured on one seed shows its standard error over problems."""
  from opd_jax.study import verdicts
  acc = results["accuracy"]
  runs = [r for r in _seed_runs(results, run) if r in acc]
  est = verdicts.accuracy_estimate([acc[r] for r in runs])
  se = est.se if np.isfinite(est.se) else float(acc[run].get("stderr", 0.0))
  return est.mean, se, [float(acc[r]["acc"]) for r in runs]


def fig_trajectories(results: dict, path):
  methods = _methods(results, "trajectory")
  if not methods:
    return None
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
  traj = results["trajectory"]
  for ax, (key, name) in zip(axes, _TRAJ):
    for m in methods:
      t = traj[m]
      ax.plot(t["progress"], t[key], "o-", color=color(m), label=label(m))
      for other in _seed_runs(results, m)[1:]:   # the other seeds, thin
        if other in traj:
          ax.plot(traj[other]["progress"], traj[other][key], "-", lw=0.8, alpha=0.5,
                  color=color(m))
    ax.set(xlabel="training progress (fraction of steps)", ylabel=name, title=name)
    ax.legend()
  fig.suptitle("Trajectories of the cumulative update on q, k, v, o (mean over matrices; thin: "
               "other seeds)")
  return _save(fig, path)


def fig_rank16(results: dict, path):
  r16 = results.get("rank16", {})
  methods = [m for m in ("opd", "sft") if m in r16]
  acc = results.get("accuracy", {})
  if not methods or any(r16[m]["plain_run"] not in acc or r16[m]["projected_run"] not in acc
                        for m in methods):
    return None
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  x = np.arange(len(methods))
  k = r16[methods[0]]["k"]
  for j, (which, hatch, lab) in enumerate([("plain_run", None, "plain"),
                                           ("projected_run", "//", f"rank-{k} projected")]):
    bars = [_acc_bar(results, r16[m][which]) for m in methods]
    xs = x + (j - 0.5) * 0.38
    ax.bar(xs, [b[0] for b in bars], 0.38, yerr=[b[1] for b in bars], capsize=3, hatch=hatch,
           color=[color(m) for m in methods], edgecolor="k", label=lab)
    for xi, b in zip(xs, bars):
      ax.plot([xi] * len(b[2]), b[2], "k.", ms=4)
  ax.set_xticks(x, [label(m) for m in methods])
  ax.set_ylabel("eval accuracy (avg@k)")
  ax.set_title(f"Plain vs rank-{k} projected (resumed at ~20%)\nmean over seeds +- SE; dots: "
               "seeds", fontsize=9)
  ax.legend()
  return _save(fig, path)


def _control_fig(results, path, runs, refs, title):
  traj = results.get("trajectory", {})
  runs = [r for r in runs if r in traj]
  if not runs:
    return None
  fig, ax = plt.subplots(figsize=(6.5, 3.8))
  for ref in refs:
    if ref in traj:
      ax.plot(traj[ref]["steps"], traj[ref]["stable_rank"], "o-", lw=2.5, color=color(ref),
              label=f"{label(ref)} (reference)")
  for r in runs:
    ax.plot(traj[r]["steps"], traj[r]["stable_rank"], "s--", color=color(r, results),
            label=label(r, results))
  ax.set(xlabel="training step", ylabel="stable rank of dW_t (q, k, v, o mean)", title=title)
  ax.legend(fontsize=8)
  return _save(fig, path)


def fig_control_sparsify(results, path):
  return _control_fig(results, path, results.get("controls", {}).get("sparsify", []), ["opd"],
                      "Control: token sparsification")


def fig_control_offpolicy(results, path):
  return _control_fig(results, path, results.get("controls", {}).get("offpolicy", []), ["opd"],
                      "Control: off-policy (teacher) rollouts")


def fig_control_mixing(results, path):
  mix = results.get("controls", {}).get("mixing", {})
  runs = sorted(mix, key=mix.get, reverse=True)
  return _control_fig(results, path, runs, ["opd", "rlvr"], "Control: OPD + RLVR mixing")


def fig_adapters(results: dict, path):
  """Adapter arms beside full OPD: stable rank and ||dW_t||_F trajectories (q, k, v, o), and the
  merged update's spectral shares on the adapted matrices."""
  ad = results.get("adapters")
  if not ad:
    return None
  traj, upd = results.get("trajectory", {}), ad.get("update", {})
  runs = [r for r in ad["runs"].values() if r in traj or r in upd]
  if not runs:
    return None
  r = ad["rank"]
  fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
  for ax, (key, name) in zip(axes[:2], _TRAJ[:2]):
    for run in runs:
      if run in traj:
        ax.plot(traj[run]["steps"], traj[run][key], "o-", color=color(run), label=label(run))
    if key == "stable_rank":
      ax.axhline(r, ls=":", color="k", lw=1, label=f"r = {r} (LoRA bound)")
      ax.axhline(2 * r, ls="--", color="k", lw=1, label=f"2r = {2 * r} (PiSSA bound)")
    ax.set(xlabel="training step", ylabel=name, title=f"{name} (q, k, v, o mean)")
    ax.legend(fontsize=8)
  keys = [("energy_top_r_mean", f"top-{r} energy"), ("energy_top_2r_mean", f"top-{2 * r} energy"),
          ("principal_share_in_mean", f"in anchor's top-{r} input subspace"),
          ("principal_share_out_mean", f"in anchor's top-{r} output subspace")]
  width = 0.8 / max(1, len(runs))
  x = np.arange(len(keys))
  ax = axes[2]
  for i, run in enumerate(r_ for r_ in runs if r_ in upd):
    vals = [upd[run].get(k) for k, _ in keys]
    ax.bar(x + i * width, [np.nan if v is None else v for v in vals], width, color=color(run),
           label=label(run))
  ref = next((upd[r_] for r_ in runs if r_ in upd), {})  # same matrices, same baselines
  for j, b in zip((2, 3), (ref.get("baseline_in_mean"), ref.get("baseline_out_mean"))):
    if b is not None:
      ax.hlines(b, j - 0.1, j + 0.9, colors="k", linestyles=":", label="random baseline r/n"
                if j == 2 else None)
  ax.set_xticks(x + 0.4 - width / 2, [n for _, n in keys], rotation=15, fontsize=8)
  ax.set(ylabel="share of ||dW||_F^2", ylim=(0, 1.05),
         title="merged update on the adapted matrices (mean)")
  ax.legend(fontsize=8)
  fig.suptitle("Adapters (beyond the paper): full OPD, LoRA and PiSSA from the same anchor")
  return _save(fig, path)


def _map_points(results: dict) -> dict[str, list[dict]]:
  """{method: regime-map rows with a measured budget, by budget}."""
  rows = (results.get("regime_map") or {}).get("rows", [])
  out: dict[str, list[dict]] = {}
  for row in rows:
    if row.get("budget") is not None:
      out.setdefault(row["method"], []).append(row)
  return {m: sorted(rs, key=lambda r: r["budget"]) for m, rs in out.items()}


def fig_regime_map(results: dict, path):
  """Sparsity, mean max principal angle, stable rank and accuracy gain against the update budget
  (half-ulps; the paper's budget of each method marked)."""
  points = _map_points(results)
  if not points:
    return None
  panels = [("sparsity", "bf16 update sparsity", 100.0), ("max_angle_mean_deg",
            "max principal angle, mean (deg)", 1.0), ("stable_rank", "stable rank of dW (end)",
            1.0), ("acc_gain", "accuracy gain over the anchor", 1.0)]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
  for ax, (key, name, mult) in zip(axes, panels):
    for method, rows in points.items():
      xs = [r["budget"] for r in rows if r.get(key) is not None]
      ys = [mult * r[key] for r in rows if r.get(key) is not None]
      if xs:
        ax.plot(xs, ys, "o-", color=color(method), label=LABELS.get(method, method))
      at = [r for r in rows if r["scale"] == 1.0 and r.get(key) is not None]
      if at:
        ax.plot([at[0]["budget"]], [mult * at[0][key]], "*", ms=13, color=color(method),
                markeredgecolor="k")
    ax.set_xscale("log")
    ax.set(xlabel="update budget (bf16 half-ulps)", ylabel=name, title=name)
    if key == "acc_gain":
      ax.axhline(0, color="k", lw=0.8)
    ax.legend(fontsize=8)
  fig.suptitle("Regime map (beyond the paper): each method from the same anchor at several "
               "budgets; star = the paper's budget")
  return _save(fig, path)


def fig_accuracy(results: dict, path):
  acc = results.get("accuracy", {})
  if not acc:
    return None
  later = _later_seed_runs(results)
  mapped = {r["run"] for r in (results.get("regime_map") or {}).get("rows", [])}
  runs = [r for r in acc if r not in later and (r not in mapped or r in _FIXED)]
  fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(runs) + 2), 4.2))
  bars = [_acc_bar(results, r) for r in runs]
  ax.bar(range(len(runs)), [b[0] for b in bars], yerr=[b[1] for b in bars], capsize=3,
         color=[color(r, results) for r in runs], edgecolor="k")
  for i, b in enumerate(bars):
    if len(b[2]) > 1:
      ax.plot([i] * len(b[2]), b[2], "k.", ms=4)
  for bar, r in zip(ax.patches, runs):
    if r.endswith("_rank16"):
      bar.set_hatch("//")
  ax.set_xticks(range(len(runs)), [label(r, results) for r in runs], rotation=40, ha="right",
                fontsize=8)
  th = results.get("thresholds", {})
  if "teacher_min" in th:
    ax.axhline(th["teacher_min"], color=color("teacher"), ls="--", lw=1,
               label=f"teacher threshold {th['teacher_min']}")
  if "anchor" in acc:
    ax.axhline(acc["anchor"]["acc"], color=color("anchor"), ls=":", lw=1.5,
               label="anchor accuracy")
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("eval accuracy (avg@k)")
  ax.set_title("Accuracy on the eval split (seeded runs: mean over seeds +- SE, dots: seeds)",
               fontsize=9)
  ax.legend(fontsize=8)
  return _save(fig, path)


FIGURES = {
    "accuracy": fig_accuracy,
    "sparsity_per_type": fig_sparsity_per_type,
    "spectral": fig_spectral,
    "mask_overlap": fig_mask_overlap,
    "trajectories": fig_trajectories,
    "rank16": fig_rank16,
    "control_sparsify": fig_control_sparsify,
    "control_offpolicy": fig_control_offpolicy,
    "control_mixing": fig_control_mixing,
    "adapters": fig_adapters,
    "regime_map": fig_regime_map,
}


def write_all(results: dict, out_dir) -> dict[str, str]:
  """Draws every figure it has data for; returns {figure name: file name}."""
  out_dir = pathlib.Path(out_dir)
  out = {}
  for name, fn in FIGURES.items():
    p = fn(results, out_dir / f"{name}.png")
    if p is not None:
      out[name] = p.name
  return out

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


def _ordered_types(types) -> list[str]:
  """Module types in the fixed order of `_TYPE_ORDER`, others after it alphabetically."""
  types = set(types)
  return [t for t in _TYPE_ORDER if t in types] + sorted(types - set(_TYPE_ORDER))


def fig_sparsity_per_type(results: dict, path):
  methods = _methods(results, "endpoint")
  if not methods:
    return None
  types = _ordered_types(t for m in methods for t in results["endpoint"][m]["sparsity_per_type"])
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
    # None: a run whose update changed no bf16 code has no update mask (0 / 0): no bar
    ax.bar(x + (i - (len(methods) - 1) / 2) * w,
           [np.nan if e[k] is None else 100 * e[k] for k, _ in kinds], w,
           color=color(m), label=label(m))
  base = results["endpoint"][methods[0]]["baseline"]
  ax.axhline(100 * base, color="k", ls="--", lw=1, label=f"random baseline ({100 * base:.0f}%)")
  ax.set_xticks(x, [t for _, t in kinds])
  ax.set_ylabel("overlap with update mask (%)")
  ax.set_title("Update-mask localisation")
  ax.legend()
  return _save(fig, path)


_TRAJ = [("stable_rank", "stable rank of dW_t"), ("frobenius", "||dW_t||_F"),
         ("hill", "Hill tail estimate"), ("sim_k", "Sim_K(t, t_end)")]


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
    ks = sorted({traj[m].get("sim_k_rank") for m in methods} - {None})
    title = f"{name}, K = {', '.join(map(str, ks))}" if key == "sim_k" and ks else name
    ax.set(xlabel="training progress (fraction of steps)", ylabel=name, title=title)
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


_CONTROL_PANELS = [("stable_rank", "stable rank of dW_t", "linear"),
                   ("frobenius", "||dW_t||_F", "log"), ("hill", "Hill tail estimate", "linear")]


def _control_fig(results, path, runs, refs, title):
  """Stable rank, Frobenius norm and Hill estimate of a control's cumulative update (q, k, v, o
  means) against training progress, beside the reference runs (the paper's Figs 7-9)."""
  traj = results.get("trajectory", {})
  runs = [r for r in runs if r in traj]
  if not runs:
    return None
  fig, axes = plt.subplots(1, len(_CONTROL_PANELS), figsize=(16, 3.9))
  for ax, (key, name, scale) in zip(axes, _CONTROL_PANELS):
    for ref in refs:
      if ref in traj and traj[ref].get(key):
        ax.plot(traj[ref]["progress"], traj[ref][key], "o-", lw=2.5, color=color(ref),
                label=f"{label(ref)} (reference)")
    for r in runs:
      if traj[r].get(key):
        ax.plot(traj[r]["progress"], traj[r][key], "s--", color=color(r, results),
                label=label(r, results))
    ax.set_yscale(scale)
    ax.set(xlabel="training progress (fraction of steps)", ylabel=f"{name} (q, k, v, o mean)",
           title=name)
    ax.legend(fontsize=7)
  fig.suptitle(title)
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


def fig_singular_values(results: dict, path):
  """The paper's Fig 2 singular-value panel for each method's representative matrix: the
  spectra of W_0 and W_1 (nearly on top of each other), their relative shift, and the spectrum
  of the update dW = W_1 - W_0 (`endpoint[m]` sigma0, sigma1, sigma_dw)."""
  ep = results.get("endpoint", {})
  methods = [m for m in _methods(results, "endpoint")
             if ep[m].get("sigma1") or ep[m].get("sigma_dw")]
  if not methods:
    return None
  fig, axes = plt.subplots(1, 3, figsize=(15, 3.9))
  for m in methods:
    e = ep[m]
    s0, s1 = np.asarray(e.get("sigma0", []), float), np.asarray(e.get("sigma1", []), float)
    if s1.size:
      i = np.arange(1, s1.size + 1)
      axes[0].plot(i, s0, ":", color=color(m), lw=2,
                   label=f"{label(m)}: W_0 ({e.get('origin', '')})")
      axes[0].plot(i, s1, "-", color=color(m), lw=1, label=f"{label(m)}: W_1")
      with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(s1 - s0) / s0
      axes[1].plot(i, rel, "o-", ms=3, color=color(m), label=label(m))
    sd = np.asarray(e.get("sigma_dw", []), float)
    if sd.size:
      axes[2].plot(np.arange(1, sd.size + 1), sd, "o-", ms=3, color=color(m), label=label(m))
  rep = ep[methods[0]].get("rep_matrix", "?")
  axes[0].set(xlabel="singular-value index i", ylabel="sigma_i", yscale="log",
              title=f"Singular values of W_0 and W_1, {rep}")
  axes[1].set(xlabel="singular-value index i",
              ylabel="|sigma_i(W_1) - sigma_i(W_0)| / sigma_i(W_0)",
              yscale="log", title="Relative shift of each singular value")
  axes[2].set(xlabel="singular-value index i", ylabel="sigma_i(dW)", yscale="log",
              title="Singular values of the update dW = W_1 - W_0")
  for ax in axes:
    ax.legend(fontsize=7)
  fig.suptitle(f"Spectra of the representative matrix {rep} (SFT: base -> anchor; OPD, RLVR: "
               "anchor -> end)")
  return _save(fig, path)


_LOCAL_PANELS = [("sparsity", "bf16 update sparsity", "viridis"),
                 ("overlap_principal", "principal-mask overlap", "magma"),
                 ("overlap_low", "low-magnitude-mask overlap", "magma")]


def localisation_grid(per_matrix: dict, key: str) -> tuple[np.ndarray, list[int], list[str]]:
  """The layer x module-type grid of `key` over the layered weights of an endpoint's
  `per_matrix`: each cell pools the weights of that (layer, type) (an MoE layer's experts), the
  sparsity weighted by entry count, an overlap as the unweighted mean over matrices with a value;
  NaN where no weight has a value. Returns (grid [layers, types], layers, types)."""
  cells: dict[tuple[int, str], list[tuple[float, int]]] = {}
  for d in per_matrix.values():
    if d.get("layer") is None or d.get(key) is None:
      continue
    cells.setdefault((int(d["layer"]), d["type"]), []).append((float(d[key]), int(d["n"])))
  layers = sorted({layer for layer, _ in cells})
  types = _ordered_types(t for _, t in cells)
  grid = np.full((len(layers), len(types)), np.nan)
  for (layer, t), vals in cells.items():
    v = np.asarray([x for x, _ in vals])
    w = np.asarray([n for _, n in vals], float) if key == "sparsity" else np.ones(len(vals))
    grid[layers.index(layer), types.index(t)] = float(np.sum(v * w) / np.sum(w))
  return grid, layers, types


def fig_localisation(results: dict, path):
  """The paper's Fig 3: layer x module-type heatmaps of bf16 update sparsity and of the
  principal- and low-magnitude-mask overlaps, one column per method (`endpoint[m].per_matrix`);
  each row shares one colour scale, the mask overlaps centred on the random baseline."""
  ep = results.get("endpoint", {})
  methods = [m for m in _methods(results, "endpoint") if ep[m].get("per_matrix")]
  if not methods:
    return None
  panels = []
  for key, name, cmap in _LOCAL_PANELS:
    grids = {m: localisation_grid(ep[m]["per_matrix"], key) for m in methods}
    if any(np.isfinite(g[0]).any() for g in grids.values()):
      panels.append((key, name, cmap, grids))
  if not panels:
    return None
  n_layers = max(len(g[1]) for _, _, _, grids in panels for g in grids.values())
  fig, axes = plt.subplots(len(panels), len(methods), squeeze=False, layout="constrained",
                           figsize=(3.8 * len(methods) + 1.5,
                                    len(panels) * max(2.6, 1.0 + 0.25 * n_layers) + 0.5))
  base = ep[methods[0]].get("baseline") or 0.5
  for row, (key, name, cmap, grids) in enumerate(panels):
    vals = np.concatenate([g[0][np.isfinite(g[0])] for g in grids.values()])
    if key == "sparsity":
      norm = matplotlib.colors.Normalize(0.0, 100.0)
    else:  # diverging around the random baseline
      mid = 100 * base
      half = max(float(np.max(np.abs(100 * vals - mid))), 1.0)
      norm = matplotlib.colors.TwoSlopeNorm(mid, max(0.0, mid - half), min(100.0, mid + half))
      cmap = "RdBu_r"
    for col, m in enumerate(methods):
      ax = axes[row, col]
      grid, layers, types = grids[m]
      im = ax.imshow(100 * grid, aspect="auto", cmap=cmap, norm=norm, origin="lower")
      if grid.size <= 120:  # small grids: the values in the cells
        for (i, j), v in np.ndenumerate(100 * grid):
          if np.isfinite(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="w" if key == "sparsity" and v < 60 else "k")
      ax.set_xticks(range(len(types)), types, fontsize=8)
      ax.set_yticks(range(len(layers)), layers, fontsize=7)
      ax.set_xlabel("module type", fontsize=8)
      ax.set_ylabel("layer", fontsize=8)
      ax.set_title(f"{label(m)}: {name}", fontsize=9, color=color(m))
    unit = "% unchanged" if key == "sparsity" else f"% of update mask (random {100 * base:.0f})"
    fig.colorbar(im, ax=list(axes[row]), label=unit, shrink=0.9)
  fig.suptitle("Per-layer localisation of the update (SFT: base -> anchor; OPD, RLVR: "
               "anchor -> end)")
  path = pathlib.Path(path)
  fig.savefig(path, dpi=_DPI)
  plt.close(fig)
  return path


def fig_progress_accuracy(results: dict, path):
  """The paper's Fig 6: eval accuracy against training progress of the plain OPD and SFT runs
  (`progress_accuracy`, every seed: the first bold, the others thin) and their rank-K arms,
  which resume the plain run at `rank16[m].resume_step` and are measured at their end
  (`accuracy[projected run]`), drawn from the plain run's point at the resume step."""
  prog = results.get("progress_accuracy") or {}
  r16 = results.get("rank16", {})
  acc = results.get("accuracy", {})
  methods = [m for m in ("opd", "sft") if m in prog]
  if not methods:
    return None
  fig, axes = plt.subplots(1, len(methods), figsize=(6.2 * len(methods), 4.0), squeeze=False)
  for ax, m in zip(axes[0], methods):
    plain_runs = [r for r in (r16.get(m, {}).get("plain_runs") or _seed_runs(results, m))
                  if r in prog] or [m]
    proj = r16.get(m, {})
    proj_runs = list(proj.get("projected_runs") or
                     ([proj["projected_run"]] if "projected_run" in proj else []))
    for i, run in enumerate(plain_runs):
      c = prog[run]
      first = i == 0
      ax.errorbar(c["progress"], c["acc"], yerr=c["stderr"] if first else None,
                  fmt="o-" if first else "-", lw=2 if first else 0.8, alpha=1 if first else 0.5,
                  capsize=3, color=color(m), label=f"{label(m)} (plain)" if first else None)
      if i >= len(proj_runs) or proj_runs[i] not in acc:
        continue
      end = acc[proj_runs[i]]
      start_step = proj.get("resume_step")
      xs, ys = [1.0], [float(end["acc"])]
      if start_step in c["steps"]:
        j = c["steps"].index(start_step)
        xs, ys = [c["progress"][j]] + xs, [c["acc"][j]] + ys
      ax.plot(xs, ys, "--", lw=2 if first else 0.8, alpha=1 if first else 0.5, color=color(m),
              label=f"{label(proj_runs[i], results)} (dashed: resumed at step {start_step}, "
                    "measured at its end)" if first else None)
      ax.errorbar([1.0], [end["acc"]], yerr=[end.get("stderr", 0.0)] if first else None,
                  fmt="s" if first else ".", mfc="white" if first else color(m), ms=8 if first
                  else 5, capsize=3, color=color(m), alpha=1 if first else 0.5)
    if "anchor" in acc:
      ax.axhline(acc["anchor"]["acc"], color=color("anchor"), ls=":", lw=1.2,
                 label="anchor accuracy")
    ax.set(xlabel="training progress (fraction of steps)", ylabel="eval accuracy (avg@k)",
           title=f"{label(m)}: plain vs projected")
    ax.legend(fontsize=8)
  fig.suptitle("Accuracy against training progress (first seed +- SE over problems; thin: other "
               "seeds)", fontsize=10)
  return _save(fig, path)


def fig_mask_consensus(results: dict, path):
  """Update-mask consensus (The Path Not Taken, Table 2 style): the Jaccard index of the sets of
  bf16-changed weights between seeds of one method and between methods (`mask_consensus`), overall
  and per module type, beside the random baseline (masks of the same sizes placed independently).
  """
  cons = results.get("mask_consensus") or {}
  groups = [g for g, d in cons.items() if d.get("jaccard_mean") is not None]
  if not groups:
    return None
  types = _ordered_types(t for g in groups for t in cons[g].get("by_type", {}))
  cols = ["overall"] + types
  fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(cols), 4.0))
  w = 0.8 / len(groups)
  x = np.arange(len(cols))
  for i, g in enumerate(groups):
    d = cons[g]
    vals = [d["jaccard_mean"]] + [d["by_type"].get(t) for t in types]
    xs = x + (i - (len(groups) - 1) / 2) * w
    fam = g.split(" vs ")[0]
    is_cross = d.get("kind") == "methods"
    ax.bar(xs, [np.nan if v is None else v for v in vals], w, color=color(fam),
           hatch="//" if is_cross else None, edgecolor="k",
           label=(f"{' vs '.join(label(p) for p in g.split(' vs '))} (first seeds)" if is_cross
                  else f"{label(g)}: {len(d['pairs'])} seed pair(s)"))
    pj = [p["jaccard"] for p in d["pairs"] if p["jaccard"] is not None]
    if len(pj) > 1:
      ax.plot([xs[0]] * len(pj), pj, "k.", ms=4)
    if d.get("baseline_mean") is not None:
      ax.hlines(d["baseline_mean"], xs[0] - w / 2, xs[0] + w / 2, colors="k", linestyles="--",
                label="random baseline (same mask sizes)" if i == 0 else None)
  ax.set_xticks(x, cols)
  ax.set(xlabel="module type", ylabel="Jaccard index |A & B| / |A | B|", ylim=(0, 1.05),
         title="Update-mask consensus across runs (bf16-changed entries)")
  ax.legend(fontsize=8)
  return _save(fig, path)


_LIVE_PANELS = [("density", "bf16-visible density of W_t - W_0 (all weights)"),
                ("stable_rank", "stable rank of dW_t"), ("frobenius", "||dW_t||_F"),
                ("sim_k", "Sim_K to the previous point")]


def live_curve(series: dict, key: str) -> tuple[list[float], list[float]]:
  """(progress, values) of one live-geometry quantity of a run (`runs.live_series` plus its
  `steps`): 'density' is the overall density; the others are averaged over the attention
  types present (q, k, v, o: the monitor's own means over layers); points without a value
  (Sim_K at a process's first point) are left out."""
  if key == "density":
    cols = [series.get("geometry/density")]
  else:
    cols = [v for k, v in sorted(series.items()) if k.startswith(f"geometry/{key}/")]
  cols = [c for c in cols if c]
  xs, ys = [], []
  for i, step in enumerate(series.get("step", [])):
    vals = [c[i] for c in cols if c[i] is not None and np.isfinite(c[i])]
    if vals and len(vals) == len(cols):
      xs.append(step / series["steps"])
      ys.append(float(np.mean(vals)))
  return xs, ys


def fig_live_geometry(results: dict, path):
  """The training loop's live geometry monitor (`geometry.every`, beyond the paper) for the
  plain OPD, RLVR and SFT runs (first seed bold, other seeds thin): density, stable rank,
  Frobenius norm and Sim_K of the update since each run's start, against progress."""
  live = results.get("live_geometry") or {}
  methods = [m for m in ("sft", "opd", "rlvr") if m in live]
  if not methods:
    return None
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
  for ax, (key, name) in zip(axes, _LIVE_PANELS):
    for m in methods:
      for i, run in enumerate([r for r in (_seed_runs(results, m) or [m]) if r in live]):
        xs, ys = live_curve(live[run], key)
        first = i == 0
        ax.plot(xs, ys, "o-" if first else "-", lw=2 if first else 0.8,
                alpha=1 if first else 0.5, color=color(m), label=label(m) if first else None)
    ax.set(xlabel="training progress (fraction of steps)", ylabel=name, title=name)
    if key == "density":
      ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
  fig.suptitle("Live geometry from the training loop's monitor (attention q, k, v, o means; "
               "thin: other seeds)", fontsize=10)
  return _save(fig, path)


FIGURES = {
    "accuracy": fig_accuracy,
    "sparsity_per_type": fig_sparsity_per_type,
    "spectral": fig_spectral,
    "singular_values": fig_singular_values,
    "mask_overlap": fig_mask_overlap,
    "localisation": fig_localisation,
    "mask_consensus": fig_mask_consensus,
    "trajectories": fig_trajectories,
    "live_geometry": fig_live_geometry,
    "rank16": fig_rank16,
    "progress_accuracy": fig_progress_accuracy,
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

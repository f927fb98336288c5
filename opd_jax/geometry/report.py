"""`diagnose`: endpoint (and trajectory) diagnostics of a fine-tuning run, written as
`metrics.json`, `summary.md` and PNG figures; plus plotting helpers for multi-method figures.

    from opd_jax.geometry import report
    result = report.diagnose("ckpt/base", "ckpt/tuned", snapshots=["snap/63", "snap/127"],
                             out_dir="diag")
    report.plot_trajectories({"OPD": opd["trajectory"], "SFT": sft["trajectory"]}, "traj.png")

CLI: `opd-jax diagnose --base A --tuned B [--snapshots S1 S2 ...] --out DIR` (wired in
`opd_jax/cli.py`; it only calls `diagnose`). `add_diagnose_args(parser)` / `run_diagnose(args)`
are the same flags and call for other entry points.

Each of base / tuned / snapshots is a params dict in memory, a Hugging Face checkpoint directory
(holding `config.json`; read by `opd_jax.models.hf.load`) or one of our checkpoint / snapshot paths
(`opd_jax.train.checkpoint.load_params`).

Trajectory convention: W_0 = base, the snapshots in training order, and t_end = tuned, which is
appended unless it is already the last snapshot (`DiagnoseConfig.append_tuned`). Steps default to
the snapshot directory names when they are all integers (our snapshot layout `<root>/<step>`),
else 1..T.

Colours: one method one colour in every figure (`method_colors`): fixed colours for the paper's
methods (SFT, OPD, RLVR, ...), then a fixed palette in order of first appearance.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from opd_jax import errors
from opd_jax.geometry import endpoint as endpoint_lib
from opd_jax.geometry import matrices
from opd_jax.geometry import trajectory as trajectory_lib


@dataclasses.dataclass(frozen=True)
class DiagnoseConfig:
  """Knobs of `diagnose`.

  Attributes:
    endpoint: `EndpointConfig` (k, mask rank r, alpha, ...).
    trajectory: `TrajectoryConfig` (hill_k, sim_k, ...).
    modules: module types of the trajectory (paper: attention q, k, v, o).
    steps: training step of every trajectory point (snapshots, then tuned when appended);
      default: inferred (see the module docstring).
    append_tuned: make `tuned` the trajectory's last point when it is not the last snapshot.
    figures: write the PNG figures.
  """

  endpoint: endpoint_lib.EndpointConfig = endpoint_lib.EndpointConfig()
  trajectory: trajectory_lib.TrajectoryConfig = trajectory_lib.TrajectoryConfig()
  modules: tuple[str, ...] = matrices.ATTENTION_TYPES
  steps: tuple[float, ...] | None = None
  append_tuned: bool = True
  figures: bool = True


# -- colours ------------------------------------------------------------------------------------
_FIXED_COLORS = {
    "base": "#7f7f7f", "sft": "#1f77b4", "opd": "#d62728", "rlvr": "#2ca02c",
    "mixed": "#9467bd", "distill": "#ff7f0e", "opd_offpolicy": "#e377c2",
    "opd_rank16": "#8c564b", "sft_rank16": "#17becf",
}
_PALETTE = ("#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
            "#e6550d", "#31a354", "#756bb1", "#636363", "#9c9ede")


def _norm_method(name: str) -> str:
  return name.lower().replace("-", "_").replace(" ", "_")


def method_colors(methods: Sequence[str]) -> dict[str, str]:
  """A colour per method: fixed ones for known names (case-insensitive: SFT, OPD, RLVR, mixed,
  distill, ...), then the palette in order of first appearance."""
  out, used, i = {}, set(), 0
  for m in methods:
    c = _FIXED_COLORS.get(_norm_method(m))
    if c is not None:
      out[m] = c
      used.add(c)
  for m in methods:
    if m in out:
      continue
    while _PALETTE[i % len(_PALETTE)] in used and i < len(_PALETTE):
      i += 1
    out[m] = _PALETTE[i % len(_PALETTE)]
    used.add(out[m])
    i += 1
  return out


def _pyplot():
  import matplotlib

  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  return plt


def _save(fig, out_png) -> str:
  out_png = pathlib.Path(out_png)
  out_png.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)
  _pyplot().close(fig)
  return str(out_png)


# -- multi-method figures -----------------------------------------------------------------------
TRAJECTORY_LABELS = {"stable_rank": "stable rank of dW_t", "frobenius": "||dW_t||_F",
                     "hill": "Hill tail index", "sim_end": "Sim_K(t, t_end)",
                     "sim_prev": "Sim_K(t, t-1)"}


def plot_trajectories(runs: Mapping[str, Mapping], out_png, *,
                      metrics: Sequence[str] = ("stable_rank", "frobenius", "hill", "sim_end"),
                      module_type: str | None = None) -> str:
  """One panel per metric against training progress (step / last step), one line per method.

  Args:
    runs: {method: `trajectory_metrics` output}.
    out_png: path of the PNG.
    metrics: trajectory metrics to plot.
    module_type: plot the mean over this module type instead of over all matrices.
  """
  plt = _pyplot()
  colors = method_colors(list(runs))
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    for method, traj in runs.items():
      agg = traj["overall"] if module_type is None else traj["by_type"][module_type]
      if metric not in agg:
        continue
      ax.plot(traj["progress"], agg[metric], marker="o", color=colors[method], label=method)
    ax.set_xlabel("training progress (step / last step)")
    ax.set_ylabel(TRAJECTORY_LABELS.get(metric, metric))
    ax.set_title(TRAJECTORY_LABELS.get(metric, metric)
                 + ("" if module_type is None else f" ({module_type})"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return _save(fig, out_png)


def plot_angle_curves(runs: Mapping[str, Mapping], out_png) -> str:
  """Principal angle vs index (input and output side) of each method's representative matrix.

  Args:
    runs: {method: `endpoint_metrics` output (with 'representative')}.
  """
  plt = _pyplot()
  colors = method_colors(list(runs))
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for ax, side in zip(axes, ("in", "out")):
    for method, ep in runs.items():
      rep = ep.get("representative")
      if not rep:
        continue
      angles = rep[f"angles_{side}_deg"]
      ax.plot(np.arange(1, len(angles) + 1), angles, color=colors[method],
              label=f"{method} ({rep['name']})")
    ax.set_xlabel("principal angle index i")
    ax.set_ylabel("angle (degrees)")
    ax.set_title(f"top-k principal angles, {side}put side")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return _save(fig, out_png)


def plot_per_matrix(runs: Mapping[str, Mapping], metric: str, out_png, *,
                    log: bool = False) -> str:
  """A per-matrix metric (e.g. 'max_angle_deg', 'nss') in params order, one series per method;
  module types are separated by dotted lines and named on the x axis."""
  plt = _pyplot()
  colors = method_colors(list(runs))
  fig, ax = plt.subplots(figsize=(10, 3.6))
  types: list[str] = []
  for method, ep in runs.items():
    names = [n for n, d in ep["matrices"].items() if metric in d]
    values = [ep["matrices"][n][metric] for n in names]
    types = types or [ep["matrices"][n]["type"] for n in names]
    ax.plot(np.arange(len(values)), values, marker=".", linestyle="-", linewidth=0.6,
            color=colors[method], label=method)
  starts = [i for i, t in enumerate(types) if i == 0 or t != types[i - 1]]
  for i in starts[1:]:
    ax.axvline(i - 0.5, color="0.6", linestyle=":", linewidth=0.8)
  ends = starts[1:] + [len(types)]
  ax.set_xticks([(a + b - 1) / 2 for a, b in zip(starts, ends)])
  ax.set_xticklabels([types[a] for a in starts])
  ax.set_xlabel("matrix (params order, by module type then layer)")
  ax.set_ylabel(metric)
  if log:
    ax.set_yscale("log")
  ax.set_title(f"{metric} per matrix")
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8)
  return _save(fig, out_png)


def plot_mask_overlaps(runs: Mapping[str, Mapping], out_png) -> str:
  """Principal- and low-magnitude-mask overlaps (overall mean) per method, with the random
  baselines (the realised mask fractions, ~alpha) as dashed lines."""
  plt = _pyplot()
  colors = method_colors(list(runs))
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  kinds = (("overlap_principal", "frac_principal", "principal mask"),
           ("overlap_low", "frac_low", "low-magnitude mask"))
  width = 0.8 / max(1, len(runs))
  for j, (method, ep) in enumerate(runs.items()):
    vals = [ep["overall"].get(k, math.nan) for k, _, _ in kinds]
    ax.bar(np.arange(len(kinds)) + (j - (len(runs) - 1) / 2) * width, vals, width,
           color=colors[method], label=method)
  for i, (_, frac, _) in enumerate(kinds):
    base = _nan_mean([ep["overall"].get(frac, math.nan) for ep in runs.values()])
    ax.hlines(base, i - 0.45, i + 0.45, colors="k", linestyles="--",
              label="random baseline" if i == 0 else None)
  ax.set_xticks(np.arange(len(kinds)))
  ax.set_xticklabels([label for _, _, label in kinds])
  ax.set_ylabel("|M & M_upd| / |M_upd|")
  ax.set_title("update-mask overlap")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8)
  return _save(fig, out_png)


def _nan_mean(values) -> float:
  vals = [v for v in values if v is not None and not math.isnan(v)]
  return float(np.mean(vals)) if vals else math.nan


# -- summary --------------------------------------------------------------------------------------
def _fmt(v) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "-"
  if isinstance(v, int):
    return str(v)
  av = abs(v)
  return f"{v:.3e}" if av and (av < 1e-3 or av >= 1e4) else f"{v:.4f}"


_SUMMARY_COLS = (("sparsity", "bf16 sparsity"), ("density", "density"),
                 ("max_angle_deg", "mean max angle (deg)"),
                 ("max_angle_deg_max", "max angle (deg)"), ("nss", "NSS"),
                 ("overlap_principal", "principal overlap"), ("frac_principal", "baseline"),
                 ("overlap_low", "low-mag overlap"), ("frac_low", "baseline"))


def summary_markdown(result: Mapping) -> str:
  """The markdown summary of a `diagnose` result."""
  ep = result["endpoint"]
  lines = ["# Parameter-space diagnostics", "",
           f"- base: `{result['base']}`", f"- tuned: `{result['tuned']}`",
           f"- k = {ep['config']['k']}, mask rank r = {ep['config']['mask_rank']}, "
           f"alpha = {ep['config']['alpha']}", "",
           "| scope | n params | " + " | ".join(c for _, c in _SUMMARY_COLS) + " |",
           "|---|---|" + "---|" * len(_SUMMARY_COLS)]
  rows = [("overall", ep["overall"])] + list(ep["by_type"].items())
  for scope, agg in rows:
    lines.append(f"| {scope} | {agg['n_params']} | "
                 + " | ".join(_fmt(agg.get(k)) for k, _ in _SUMMARY_COLS) + " |")
  rep = ep.get("representative")
  if rep:
    lines += ["", f"Representative matrix `{rep['name']}` (k = {rep['k']}): largest angle "
              f"{_fmt(max(rep['angles_in_deg']))} deg (input side), "
              f"{_fmt(max(rep['angles_out_deg']))} deg (output side)."]
  traj = result.get("trajectory")
  if traj:
    metrics = [m for m in trajectory_lib.METRICS if m in traj["overall"]]
    lines += ["", f"## Trajectory ({', '.join(traj['modules'])}; mean over matrices)", "",
              "| step | progress | " + " | ".join(metrics) + " |",
              "|---|---|" + "---|" * len(metrics)]
    for t, step in enumerate(traj["steps"]):
      lines.append(f"| {_fmt(step)} | {_fmt(traj['progress'][t])} | "
                   + " | ".join(_fmt(traj["overall"][m][t]) for m in metrics) + " |")
  if result.get("figures"):
    lines += ["", "## Figures", ""] + [f"![{pathlib.Path(f).stem}]({pathlib.Path(f).name})"
                                      for f in result["figures"]]
  return "\n".join(lines) + "\n"


def _json_safe(x):
  if isinstance(x, float):
    return None if math.isnan(x) or math.isinf(x) else x
  if isinstance(x, Mapping):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return _json_safe(x.item())
  return x


# -- diagnose -----------------------------------------------------------------------------------
def _infer_steps(points: Sequence[Any]) -> list[float] | None:
  steps = []
  for p in points:
    if isinstance(p, Mapping):
      return None
    name = pathlib.Path(p).name
    if not name.isdigit():
      return None
    steps.append(float(name))
  return steps


def _same_source(a, b) -> bool:
  if isinstance(a, Mapping) or isinstance(b, Mapping):
    return a is b
  if not (pathlib.Path(a).exists() and pathlib.Path(b).exists()):
    return False
  return pathlib.Path(a).resolve() == pathlib.Path(b).resolve()


def _check_inputs(base, tuned, snapshots, p0, p1) -> None:
  """Everything `diagnose` will read is checked before anything is computed: every path exists,
  base and tuned have the same tensors with the same shapes, and every value is finite. Raises a
  `UserError` naming the input and the tensor."""
  for what, src in [("--snapshots", s) for s in snapshots]:
    if not isinstance(src, Mapping) and not pathlib.Path(src).exists():
      raise errors.UserError(f"{what}: {str(src)!r} does not exist")
  import jax  # the params trees are nested dicts of arrays
  leaves0 = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(p0)}
  leaves1 = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(p1)}
  only = sorted(set(leaves0) ^ set(leaves1))
  if only:
    raise errors.UserError(f"--base {matrices.describe_source(base)} and --tuned "
                           f"{matrices.describe_source(tuned)} hold different tensors: "
                           f"{only[:4]} (not the same architecture)")
  for name, a in leaves0.items():
    b = leaves1[name]
    if tuple(np.shape(a)) != tuple(np.shape(b)):
      raise errors.UserError(f"tensor {name}: shape {tuple(np.shape(a))} in --base but "
                             f"{tuple(np.shape(b))} in --tuned")
    for flag, src, x in (("--base", base, a), ("--tuned", tuned, b)):
      arr = np.asarray(x)
      if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr.astype(np.float32))))
        if bad:
          raise errors.UserError(f"{flag} {matrices.describe_source(src)}: tensor {name} has "
                                 f"{bad} non-finite values (NaN / inf); nothing was computed")


def diagnose(base, tuned, snapshots: Sequence[Any] = (), out_dir="diagnostics",
             cfg: DiagnoseConfig | None = None) -> dict:
  """Endpoint diagnostics base -> tuned (and the trajectory over `snapshots`), written to
  `out_dir` (`metrics.json`, `summary.md`, PNGs).

  Returns:
    {'base', 'tuned', 'endpoint': endpoint_metrics(...), 'trajectory': trajectory_metrics(...)
     or None, 'overall': the endpoint's overall aggregate, 'figures': [paths], 'files': [paths]}.
  """
  cfg = cfg or DiagnoseConfig()
  out_dir = pathlib.Path(out_dir)
  for what, src in (("--base", base), ("--tuned", tuned)):
    if not isinstance(src, Mapping) and not pathlib.Path(src).exists():
      raise errors.UserError(f"{what}: {str(src)!r} does not exist")
  p0 = matrices.resolve_params(base)
  p1 = matrices.resolve_params(tuned)
  _check_inputs(base, tuned, list(snapshots), p0, p1)
  out_dir.mkdir(parents=True, exist_ok=True)
  ep = endpoint_lib.endpoint_metrics(p0, p1, cfg.endpoint)
  traj = None
  points = list(snapshots)
  if points:
    if cfg.append_tuned and not _same_source(points[-1], tuned):
      points.append(tuned)
    steps = list(cfg.steps) if cfg.steps is not None else _infer_steps(points)
    sources = [p1 if _same_source(p, tuned) else p for p in points]  # tuned is loaded once
    traj = trajectory_lib.trajectory_metrics(p0, sources, steps, cfg.trajectory, cfg.modules)
  result = {"base": matrices.describe_source(base), "tuned": matrices.describe_source(tuned),
            "endpoint": ep, "trajectory": traj, "overall": ep["overall"], "figures": []}
  if cfg.figures:
    label = {"run": ep}
    figs = [plot_per_matrix(label, "max_angle_deg", out_dir / "max_angle_per_matrix.png")
            if cfg.endpoint.angles else None,
            plot_per_matrix(label, "nss", out_dir / "nss_per_matrix.png", log=True)
            if cfg.endpoint.angles else None,
            plot_angle_curves(label, out_dir / "angles_representative.png")
            if ep.get("representative") else None,
            plot_mask_overlaps(label, out_dir / "mask_overlap.png") if cfg.endpoint.masks
            else None]
    if traj is not None:
      metrics = [m for m in ("stable_rank", "frobenius", "hill", "sim_end")
                 if m in traj["overall"]]
      figs.append(plot_trajectories({"run": traj}, out_dir / "trajectory.png", metrics=metrics))
    result["figures"] = [f for f in figs if f]
  metrics_path = out_dir / "metrics.json"
  metrics_path.write_text(json.dumps(_json_safe({k: v for k, v in result.items()
                                                 if k != "overall"}), indent=1))
  summary_path = out_dir / "summary.md"
  summary_path.write_text(summary_markdown(result))
  result["files"] = [str(metrics_path), str(summary_path)] + result["figures"]
  return result


# -- CLI pieces ---------------------------------------------------------------------------------
def add_diagnose_args(parser) -> None:
  """The `diagnose` flags on an argparse parser."""
  parser.add_argument("--base", required=True, help="W_0: HF checkpoint dir or our checkpoint")
  parser.add_argument("--tuned", required=True, help="W_1: HF checkpoint dir or our checkpoint")
  parser.add_argument("--snapshots", nargs="*", default=[], help="snapshots in training order")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--k", type=int, default=512, help="top-k of the principal angles")
  parser.add_argument("--alpha", type=float, default=0.5, help="mask fraction")
  parser.add_argument("--mask-rank", type=int, default=64, help="rank r of the principal mask")


def run_diagnose(args) -> dict:
  """`diagnose` from parsed `add_diagnose_args` flags."""
  cfg = DiagnoseConfig(endpoint=endpoint_lib.EndpointConfig(
      k=getattr(args, "k", 512), alpha=getattr(args, "alpha", 0.5),
      mask_rank=getattr(args, "mask_rank", 64)))
  return diagnose(args.base, args.tuned, snapshots=tuple(args.snapshots), out_dir=args.out,
                  cfg=cfg)

"""The study's added figures (singular values, localisation heatmaps, accuracy vs progress, the
controls' Frobenius / Hill panels, mask consensus), the numbers they draw (per-matrix endpoint
summary, update-mask Jaccard, localisation grid) against numpy references, and `progress`."""

import itertools
import math
import pathlib

import jax
import numpy as np
import pytest

import geometry_reference as ref
from opd_jax.geometry import endpoint, matrices
from opd_jax.study import diagnostics, figures, progress, reporting

K, R, ALPHA = 6, 3, 0.4


# -- random params in our layout ----------------------------------------------------------------
def _params(rng, vocab=40, d=16, layers=3):
  def n(*shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  return {
      "embed": {"embedding": n(vocab, d)},
      "layers": {
          "attn": {"q_proj": {"kernel": n(layers, d, d)}, "k_proj": {"kernel": n(layers, d, 8)},
                   "v_proj": {"kernel": n(layers, d, 8)}, "o_proj": {"kernel": n(layers, d, d)}},
          "mlp": {"gate_proj": {"kernel": n(layers, d, 24)},
                  "up_proj": {"kernel": n(layers, d, 24)},
                  "down_proj": {"kernel": n(layers, 24, d)}},
          "input_norm": {"scale": 1 + n(layers, d, scale=0.1)}},
      "final_norm": {"scale": 1 + n(d, scale=0.1)},
  }


def _perturb(rng, p0, frac, size=3e-2):
  """Moves a random `frac` of the entries of every leaf by a relative `size` (most change their
  bf16 code), the rest by 1e-5 relative (below bf16 resolution: codes unchanged); a few exact
  zeros go to -0.0 (unchanged by definition)."""
  def f(x):
    hit = rng.random(x.shape) < frac
    rel = np.where(hit, size * rng.standard_normal(x.shape), 1e-5)
    y = (x * (1 + rel)).astype(np.float32)
    return y
  return jax.tree_util.tree_map(f, p0)


def _with_signed_zeros(p0, p1):
  """Sets a few entries of q_proj to +0 in W_0 and -0 in W_1: no change."""
  a0 = p0["layers"]["attn"]["q_proj"]["kernel"]
  a1 = p1["layers"]["attn"]["q_proj"]["kernel"]
  a0[0, 0, :3] = 0.0
  a1[0, 0, :3] = -0.0


# -- per-matrix endpoint summary ------------------------------------------------------------------
def test_endpoint_summary_per_matrix_fields_match_numpy_reference():
  rng = np.random.default_rng(0)
  p0 = _params(rng)
  p1 = _perturb(rng, p0, 0.4)
  _with_signed_zeros(p0, p1)
  cfg = endpoint.EndpointConfig(k=K, mask_rank=R, alpha=ALPHA, progress=False)
  out = endpoint.endpoint_metrics(p0, p1, cfg)
  rep = out["representative"]["name"]
  s = diagnostics.endpoint_summary(out, ALPHA,
                                   sigma_dw=diagnostics.update_singular_values(p0, p1, rep))
  per = s["per_matrix"]
  m0s = matrices.named_matrices(p0, include_1d=True)
  m1s = {m.name: m for m in matrices.named_matrices(p1, include_1d=True)}
  assert set(per) == {m.name for m in m0s}
  for m0 in m0s:
    got, a0, a1 = per[m0.name], np.asarray(m0.array), np.asarray(m1s[m0.name].array)
    assert got["type"] == m0.module_type and got["layer"] == m0.layer and got["n"] == a0.size
    if m0.is_matrix:
      want = ref.matrix_metrics(a0, a1, k=K, r=R, alpha=ALPHA)
      assert got["overlap_principal"] == pytest.approx(want["overlap_principal"], abs=1e-12)
      assert got["overlap_low"] == pytest.approx(want["overlap_low"], abs=1e-12)
    else:
      want = ref.vector_metrics(a0, a1)
      assert got["overlap_principal"] is None and got["overlap_low"] is None
    assert got["sparsity"] == pytest.approx(want["sparsity"], abs=1e-12), m0.name
  # The representative matrix's spectra: W_0, W_1 and dW, descending, against numpy.
  a0, a1 = (np.asarray(m.array, np.float64) for m in
            (next(m for m in m0s if m.name == rep), m1s[rep]))
  np.testing.assert_allclose(s["sigma0"], np.linalg.svd(a0, compute_uv=False), rtol=1e-9)
  np.testing.assert_allclose(s["sigma1"], np.linalg.svd(a1, compute_uv=False), rtol=1e-9)
  # dW's singular values from the eigenvalues of dW^T dW (not an SVD)
  d = a1 - a0
  want_dw = np.sqrt(np.sort(np.linalg.eigvalsh(d.T @ d))[::-1].clip(0))
  np.testing.assert_allclose(s["sigma_dw"], want_dw, rtol=1e-7, atol=1e-12 * want_dw[0])


def test_update_singular_values_names_a_missing_matrix():
  rng = np.random.default_rng(1)
  p0 = _params(rng)
  with pytest.raises(KeyError, match="no matrix 'layers.9.attn.q_proj'"):
    diagnostics.update_singular_values(p0, p0, "layers.9.attn.q_proj")


# -- update-mask Jaccard --------------------------------------------------------------------------
def _ref_jaccard(p0, pa, pb):
  """Per weight and pooled, from index sets of the paper's relative bf16 test."""
  def sets(p1):
    out = {}
    for m0, m1 in zip(matrices.named_matrices(p0, include_1d=True),
                      matrices.named_matrices(p1, include_1d=True)):
      out[m0.name] = (m0.module_type, m0.array.size,
                      set(np.flatnonzero(ref.relative_changed(m0.array, m1.array)).tolist()))
    return out

  sa, sb = sets(pa), sets(pb)
  per, pooled_a, pooled_b, types = {}, set(), set(), {}
  for name, (t, n, a) in sa.items():
    b = sb[name][2]
    per[name] = len(a & b) / len(a | b) if a | b else None
    pooled_a |= {(name, i) for i in a}
    pooled_b |= {(name, i) for i in b}
    ta, tb = types.setdefault(t, (set(), set()))
    ta |= {(name, i) for i in a}
    tb |= {(name, i) for i in b}
  overall = len(pooled_a & pooled_b) / len(pooled_a | pooled_b)
  by_type = {t: (len(a & b) / len(a | b) if a | b else None) for t, (a, b) in types.items()}
  return per, overall, by_type, sa, sb


@pytest.mark.parametrize("seed,fa,fb", [(0, 0.3, 0.3), (1, 0.1, 0.6), (2, 0.5, 0.05)])
def test_update_mask_jaccard_matches_numpy_reference(seed, fa, fb):
  rng = np.random.default_rng(seed)
  p0 = _params(rng)
  pa, pb = _perturb(rng, p0, fa), _perturb(rng, p0, fb)
  _with_signed_zeros(p0, pa)
  # shared moves: the same entries moved the same way in both runs (a consensus to find)
  qa, qb = pa["layers"]["mlp"]["up_proj"]["kernel"], pb["layers"]["mlp"]["up_proj"]["kernel"]
  qb[1] = qa[1]
  got = diagnostics.update_mask_jaccard(p0, pa, pb)
  per, overall, by_type, sa, sb = _ref_jaccard(p0, pa, pb)
  assert set(got["matrices"]) == set(per)
  for name, want in per.items():
    g = got["matrices"][name]
    assert g["changed_a"] == len(sa[name][2]) and g["changed_b"] == len(sb[name][2]), name
    if want is None:
      assert g["jaccard"] is None
    else:
      assert g["jaccard"] == pytest.approx(want, abs=1e-12), name
  assert got["matrices"]["layers.1.mlp.up_proj"]["jaccard"] == 1.0
  assert got["overall"]["jaccard"] == pytest.approx(overall, abs=1e-12)
  for t, want in by_type.items():
    assert got["by_type"][t]["jaccard"] == pytest.approx(want, abs=1e-12), t
  # The random baseline: independent masks of the same sizes, E|A&B| / E|A|B| pooled.
  e_int = sum(len(sa[n][2]) * len(sb[n][2]) / sa[n][1] for n in sa)
  e_uni = sum(len(sa[n][2]) + len(sb[n][2]) for n in sa) - e_int
  assert got["overall"]["baseline"] == pytest.approx(e_int / e_uni, rel=1e-12)


def test_update_masks_count_the_endpoint_changes():
  rng = np.random.default_rng(3)
  p0 = _params(rng)
  p1 = _perturb(rng, p0, 0.25)
  masks = diagnostics.update_masks(p0, p1)
  out = endpoint.endpoint_metrics(p0, p1, endpoint.EndpointConfig(k=K, mask_rank=R, alpha=ALPHA,
                                                                   progress=False))
  assert {n: m.changed for n, m in masks.items()} == {
      n: d["changed"] for n, d in out["matrices"].items()}


def test_mask_jaccard_of_identical_and_disjoint_updates():
  rng = np.random.default_rng(4)
  p0 = _params(rng)
  pa = _perturb(rng, p0, 0.3)
  assert diagnostics.update_mask_jaccard(p0, pa, pa)["overall"]["jaccard"] == 1.0
  # B changes exactly the entries A leaves unchanged: disjoint masks
  pb = jax.tree_util.tree_map(lambda x0, xa: np.where(
      np.asarray(ref.relative_changed(x0, xa)), x0, (x0 * 1.05 + 0.01).astype(np.float32)),
      p0, pa)
  got = diagnostics.update_mask_jaccard(p0, pa, pb)
  assert got["overall"]["jaccard"] == 0.0 and got["overall"]["intersection"] == 0
  unchanged = diagnostics.update_mask_jaccard(p0, p0, p0)
  assert unchanged["overall"]["jaccard"] is None and unchanged["overall"]["baseline"] is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_params_is_bitwise_equality_of_every_leaf(seed, tmp_path):
  """`same_params` (the study's check that the first SFT seed retraced the anchor) against
  numpy's bytes comparison, on random trees; checkpoint paths read the same."""
  from opd_jax.models import transformer
  from opd_jax.train import checkpoint as ckpt_lib
  from opd_jax.train import config as train_config
  rng = np.random.default_rng(seed)
  p0 = _params(rng)
  copy = jax.tree_util.tree_map(np.array, p0)
  assert diagnostics.same_params(p0, copy)
  leaves, treedef = jax.tree_util.tree_flatten(copy)
  i = int(rng.integers(len(leaves)))
  flat = leaves[i].reshape(-1).copy()
  j = int(rng.integers(flat.size))
  flat[j] = np.nextafter(flat[j], np.float32(np.inf))   # one ulp in one entry
  leaves[i] = flat.reshape(leaves[i].shape)
  moved = jax.tree_util.tree_unflatten(treedef, leaves)
  want = all(a.tobytes() == b.tobytes() for a, b in zip(jax.tree_util.tree_leaves(p0), leaves))
  assert diagnostics.same_params(p0, moved) is want is False
  fewer = dict(p0)
  fewer.pop(sorted(fewer)[0])
  assert not diagnostics.same_params(p0, fewer)
  model = train_config.ModelSpec().model
  _, params = transformer.init(model, seed)
  a = ckpt_lib.save_snapshot(tmp_path / "a", 1, params, model)
  b = ckpt_lib.save_snapshot(tmp_path / "b", 1, params, model)
  assert diagnostics.same_params(a, b) and diagnostics.same_params(a, params)


def test_mask_consensus_pairs_every_seed_and_the_first_runs_across_methods(tmp_path):
  rng = np.random.default_rng(5)
  p0 = _params(rng)
  runs = {"opd": {f"opd{i}": _perturb(rng, p0, 0.3) for i in range(3)},
          "rlvr": {f"rlvr{i}": _perturb(rng, p0, 0.1) for i in range(2)},
          "sft": {"sft": _perturb(rng, p0, 0.8)}}
  logs = []
  out = diagnostics.mask_consensus(p0, runs, log=logs.append)
  assert set(out) == {"opd", "rlvr", "opd vs rlvr", "opd vs sft", "rlvr vs sft"}
  assert len(logs) == 6   # each run's mask once
  for fam in ("opd", "rlvr"):
    names = list(runs[fam])
    want = [diagnostics.update_mask_jaccard(p0, runs[fam][a], runs[fam][b])["overall"]
            for a, b in itertools.combinations(names, 2)]
    got = out[fam]
    assert got["kind"] == "seeds" and got["runs"] == names
    assert [(p["a"], p["b"]) for p in got["pairs"]] == list(itertools.combinations(names, 2))
    np.testing.assert_allclose([p["jaccard"] for p in got["pairs"]], [w["jaccard"] for w in want])
    assert got["jaccard_mean"] == pytest.approx(np.mean([w["jaccard"] for w in want]))
    assert got["baseline_mean"] == pytest.approx(np.mean([w["baseline"] for w in want]))
    assert got["jaccard_min"] <= got["jaccard_mean"] <= got["jaccard_max"]
  cross = out["opd vs rlvr"]
  assert cross["kind"] == "methods" and cross["runs"] == ["opd0", "rlvr0"]
  assert cross["jaccard_mean"] == pytest.approx(diagnostics.update_mask_jaccard(
      p0, runs["opd"]["opd0"], runs["rlvr"]["rlvr0"])["overall"]["jaccard"])


# -- localisation grid -----------------------------------------------------------------------------
def test_localisation_grid_pools_each_layer_and_type():
  rng = np.random.default_rng(6)
  per = {}
  for layer, t, e in itertools.product(range(3), ["q", "k", "gate"], range(2)):  # 2 "experts"
    per[f"l{layer}.{t}.{e}"] = {"type": t, "layer": layer, "n": int(rng.integers(10, 100)),
                                "sparsity": float(rng.random()),
                                "overlap_principal": float(rng.random()), "overlap_low": None}
  per["embed"] = {"type": "embed", "layer": None, "n": 50, "sparsity": 0.3,
                  "overlap_principal": 0.5, "overlap_low": 0.5}
  grid, layers, types = figures.localisation_grid(per, "sparsity")
  assert layers == [0, 1, 2] and types == ["q", "k", "gate"]   # the paper's type order
  for (i, layer), (j, t) in itertools.product(enumerate(layers), enumerate(types)):
    ds = [per[f"l{layer}.{t}.{e}"] for e in range(2)]
    want = sum(d["sparsity"] * d["n"] for d in ds) / sum(d["n"] for d in ds)
    assert grid[i, j] == pytest.approx(want)
    want_p = np.mean([d["overlap_principal"] for d in ds])
    assert figures.localisation_grid(per, "overlap_principal")[0][i, j] == pytest.approx(want_p)
  empty, _, _ = figures.localisation_grid(per, "overlap_low")
  assert empty.size == 0


# -- figures on a synthetic results dict -----------------------------------------------------------
def _traj(rng, n=4, scale=1.0):
  steps = list(range(2, 2 * n + 1, 2))
  return {"steps": steps, "progress": [s / steps[-1] for s in steps],
          "stable_rank": list(rng.uniform(2, 5, n)),
          "frobenius": list(scale * np.cumsum(rng.uniform(0.5, 1.0, n))),
          "hill": list(rng.uniform(1, 3, n)), "sim_k": list(np.linspace(0.5, 1, n))}


def _endpoint_entry(rng, origin, sparsity):
  per = {}
  for layer, t in itertools.product(range(4), ["q", "k", "v", "o", "gate", "up", "down"]):
    per[f"layers.{layer}.{t}"] = {"type": t, "layer": layer, "n": 256,
                                  "sparsity": float(np.clip(sparsity + rng.normal(0, .05), 0, 1)),
                                  "overlap_principal": float(rng.uniform(0.3, 0.6)),
                                  "overlap_low": float(rng.uniform(0.4, 0.8))}
  per["final_norm"] = {"type": "norm", "layer": None, "n": 16, "sparsity": 0.5,
                       "overlap_principal": None, "overlap_low": None}
  s0 = np.sort(rng.uniform(0.1, 3, 16))[::-1]
  return {"origin": origin, "sparsity": sparsity, "density": 1 - sparsity,
          "sparsity_per_type": {"q": sparsity}, "rep_matrix": "layers.2.attn.q_proj",
          "angle_curve_deg": list(np.sort(rng.uniform(0, 2, 8))),
          "max_angle_per_matrix": {"a": 1.0}, "nss_per_matrix": {"a": 1e-3},
          "max_angle_deg": 1.0, "max_angle_mean_deg": 0.5, "nss": 1e-3,
          "principal_overlap": 0.45, "low_mag_overlap": 0.6, "baseline": 0.5, "per_matrix": per,
          "sigma0": list(s0), "sigma1": list(s0 * (1 + 1e-3 * rng.standard_normal(16))),
          "sigma_dw": list(np.sort(rng.uniform(1e-4, 1e-2, 16))[::-1])}


def synthetic(rng=None):
  rng = rng or np.random.default_rng(0)
  acc = lambda a: {"acc": a, "stderr": 0.02, "n": 64, "k": 4}  # noqa: E731
  r = {"preset": "synthetic", "accuracy": {"anchor": acc(0.4)}, "trajectory": {}}
  r["endpoint"] = {m: _endpoint_entry(rng, o, sp) for m, o, sp in
                   (("sft", "base -> anchor", 0.1), ("opd", "anchor -> end", 0.5),
                    ("rlvr", "anchor -> end", 0.75))}
  runs = {"opd": ["opd", "opd_seed1"], "sft": ["sft", "sft_seed1"],
          "opd_rank16": ["opd_rank16", "opd_rank16_seed1"],
          "sft_rank16": ["sft_rank16", "sft_rank16_seed1"], "rlvr": ["rlvr"]}
  r["seeds"] = {"values": [0, 1], "runs": runs, "fixed_endpoints": ["sft"]}
  r["progress_accuracy"] = {}
  for fam in ("opd", "sft"):
    for run in runs[fam]:
      steps = [0, 2, 4, 6, 8]
      r["progress_accuracy"][run] = {
          "total_steps": 8, "steps": steps, "progress": [s / 8 for s in steps],
          "acc": list(0.4 + np.cumsum(rng.uniform(0, 0.05, 5))), "stderr": [0.02] * 5,
          "n": [64] * 5, "k": 4, "measured": [False, True, True, True, False]}
      r["accuracy"][run] = acc(r["progress_accuracy"][run]["acc"][-1])
    for run in runs[f"{fam}_rank16"]:
      r["accuracy"][run] = acc(float(rng.uniform(0.4, 0.6)))
  r["rank16"] = {m: {"plain_run": m, "projected_run": f"{m}_rank16", "plain_runs": runs[m],
                     "projected_runs": runs[f"{m}_rank16"], "resume_step": 2, "k": 4,
                     "where": "gradient"} for m in ("opd", "sft")}
  for run in ("opd", "rlvr", "sft", "ctrl_topkl_25", "ctrl_offpolicy", "mix_0.75", "mix_0.05"):
    r["trajectory"][run] = _traj(rng, scale=0.01 if run == "rlvr" else 1.0)
  r["controls"] = {"sparsify": ["ctrl_topkl_25"], "offpolicy": ["ctrl_offpolicy"],
                   "mixing": {"mix_0.75": 0.75, "mix_0.05": 0.05}}
  r["mask_consensus"] = {
      "opd": {"kind": "seeds", "runs": ["opd", "opd_seed1", "opd_seed2"],
              "pairs": [{"a": "opd", "b": "opd_seed1", "jaccard": 0.6, "baseline": 0.3,
                         "by_type": {"q": 0.6, "k": 0.5}},
                        {"a": "opd", "b": "opd_seed2", "jaccard": 0.62, "baseline": 0.31,
                         "by_type": {"q": 0.61, "k": 0.52}}],
              "jaccard_mean": 0.61, "jaccard_min": 0.6, "jaccard_max": 0.62,
              "baseline_mean": 0.305, "by_type": {"q": 0.605, "k": 0.51}},
      "opd vs rlvr": {"kind": "methods", "runs": ["opd", "rlvr"],
                      "pairs": [{"a": "opd", "b": "rlvr", "jaccard": 0.2, "baseline": 0.15,
                                 "by_type": {"q": 0.2, "k": 0.18}}],
                      "jaccard_mean": 0.2, "jaccard_min": 0.2, "jaccard_max": 0.2,
                      "baseline_mean": 0.15, "by_type": {"q": 0.2, "k": 0.18}}}
  return r


NEW_FIGURES = {
    "singular_values": ("endpoint", lambda r: [e.pop(k) for e in r["endpoint"].values()
                                               for k in ("sigma0", "sigma1", "sigma_dw")]),
    "localisation": ("endpoint", lambda r: [e.pop("per_matrix") for e in r["endpoint"].values()]),
    "progress_accuracy": ("rank16", lambda r: r.pop("progress_accuracy")),
    "mask_consensus": ("endpoint", lambda r: r.pop("mask_consensus")),
    "control_sparsify": ("controls", lambda r: r["controls"].update(sparsify=[])),
    "control_offpolicy": ("controls", lambda r: r["controls"].update(offpolicy=[])),
    "control_mixing": ("controls", lambda r: r["controls"].update(mixing={})),
}


def _png(path: pathlib.Path) -> bool:
  data = path.read_bytes()
  return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.parametrize("name", sorted(NEW_FIGURES))
def test_new_figure_draws_and_returns_none_without_its_data(name, tmp_path):
  fn = figures.FIGURES[name]
  section, drop = NEW_FIGURES[name]
  assert name in reporting._FIGS_BY_SECTION[section]
  out = fn(synthetic(), tmp_path / f"{name}.png")
  assert out == tmp_path / f"{name}.png" and _png(out)
  r = synthetic()
  drop(r)
  assert fn(r, tmp_path / "absent.png") is None and not (tmp_path / "absent.png").exists()
  assert fn({}, tmp_path / "empty.png") is None


def test_control_figure_draws_stable_rank_frobenius_and_hill(tmp_path, monkeypatch):
  drawn = []
  real = figures._save

  def spy(fig, path):
    drawn.append([(ax.get_ylabel(), [ln.get_label() for ln in ax.get_lines()])
                  for ax in fig.axes])
    return real(fig, path)

  monkeypatch.setattr(figures, "_save", spy)
  r = synthetic()
  figures.fig_control_mixing(r, tmp_path / "mix.png")
  (panels,) = drawn
  assert [y.split(" (")[0] for y, _ in panels] == ["stable rank of dW_t", "||dW_t||_F",
                                                  "Hill tail estimate"]
  for _, labels in panels:   # both references and both mixtures in every panel
    assert {"OPD (reference)", "RLVR (reference)", "OPD+RLVR mix alpha=0.75",
            "OPD+RLVR mix alpha=0.05"} <= set(labels)


def test_progress_figure_starts_each_projected_arm_at_the_resume_point(tmp_path, monkeypatch):
  drawn = []
  real = figures._save
  monkeypatch.setattr(figures, "_save", lambda fig, path: (drawn.append(fig.axes),
                                                           real(fig, path))[1])
  r = synthetic()
  figures.fig_progress_accuracy(r, tmp_path / "p.png")
  ax = drawn[0][0]
  dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
  c = r["progress_accuracy"]["opd"]
  assert list(dashed[0].get_xdata()) == [0.25, 1.0]
  assert list(dashed[0].get_ydata()) == [c["acc"][1], r["accuracy"]["opd_rank16"]["acc"]]


def test_report_renders_the_new_figures_and_tables_and_renders_without_them(tmp_path):
  r = synthetic()
  r.update(thresholds={}, phases={})
  out = reporting.render(r, tmp_path / "with")
  md = (tmp_path / "with" / "report.md").read_text()
  for name in NEW_FIGURES:
    assert name in out["figures"] and f"({name}.png)" in md, name
  assert "Update-mask consensus" in md and "| OPD | 3 seeds, 2 pairs | 0.61" in md
  assert "| OPD vs RLVR | first seeds | 0.2 | 0.15 |" in md
  assert "Accuracy against training progress" in md and "| opd_seed1 |" in md
  assert "final Frobenius norm of dW" in md
  bare = synthetic()
  bare.update(thresholds={}, phases={})
  for _, drop in NEW_FIGURES.values():
    drop(bare)
  out = reporting.render(bare, tmp_path / "without")
  md = (tmp_path / "without" / "report.md").read_text()
  for _, title in reporting.SECTIONS:
    assert f"## {title}" in md
  for name in NEW_FIGURES:
    assert name not in out["figures"] and f"({name}.png)" not in md
  assert "Update-mask consensus" not in md and "Accuracy against training progress" not in md


# -- progress --------------------------------------------------------------------------------------
def test_evaluate_snapshots_evaluates_each_new_snapshot_once(monkeypatch):
  from opd_jax.study import runs
  from opd_jax.train.config import ModelSpec
  calls = []

  def fake_evaluate(cfg, model_spec, ev):
    calls.append((cfg, model_spec, ev))
    step = int(pathlib.Path(model_spec.path).name)
    return {"acc": step / 100, "stderr": 0.01 * step, "n": 32, "k": 4, "pass_at_k": 0.0,
            "response_len": 1.0}

  monkeypatch.setattr(runs, "evaluate", fake_evaluate)
  cfg, ev = object(), object()
  model = ModelSpec(source="random", path="")
  snaps = {s: f"/w/run/snapshots/{s}" for s in (6, 2, 4)}
  known = {0: {"acc": 0.3, "stderr": 0.02, "n": 32, "k": 4},
           10: {"acc": 0.9, "stderr": 0.02, "n": 32, "k": 4}}
  logs = []
  curve = progress.evaluate_snapshots("opd_rank16", cfg, model, snaps, ev, total_steps=10,
                                      step_offset=4, known=known, log=logs.append)
  # local steps 2, 4, 6 -> 6, 8, 10; step 10 is known: not evaluated again
  assert [c[1].path for c in calls] == ["/w/run/snapshots/2", "/w/run/snapshots/4"]
  assert all(c[0] is cfg and c[2] is ev and c[1].source == "checkpoint" for c in calls)
  assert [p.step for p in curve.points] == [0, 6, 8, 10]
  assert [p.measured for p in curve.points] == [False, True, True, False]
  res = curve.to_results()
  assert res["progress"] == [0.0, 0.6, 0.8, 1.0] and res["acc"] == [0.3, 0.02, 0.04, 0.9]
  assert res["stderr"] == pytest.approx([0.02, 0.02, 0.04, 0.02]) and res["k"] == 4
  assert res["total_steps"] == 10 and res["n"] == [32] * 4 and len(logs) == 2
  with pytest.raises(ValueError, match="total_steps"):
    progress.evaluate_snapshots("x", cfg, model, snaps, ev, total_steps=0)


def test_progress_results_feed_the_figure(tmp_path, monkeypatch):
  from opd_jax.study import runs
  from opd_jax.train.config import ModelSpec
  monkeypatch.setattr(runs, "evaluate", lambda cfg, spec, ev: {
      "acc": 0.5, "stderr": 0.01, "n": 8, "k": 2})
  curve = progress.evaluate_snapshots("opd", None, ModelSpec(), {2: "/s/2", 4: "/s/4"}, None,
                                      total_steps=4, known={0: {"acc": 0.4, "n": 8, "k": 2}},
                                      log=lambda s: None)
  r = {"progress_accuracy": {"opd": curve.to_results()},
       "accuracy": {"opd_rank16": {"acc": 0.45, "stderr": 0.02}},
       "rank16": {"opd": {"plain_run": "opd", "projected_run": "opd_rank16", "resume_step": 2,
                          "k": 4}}}
  assert _png(figures.fig_progress_accuracy(r, tmp_path / "p.png"))
  assert math.isclose(curve.points[0].stderr, 0.0)


# -- live geometry (the training loop's monitor) ---------------------------------------------------
def test_live_series_and_curves_follow_the_metrics_file(tmp_path):
  """`runs.live_series` reads the monitor's rows of a metrics.jsonl in step order (other rows
  ignored, a missing Sim_K is None); `figures.live_curve` averages the attention types per point
  (numpy reference) and drops points without every value; the figure is drawn."""
  from opd_jax.study import runs
  from opd_jax.train import metrics as metrics_lib
  rng = np.random.default_rng(3)
  steps, every, types = 40, 10, ("q", "k", "v", "o")
  path = tmp_path / "metrics.jsonl"
  w = metrics_lib.JsonlWriter(str(path))
  want = {}
  for s in (30, 10, 20, 40):   # written out of order (a resumed run appends)
    w.write(s - 1, {"loss": float(rng.random())})   # a row without the monitor
    row = {"geometry/density": float(rng.random()), "loss": 1.0}
    for t in types:
      row[f"geometry/stable_rank/{t}"] = float(1 + 3 * rng.random())
      if s > every:    # the first point has no Sim_K
        row[f"geometry/sim_k/{t}"] = float(rng.random())
    w.write(s, row)
    want[s] = row
  w.close()
  series = runs.live_series(path)
  assert series["step"] == [10, 20, 30, 40] and "loss" not in series
  assert series["geometry/sim_k/q"][0] is None
  np.testing.assert_allclose(series["geometry/density"], [want[s]["geometry/density"]
                                                          for s in (10, 20, 30, 40)])
  series["steps"] = steps
  xs, ys = figures.live_curve(series, "stable_rank")
  assert xs == [0.25, 0.5, 0.75, 1.0]
  np.testing.assert_allclose(ys, [np.mean([want[s][f"geometry/stable_rank/{t}"] for t in types])
                                  for s in (10, 20, 30, 40)])
  xs, ys = figures.live_curve(series, "sim_k")
  assert xs == [0.5, 0.75, 1.0] and len(ys) == 3
  assert figures.live_curve(series, "frobenius") == ([], [])
  results = {"live_geometry": {"opd": series, "opd_seed1": series},
             "seeds": {"runs": {"opd": ["opd", "opd_seed1"]}}}
  out = figures.fig_live_geometry(results, tmp_path / "live.png")
  assert out.read_bytes()[:4] == b"\x89PNG"
  assert figures.fig_live_geometry({}, tmp_path / "none.png") is None

"""study/regime.py: the scale rules against independent references (bf16 codes from ml_dtypes,
closed-form schedules in float64, medians from numpy), and how the study applies them."""

import math

import jax
import ml_dtypes
import numpy as np
import pytest

from opd_jax.models import config as model_config
from opd_jax.models import transformer
from opd_jax.study import regime


def _half_ulp_reference(x: float) -> float:
  """Half the distance from bf16(x) to the next bf16 code away from zero, read off the codes."""
  b = np.array([abs(x)], ml_dtypes.bfloat16)
  # Round down to a representable value first: the spacing depends on the binade only.
  code = b.view(np.uint16)
  if float(code.view(ml_dtypes.bfloat16)[0]) > abs(x):
    code = code - np.uint16(1)
  up = (code + np.uint16(1)).view(ml_dtypes.bfloat16)
  return (float(up[0]) - float(code.view(ml_dtypes.bfloat16)[0])) / 2


def test_bf16_half_ulp_matches_the_codes_on_random_values():
  rng = np.random.default_rng(0)
  xs = np.concatenate([rng.lognormal(-4, 2, 200), -rng.lognormal(-4, 2, 50),
                       [2.0 ** -6, 0.02, 1.0, 0.0135]])
  got = regime.bf16_half_ulp(xs)
  want = np.array([_half_ulp_reference(float(x)) for x in xs])
  np.testing.assert_array_equal(got, want)
  assert regime.bf16_half_ulp(0.02) == pytest.approx(6.1035e-5, rel=1e-4)
  with pytest.raises(ValueError, match="non-zero"):
    regime.bf16_half_ulp([0.0, 1.0])


def _schedule_reference(schedule: str, steps: int, warmup_frac: float, ratio: float) -> float:
  """Mean of the schedule in float64, written from its definition: linear warmup 0 -> 1 over
  round(warmup_frac * steps) updates, then constant 1 or cosine 1 -> ratio over the rest."""
  w = int(round(warmup_frac * steps))
  vals = []
  for t in range(steps):
    if t < w:
      vals.append(t / w)
    elif schedule == "constant":
      vals.append(1.0)
    else:
      decay = max(steps - w, 1)
      u = min(t - w, decay) / decay
      vals.append(ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * u)))
  return float(np.mean(vals))


@pytest.mark.parametrize("schedule,steps,warmup,ratio", [
    ("constant", 40, 0.0, 1.0), ("constant", 37, 0.1, 1.0), ("cosine", 20, 0.1, 0.1),
    ("cosine", 5375, 0.1, 0.1), ("cosine", 33, 0.0, 0.3)])
def test_schedule_mean_matches_the_closed_form(schedule, steps, warmup, ratio):
  got = regime.schedule_mean(schedule, steps, warmup_frac=warmup, final_ratio=ratio)
  assert got == pytest.approx(_schedule_reference(schedule, steps, warmup, ratio), rel=1e-6)


def test_paper_budgets_from_the_papers_numbers():
  h = 2.0 ** (math.floor(math.log2(0.02)) - 8)
  assert regime.paper_budget("opd") == pytest.approx(1e-6 * 299 / h, rel=1e-9)
  assert regime.paper_budget("rlvr") == pytest.approx(1e-6 * 1023 / h, rel=1e-9)
  sft_mean = _schedule_reference("cosine", 5375, 0.1, 0.1)
  assert regime.paper_budget("sft") == pytest.approx(1e-5 * sft_mean * 5375 / h, rel=1e-6)


@pytest.mark.parametrize("method", ["opd", "rlvr", "sft"])
def test_matched_lr_gives_the_papers_budget_times_scale(method):
  rng = np.random.default_rng(1)
  for _ in range(5):
    median = float(rng.lognormal(-4, 0.7))
    steps = int(rng.integers(4, 400))
    scale = float(rng.choice([0.25, 1.0, 16.0]))
    optim = ({"schedule": "cosine", "lr": 1e-3, "final_lr": 1e-4, "warmup_frac": 0.1}
             if method == "sft" else {"schedule": "constant", "lr": 1e-4})
    m = regime.match_budget(method, optim, steps, median, scale=scale)
    ratio = 0.1 if method == "sft" else 1.0
    mean = _schedule_reference(optim["schedule"], steps, optim.get("warmup_frac", 0.0), ratio)
    h = _half_ulp_reference(median)
    # Independently: the budget of the matched lr, in float64.
    assert m.lr * mean * steps / h == pytest.approx(scale * regime.paper_budget(method), rel=1e-6)
    assert m.budget == pytest.approx(scale * m.paper_budget, rel=1e-9)
    assert m.final_lr == pytest.approx(m.lr * (0.1 if method == "sft" else 0.0), rel=1e-9)
    flat = m.to_metrics()
    assert flat["lr"] == m.lr and flat["lr_over_half_ulp"] == pytest.approx(m.lr / h)
    assert method in regime.describe(m)


def test_median_abs_weight_over_the_block_matrices_only():
  cfg = model_config.tiny(vocab_size=96, n_layers=2)
  _, params = transformer.init(cfg, 3)
  rng = np.random.default_rng(2)
  params = {k: v for k, v in params.items()}
  # Blow up the embedding: it must not move the median of the block matrices.
  params["embed"] = {"embedding": np.asarray(rng.normal(0, 5.0, params["embed"]["embedding"].shape),
                                             np.float32)}
  leaves = []
  for group in ("attn", "mlp"):
    for name, mod in params["layers"][group].items():
      if "kernel" in mod and np.ndim(mod["kernel"]) == 3:
        leaves.append(np.abs(np.asarray(mod["kernel"], np.float64)).ravel())
  want = float(np.median(np.concatenate(leaves)))
  assert regime.median_abs_weight(params) == pytest.approx(want, rel=1e-6)


def test_width_ranks_are_the_papers_fractions():
  assert regime.width_ranks(4096) == {"angle_k": 512, "mask_rank": 64}
  assert regime.width_ranks(64) == {"angle_k": 8, "mask_rank": 1}
  assert regime.width_ranks(128) == {"angle_k": 16, "mask_rank": 2}
  assert regime.width_ranks(4) == {"angle_k": 1, "mask_rank": 1}


def test_study_sets_every_budget_sections_lr_by_the_rule(tmp_path):
  """compose_run with real paths: the anchor's and the SFT arm's (the anchor SFT, every seed) lr
  from the base's median |W|, OPD / RLVR / rank-16 / controls / map runs from the anchor's; the
  map runs at their own scale."""
  from opd_jax.study import runs
  from opd_jax.train import checkpoint as ckpt_lib
  from opd_jax.train import config as train_config
  from opd_jax.study import config as study_config
  study = study_config.from_config_dict(train_config.load_config(
      "configs/study.py:smoke", ["rank16.derive_k=False"]))  # K: the next test
  paths = {}
  for i, name in enumerate(("base", "anchor", "teacher")):
    model = study.teacher.model if name == "teacher" else study.student.model
    _, params = transformer.init(model, i)
    if name == "anchor":  # another binade than the base: the two lrs must differ by 2x
      params = jax.tree_util.tree_map_with_path(
          lambda path, a: a * 2.0 if "kernel" in jax.tree_util.keystr(path)
          and "layers" in jax.tree_util.keystr(path) else a, params)
    paths[name] = str(ckpt_lib.save_snapshot(tmp_path / name, 1, params, model))

  def resolve(phase, which):
    return paths.get(phase, paths["anchor"])

  specs = {s.name: s for s in runs.run_specs(study)}
  med = {n: regime.median_abs_weight(paths[n]) for n in ("base", "anchor")}
  assert regime.bf16_half_ulp(med["anchor"]) == 2 * regime.bf16_half_ulp(med["base"])
  for name, origin, method, scale in [
      ("anchor", "base", "sft", 1.0), ("opd", "anchor", "opd", 1.0),
      ("rlvr_seed1", "anchor", "rlvr", 1.0), ("sft_seed1", "base", "sft", 1.0),
      ("sft_rank16", "base", "sft", 1.0), ("map_sft_x1", "anchor", "sft", 1.0),
      ("opd_rank16", "anchor", "opd", 1.0), ("ctrl_offpolicy", "anchor", "opd", 1.0),
      ("map_rlvr_x4", "anchor", "rlvr", 4.0), ("map_sft_x4", "anchor", "sft", 4.0)]:
    spec = specs[name]
    cfg = runs.compose_run(study, spec, resolve)
    section = getattr(study, spec.section)
    want = regime.match_budget(method, section.get("optim", {}),
                               study_config.section_steps(study, spec.section), med[origin],
                               scale=scale)
    assert cfg.optim.lr == pytest.approx(want.lr, rel=1e-12), name
    assert runs.budget_match(study, spec, resolve).budget == pytest.approx(
        scale * regime.paper_budget(method), rel=1e-9), name
  # Symbolic paths (the DAG's fingerprints): the section's lr, and no match yet.
  assert runs.budget_match(study, specs["opd"], runs._symbolic) is None
  assert runs.budget_match(study, specs["teacher"], resolve) is None
  # The rule off (qwen3_8b): the section's lr as set.
  off = study_config.from_config_dict(train_config.load_config(
      "configs/study.py:smoke", ["regime.match_budget=False", "regime.map_scales=()"]))
  assert runs.compose_run(off, specs["opd"], resolve).optim.lr == off.opd["optim"]["lr"]
  with pytest.raises(train_config.ConfigError, match="map_scales"):
    study_config.from_config_dict(train_config.load_config(
        "configs/study.py:smoke", ["regime.match_budget=False"]))


def _with_low_rank_moves(params, singular_values, seed):
  """params with dW = U diag(s) V^T (orthonormal U, V) added to every q, k, v, o matrix."""
  rng = np.random.default_rng(seed)
  s = np.asarray(singular_values, np.float64)

  def move(path, a):
    key = jax.tree_util.keystr(path)
    if "layers" not in key or not any(f"'{t}_proj'" in key for t in "qkvo"):
      return a
    a = np.array(a, np.float64)
    for layer in range(a.shape[0]):
      u, _ = np.linalg.qr(rng.normal(size=(a.shape[1], len(s))))
      v, _ = np.linalg.qr(rng.normal(size=(a.shape[2], len(s))))
      a[layer] += 0.05 * (u * s) @ v.T
    return a.astype(np.float32)

  return jax.tree_util.tree_map_with_path(move, params)


def test_projection_rank_rule_against_constructed_updates():
  """Stable ranks of dW vs numpy on the moved matrices; K = floor(median)."""
  cfg = model_config.tiny(vocab_size=96, n_layers=2)
  _, p0 = transformer.init(cfg, 0)
  p1 = _with_low_rank_moves(p0, [1.0, 1.0, 1.0, math.sqrt(0.5)], 1)   # stable rank 3.5
  ranks = regime.attention_stable_ranks(p0, p1)
  assert len(ranks) == 4 * cfg.n_layers
  for name, r in ranks.items():
    assert r == pytest.approx(3.5, rel=1e-4), name
  assert regime.projection_rank(ranks) == 3
  assert regime.projection_rank({"a": 0.7}) == 1
  assert regime.projection_rank({"a": 2.0, "b": 5.9, "c": 9.0}) == 5
  with pytest.raises(ValueError, match="no attention matrix moved"):
    regime.projection_rank(regime.attention_stable_ranks(p0, p0))


def test_rank16_arms_take_k_from_their_seeds_opd(tmp_path):
  from opd_jax.study import config as study_config
  from opd_jax.study import runs
  from opd_jax.train import checkpoint as ckpt_lib
  from opd_jax.train import config as train_config
  study = study_config.from_config_dict(train_config.load_config("configs/study.py:smoke"))
  model = study.student.model
  _, anchor = transformer.init(model, 0)
  paths = {"anchor": ckpt_lib.save_snapshot(tmp_path / "anchor", 1, anchor, model)}
  for name, s in (("opd", [1.0, 1.0, 1.0, math.sqrt(0.5)]), ("opd_seed1", [1.0, 0.6])):
    paths[name] = ckpt_lib.save_snapshot(tmp_path / name, 1, _with_low_rank_moves(anchor, s, 2),
                                         model)

  def resolve(phase, which):
    return str(paths.get(phase, paths["anchor"]))

  specs = {s.name: s for s in runs.run_specs(study)}
  for run, k in (("opd_rank16", 3), ("sft_rank16", 3), ("opd_rank16_seed1", 1),
                 ("sft_rank16_seed1", 1)):
    assert runs.compose_run(study, specs[run], resolve).subspace.k == k, run
    assert specs[run].rank_of in specs[run].deps
  assert runs.projection_rank(study, "opd", runs._symbolic) is None
  fixed = study_config.from_config_dict(train_config.load_config(
      "configs/study.py:smoke", ["rank16.derive_k=False", "rank16.k=5"]))
  fixed_specs = {s.name: s for s in runs.run_specs(fixed)}
  assert runs.compose_run(fixed, fixed_specs["sft_rank16"], resolve).subspace.k == 5
  assert fixed_specs["sft_rank16"].rank_of is None

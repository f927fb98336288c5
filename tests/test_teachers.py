"""Multi-teacher OPD (`train.teachers`): routing, routed scoring against each teacher alone,
the routed direct-route teacher against a float64 reference, config refusals, and two-teacher
OPD / distill runs through `loop.run` with per-teacher metrics (two processes: the recipe-parity
jobs `teachers` / `teachers_distill` in tests/mp_recipes_worker.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax

from opd_jax.data import tasks
from opd_jax.models import config as model_config
from opd_jax.models import scoring
from opd_jax.models import transformer
from opd_jax.objectives import distill
from opd_jax.train import config as config_lib
from opd_jax.train import loop
from opd_jax.train import teachers

VOCAB = 48


def _teachers_cfg(route="domain", **domains):
  return config_lib.TeachersConfig(
      models=tuple(config_lib.TeacherSpec(name=n, domains=tuple(d)) for n, d in domains.items()),
      route=route)


def test_route_table_by_domain_with_catch_all_and_by_index():
  rng = np.random.default_rng(0)
  domains = rng.choice(["a", "b", "c", "d"], size=200)
  ex = [tasks.Example("p", "s", "1", domain=str(d)) for d in domains]
  cfg = _teachers_cfg(x=("a", "c"), y=("b",), rest=())
  table = teachers.route_table(ex, cfg)
  want = np.select([np.isin(domains, ["a", "c"]), domains == "b"], [0, 1], 2)
  np.testing.assert_array_equal(table, want)
  assert teachers.counts(table, cfg.names) == {n: int(np.sum(want == i))
                                               for i, n in enumerate(cfg.names)}
  idx = rng.integers(0, 200, size=16)
  np.testing.assert_array_equal(teachers.teacher_ids(table, idx), want[idx])
  np.testing.assert_array_equal(
      teachers.route_table(ex, _teachers_cfg(route="index", x=(), y=(), z=())),
      np.arange(200) % 3)


def test_an_unrouted_domain_is_one_line_naming_the_example():
  ex = [tasks.Example("p", "s", "1", domain="a"), tasks.Example("q", "s", "1", domain="zz")]
  with pytest.raises(teachers.RoutingError, match=r"example 1 has domain 'zz'") as e:
    teachers.route_table(ex, _teachers_cfg(x=("a",), y=("b",)))
  assert "\n" not in str(e.value)


def test_generated_tasks_carry_their_family_as_domain():
  cfg = tasks.TaskConfig(families=("addition", "mod_chain"))
  ex = tasks.generate(cfg, "train", 64, seed=3)
  assert {e.domain for e in ex} == {"addition", "mod_chain"}
  for e in ex:  # the family's own prompt shapes
    assert e.prompt.endswith("=") == (e.domain == "addition")


@pytest.mark.parametrize("overrides, match", [
    (("teacher.source=random",), "teacher.source='random' and config.teachers.models"),
    (("rollout.policy=teacher",), "rollout.policy='teacher'"),
    (("method=rlvr",), "config.teachers"),
    (("teachers.route=index",), "route='index'"),
])
def test_config_refusals_name_the_field(overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    config_lib.from_config_dict(config_lib.load_config("configs/opd.py:two_teacher_smoke",
                                                       list(overrides)))
  assert "\n" not in str(e.value)


def test_config_refuses_overlapping_domains_and_a_single_teacher():
  spec = config_lib.ModelSpec()
  with pytest.raises(config_lib.ConfigError, match="routed to both"):
    config_lib.TeachersConfig(models=(config_lib.TeacherSpec("a", spec, ("x",)),
                                      config_lib.TeacherSpec("b", spec, ("x",))))
  with pytest.raises(config_lib.ConfigError, match="two or more"):
    config_lib.TeachersConfig(models=(config_lib.TeacherSpec("a", spec, ("x",)),))


def _models():
  """Two teachers of different widths and a student, all on one vocabulary."""
  student = model_config.tiny(vocab_size=VOCAB)
  wide = student.replace(d_model=96, d_ff=160)
  return [transformer.init(c, seed=s) for c, s in ((student, 0), (student, 1), (wide, 2))]


def _batch(b=6, t=12, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, size=(b, t)).astype(np.int32)
  mask = np.ones((b, t), bool)
  mask[0, -3:] = False   # a shorter row
  ids = rng.integers(0, 2, size=b).astype(np.int32)
  ids[:2] = (0, 1)       # both teachers present
  return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(ids)


def test_routed_scoring_matches_each_teacher_alone():
  _, t0, t1 = _models()
  tokens, mask, ids = _batch()

  def score(gd, p):
    return scoring.token_logprobs(gd, p, tokens, mask, chunk_size=4)

  routed = teachers.score_routed(score, (t0[0], t1[0]), (t0[1], t1[1]), ids)
  alone = [np.asarray(score(*t)) for t in (t0, t1)]
  want = np.where(np.asarray(ids)[:, None] == 0, alone[0], alone[1])
  np.testing.assert_array_equal(np.asarray(routed), want)
  # one teacher: the plain call
  np.testing.assert_array_equal(np.asarray(teachers.score_routed(score, *t0, None)), alone[0])


def _full_logits(gd, p, tokens, mask):
  h = scoring.shifted_hidden(gd, p, tokens, mask)
  return np.asarray(scoring.unembed_fn(gd, p)(h), np.float64)


def test_routed_direct_route_teacher_matches_float64_reference():
  (s_gd, s_p), t0, t1 = _models()
  tokens, mask, ids = _batch(seed=1)
  loss_mask = np.asarray(mask).copy()
  loss_mask[:, :4] = False  # the prompt
  h = scoring.shifted_hidden(s_gd, s_p, tokens, mask)
  teacher = teachers.routed_teacher((t0[0], t1[0]), (t0[1], t1[1]),
                                    lambda gd, p: scoring.shifted_hidden(gd, p, tokens, mask),
                                    scoring.unembed_fn, ids, tokens.shape)
  cfg = distill.DistillConfig(kind="reverse_kl", chunk_size=5)
  total, denom, m = distill.divergence_loss(scoring.unembed_fn(s_gd, s_p), h, teacher,
                                            jnp.asarray(loss_mask), cfg, group_B=ids,
                                            group_names=("a", "b"))
  s_logits = _full_logits(s_gd, s_p, tokens, mask)
  t_logits = np.where(np.asarray(ids)[:, None, None] == 0, _full_logits(*t0, tokens, mask),
                      _full_logits(*t1, tokens, mask))
  ps, lt = np.exp(log_softmax(s_logits, -1)), log_softmax(t_logits, -1)
  kl = np.sum(ps * (np.log(ps) - lt), -1)
  np.testing.assert_allclose(float(total) / float(denom), kl[loss_mask].mean(), rtol=2e-5)
  for i, name in enumerate(("a", "b")):
    sel = loss_mask & (np.asarray(ids) == i)[:, None]
    np.testing.assert_allclose(float(m[f"teacher/{name}/reverse_kl"]), kl[sel].mean(), rtol=2e-5)


def test_per_teacher_metrics_match_numpy():
  rng = np.random.default_rng(2)
  b, t = 10, 7
  ids = rng.integers(0, 3, size=b)
  valid = rng.random(b) > 0.2
  mask = rng.random((b, t)) > 0.3
  reward = rng.normal(size=(b, t)).astype(np.float32)
  kl = rng.random((b, t)).astype(np.float32)
  m = teachers.metrics(("x", "y", "z"), jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(mask),
                       reward_BxT=jnp.asarray(reward), kl_BxT=jnp.asarray(kl))
  for i, name in enumerate(("x", "y", "z")):
    rows = valid & (ids == i)
    sel = mask & rows[:, None]
    assert float(m[f"teacher/{name}/rows"]) == rows.sum()
    assert float(m[f"teacher/{name}/tokens"]) == sel.sum()
    np.testing.assert_allclose(float(m[f"teacher/{name}/teacher_gap"]),
                               -reward.astype(np.float64)[sel].mean() if sel.any() else 0.0,
                               rtol=1e-5)
    np.testing.assert_allclose(float(m[f"teacher/{name}/reverse_kl"]),
                               kl.astype(np.float64)[sel].mean() if sel.any() else 0.0, rtol=1e-5)
    ret = np.where(sel, reward.astype(np.float64), 0).sum(1)[rows]
    np.testing.assert_allclose(float(m[f"teacher/{name}/return"]),
                               ret.mean() if rows.any() else 0.0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["opd", "distill"])
def test_two_teacher_run_routes_by_domain_with_per_teacher_metrics(tmp_path, method):
  overrides = ["loop.steps=2", "loop.batch_size=4", "rollout.group_size=2",
               "data.train_examples=64", "data.eval_examples=8", "loop.checkpoint_every=0",
               "loop.transfer_guard=disallow"]
  if method == "distill":
    overrides += ["method=distill", "pg.pg.eps_high=0.28"]
  cfg = config_lib.from_config_dict(
      config_lib.load_config("configs/opd.py:two_teacher_smoke", overrides))
  summary = loop.run(cfg, tmp_path / "run")
  assert summary["step"] == 2
  lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  steps = [x for x in lines if "teacher/chain/rows" in x]
  assert len(steps) == 2
  # Every real row went to exactly one teacher, as the host's routing table says.
  train_ex = tasks.generate(cfg.data.task, "train", cfg.data.train_examples,
                            seed=cfg.data.data_seed)
  table = teachers.route_table(train_ex, cfg.teachers)
  assert set(np.unique(table)) == {0, 1}
  total = {"chain": 0.0, "sum": 0.0}
  for x in steps:
    assert x["teacher/chain/rows"] + x["teacher/sum/rows"] == 8
    for name in total:
      total[name] += x[f"teacher/{name}/rows"]
      assert np.isfinite(x[f"teacher/{name}/tokens"])
      key = f"teacher/{name}/teacher_gap" if method == "opd" else f"teacher/{name}/reverse_kl"
      assert np.isfinite(x[key])
  assert total["chain"] > 0 and total["sum"] > 0

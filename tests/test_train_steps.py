"""train/steps.py: every step against a naive full-logits reference (autodiff of an independently
written loss + the same optax chain), micro-batch accumulation == full batch, the fake 8-device
mesh == one device, compile-once, the non-finite flag, and batch validation errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mp_worker
from opd_jax.models import config, transformer
from opd_jax.objectives import distill, log_ratio, surrogate
from opd_jax.train import mesh as mesh_lib
from opd_jax.train import state as state_lib
from opd_jax.train import steps

# tiny (1 layer, vocab 128) and SGD + momentum, shared with the multi-process test; the Adam
# chain itself is checked against a float64 reference in test_optim_factory.py.
CFG, TX, _ = mp_worker.setup()
TEACHER_CFG = config.tiny(vocab_size=CFG.vocab_size, n_layers=1, d_model=32, n_heads=2,
                          n_kv_heads=1, head_dim=16, d_ff=64)
PG_CFG = steps.PGStepConfig(pg=surrogate.PGConfig(kind="ppo_clip", eps_low=0.2, eps_high=0.28),
                            epochs=2, minibatches=2, micro_batches=2, temperature=0.8,
                            kl_coef=0.1, kl_kind="k3")
PG_B, PG_T = 16, 12
GRAPHDEF = transformer.graphdef_for(CFG)


# -- set-up helpers -------------------------------------------------------------------------------
VALUE_LR = 0.01


def _value_init():
  """A learned value head with random (non-zero) parameters and a fresh Adam state."""
  rng = np.random.default_rng(7)
  params = {"kernel": (0.3 * rng.standard_normal(CFG.d_model)).astype(np.float32),
            "bias": np.float32(0.2)}
  return {"params": params, "opt_state": optax.adam(VALUE_LR).init(params)}


@functools.lru_cache(maxsize=None)
def _layout(shape, value=False):
  m = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=shape))
  abstract = transformer.abstract_params(CFG)
  return m, mesh_lib.state_shardings(TX, mesh_lib.param_shardings(CFG, m), abstract,
                                     value=_value_init() if value else None)


@functools.lru_cache(maxsize=None)
def _host_state(seed=0, value=False):
  _, params = transformer.init(CFG, seed)
  return jax.device_get(state_lib.create_state(params, TX, 5,
                                               value=_value_init() if value else None))


def _state(shape, value=False):
  """A fresh device copy (steps donate their state argument)."""
  host = _host_state(value=value)
  fresh = host.replace(rng=jax.random.wrap_key_data(np.asarray(jax.random.key_data(host.rng))))
  return jax.device_put(fresh, _layout(shape, value)[1])


_STEPS = {}


def _jitted(name, shape, batch, fn, value=False, **knobs):
  """One JittedStep per (name, mesh shape): reused across tests (compile once)."""
  key = (name, shape)
  if key not in _STEPS:
    m, shardings = _layout(shape, value)
    extra = ()
    if "teacher_graphdef" in knobs:
      extra = (mesh_lib.param_shardings(TEACHER_CFG, m),)
    _STEPS[key] = steps.jit_step(fn, m, shardings, mesh_lib.batch_shardings(batch, m),
                                 extra_shardings=extra, **knobs)
  return _STEPS[key]


def _put_batch(batch, shape):
  return mesh_lib.global_batch(batch, _layout(shape)[0])


def _sft_batch():
  return mp_worker.global_batches()[0]


def _pg_batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (PG_B, PG_T)).astype(np.int32)
  mask = np.ones((PG_B, PG_T), bool)
  prompt_len = rng.integers(2, 5, PG_B)
  resp_end = rng.integers(7, PG_T + 1, PG_B)
  pos = np.arange(PG_T)[None]
  mask[:3, :1] = False  # left padding on a few rows
  mask &= pos < resp_end[:, None]  # right padding after "EOS"
  loss_mask = mask & (pos >= prompt_len[:, None])
  near = -np.log(CFG.vocab_size)  # the untrained model is near uniform: ratios near 1, some clipped
  return {
      "tokens_BxT": tokens, "mask_BxT": mask, "loss_mask_BxT": loss_mask,
      "old_logp_BxT": (near + 0.3 * rng.standard_normal((PG_B, PG_T))).astype(np.float32),
      "adv_BxT": np.where(loss_mask, rng.standard_normal((PG_B, PG_T)), 0).astype(np.float32),
      "ref_logp_BxT": (near + 0.2 * rng.standard_normal((PG_B, PG_T))).astype(np.float32),
  }


def _distill_batch():
  b = _sft_batch()
  return {k: np.concatenate([v, v[::-1]]) for k, v in b.items()}  # 8 rows


# -- naive references: full logits, float32 autodiff, written independently -----------------------
def _naive_logp(graphdef, params, tokens, mask, temperature=1.0):
  logits = transformer.forward(graphdef, params, tokens, mask) / temperature
  logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp_all[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(picked, ((0, 0), (1, 0)))


def _token_mean(x, m):
  return jnp.sum(jnp.where(m, x, 0.0)) / jnp.sum(m)


def _naive_sft_loss(params, b):
  logp = _naive_logp(GRAPHDEF, params, b["tokens_BxT"], b["mask_BxT"])
  return _token_mean(-logp, b["loss_mask_BxT"])


def _naive_pg_loss(params, b):
  logp = _naive_logp(GRAPHDEF, params, b["tokens_BxT"], b["mask_BxT"], PG_CFG.temperature)
  ratio = jnp.exp(logp - b["old_logp_BxT"])
  adv = b["adv_BxT"]
  obj = jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.28) * adv)
  d = b["ref_logp_BxT"] - logp
  k3 = jnp.exp(d) - d - 1.0
  return _token_mean(-obj + 0.1 * k3, b["loss_mask_BxT"])


def _naive_reverse_kl_loss(params, b, teacher_params):
  tg = transformer.graphdef_for(TEACHER_CFG)
  s = jax.nn.log_softmax(transformer.forward(GRAPHDEF, params, b["tokens_BxT"], b["mask_BxT"]))
  t = jax.nn.log_softmax(transformer.forward(tg, teacher_params, b["tokens_BxT"], b["mask_BxT"]))
  kl = jnp.sum(jnp.exp(s) * (s - t), axis=-1)[:, :-1]  # position t-1 predicts token t
  return _token_mean(kl, b["loss_mask_BxT"][:, 1:])


@functools.partial(jax.jit, static_argnums=(0,))
def _naive_update(loss_fn, params, opt_state, batch, *extra):
  loss, grads = jax.value_and_grad(loss_fn)(params, batch, *extra) if extra else \
      jax.value_and_grad(loss_fn)(params, batch)
  updates, opt_state = TX.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def _max_diff(a, b):
  """max over leaves of max|a - b| / max(1, max|b|): absolute for O(1) values, relative for the
  larger ones (momentum traces)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  out = 0.0
  for x, y in zip(la, lb):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = float(np.max(np.abs(x - y))) / max(1.0, float(np.max(np.abs(y))))
    if not np.isfinite(d):
      return float("inf")  # a NaN or inf anywhere fails every comparison (max() skips a NaN)
    out = max(out, d)
  return out


def _run(name, shape, fn, batch, *extra, value=False, **knobs):
  step = _jitted(name, shape, batch, fn, value=value, **knobs)
  return step(_state(shape, value), _put_batch(batch, shape), *extra)


# -- tests ----------------------------------------------------------------------------------------
def test_sft_step_matches_naive_reference():
  batch = _sft_batch()
  new, metrics = _run("sft", (1, 1, 1), steps.sft_step, batch, graphdef=GRAPHDEF, tx=TX,
                      cfg=steps.SFTStepConfig())
  host = _host_state()
  ref_params, ref_opt, ref_loss = _naive_update(_naive_sft_loss, host.params, host.opt_state,
                                                batch)
  assert float(metrics["train/loss"]) == pytest.approx(float(ref_loss), rel=1e-6)
  assert float(metrics["sft/nll"]) == pytest.approx(float(ref_loss), rel=1e-6)
  assert _max_diff(new.params, ref_params) <= 1e-6
  assert _max_diff(new.opt_state, ref_opt) <= 1e-6
  assert int(new.step) == int(host.step) + 1
  assert float(metrics["train/lr"]) == pytest.approx(0.2)
  assert float(metrics["train/loss_finite"]) == 1.0 and float(metrics["train/updates"]) == 1.0
  assert float(metrics["train/grad_norm"]) > 0


def test_micro_batch_accumulation_equals_full_batch():
  batch = _sft_batch()
  full, m_full = _run("sft", (1, 1, 1), steps.sft_step, batch, graphdef=GRAPHDEF, tx=TX,
                      cfg=steps.SFTStepConfig())
  micro, m_micro = _run("sft_mb2", (1, 1, 1), steps.sft_step, batch, graphdef=GRAPHDEF, tx=TX,
                        cfg=steps.SFTStepConfig(micro_batches=2))
  assert float(m_micro["train/loss"]) == pytest.approx(float(m_full["train/loss"]), rel=1e-6)
  assert float(m_micro["train/grad_norm"]) == pytest.approx(float(m_full["train/grad_norm"]),
                                                            rel=1e-5)
  assert float(m_micro["train/denominator"]) == float(m_full["train/denominator"])
  assert _max_diff(micro.params, full.params) <= 1e-6
  with pytest.raises(ValueError, match="micro_batches=3"):
    jax.eval_shape(functools.partial(steps.sft_step, graphdef=GRAPHDEF, tx=TX,
                                     cfg=steps.SFTStepConfig(micro_batches=3)),
                   _host_state(), batch)


def _pg_reference(batch):
  """Python loop over epochs x minibatches (the documented shuffle: permutation with
  fold_in(fold_in(rng, step), epoch); minibatch i = rows i, i + M, ...)."""
  host = _host_state()
  params, opt_state = host.params, host.opt_state
  rng = jax.random.fold_in(host.rng, host.step)
  losses = []
  for e in range(PG_CFG.epochs):
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(rng, e), PG_B))
    shuffled = {k: v[perm] for k, v in batch.items()}
    for i in range(PG_CFG.minibatches):
      mb = {k: v[i::PG_CFG.minibatches] for k, v in shuffled.items()}
      params, opt_state, loss = _naive_update(_naive_pg_loss, params, opt_state, mb)
      losses.append(float(loss))
  return params, opt_state, losses


def test_pg_step_matches_reference_loop():
  batch = _pg_batch()
  new, metrics = _run("pg", (1, 1, 1), steps.pg_step, batch, graphdef=GRAPHDEF, tx=TX,
                      cfg=PG_CFG)
  ref_params, ref_opt, losses = _pg_reference(batch)
  assert float(metrics["train/updates"]) == 4
  assert float(metrics["train/loss"]) == pytest.approx(np.mean(losses), rel=1e-5, abs=1e-7)
  assert _max_diff(new.params, ref_params) <= 1e-5  # 4 updates
  assert _max_diff(new.opt_state, ref_opt) <= 1e-5
  assert 0.0 < float(metrics["pg/clip_frac"]) < 1.0  # the clipped branch is exercised
  assert float(metrics["pg/kl_ref"]) > 0


def test_mesh_8_devices_equals_single_device_and_compiles_once():
  batch = _pg_batch()
  knobs = dict(graphdef=GRAPHDEF, tx=TX, cfg=PG_CFG)
  single, m_single = _run("pg", (1, 1, 1), steps.pg_step, batch, **knobs)
  step = _jitted("pg", (2, 2, 2), batch, steps.pg_step, **knobs)
  state = _state((2, 2, 2))
  sharded, m_sharded = step(state, _put_batch(batch, (2, 2, 2)))
  assert _max_diff(sharded.params, single.params) <= 1e-5
  assert _max_diff(sharded.opt_state, single.opt_state) <= 1e-5
  for k in m_single:
    assert float(m_sharded[k]) == pytest.approx(float(m_single[k]), rel=1e-5, abs=1e-6), k
  # The new state keeps the layout.
  _, shardings = _layout((2, 2, 2))
  for x, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(shardings)):
    assert x.sharding == s
  # Compile once: more steps with new data never re-trace (these off-policy random batches with
  # a large learning rate may well diverge; only the tracing is checked here).
  traces = step.trace_count
  assert traces == 1
  for seed in (1, 2):
    sharded, _ = step(sharded, _put_batch(_pg_batch(seed), (2, 2, 2)))
  assert step.trace_count == 1 and int(sharded.step) == int(_host_state().step) + 3


def test_loss_finite_flag_on_nan():
  batch = _pg_batch()
  rows, cols = np.nonzero(batch["loss_mask_BxT"])
  batch["adv_BxT"][rows[0], cols[0]] = np.nan
  _, metrics = _run("pg", (1, 1, 1), steps.pg_step, batch, graphdef=GRAPHDEF, tx=TX, cfg=PG_CFG)
  assert float(metrics["train/loss_finite"]) == 0.0
  assert not np.isfinite(float(metrics["train/loss"]))


def test_distill_step_matches_naive_reverse_kl():
  batch = _distill_batch()
  _, teacher_params = transformer.init(TEACHER_CFG, 9)
  cfg = steps.DistillStepConfig(distill=distill.DistillConfig(kind="reverse_kl", chunk_size=5))
  m, _ = _layout((1, 1, 1))
  teacher = jax.device_put(teacher_params, mesh_lib.param_shardings(TEACHER_CFG, m))
  new, metrics = _run("distill", (1, 1, 1), steps.distill_step, batch, teacher,
                      graphdef=GRAPHDEF, teacher_graphdef=transformer.graphdef_for(TEACHER_CFG),
                      tx=TX, cfg=cfg)
  host = _host_state()
  ref_params, _, ref_loss = _naive_update(_naive_reverse_kl_loss, host.params, host.opt_state,
                                          batch, teacher_params)
  assert float(metrics["train/loss"]) == pytest.approx(float(ref_loss), rel=1e-5)
  assert float(metrics["distill/reverse_kl"]) == pytest.approx(float(ref_loss), rel=1e-5)
  assert _max_diff(new.params, ref_params) <= 1e-6


def test_batch_validation_errors():
  batch = _pg_batch()
  fn = functools.partial(steps.pg_step, graphdef=GRAPHDEF, tx=TX, cfg=PG_CFG)
  missing = {k: v for k, v in batch.items() if k != "old_logp_BxT"}
  with pytest.raises(ValueError, match="old_logp_BxT"):
    fn(_host_state(), missing)
  bad = dict(batch, adv_BxT=batch["adv_BxT"][:, :-1])
  with pytest.raises(ValueError, match="adv_BxT"):
    fn(_host_state(), bad)
  no_ref = {k: v for k, v in batch.items() if k != "ref_logp_BxT"}
  with pytest.raises(ValueError, match="ref_logp_BxT"):
    fn(_host_state(), no_ref)
  with pytest.raises(ValueError, match="minibatches"):
    steps.pg_step(_host_state(), {k: v[:6] for k, v in batch.items()}, graphdef=GRAPHDEF, tx=TX,
                  cfg=PG_CFG)
  with pytest.raises(ValueError, match="epochs"):
    steps.PGStepConfig(epochs=0)


# -- learned value head (GAE-OPD) -----------------------------------------------------------------
VALUE_CFG = dataclasses.replace(PG_CFG, value_head=True, value_coef=10.0, value_lr=VALUE_LR)
VALUE_CFG_1 = dataclasses.replace(VALUE_CFG, epochs=1, minibatches=1, micro_batches=1)


def _value_batch(seed=0):
  batch = _pg_batch(seed)
  rng = np.random.default_rng(seed + 100)
  batch["returns_BxT"] = np.where(batch["loss_mask_BxT"], rng.standard_normal((PG_B, PG_T)),
                                  0).astype(np.float32)
  return batch


def _value_reference64(params, head, batch):
  """Float64 numpy: 0.5 (h.k + b - target)^2, token mean over the loss mask, and its gradient;
  h = the final-normed hidden state of the position before each token (computed by the model)."""
  h, _ = transformer.merge(GRAPHDEF, params).hidden(batch["tokens_BxT"], batch["mask_BxT"])
  h = np.asarray(h, np.float64)
  mask = batch["mask_BxT"]
  h = np.where(mask[:, :-1, None], h[:, :-1], 0.0)  # h of position t - 1 predicts token t
  h = np.concatenate([np.zeros_like(h[:, :1]), h], axis=1)
  k = np.asarray(head["kernel"], np.float64)
  b = float(head["bias"])
  m = batch["loss_mask_BxT"].astype(np.float64)
  v = h @ k + b
  err = v - batch["returns_BxT"].astype(np.float64)
  n = m.sum()
  loss = 0.5 * np.sum(m * err**2) / n
  grad = {"kernel": np.einsum("bt,btd->d", m * err, h) / n, "bias": np.sum(m * err) / n}
  metrics = {"value/loss": loss, "value/mse": np.sum(m * err**2) / n,
             "value/mean": np.sum(m * v) / n}
  return loss, grad, metrics


def test_value_head_leaves_the_policy_update_unchanged():
  """Trunk stop-gradient: with a heavily weighted value loss (value_coef 10), 2 epochs x 2
  minibatches x 2 micro-batches, the policy params, its optimizer state and grad norm equal the
  plain pg_step's; the loss adds value_coef x the value loss."""
  batch = _value_batch()
  plain, m_plain = _run("pg", (1, 1, 1), steps.pg_step, _pg_batch(), graphdef=GRAPHDEF, tx=TX,
                        cfg=PG_CFG)
  new, m = _run("pg_value", (1, 1, 1), steps.pg_step, batch, value=True, graphdef=GRAPHDEF,
                tx=TX, cfg=VALUE_CFG)
  assert _max_diff(new.params, plain.params) <= 1e-6
  assert _max_diff(new.opt_state, plain.opt_state) <= 1e-6
  assert float(m["train/grad_norm"]) == pytest.approx(float(m_plain["train/grad_norm"]), rel=1e-6)
  assert float(m["train/loss"]) == pytest.approx(
      float(m_plain["train/loss"]) + 10.0 * float(m["value/loss"]), rel=1e-5)
  assert float(m["train/updates"]) == 4 and float(m["train/loss_finite"]) == 1.0
  # the value head moved and its Adam state counted 4 updates
  init = _value_init()
  assert _max_diff(new.value["params"], init["params"]) > 1e-3
  assert int(new.value["opt_state"][0].count) == 4
  for k in ("value/loss", "value/mse", "value/mean", "value/grad_norm"):
    assert np.isfinite(float(m[k])), k


def test_value_head_matches_float64_adam_step_and_micro_batching():
  batch = _value_batch()
  host = _host_state(value=True)
  loss64, grad64, metrics64 = _value_reference64(host.params, host.value["params"], batch)
  init = host.value["params"]
  results = {}
  for micro in (1, 2):
    cfg = dataclasses.replace(VALUE_CFG_1, micro_batches=micro)
    new, m = _run(f"pg_value_1_mb{micro}", (1, 1, 1), steps.pg_step, batch, value=True,
                  graphdef=GRAPHDEF, tx=TX, cfg=cfg)
    results[micro] = (new, m)
    # value/loss is exact per update (sum / denominator); value/mse and value/mean are masked
    # means per micro-batch, averaged over micro-batches (like every objective metric)
    for k, ref in metrics64.items():
      if micro == 1 or k == "value/loss":
        assert float(m[k]) == pytest.approx(ref, rel=1e-5, abs=1e-6), (micro, k)
    # the value head's gradient of the step's loss: value_coef x the value loss's
    g_total = {k: cfg.value_coef * v for k, v in grad64.items()}
    g_norm = np.sqrt(np.sum(g_total["kernel"]**2) + g_total["bias"]**2)
    assert float(m["value/grad_norm"]) == pytest.approx(g_norm, rel=1e-5)
    # Adam's moments after one update: mu = (1 - b1) g, nu = (1 - b2) g^2 (linear in g)
    adam = new.value["opt_state"][0]
    for name in ("kernel", "bias"):
      g = g_total[name]
      np.testing.assert_allclose(np.asarray(adam.mu[name], np.float64), 0.1 * g, rtol=1e-4,
                                 atol=1e-7)
      np.testing.assert_allclose(np.asarray(adam.nu[name], np.float64), 1e-3 * g**2, rtol=1e-4,
                                 atol=1e-10)
      # the first bias-corrected Adam step: p - lr * g / (|g| + eps)
      expected = np.asarray(init[name], np.float64) - VALUE_LR * g / (np.abs(g) + 1e-8)
      np.testing.assert_allclose(np.asarray(new.value["params"][name], np.float64), expected,
                                 rtol=0, atol=1e-6)
  (n1, m1), (n2, m2) = results[1], results[2]
  assert _max_diff(n2.value, n1.value) <= 1e-6
  assert _max_diff(n2.params, n1.params) <= 1e-6
  assert float(m2["value/loss"]) == pytest.approx(float(m1["value/loss"]), rel=1e-6)
  assert float(m2["train/loss"]) == pytest.approx(float(m1["train/loss"]), rel=1e-6)


def test_value_step_config_and_validation():
  assert not PG_CFG.needs_returns and PG_CFG.needs_reference and not PG_CFG.needs_teacher
  assert VALUE_CFG.needs_returns
  assert VALUE_CFG.batch_fields == steps.PG_FIELDS + ("ref_logp_BxT", "returns_BxT")
  assert steps.PGStepConfig().batch_fields == steps.PG_FIELDS
  with pytest.raises(ValueError, match="value_coef"):
    steps.PGStepConfig(value_coef=-1.0)
  with pytest.raises(ValueError, match="value_lr"):
    steps.PGStepConfig(value_lr=0.0)
  value = steps.init_value(VALUE_CFG, CFG.d_model)
  assert value["params"]["kernel"].shape == (CFG.d_model,) and float(value["params"]["bias"]) == 0
  assert jax.tree.structure(value["opt_state"]) == jax.tree.structure(
      steps.make_value_tx(VALUE_CFG).init(value["params"]))
  batch = _value_batch()
  fn = functools.partial(steps.pg_step, graphdef=GRAPHDEF, tx=TX)
  with pytest.raises(ValueError, match="state.value"):
    jax.eval_shape(functools.partial(fn, cfg=VALUE_CFG), _host_state(), batch)
  with pytest.raises(ValueError, match="value_head is False"):
    jax.eval_shape(functools.partial(fn, cfg=PG_CFG), _host_state(value=True), batch)
  no_returns = {k: v for k, v in batch.items() if k != "returns_BxT"}
  with pytest.raises(ValueError, match="returns_BxT"):
    jax.eval_shape(functools.partial(fn, cfg=VALUE_CFG), _host_state(value=True), no_returns)


# -- CR-OPD ---------------------------------------------------------------------------------------
# Near-uniform untrained models: C_t = teacher top-8 (probability thresholds off) intersected with
# the student's top-40, so the set sizes vary from token to token.
CR_TERM = steps.CRTermConfig(coef=0.7, teacher_min_prob=2.0, teacher_top_k=8, student_top_k=40,
                             student_min_prob=2.0)
CR_CFG = steps.PGStepConfig(
    pg=surrogate.PGConfig(kind="ppo_clip", eps_low=0.2, eps_high=0.28, mode="seq_mean_token_sum"),
    micro_batches=2, temperature=0.8, chunk_size=5, cr=CR_TERM)
TEACHER_GRAPHDEF = transformer.graphdef_for(TEACHER_CFG)


@functools.lru_cache(maxsize=None)
def _teacher_host():
  return jax.device_get(transformer.init(TEACHER_CFG, 9)[1])


def _teacher(shape):
  return jax.device_put(_teacher_host(), mesh_lib.param_shardings(TEACHER_CFG, _layout(shape)[0]))


def _shifted_logits(graphdef, params, b):
  """Full logits aligned with the token they predict (row t from position t - 1)."""
  logits = transformer.forward(graphdef, params, b["tokens_BxT"], b["mask_BxT"])
  return jnp.pad(logits[:, :-1].astype(jnp.float32), ((0, 0), (1, 0), (0, 0)))


def _naive_cr_loss(params, b, teacher_params):
  """(surrogate sum + CR-OPD sum) / denominator from full logits, the objectives called directly
  (an identity logits function over materialised [B, T, V] logits; one chunk)."""
  logits = _shifted_logits(GRAPHDEF, params, b)
  teacher_logits = jax.lax.stop_gradient(_shifted_logits(TEACHER_GRAPHDEF, teacher_params, b))
  logp_all = jax.nn.log_softmax(logits / 0.8, axis=-1)
  logp = jnp.take_along_axis(logp_all, b["tokens_BxT"][..., None], axis=-1)[..., 0]
  pg_sum, denom, _ = surrogate.pg_loss(logp, b["old_logp_BxT"], b["adv_BxT"], b["loss_mask_BxT"],
                                       CR_CFG.pg)
  cr_cfg = log_ratio.CROPDConfig(coef=0.7, teacher_min_prob=2.0, teacher_top_k=8,
                                 student_top_k=40, student_min_prob=2.0, temperature=0.8,
                                 chunk_size=PG_T, mode="seq_mean_token_sum")
  cr_sum, cr_denom, _ = log_ratio.cr_opd_loss(lambda x: x, logits, teacher_logits,
                                              b["tokens_BxT"], b["adv_BxT"], b["loss_mask_BxT"],
                                              cr_cfg)
  del cr_denom  # same mask and mode: the same denominator
  return (pg_sum + cr_sum) / denom


def test_cr_opd_step_matches_direct_objectives():
  batch = _pg_batch()
  new, m = _run("pg_cr", (1, 1, 1), steps.pg_step, batch, _teacher((1, 1, 1)), graphdef=GRAPHDEF,
                teacher_graphdef=TEACHER_GRAPHDEF, tx=TX, cfg=CR_CFG)
  host = _host_state()
  ref_params, ref_opt, ref_loss = _naive_update(_naive_cr_loss, host.params, host.opt_state,
                                                batch, _teacher_host())
  assert float(m["train/loss"]) == pytest.approx(float(ref_loss), rel=1e-5)
  assert _max_diff(new.params, ref_params) <= 1e-5
  assert _max_diff(new.opt_state, ref_opt) <= 1e-5
  assert 0.0 < float(m["cr/active_frac"]) < 1.0 and float(m["cr/loss"]) > 0
  assert 1.0 <= float(m["cr/set_size"]) <= 8.0
  # The CR term changes the update (its share of the loss is not negligible).
  off, m_off = _run("pg_cr_plain", (1, 1, 1), steps.pg_step, batch, graphdef=GRAPHDEF, tx=TX,
                    cfg=dataclasses.replace(CR_CFG, cr=steps.CRTermConfig()))
  assert float(m["train/loss"]) > float(m_off["train/loss"])
  assert _max_diff(new.params, off.params) > 1e-4


def test_cr_opd_coef_zero_is_the_plain_step_bitwise():
  batch = _pg_batch()
  off_cfg = dataclasses.replace(CR_CFG, cr=dataclasses.replace(CR_TERM, coef=0.0))
  assert not off_cfg.needs_teacher and CR_CFG.needs_teacher
  plain, m_plain = _run("pg_cr_plain", (1, 1, 1), steps.pg_step, batch, graphdef=GRAPHDEF, tx=TX,
                        cfg=dataclasses.replace(CR_CFG, cr=steps.CRTermConfig()))
  off, m_off = _run("pg_cr_off", (1, 1, 1), steps.pg_step, batch, graphdef=GRAPHDEF, tx=TX,
                    cfg=off_cfg)
  for x, y in zip(jax.tree.leaves((off.params, off.opt_state)),
                  jax.tree.leaves((plain.params, plain.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert set(m_off) == set(m_plain) and not any(k.startswith("cr/") for k in m_off)
  for k in m_plain:
    assert float(m_off[k]) == float(m_plain[k]), k


def test_cr_term_config():
  cr = CR_CFG.cr_opd_config  # the shared knobs come from the PG step (one copy of each)
  assert (cr.temperature, cr.chunk_size, cr.mode) == (0.8, 5, "seq_mean_token_sum")
  assert (cr.coef, cr.teacher_top_k, cr.student_top_k) == (0.7, 8, 40)
  assert steps.CRTermConfig().coef == 0.0 and not steps.PGStepConfig().needs_teacher
  with pytest.raises(ValueError, match="coef"):
    steps.CRTermConfig(coef=-0.1)
  with pytest.raises(ValueError, match="teacher-support"):
    steps.CRTermConfig(coef=1.0, teacher_min_prob=2.0, teacher_top_k=0)
  with pytest.raises(ValueError, match="teacher_params"):
    jax.eval_shape(functools.partial(steps.pg_step, graphdef=GRAPHDEF, tx=TX, cfg=CR_CFG),
                   _host_state(), _pg_batch())


def test_value_head_and_cr_opd_on_8_devices_compile_once():
  """Both options together, 2 epochs x 2 minibatches x 2 micro-batches: the fake 8-device mesh
  equals one device, and more calls never re-trace."""
  batch = _value_batch()
  cfg = dataclasses.replace(VALUE_CFG, cr=CR_TERM, chunk_size=5)
  knobs = dict(graphdef=GRAPHDEF, teacher_graphdef=TEACHER_GRAPHDEF, tx=TX, cfg=cfg)
  single, m_single = _run("pg_value_cr", (1, 1, 1), steps.pg_step, batch, _teacher((1, 1, 1)),
                          value=True, **knobs)
  step = _jitted("pg_value_cr", (2, 2, 2), batch, steps.pg_step, value=True, **knobs)
  teacher = _teacher((2, 2, 2))
  sharded, m_sharded = step(_state((2, 2, 2), True), _put_batch(batch, (2, 2, 2)), teacher)
  assert _max_diff(sharded.params, single.params) <= 1e-5
  assert _max_diff(sharded.value, single.value) <= 1e-5
  for k in m_single:
    assert float(m_sharded[k]) == pytest.approx(float(m_single[k]), rel=1e-5, abs=1e-6), k
  assert float(m_sharded["cr/active_frac"]) > 0 and float(m_sharded["value/loss"]) > 0
  _, shardings = _layout((2, 2, 2), True)
  for x, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(shardings)):
    assert x.sharding == s
  assert step.trace_count == 1
  sharded, _ = step(sharded, _put_batch(_value_batch(1), (2, 2, 2)), teacher)
  assert step.trace_count == 1 and int(sharded.step) == int(_host_state().step) + 2


# -- the MoE load-balancing loss ------------------------------------------------------------------
def _moe_batch(vocab, b=4, t=10, seed=3):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
  mask = np.ones((b, t), bool)
  mask[1, 7:] = False
  mask[3, 5:] = False
  loss_mask = mask & (np.arange(t) >= 3)
  return {"tokens_BxT": tokens, "mask_BxT": mask, "loss_mask_BxT": loss_mask}


def _moe_reference_loss(params, graphdef, batch, coef, n_micro):
  """Full-logits NLL token mean + coef x load-balancing loss, each micro-batch's aux weighted by
  its target count (the documented convention), written from `forward_with_aux`. Returns (loss,
  the weighted aux)."""
  total, count, aux_sum = 0.0, 0.0, 0.0
  for i in range(n_micro):
    mb = {k: v[i::n_micro] for k, v in batch.items()}
    logits, aux = transformer.forward_with_aux(graphdef, params, mb["tokens_BxT"],
                                               mb["mask_BxT"])
    ls = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(ls[:, :-1], mb["tokens_BxT"][:, 1:, None], axis=-1)[..., 0]
    target = mb["loss_mask_BxT"][:, 1:]
    d = target.sum()
    total = total + jnp.sum(jnp.where(target, -logp, 0.0)) + coef * aux * d
    aux_sum = aux_sum + aux * d
    count = count + d
  return total / count, aux_sum / count


_moe_reference = jax.jit(jax.value_and_grad(_moe_reference_loss, has_aux=True),
                         static_argnums=(1, 4))


@pytest.mark.parametrize("coef", [0.5, 0.0])
def test_moe_student_step_adds_the_load_balancing_loss(coef):
  cfg = config.tiny_moe(vocab_size=61, router_aux_loss_coef=coef)
  graphdef, params = transformer.init(cfg, 0)
  batch = _moe_batch(cfg.vocab_size)
  tx = optax.sgd(1.0)  # new params = params - grad
  step = jax.jit(functools.partial(steps.sft_step, graphdef=graphdef, tx=tx,
                                   cfg=steps.SFTStepConfig(micro_batches=2)))
  new, metrics = step(state_lib.create_state(params, tx, 0), batch)
  # (The reference takes the coef as an argument: one compile serves both cases.)
  ref_gd = transformer.graphdef_for(cfg.replace(router_aux_loss_coef=0.0))
  (loss, aux), grads = _moe_reference(params, ref_gd, batch, jnp.float32(coef), 2)
  np.testing.assert_allclose(float(metrics["train/loss"]), float(loss), rtol=1e-5)
  want = jax.tree.map(lambda p, g: p - g, params, grads)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=0)
  if coef == 0:  # off: no aux term, no metric (the plain objective's step)
    assert "loss/router_aux" not in metrics
    return
  np.testing.assert_allclose(float(metrics["loss/router_aux"]), float(aux), rtol=1e-5)
  # The aux gradient is really there: it moves the router kernels.
  _, plain = _moe_reference(params, ref_gd, batch, jnp.float32(0.0), 2)
  router = lambda t: np.asarray(t["layers"]["mlp"]["router"]["kernel"])  # noqa: E731
  assert np.abs(router(grads) - router(plain)).max() > 1e-4
  # PG and distill steps carry the same term (shapes only: the same helper adds it).
  pg_batch = dict(batch, old_logp_BxT=np.zeros(batch["mask_BxT"].shape, np.float32),
                  adv_BxT=np.ones(batch["mask_BxT"].shape, np.float32))
  state = state_lib.create_state(params, tx, 0)
  _, pg_m = jax.eval_shape(functools.partial(steps.pg_step, graphdef=graphdef, tx=tx), state,
                           pg_batch)
  _, d_m = jax.eval_shape(functools.partial(steps.distill_step, graphdef=graphdef,
                                            teacher_graphdef=graphdef, tx=tx), state, batch,
                          params)
  assert "loss/router_aux" in pg_m and "loss/router_aux" in d_m

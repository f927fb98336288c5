"""train/steps.py: every step against a naive full-logits reference (autodiff of an independently
written loss + the same optax chain), micro-batch accumulation == full batch, the fake 8-device
mesh == one device, compile-once, the non-finite flag, and batch validation errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mp_worker
from opd_jax.models import config, transformer
from opd_jax.objectives import distill, surrogate
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
@functools.lru_cache(maxsize=None)
def _layout(shape):
  m = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=shape))
  abstract = transformer.abstract_params(CFG)
  return m, mesh_lib.state_shardings(TX, mesh_lib.param_shardings(CFG, m), abstract)


@functools.lru_cache(maxsize=None)
def _host_state(seed=0):
  _, params = transformer.init(CFG, seed)
  return jax.device_get(state_lib.create_state(params, TX, 5))


def _state(shape):
  """A fresh device copy (steps donate their state argument)."""
  host = _host_state()
  fresh = host.replace(rng=jax.random.wrap_key_data(np.asarray(jax.random.key_data(host.rng))))
  return jax.device_put(fresh, _layout(shape)[1])


_STEPS = {}


def _jitted(name, shape, batch, fn, **knobs):
  """One JittedStep per (name, mesh shape): reused across tests (compile once)."""
  key = (name, shape)
  if key not in _STEPS:
    m, shardings = _layout(shape)
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
    out = max(out, float(np.max(np.abs(x - y))) / max(1.0, float(np.max(np.abs(y)))))
  return out


def _run(name, shape, fn, batch, *extra, **knobs):
  step = _jitted(name, shape, batch, fn, **knobs)
  return step(_state(shape), _put_batch(batch, shape), *extra)


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

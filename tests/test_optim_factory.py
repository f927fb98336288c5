"""optim/factory.py: the explicit chain vs a float64 numpy AdamW reference, schedules, masks,
ablation slots and their errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from opd_jax.optim import factory


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "embed": {"embedding": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)},
      "layers": {"proj": {"kernel": jnp.asarray(rng.standard_normal((2, 4, 3)), jnp.float32),
                          "bias": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)},
                 "norm": {"scale": jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)}},
      "final_norm": {"scale": jnp.asarray(rng.standard_normal((4,)), jnp.float32)},
  }


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)


def _reference_adamw(params, grads_seq, lrs, *, b1, b2, eps, wd, clip, decay_mask):
  """float64 numpy: global-norm clip -> Adam (bias-corrected) -> + wd * p (masked) -> * -lr."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
    g = {k: np.asarray(x, np.float64) for k, x in g.items()}
    norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
    if clip > 0 and norm > clip:
      g = {k: x * clip / norm for k, x in g.items()}
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      mhat = m[k] / (1 - b1 ** t)
      vhat = v[k] / (1 - b2 ** t)
      u = mhat / (np.sqrt(vhat) + eps)
      if decay_mask[k]:
        u = u + wd * p[k]
      p[k] = p[k] - lr * u
  return p


def _flat(tree):
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_chain_matches_float64_adamw_reference(schedule):
  cfg = factory.OptimConfig(lr=0.05, schedule=schedule, warmup_frac=0.25, final_lr=0.005,
                            b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, grad_clip_norm=2.5)
  params = _params()
  total = 8
  tx = factory.make_optimizer(cfg, params, total_steps=total)
  state = tx.init(params)
  update = jax.jit(tx.update)
  grads_seq = [_grads(params, 10 + i) for i in range(5)]
  p = params
  lrs = []
  for g in grads_seq:
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
    lrs.append(float(factory.current_lr(state)))
  sched = factory.make_schedule(cfg, total)
  expected_lrs = [float(sched(i)) for i in range(5)]
  np.testing.assert_allclose(lrs, expected_lrs, rtol=1e-6)
  decay = {k: k.endswith("['kernel']") or k.endswith("['embedding']") for k in _flat(params)}
  ref = _reference_adamw(_flat(params), [_flat(g) for g in grads_seq], expected_lrs, b1=0.9,
                         b2=0.98, eps=1e-6, wd=0.1, clip=2.5, decay_mask=decay)
  got = _flat(p)
  for k in ref:
    np.testing.assert_allclose(np.asarray(got[k], np.float64), ref[k], rtol=1e-5, atol=1e-6,
                               err_msg=k)


def test_schedules_match_closed_form():
  cfg = factory.OptimConfig(lr=1e-3, schedule="cosine", warmup_frac=0.1, final_lr=1e-4)
  total = 100
  sched = factory.make_schedule(cfg, total)
  for step in [0, 3, 9, 10, 11, 40, 77, 99, 100, 150]:
    if step < 10:
      expected = 1e-3 * step / 10
    else:
      frac = min((step - 10) / 90, 1.0)
      expected = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * frac))
    assert float(sched(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12), step
  const = factory.make_schedule(factory.OptimConfig(lr=3e-4), None)
  assert float(const(0)) == pytest.approx(3e-4) and float(const(1000)) == pytest.approx(3e-4)
  with pytest.raises(ValueError, match="total_steps"):
    factory.make_schedule(factory.OptimConfig(schedule="cosine"), None)


def test_weight_decay_mask_excludes_norms_and_biases():
  mask = _flat(factory.weight_decay_mask(_params()))
  assert mask == {"['embed']['embedding']": True, "['layers']['proj']['kernel']": True,
                  "['layers']['proj']['bias']": False, "['layers']['norm']['scale']": False,
                  "['final_norm']['scale']": False}
  assert all(_flat(factory.weight_decay_mask(_params(), "all")).values())


def test_unknown_transform_name_lists_valid_names():
  with pytest.raises(ValueError) as e:
    factory.OptimConfig(transforms=(("subspace_projektion", {}),))
  msg = str(e.value)
  assert "subspace_projektion" in msg
  for name in factory.TRANSFORMS:
    assert name in msg
  with pytest.raises(ValueError, match="position"):
    factory.TransformSpec("sign", position="middle")
  with pytest.raises(ValueError, match="kwargs"):
    factory.make_optimizer(factory.OptimConfig(transforms=(("scale", {"factor": 2.0}),)),
                           _params())


def test_subspace_projection_needs_bases():
  cfg = factory.OptimConfig(transforms=("subspace_projection",))
  with pytest.raises(ValueError, match="subspace_bases"):
    factory.make_optimizer(cfg, _params())


def test_pre_and_post_slots_and_freeze():
  params = _params()
  g = _grads(params, 3)
  base_cfg = dict(lr=0.1, weight_decay=0.0, grad_clip_norm=0.0)

  def first_update(**kw):
    tx = factory.make_optimizer(factory.OptimConfig(**base_cfg, **kw), params)
    return _flat(tx.update(g, tx.init(params), params)[0])

  plain = first_update()
  # 'post' scale acts on the final update: exactly 3x.
  scaled = first_update(transforms=(("scale", "post", {"step_size": 3.0}),))
  for k in plain:
    np.testing.assert_allclose(scaled[k], 3.0 * plain[k], rtol=1e-6)
  # 'pre' scale acts on the gradient before Adam, which is scale-invariant (up to eps).
  pre = first_update(transforms=(("scale", "pre", {"step_size": 3.0}),))
  for k in plain:
    np.testing.assert_allclose(pre[k], plain[k], rtol=1e-4)
  # freeze: matching paths get exactly zero updates, the others are untouched.
  frozen = first_update(transforms=(("freeze", {"patterns": ["norm"]}),))
  for k in plain:
    if "norm" in k:
      assert not np.any(np.asarray(frozen[k]))
    else:
      np.testing.assert_array_equal(frozen[k], plain[k])


def test_works_with_abstract_params_and_under_jit():
  params = _params()
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  cfg = factory.OptimConfig(lr=1e-2, weight_decay=0.1, transforms=(("sign", "pre", {}),))
  tx = factory.make_optimizer(cfg, abstract)
  abstract_state = jax.eval_shape(tx.init, abstract)
  assert jax.tree.structure(abstract_state) == jax.tree.structure(tx.init(params))
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  s = tx.init(params)
  p = params
  for i in range(3):
    p, s = step(p, s, _grads(params, i))
  assert len(traces) == 1
  assert float(factory.current_lr(s)) == pytest.approx(1e-2)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_stays_float32_with_bfloat16_params(schedule):
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params())
  cfg = factory.OptimConfig(lr=1e-6, schedule=schedule)
  tx = factory.make_optimizer(cfg, params, total_steps=100)
  grads = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _grads(_params(), 1))
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  lr = factory.current_lr(state)
  assert lr.dtype == jnp.float32
  if schedule == "constant":   # optax's default cast would give bfloat16's 9.98e-7
    assert float(lr) == pytest.approx(np.float32(1e-6), rel=1e-7)


def test_subspace_projection_slot_pre_and_post():
  from opd_jax.optim import subspace
  params = _params()
  delta = _grads(params, 7)
  bases = subspace.capture_bases(delta, k=2)  # kernels only: layers/proj/kernel [2, 4, 3]
  v = np.asarray(bases["layers"]["proj"]["kernel"], np.float64)  # [2, 4, 2]
  g = _grads(params, 8)
  gk = np.asarray(g["layers"]["proj"]["kernel"], np.float64)
  proj = np.einsum("lik,ljk,ljo->lio", v, v, gk)  # V V^T g per layer (input side)

  def first_update(position):
    cfg = factory.OptimConfig(lr=0.1, grad_clip_norm=0.0, eps=1e-8,
                              transforms=(("subspace_projection", position, {}),))
    tx = factory.make_optimizer(cfg, params, subspace_bases=bases)
    return tx.update(g, tx.init(params), params)[0]

  post = np.asarray(first_update("post")["layers"]["proj"]["kernel"], np.float64)
  resid = post - np.einsum("lik,ljk,ljo->lio", v, v, post)
  assert np.abs(resid).max() <= 1e-6 * np.abs(post).max()  # the update itself is in span(V)
  plain = first_update("post")["embed"]["embedding"]
  np.testing.assert_array_equal(plain, first_update("pre")["embed"]["embedding"])
  # 'pre': Adam sees the projected gradient; its first update is -lr * Pg / (|Pg| + eps).
  pre = np.asarray(first_update("pre")["layers"]["proj"]["kernel"], np.float64)
  np.testing.assert_allclose(pre, -0.1 * proj / (np.abs(proj) + 1e-8), rtol=1e-4, atol=1e-7)


def _random_tree(rng):
  return {"dense": {"kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
                    "bias": jnp.asarray(rng.standard_normal((5,)), jnp.float32)},
          "norm": {"scale": jnp.asarray(rng.standard_normal((6,)), jnp.float32)}}


def _same(a, b):
  if jax.dtypes.issubdtype(getattr(a, "dtype", None), jax.dtypes.prng_key):
    a, b = jax.random.key_data(a), jax.random.key_data(b)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_graft_carries_the_shared_parts_and_inits_the_added_ones():
  """A branch's optimizer (`loop.branch_from`) takes over its source's state: count,
  hyperparameters and every shared chain part; an added part keeps its init. With an added
  transform that changes nothing (scale 1), the branch's next update equals the source's."""
  rng = np.random.default_rng(0)
  params = _random_tree(rng)
  source_cfg = factory.OptimConfig(lr=1e-2, schedule="cosine", warmup_frac=0.2,
                                   weight_decay=0.1, transforms=(("clip_by_value", {}),))
  source_tx = factory.make_optimizer(source_cfg, params, total_steps=10)
  state = source_tx.init(params)
  for _ in range(3):
    _, state = source_tx.update(_random_tree(rng), state, params)
  for added in (("scale", "post", {"step_size": 1.0}), ("add_noise", "post", {"eta": 0.5}),
                ("centralize", "pre", {})):
    cfg = factory.OptimConfig(lr=1e-2, schedule="cosine", warmup_frac=0.2, weight_decay=0.1,
                              transforms=(("clip_by_value", {}), added))
    tx = factory.make_optimizer(cfg, params, total_steps=10)
    fresh = tx.init(params)
    grafted = factory.graft_opt_state(cfg, fresh, source_cfg, state)
    new_labels, old_labels = factory.chain_labels(cfg), factory.chain_labels(source_cfg)
    assert len(new_labels) == len(old_labels) + 1
    assert int(grafted.count) == 3
    for i, label in enumerate(new_labels):
      want = (state.inner_state[old_labels.index(label)] if label in old_labels
              else fresh.inner_state[i])
      jax.tree.map(_same, grafted.inner_state[i], want)
    grads = _random_tree(rng)
    if added[0] == "scale":
      want_u, _ = source_tx.update(grads, state, params)
      got_u, _ = tx.update(grads, grafted, params)
      jax.tree.map(np.testing.assert_array_equal, got_u, want_u)
  # A branch may only add transforms: dropping or reordering one is refused, naming it.
  dropped = factory.OptimConfig(lr=1e-2, weight_decay=0.1)
  with pytest.raises(factory.GraftError, match=r"'pre:clip_by_value\{\}'.*only add"):
    factory.graft_opt_state(dropped, factory.make_optimizer(dropped, params).init(params),
                            source_cfg, state)
  changed = factory.OptimConfig(lr=1e-2, weight_decay=0.1, b2=0.99,
                                transforms=(("clip_by_value", {}),))
  with pytest.raises(factory.GraftError, match=r"scale_by_adam\(b1=0.9, b2=0.999"):
    factory.graft_opt_state(changed, factory.make_optimizer(changed, params).init(params),
                            source_cfg, state)

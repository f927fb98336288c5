"""Token sparsification transforms: exact counts, rescale, masks, RNG, jit, chain, hyperparams, mesh."""

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from opd_jax.optim import tokens


def _batch(seed=0, b=8, t=16):
  """Left-padded prompts then responses of varied lengths, padding after EOS."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, t), bool)
  for i in range(b):
    start = rng.integers(0, t // 2)
    length = rng.integers(0, t - start + 1)
    mask[i, start:start + length] = True
  mask[0] = False                       # an empty response
  mask[1, 3:] = True                    # a long one
  adv = rng.normal(size=(b, t)).astype(np.float32)
  signal = rng.normal(size=(b, t)).astype(np.float32)
  signal[~mask] = 100.0                 # padding would win the top-k if it were eligible
  return adv, signal, mask


def _ceil(rho, n):
  return math.ceil(fractions.Fraction(str(rho)) * n)


def _np_top_kl(adv, signal, mask, rho):
  out = np.zeros(adv.shape, np.float64)
  for b in range(adv.shape[0]):
    idx = np.flatnonzero(mask[b])
    k = _ceil(rho, len(idx))
    if k == 0:
      continue
    chosen = idx[np.argsort(-signal[b, idx], kind="stable")[:k]]
    out[b, chosen] = adv[b, chosen] * len(idx) / k
  return out


@pytest.mark.parametrize("rho", [0.25, 0.5, 0.3, 1.0, 0.0])
def test_top_kl_retention_matches_reference(rho):
  adv, signal, mask = _batch()
  tx = tokens.top_kl_retention(rho)
  out, state = jax.jit(tx.update)(jnp.asarray(adv), tx.init(adv), signal=signal, mask=mask)
  out = np.asarray(out)
  np.testing.assert_allclose(out, _np_top_kl(adv, signal, mask, rho), rtol=1e-6, atol=1e-7)
  kept = out != 0
  assert not np.any(kept & ~mask)       # never padding / prompt / post-EOS
  lengths = mask.sum(1)
  for b in range(len(adv)):
    assert kept[b].sum() == _ceil(rho, lengths[b])
    if kept[b].any():  # the rescaled keep-mask sums to the response length
      np.testing.assert_allclose((out[b][kept[b]] / adv[b][kept[b]]).sum(), lengths[b], rtol=1e-5)
  want_frac = sum(_ceil(rho, n) for n in lengths) / lengths.sum()
  np.testing.assert_allclose(tokens.kept_frac(state)["tokens/kept_frac"], want_frac, rtol=1e-6)


def test_random_retention_counts_reproducibility_and_rng_advance():
  adv, signal, mask = _batch(1)
  tx = tokens.random_retention(0.5, seed=7)
  update = jax.jit(tx.update)
  out1, state1 = update(jnp.asarray(adv), tx.init(adv), signal=signal, mask=mask)
  out2, _ = update(jnp.asarray(adv), state1, signal=signal, mask=mask)
  again, _ = update(jnp.asarray(adv), tx.init(adv), signal=signal, mask=mask)
  # The key lives in the state, so seed 8's state through the same (compiled) update is seed 8.
  other_seed, _ = update(jnp.asarray(adv), tokens.random_retention(0.5, seed=8).init(adv),
                         signal=signal, mask=mask)
  np.testing.assert_array_equal(out1, again)              # reproducible per seed
  lengths = mask.sum(1)
  for out in (np.asarray(out1), np.asarray(out2)):
    kept = out != 0
    assert not np.any(kept & ~mask)
    for b in range(len(adv)):
      assert kept[b].sum() == _ceil(0.5, lengths[b])
    scale = np.where(kept, out / np.where(kept, adv, 1), 0)
    np.testing.assert_allclose(scale.sum(1), np.where(lengths > 0, lengths, 0), rtol=1e-5)
  assert np.any(np.asarray(out1) != np.asarray(out2))     # the counter advances the key
  assert np.any(np.asarray(out1) != np.asarray(other_seed))
  assert int(state1.count) == 1
  # Uniform over positions: over many draws each real token is kept about half the time.
  row, n_draws = 1, 200
  ones, state, kept = jnp.ones(adv.shape), tx.init(adv), []
  for _ in range(n_draws):
    out, state = update(ones, state, signal=signal, mask=mask)
    kept.append(np.asarray(out)[row] != 0)
  freq = np.mean(kept, 0)[mask[row]]
  assert np.all(np.abs(freq - _ceil(0.5, mask[row].sum()) / mask[row].sum()) < 0.15)


def test_jit_without_recompiling_and_chain_with_scale():
  adv, signal, mask = _batch(2)
  tx = optax.chain(tokens.top_kl_retention(0.25), optax.scale(-2.0))
  traces = []

  @jax.jit
  def step(a, state, signal, mask):
    traces.append(1)
    return tx.update(a, state, signal=signal, mask=mask)

  state = tx.init(adv)
  out1, state = step(jnp.asarray(adv), state, signal, mask)
  rng = np.random.default_rng(3)
  adv2 = rng.normal(size=adv.shape).astype(np.float32)
  out2, state = step(jnp.asarray(adv2), state, -signal, mask)
  assert len(traces) == 1
  np.testing.assert_allclose(out1, -2.0 * _np_top_kl(adv, signal, mask, 0.25), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out2, -2.0 * _np_top_kl(adv2, -signal, mask, 0.25), rtol=1e-6,
                             atol=1e-7)
  assert "tokens/kept_frac" in tokens.kept_frac(state)


def test_inject_hyperparams_with_traced_rho():
  adv, signal, mask = _batch(4)
  tx = optax.inject_hyperparams(tokens.top_kl_retention)(rho=0.5)
  traces = []

  @jax.jit
  def step(a, state):
    traces.append(1)
    return tx.update(a, state, signal=signal, mask=mask)

  state = tx.init(jnp.asarray(adv))
  out, state = step(jnp.asarray(adv), state)
  np.testing.assert_allclose(out, _np_top_kl(adv, signal, mask, 0.5), rtol=1e-6, atol=1e-7)
  for rho in (0.25, 0.3, 0.7):
    state.hyperparams["rho"] = jnp.asarray(rho, jnp.float32)
    out, state = step(jnp.asarray(adv), state)
    np.testing.assert_allclose(out, _np_top_kl(adv, signal, mask, rho), rtol=1e-6, atol=1e-7)
  assert len(traces) == 1
  # random_retention under inject_hyperparams (seed is injected too, and works as an array)
  rtx = optax.inject_hyperparams(tokens.random_retention)(rho=0.25, seed=3)
  out, rstate = jax.jit(lambda a, s: rtx.update(a, s, mask=mask))(jnp.asarray(adv),
                                                                    rtx.init(jnp.asarray(adv)))
  assert ((np.asarray(out) != 0).sum(1) == [_ceil(0.25, n) for n in mask.sum(1)]).all()
  assert float(tokens.kept_frac(rstate)["tokens/kept_frac"]) > 0
  # bfloat16 signals with rho held in float32 (as the module docstring says to wrap): the counts
  # are float32's, e.g. 0.3 * 10 keeps 3.
  ftx = optax.inject_hyperparams(tokens.top_kl_retention, hyperparam_dtype=jnp.float32)(rho=0.3)
  mask20 = np.arange(24)[None, :] < np.array([[10], [20], [7]])
  adv16 = jnp.ones(mask20.shape, jnp.bfloat16)
  sig = np.random.default_rng(1).standard_normal(mask20.shape).astype(np.float32)
  out, _ = jax.jit(lambda a, s: ftx.update(a, s, signal=sig, mask=mask20))(adv16,
                                                                            ftx.init(adv16))
  assert (np.asarray(out) != 0).sum(1).tolist() == [3, 6, 3]


def test_batch_sharded_on_a_fake_mesh_matches_single_device():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  adv, signal, mask = _batch(5, b=16)
  sharding = NamedSharding(mesh, P("data", None))
  put = lambda x: jax.device_put(x, sharding)  # noqa: E731
  top = tokens.top_kl_retention(0.5)
  got, _ = jax.jit(top.update)(put(adv), top.init(adv), signal=put(signal), mask=put(mask))
  assert len(got.sharding.device_set) == 8
  np.testing.assert_allclose(got, _np_top_kl(adv, signal, mask, 0.5), rtol=1e-6, atol=1e-7)
  rand = tokens.random_retention(0.5, seed=1)
  step = jax.jit(rand.update)
  want, _ = step(jnp.asarray(adv), rand.init(adv), signal=signal, mask=mask)
  got, _ = step(put(adv), rand.init(adv), signal=put(signal), mask=put(mask))
  assert len(got.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_pytree_leaves_dtypes_and_errors():
  adv, signal, mask = _batch(6)
  tx = tokens.top_kl_retention(0.5)
  tree = {"opd": jnp.asarray(adv), "rlvr": jnp.asarray(adv, jnp.bfloat16),
          "vec": jnp.asarray(np.stack([adv, adv], -1))}
  out, _ = jax.jit(tx.update)(tree, tx.init(tree), signal=signal, mask=mask)
  ref = _np_top_kl(adv, signal, mask, 0.5)
  np.testing.assert_allclose(out["opd"], ref, rtol=1e-6, atol=1e-7)
  assert out["rlvr"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out["rlvr"], np.float32), ref, rtol=2e-2, atol=1e-2)
  np.testing.assert_allclose(out["vec"][..., 1], ref, rtol=1e-6, atol=1e-7)
  # Leaf selection goes through optax.masked (update's `mask=` is the loss mask, not a leaf mask).
  masked = optax.masked(tx, {"opd": True, "rlvr": False, "vec": False})
  out_m, _ = jax.jit(masked.update)(tree, masked.init(tree), signal=signal, mask=mask)
  np.testing.assert_allclose(out_m["opd"], ref, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(out_m["vec"], tree["vec"])
  with pytest.raises(ValueError, match="signal="):
    tx.update(tree, tx.init(tree), mask=mask)
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    tx.update(jnp.zeros((3, 2)), tx.init(tree), signal=signal, mask=mask)
  with pytest.raises(ValueError, match="rho"):
    tokens.random_retention(1.5)
  with pytest.raises(ValueError, match="no token retention"):
    tokens.kept_frac(optax.sgd(1.0).init(adv))

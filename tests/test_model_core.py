"""Model core: scan vs unrolled stack, cached decode vs full forward, padding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.models import config as mc
from opd_jax.models import transformer as tf


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_scan_equals_unrolled_and_cache_equals_full(family):
  cfg = mc.tiny(vocab_size=97, family=family, tie_embeddings=family != "llama")
  graphdef, params = tf.init(cfg, 0)
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params
  toks = jax.random.randint(jax.random.key(1), (2, 7), 0, 97)
  full = jax.jit(lambda p, t: tf.forward(graphdef, p, t))(params, toks)
  unrolled_def = tf.graphdef_for(cfg.replace(scan_layers=False))
  unrolled = jax.jit(lambda p, t: tf.forward(unrolled_def, p, t))(params, toks)
  np.testing.assert_allclose(full, unrolled, atol=1e-5)

  @jax.jit
  def step(params, toks, pos, cache, index, kv_mask):
    model = tf.merge(graphdef, params)
    h, cache = model.hidden(toks, positions_BxT=pos, cache=cache, cache_index=index,
                            kv_mask_BxS=kv_mask)
    return model.logits(h), cache

  kv_mask = jnp.zeros((2, 10), bool).at[:, :7].set(True)
  pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
  logits, cache = step(params, toks[:, :4], pos, tf.init_cache(cfg, 2, 10), 0, kv_mask)
  outs = [logits]
  for i in range(4, 7):
    logits, cache = step(params, toks[:, i:i + 1], jnp.full((2, 1), i), cache, i, kv_mask)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4)


def test_left_padding_is_invisible():
  cfg = mc.tiny(vocab_size=50)
  graphdef, params = tf.init(cfg, 3)
  toks = jax.random.randint(jax.random.key(2), (1, 6), 1, 50)
  fwd = jax.jit(lambda p, t, m: tf.forward(graphdef, p, t, m))
  ref = fwd(params, toks, jnp.ones_like(toks, bool))
  padded = jnp.concatenate([jnp.zeros((1, 3), toks.dtype), toks], axis=1)
  mask = jnp.concatenate([jnp.zeros((1, 3), bool), jnp.ones((1, 6), bool)], axis=1)
  out = fwd(params, padded, mask)
  np.testing.assert_allclose(out[:, 3:], ref, atol=1e-5)


def test_bad_config_names_field():
  with pytest.raises(ValueError, match="n_kv_heads"):
    mc.tiny(n_kv_heads=3)
  with pytest.raises(ValueError, match="family"):
    mc.ModelConfig(family="gpt2")


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_dense_custom_vjp_matches_float64_reference(dtype, tol):
  """The dense layer's hand-written VJP (weight gradient over the token axes) against numpy
  float64 on random inputs, through the compute-dtype casts of `_mm`."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 6)).astype(np.float32)
  w = rng.standard_normal((6, 4)).astype(np.float32)
  r = rng.standard_normal((2, 5, 4)).astype(np.float32)  # cotangent: loss = sum(r * y)
  loss = lambda x, w: jnp.sum(jnp.asarray(r) * tf._mm(x, w, jnp.dtype(dtype)).astype(jnp.float32))  # noqa: E731
  y = np.asarray(tf._mm(jnp.asarray(x), jnp.asarray(w), jnp.dtype(dtype)).astype(jnp.float32))
  dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(w))
  x64, w64, r64 = (a.astype(np.float64) for a in (x, w, r))
  scale = lambda a: tol * np.abs(a).max()  # noqa: E731
  np.testing.assert_allclose(y, x64 @ w64, atol=scale(x64 @ w64), rtol=0)
  np.testing.assert_allclose(np.asarray(dx), r64 @ w64.T, atol=scale(r64 @ w64.T), rtol=0)
  want_dw = np.einsum("btd,btf->df", x64, r64)
  np.testing.assert_allclose(np.asarray(dw), want_dw, atol=scale(want_dw), rtol=0)
  assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32  # cast back to the inputs' dtype

"""Model core: scan vs unrolled stack, cached decode vs full forward, padding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.models import config as mc
from opd_jax.models import transformer as tf


def _cached_decode_step(graphdef):
  """A jitted decode step with the KV cache: (params, toks, pos, cache, index, kv_mask) ->
  (logits, cache)."""

  @jax.jit
  def step(params, toks, pos, cache, index, kv_mask):
    model = tf.merge(graphdef, params)
    h, cache = model.hidden(toks, positions_BxT=pos, cache=cache, cache_index=index,
                            kv_mask_BxS=kv_mask)
    return model.logits(h), cache

  return step


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

  step = _cached_decode_step(graphdef)

  kv_mask = jnp.zeros((2, 10), bool).at[:, :7].set(True)
  pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
  logits, cache = step(params, toks[:, :4], pos, tf.init_cache(cfg, 2, 10), 0, kv_mask)
  outs = [logits]
  for i in range(4, 7):
    logits, cache = step(params, toks[:, i:i + 1], jnp.full((2, 1), i), cache, i, kv_mask)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4)


def test_blocked_forward_equals_bucketed_cached_decode():
  # Full forward through the blocked attention (19 > 8 positions: 3 blocks of 8, the last
  # partial) vs prefill + one-token decode steps over cache buckets of 4 slots.
  cfg = mc.tiny(vocab_size=97, attention_block=8, cache_block=4)
  graphdef, params = tf.init(cfg, 5)
  t, p = 19, 5
  toks = jax.random.randint(jax.random.key(6), (2, t), 0, 97)
  mask = jnp.ones((2, t), bool).at[1, :3].set(False)  # row 1 left-padded
  full = jax.jit(lambda p_, t_, m: tf.forward(graphdef, p_, t_, m))(params, toks, mask)
  pos = tf.default_positions(mask)
  step = _cached_decode_step(graphdef)
  logits, cache = step(params, toks[:, :p], pos[:, :p], tf.init_cache(cfg, 2, t), 0, mask)
  outs = [logits]
  for i in range(p, t):
    logits, cache = step(params, toks[:, i:i + 1], pos[:, i:i + 1], cache, i, mask)
    outs.append(logits)
  real = np.asarray(mask)[..., None]
  np.testing.assert_allclose(np.where(real, jnp.concatenate(outs, 1), 0),
                             np.where(real, full, 0), atol=1e-4)


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


@pytest.mark.parametrize("rows", [(2, 5), (1, 1)])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_dense_custom_vjp_matches_float64_reference(dtype, tol, rows):
  """The dense layer's hand-written VJP (weight gradient over the token axes) against numpy
  float64 on random inputs, through the compute-dtype casts of `_mm`. One row (a batch-1 decode
  step) takes the sum of two half products on CPU (`_one_row_halves`)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((*rows, 6)).astype(np.float32)
  w = rng.standard_normal((6, 4)).astype(np.float32)
  r = rng.standard_normal((*rows, 4)).astype(np.float32)  # cotangent: loss = sum(r * y)
  assert tf._one_row_halves(x, w) == (rows == (1, 1) and jax.default_backend() == "cpu")
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


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 2e-2)])
def test_silu_mul_custom_vjp_matches_float64_reference(dtype, tol):
  """silu(gate) * up with its hand-written backward (keeps gate and up, recomputes the sigmoid)
  against numpy float64 on random inputs, and against JAX differentiating the same formula."""
  rng = np.random.default_rng(4)
  gate, up, r = (rng.standard_normal((3, 7, 10)).astype(np.float32) * 3 for _ in range(3))
  cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731

  def loss(fn):
    return lambda g, u: jnp.sum(jnp.asarray(r) * fn(g, u).astype(jnp.float32))
  y = tf._silu_mul(cast(gate), cast(up))
  dg, du = jax.jit(jax.grad(loss(tf._silu_mul), argnums=(0, 1)))(cast(gate), cast(up))
  g64, u64, r64 = (np.asarray(cast(a), np.float64) for a in (gate, up, r))
  sig = 1 / (1 + np.exp(-g64))
  want = {"y": g64 * sig * u64, "dg": r64 * u64 * sig * (1 + g64 * (1 - sig)),
          "du": r64 * g64 * sig}
  for name, got in (("y", y), ("dg", dg), ("du", du)):
    assert got.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.asarray(got, np.float64), want[name],
                               atol=tol * np.abs(want[name]).max(), rtol=0, err_msg=name)
  plain = jax.jit(jax.grad(loss(lambda g, u: jax.nn.silu(g) * u), argnums=(0, 1)))
  for got, auto in zip((dg, du), plain(cast(gate), cast(up))):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(auto, np.float64),
                               atol=tol * np.abs(np.asarray(auto, np.float64)).max(), rtol=0)


# -- mixture of experts ---------------------------------------------------------------------------
def _np_route(logits, k, norm):
  """numpy float64 reference of Qwen3's router: softmax, top-k, optional renormalisation."""
  z = logits.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  idx = np.argsort(-p, axis=-1)[..., :k]
  top = np.take_along_axis(p, idx, -1)
  if norm:
    top = top / top.sum(-1, keepdims=True)
  out = np.zeros_like(p)
  np.put_along_axis(out, idx, top, -1)
  return out


def _np_load_balancing(logits_LxBxTxE, k, mask=None):
  """numpy float64 transcription of transformers' `load_balancing_loss_func` (qwen3_moe): per
  layer, top-k assignment counts and routing probabilities summed over (unmasked) rows; both
  divided by the total row count over layers; E * sum(f * P)."""
  n_layers, b, t, e = logits_LxBxTxE.shape
  w = np.ones(b * t) if mask is None else mask.reshape(-1).astype(np.float64)
  counts, probs, rows = np.zeros(e), np.zeros(e), 0.0
  for layer in logits_LxBxTxE.reshape(n_layers, b * t, e).astype(np.float64):
    p = np.exp(layer - layer.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    sel = np.argsort(-p, axis=-1)[:, :k]
    np.add.at(counts, sel.reshape(-1), np.repeat(w, k))
    probs += (p * w[:, None]).sum(0)
    rows += w.sum()
  return e * np.sum((counts / rows) * (probs / rows))


@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_numpy(norm):
  cfg = mc.tiny_moe(num_experts=6, experts_per_token=3, norm_topk_prob=norm)
  logits = np.random.default_rng(0).standard_normal((2, 5, 6)).astype(np.float32)
  got = np.asarray(tf.route(jnp.asarray(logits), cfg))
  np.testing.assert_allclose(got, _np_route(logits, 3, norm), atol=1e-6, rtol=0)
  assert np.all((got > 0).sum(-1) == 3)


def test_load_balancing_loss_matches_numpy_and_transformers():
  import torch  # noqa: PLC0415
  from transformers.models.qwen3_moe import modeling_qwen3_moe  # noqa: PLC0415

  rng = np.random.default_rng(1)
  logits = (2 * rng.standard_normal((3, 2, 7, 8))).astype(np.float32)
  mask = np.ones((2, 7), bool)
  mask[1, :3] = False
  for m in (None, mask):
    got = float(tf.load_balancing_loss(jnp.asarray(logits), 2,
                                       None if m is None else jnp.asarray(m)))
    np.testing.assert_allclose(got, _np_load_balancing(logits, 2, m), rtol=1e-5)
    # transformers' own function on the same logits (a tuple of per-layer [B*T, E] tensors).
    theirs = modeling_qwen3_moe.load_balancing_loss_func(
        tuple(torch.from_numpy(x.reshape(-1, 8)) for x in logits), 8, 2,
        None if m is None else torch.from_numpy(m.astype(np.int64)))
    np.testing.assert_allclose(got, float(theirs), rtol=1e-5)
  # Perfect balance gives k (E * E * (k / E) * (1 / E)).
  assert float(tf.load_balancing_loss(jnp.zeros((1, 1, 4, 8)), 2)) == pytest.approx(2.0)


def test_moe_scan_unrolled_remat_cache():
  """The MoE stack: scan == unrolled, cached decode == full forward, remat gradients == plain
  gradients (router included), and the parameter count and logical axes."""
  cfg = mc.tiny_moe(vocab_size=97)
  graphdef, params = tf.init(cfg, 0)
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params
  axes = tf.logical_axes(cfg)["layers"]["mlp"]
  assert axes["router"]["kernel"] == ("layers", "embed", "expert")
  assert axes["experts"]["down_proj"]["kernel"] == ("layers", "expert", "mlp", "embed")
  toks = jax.random.randint(jax.random.key(1), (2, 7), 0, 97)
  full = jax.jit(lambda p, t: tf.forward(graphdef, p, t))(params, toks)
  unrolled_def = tf.graphdef_for(cfg.replace(scan_layers=False))
  np.testing.assert_allclose(jax.jit(lambda p, t: tf.forward(unrolled_def, p, t))(params, toks),
                             full, atol=1e-5)

  step = _cached_decode_step(graphdef)

  kv_mask = jnp.zeros((2, 10), bool).at[:, :7].set(True)
  logits, cache = step(params, toks[:, :4], jnp.broadcast_to(jnp.arange(4), (2, 4)),
                       tf.init_cache(cfg, 2, 10), 0, kv_mask)
  outs = [logits]
  for i in range(4, 7):
    logits, cache = step(params, toks[:, i:i + 1], jnp.full((2, 1), i), cache, i, kv_mask)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4)

  def loss(graphdef):
    def f(p):
      logits, aux = tf.forward_with_aux(graphdef, p, toks)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + 0.01 * aux
    return jax.jit(jax.grad(f))

  g_plain = loss(graphdef)(params)
  g_remat = loss(tf.graphdef_for(cfg.replace(remat=True)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_remat, g_plain)
  assert float(jnp.abs(g_plain["layers"]["mlp"]["router"]["kernel"]).max()) > 0
  # A dense model has no router logits and a zero auxiliary loss.
  dense = mc.tiny(vocab_size=97)
  dg, dp = tf.init(dense, 0)
  assert float(tf.forward_with_aux(dg, dp, toks)[1]) == 0.0


def test_moe_config_checks():
  with pytest.raises(ValueError, match="num_experts.*qwen3_moe"):
    mc.tiny(num_experts=4)
  with pytest.raises(ValueError, match="experts_per_token"):
    mc.tiny_moe(experts_per_token=5)
  with pytest.raises(ValueError, match="family 'qwen3_moe' needs num_experts"):
    mc.tiny(family="qwen3_moe")
  with pytest.raises(ValueError, match="rope_high_freq_factor"):
    mc.tiny(family="llama", rope_type="llama3", rope_low_freq_factor=4.0)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_moe_ragged_dispatch_equals_dense(dtype, tol):
  """moe_impl='ragged' (sorted grouped matmuls) is the same function as 'dense': logits, the
  load-balancing loss and every gradient (router included), with padding and uneven groups (some
  experts get no token)."""
  cfg = mc.tiny_moe(vocab_size=97, num_experts=6, experts_per_token=3, dtype=dtype)
  graphdef, params = tf.init(cfg, 0)
  params = jax.tree.map(lambda a: a * 10 if a.ndim > 2 else a, params)  # decisive routing
  toks = jax.random.randint(jax.random.key(1), (3, 9), 0, 97)
  mask = jnp.ones((3, 9), bool).at[1, :3].set(False)

  def run(gd):
    def f(p):
      logits, aux = tf.forward_with_aux(gd, p, toks, mask)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 1]) + aux, logits
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (loss_d, logits_d), g_d = run(graphdef)
  (loss_r, logits_r), g_r = run(tf.graphdef_for(cfg.replace(moe_impl="ragged")))
  np.testing.assert_allclose(logits_r, logits_d, atol=tol * np.abs(logits_d).max(), rtol=0)
  np.testing.assert_allclose(loss_r, loss_d, rtol=tol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max(), rtol=0),
               g_r, g_d)
  with pytest.raises(ValueError, match="moe_impl"):
    cfg.replace(moe_impl="sparse")

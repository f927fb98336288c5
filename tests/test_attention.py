"""Attention paths vs a float64 numpy reference: the one-shot attention's backward (values,
gradients and what it keeps), blocked (flash) causal attention with padding,
segments, GQA and block sizes that do not divide T (values and gradients), the model with
blocking on vs off, memory without a [B, H, T, T] buffer, and cache attention over filled
buckets (values, greedy decode tokens and log-probs)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.models import attention
from opd_jax.models import config as mc
from opd_jax.models import sharding
from opd_jax.models import transformer as tf


def _numpy_attention(q_BxTxHxh, k_BxSxKxh, v_BxSxKxh, allowed_BxTxS):
  """float64 attention head by head; rows with no allowed key are NaN (unspecified)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_BxTxHxh, k_BxSxKxh, v_BxSxKxh))
  allowed = np.asarray(allowed_BxTxS)
  b, t, h, hd = q.shape
  g = h // k.shape[2]
  out = np.full((b, t, h, hd), np.nan)
  for bi in range(b):
    for hi in range(h):
      scores = q[bi, :, hi] @ k[bi, :, hi // g].T / np.sqrt(hd)
      for ti in range(t):
        keep = allowed[bi, ti]
        if keep.any():
          w = np.exp(scores[ti, keep] - scores[ti, keep].max())
          out[bi, ti, hi] = (w / w.sum()) @ v[bi, keep, hi // g]
  return out.reshape(b, t, h * hd)


def _numpy_attention_grads(q_BxTxHxh, k_BxSxKxh, v_BxSxKxh, allowed_BxTxS, w_BxTxHh):
  """float64 gradients of sum(attention * w) with respect to q, k and v, head by head (rows
  with no allowed key must carry zero weight in w)."""
  q, k, v, w = (np.asarray(x, np.float64) for x in (q_BxTxHxh, k_BxSxKxh, v_BxSxKxh, w_BxTxHh))
  allowed = np.asarray(allowed_BxTxS)
  b, t, h, hd = q.shape
  g = h // k.shape[2]
  w = w.reshape(b, t, h, hd)
  dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
  for bi in range(b):
    for hi in range(h):
      kv = hi // g
      scores = q[bi, :, hi] @ k[bi, :, kv].T / np.sqrt(hd)
      probs = np.zeros_like(scores)
      for ti in range(t):
        keep = allowed[bi, ti]
        if keep.any():
          e = np.exp(scores[ti, keep] - scores[ti, keep].max())
          probs[ti, keep] = e / e.sum()
      dout = w[bi, :, hi]
      dv[bi, :, kv] += probs.T @ dout
      dprobs = dout @ v[bi, :, kv].T
      dscores = probs * (dprobs - np.sum(dprobs * probs, axis=1, keepdims=True)) / np.sqrt(hd)
      dq[bi, :, hi] = dscores @ k[bi, :, kv]
      dk[bi, :, kv] += dscores.T @ q[bi, :, hi]
  return dq, dk, dv


def _numpy_allowed(t, s, q_slot0, kv_mask_BxS, q_seg_BxT=None, kv_seg_BxS=None):
  allowed = np.arange(s)[None, :] <= (q_slot0 + np.arange(t))[:, None]
  allowed = allowed[None] & np.asarray(kv_mask_BxS)[:, None, :]
  if q_seg_BxT is not None:
    allowed &= np.asarray(q_seg_BxT)[:, :, None] == np.asarray(kv_seg_BxS)[:, None, :]
  return allowed


def _inputs(t, h=4, k=2, hd=8, seed=0, dtype=jnp.float32):
  """q, k, v for 3 rows; mask: left-padded row 0, right-padded row 1, full row 2; segments:
  the same padding, row 2 packed as three segments (one of a single token)."""
  rng = np.random.default_rng(seed)
  b = 3
  q = jnp.asarray(rng.standard_normal((b, t, h, hd)), dtype)
  kk = jnp.asarray(rng.standard_normal((b, t, k, hd)), dtype)
  v = jnp.asarray(rng.standard_normal((b, t, k, hd)), dtype)
  seg = np.ones((b, t), np.int32)
  seg[0, :5] = 0
  seg[1, t - 4:] = 0
  seg[2, 7:] = 2
  seg[2, 8:] = 3
  return q, kk, v, seg > 0, seg


def _real_rows(allowed_BxTxS):
  return np.asarray(allowed_BxTxS).any(-1)[..., None]


@functools.partial(jax.jit, static_argnames=("block", "use_segments"))
def _flash_value_and_grads(q, kk, v, mask, seg, w, *, block, use_segments):
  def loss(q, kk, v):
    out = attention.flash_attention(q, kk, v, mask, seg if use_segments else None, block=block)
    return jnp.sum(out * w), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, kk, v)
  return out, grads


@functools.partial(jax.jit, static_argnames=("cache_layout",))
def _one_shot_value_and_grads(q, kk, v, allowed, w, *, cache_layout=False):
  def loss(q, kk, v):
    if cache_layout:   # keys [B, K, h, S], values [B, K, S, h]
      out = attention._cache_attention(q, jnp.transpose(kk, (0, 2, 3, 1)),
                                       jnp.transpose(v, (0, 2, 1, 3)), allowed)
    else:
      out = attention.reference_attention(q, kk, v, allowed)
    return jnp.sum(out * w), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, kk, v)
  return out, grads


@pytest.mark.parametrize("cache_layout", [False, True])
@pytest.mark.parametrize("use_segments", [False, True])
def test_one_shot_equals_float64_reference_values_and_grads(use_segments, cache_layout):
  """The one-shot attention's hand-written backward (it keeps one [B, K, G, T, S] residual, the
  probabilities) against numpy float64 and against JAX differentiating the same formula."""
  t = 21
  q, kk, v, mask, seg = _inputs(t, seed=5)
  seg_or_none = seg if use_segments else None
  allowed = _numpy_allowed(t, t, 0, mask, seg_or_none, seg_or_none)
  real = _real_rows(allowed)
  w = jnp.asarray(np.random.default_rng(2).standard_normal((3, t, 32)) * real, jnp.float32)
  out, grads = _one_shot_value_and_grads(q, kk, v, jnp.asarray(allowed), w,
                                         cache_layout=cache_layout)
  expected = _numpy_attention(q, kk, v, allowed)
  np.testing.assert_allclose(np.where(real, out, 0), np.where(real, expected, 0), atol=1e-5)
  for g, g_ref in zip(grads, _numpy_attention_grads(q, kk, v, allowed, w)):
    np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=1e-5)

  # Against autodiff, the rows with no allowed key weigh too (their output, the mean of the
  # values, passes gradients to v only).
  w_all = jnp.asarray(np.random.default_rng(3).standard_normal((3, t, 32)), jnp.float32)
  grads = _one_shot_value_and_grads(q, kk, v, jnp.asarray(allowed), w_all,
                                    cache_layout=cache_layout)[1]

  def autodiff_loss(q, kk, v):
    q5 = q.reshape(*q.shape[:2], kk.shape[2], -1, q.shape[-1])
    out5 = attention._one_shot_forward(q5, kk, v, jnp.asarray(allowed), "bskh", "bskh")[0]
    return jnp.sum(out5.reshape(out.shape) * w_all)
  for g, g_auto in zip(grads, jax.jit(jax.grad(autodiff_loss, argnums=(0, 1, 2)))(q, kk, v)):
    np.testing.assert_allclose(g, g_auto, atol=1e-6, rtol=1e-6)


def test_one_shot_and_mlp_backward_keep_one_copy_of_their_large_activations():
  """What the backward passes keep (the residuals of `jax.vjp`): one [B, K, G, T, S] array for
  the one-shot attention (JAX's own differentiation keeps four), and three [B, T, F] arrays for
  the SwiGLU MLP (gate, up, and the down projection's input; JAX's own: six)."""
  b, t, h, kh, hd, d, f = 2, 16, 4, 2, 8, 16, 40
  rng = np.random.default_rng(0)
  q, kk, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
              for s in ((b, t, h, hd), (b, t, kh, hd), (b, t, kh, hd)))
  allowed = jnp.asarray(_numpy_allowed(t, t, 0, np.ones((b, t), bool)))
  _, pullback = jax.vjp(lambda q, kk, v: attention.reference_attention(q, kk, v, allowed),
                        q, kk, v)
  shapes = [leaf.shape for leaf in jax.tree.leaves(pullback)]
  assert sum(math.prod(s) >= b * h * t * t for s in shapes) == 1, shapes
  assert shapes.count((b, kh, h // kh, t, t)) == 1, shapes
  x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  weights = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((d, f), (d, f), (f, d))]
  _, pullback = jax.vjp(lambda x, *w: tf._swiglu(x, *w, dtype=jnp.float32), x, *weights)
  shapes = [leaf.shape for leaf in jax.tree.leaves(pullback)]
  assert shapes.count((b, t, f)) == 3, shapes


@pytest.mark.parametrize("use_segments", [False, True])
def test_flash_equals_float64_reference_values_and_grads(use_segments):
  t = 21
  q, kk, v, mask, seg = _inputs(t)
  seg_or_none = seg if use_segments else None
  allowed = _numpy_allowed(t, t, 0, mask, seg_or_none, seg_or_none)
  expected = _numpy_attention(q, kk, v, allowed)
  real = _real_rows(allowed)
  # Gradients weight only rows with an allowed key (the others are padding, unspecified).
  w = jnp.asarray(np.random.default_rng(1).standard_normal(expected.shape) * real, jnp.float32)
  ref_grads = _numpy_attention_grads(q, kk, v, allowed, w)
  ref_out = attention.reference_attention(q, kk, v, jnp.asarray(allowed))
  np.testing.assert_allclose(np.where(real, ref_out, 0), np.where(real, expected, 0), atol=1e-5)
  # None divides 21 (16 leaves one partial block); the two cases share the block sizes out.
  for block in ((8,) if use_segments else (5, 16)):
    out, grads = _flash_value_and_grads(q, kk, v, jnp.asarray(mask), jnp.asarray(seg), w,
                                        block=block, use_segments=use_segments)
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, expected, 0), atol=1e-5)
    assert np.all(np.isfinite(out))
    for g, g_ref in zip(grads, ref_grads):
      np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=1e-5)


def test_flash_bfloat16_inputs_and_causal_attention_dispatch():
  t = 21
  q, kk, v, mask, seg = _inputs(t, seed=3, dtype=jnp.bfloat16)
  allowed = _numpy_allowed(t, t, 0, mask, seg, seg)
  expected = _numpy_attention(q, kk, v, allowed)  # of the bfloat16-rounded inputs
  real = _real_rows(allowed)
  out = jax.jit(functools.partial(attention.causal_attention, block=8))(
      q, kk, v, jnp.asarray(mask), jnp.asarray(seg))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.where(real, out, 0), np.where(real, expected, 0), atol=1e-5)
  # T <= block: the one-shot reference itself.
  short = attention.causal_attention(q, kk, v, jnp.asarray(mask), jnp.asarray(seg), block=32)
  ref = attention.reference_attention(q, kk, v, jnp.asarray(allowed))
  np.testing.assert_array_equal(short, ref)


def _model_loss(graphdef, params, toks, seg):
  logits = tf.forward(graphdef, params, toks, segment_ids_BxT=seg)
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp[:, :-1], toks[:, 1:, None], axis=-1)[..., 0]
  # Next-token pairs within one segment (a padding position has no specified output).
  same = (seg[:, :-1] > 0) & (seg[:, 1:] == seg[:, :-1])
  return -jnp.sum(picked * same), logits


@pytest.mark.parametrize("dtype,tol,grads", [("float32", 1e-5, True), ("bfloat16", 3e-2, False)])
def test_model_blocking_on_vs_off_same_logits_and_grads(dtype, tol, grads):
  on = mc.tiny(vocab_size=61, attention_block=8, dtype=dtype, remat=True)
  off = on.replace(attention_block=0)
  graphdef_on, params = tf.init(on, 0)
  graphdef_off = tf.graphdef_for(off)
  t = 21
  seg = jnp.asarray(_inputs(t)[4])
  toks = jax.random.randint(jax.random.key(4), (3, t), 0, 61)
  if grads:
    run = jax.jit(jax.value_and_grad(_model_loss, argnums=1, has_aux=True), static_argnums=0)
  else:
    run = jax.jit(lambda gd, p, toks, seg: (_model_loss(gd, p, toks, seg), None),
                  static_argnums=0)
  (loss_on, logits_on), grads_on = run(graphdef_on, params, toks, seg)
  (loss_off, logits_off), grads_off = run(graphdef_off, params, toks, seg)
  real = np.asarray(seg > 0)[..., None]
  np.testing.assert_allclose(np.where(real, logits_on, 0), np.where(real, logits_off, 0),
                             atol=tol, rtol=tol)
  np.testing.assert_allclose(loss_on, loss_off, rtol=tol)
  for g_on, g_off in zip(jax.tree.leaves(grads_on), jax.tree.leaves(grads_off)):
    np.testing.assert_allclose(g_on, g_off, atol=tol, rtol=tol)


def test_no_full_score_buffer_in_forward_or_backward():
  b, t, h, hd, block = 2, 2048, 4, 16, 128
  full_scores_bytes = b * h * t * t * 4
  q = jax.ShapeDtypeStruct((b, t, h, hd), jnp.float32)
  kv = jax.ShapeDtypeStruct((b, t, 2, hd), jnp.float32)
  mask = jax.ShapeDtypeStruct((b, t), jnp.bool_)

  def grad_fn(impl):
    return jax.jit(jax.grad(lambda q, k, v, m: jnp.sum(impl(q, k, v, m) ** 2), argnums=(0, 1, 2)))

  flash = grad_fn(functools.partial(attention.flash_attention, block=block))
  reference = grad_fn(functools.partial(attention.causal_attention, block=0))
  flash_temp = flash.lower(q, kv, kv, mask).compile().memory_analysis().temp_size_in_bytes
  ref_temp = reference.lower(q, kv, kv, mask).compile().memory_analysis().temp_size_in_bytes
  assert ref_temp >= full_scores_bytes  # the measurement sees the [B, H, T, T] scores
  assert flash_temp < full_scores_bytes / 16, (flash_temp, full_scores_bytes)


def _swiglu_float64(x, gate, up, down):
  a, u = x @ gate, x @ up
  return ((a / (1.0 + np.exp(-a))) * u) @ down


@pytest.mark.parametrize("t,block", [(21, 8), (32, 8), (5, 8)])
def test_blocked_mlp_equals_float64_reference_values_and_grads(t, block):
  rng = np.random.default_rng(t)
  b, d, f = 3, 16, 40
  x, gate, up, down = (rng.standard_normal(s) * sc for s, sc in
                       (((b, t, d), 1.0), ((d, f), 0.3), ((d, f), 0.3), ((f, d), 0.2)))
  args32 = [jnp.asarray(a, jnp.float32) for a in (x, gate, up, down)]
  blocked = functools.partial(tf._blocked_swiglu, dtype=jnp.float32, block=block)
  one_shot = functools.partial(tf._swiglu, dtype=jnp.float32)
  np.testing.assert_allclose(jax.jit(blocked)(*args32), _swiglu_float64(x, gate, up, down),
                             atol=1e-5, rtol=1e-5)
  # Gradients (input and every weight) against the one-shot path's.
  cotangent = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  grads = [jax.jit(jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a) * cotangent), argnums=(0, 1, 2, 3)))(
      *args32) for fn in (blocked, one_shot)]
  for g_blocked, g_one_shot in zip(*grads):
    np.testing.assert_allclose(g_blocked, g_one_shot, atol=1e-5, rtol=1e-5)


def test_blocked_mlp_backward_holds_one_block_of_intermediates():
  b, t, d, f, block = 2, 2048, 32, 512, 128
  hidden_bytes = b * t * f * 4
  shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((b, t, d), (d, f), (d, f), (f, d))]

  def temp_bytes(fn):
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2, 3)))
    return grad.lower(*shapes).compile().memory_analysis().temp_size_in_bytes

  blocked = temp_bytes(functools.partial(tf._blocked_swiglu, dtype=jnp.float32, block=block))
  one_shot = temp_bytes(functools.partial(tf._swiglu, dtype=jnp.float32))
  assert one_shot >= 2 * hidden_bytes, (one_shot, hidden_bytes)  # sees [B, T, F] activations
  assert blocked < hidden_bytes, (blocked, hidden_bytes)


def test_blocked_mlp_sharded_on_fake_mesh_equals_single_device():
  rng = np.random.default_rng(3)
  args = [jnp.asarray(rng.standard_normal(s) * sc, jnp.float32) for s, sc in
          (((4, 21, 16), 1.0), ((16, 40), 0.3), ((16, 40), 0.3), ((40, 16), 0.2))]
  fn = jax.jit(jax.value_and_grad(
      lambda *a: jnp.sum(tf._blocked_swiglu(*a, dtype=jnp.float32, block=8) ** 2),
      argnums=(0, 1, 2, 3)))
  single = fn(*args)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), sharding.axis_rules(sharding.DEFAULT_RULES):
    sharded = fn(*args)
  for got, expect in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(got, expect, atol=1e-5, rtol=1e-5)


def test_flash_sharded_on_fake_mesh_equals_single_device():
  t = 21
  q, kk, v, mask, seg = _inputs(t, h=4, k=2, seed=5)
  q, kk, v, mask, seg = (jnp.concatenate([x, x[::-1]], 0) for x in (q, kk, v, mask, seg))
  fn = jax.jit(lambda *a: attention.flash_attention(*a, block=8))
  single = fn(q, kk, v, mask, seg)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), sharding.axis_rules(sharding.DEFAULT_RULES):
    sharded = fn(q, kk, v, mask, seg)
  np.testing.assert_allclose(sharded, single, atol=1e-6)


# -- attention over a KV cache --------------------------------------------------------------------
def test_flash_block_evens_out_blocks():
  assert attention.flash_block(256, 512) == 256 and attention.flash_block(4096, 0) == 4096
  assert attention.flash_block(4096, 512) == 512
  for t, block in ((600, 512), (513, 512), (1000, 512), (21, 8), (21, 5), (4097, 512)):
    b = attention.flash_block(t, block)
    assert b <= block and -(-t // b) == -(-t // block), (t, block, b)  # as many blocks
    assert b % 8 == 0 or b == block
  assert attention.flash_block(600, 512) == 304  # 2 x 304, not 512 + a mostly padded 512


def test_bucket_lengths():
  assert attention.bucket_lengths(50, 8) == (8, 16, 24, 32, 40, 48, 50)
  lengths = attention.bucket_lengths(1000, 8)
  assert len(lengths) <= attention._MAX_BUCKETS and lengths[-1] == 1000
  assert all(n % 8 == 0 for n in lengths[:-1]) and list(lengths) == sorted(set(lengths))


def test_cached_attention_equals_float64_reference_at_every_index():
  s, t = 30, 3
  q, kk, v, _, _ = _inputs(s, seed=6)
  kv_mask = np.ones((3, s), bool)
  kv_mask[0, :4] = False  # a left-padded prompt
  seg = np.ones((3, s), np.int32)
  seg[2, 10:] = 2
  # The cache layout: keys [B, K, h, S], values [B, K, S, h].
  kk_c, v_c = np.transpose(kk, (0, 2, 3, 1)), np.transpose(v, (0, 2, 1, 3))
  fn = jax.jit(lambda i, q_seg: attention.cached_attention(
      q[:, :t], kk_c, v_c, i, jnp.asarray(kv_mask), q_seg, jnp.asarray(seg), block=8))
  for index in (0, 6, 8, 15, s - t):
    q_seg = jnp.asarray(seg[:, index:index + t])
    allowed = _numpy_allowed(t, s, index, kv_mask, q_seg, seg)
    expected = _numpy_attention(q[:, :t], kk, v, allowed)
    real = _real_rows(allowed)
    outs = [fn(index, q_seg)]
    if index in (0, 15):  # a Python index picks its bucket at trace time
      outs.append(attention.cached_attention(q[:, :t], kk_c, v_c, index, jnp.asarray(kv_mask),
                                             q_seg, jnp.asarray(seg), block=8))
    for out in outs:
      np.testing.assert_allclose(np.where(real, out, 0), np.where(real, expected, 0), atol=1e-5)
  # A traced index compiles one branch per bucket length and runs only the selected one.
  jaxpr = str(jax.make_jaxpr(lambda i: attention.cached_attention(
      q[:, :1], kk_c, v_c, i, jnp.asarray(kv_mask), block=8))(3))
  assert "cond[" in jaxpr and jaxpr.count("branches") >= 1


def _greedy_decode(graphdef, params, prompt_BxP, n_new):
  """Prefill + n_new greedy steps through the KV cache: (tokens [B, n_new], log-probs)."""

  @jax.jit
  def run(params, prompt):
    model = tf.merge(graphdef, params)
    b, p = prompt.shape
    cache = tf.init_cache(model.cfg, b, p + n_new)
    kv_mask = jnp.ones((b, p + n_new), bool)
    h, cache = model.hidden(prompt, cache=cache, cache_index=0, kv_mask_BxS=kv_mask)
    logits = model.logits(h[:, -1])

    def body(carry, i):
      logits, cache = carry
      logp = jax.nn.log_softmax(logits, axis=-1)
      tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      h, cache = model.hidden(tok[:, None], positions_BxT=jnp.full((b, 1), p + i),
                              cache=cache, cache_index=p + i, kv_mask_BxS=kv_mask)
      return (model.logits(h[:, 0]), cache), (tok, jnp.take_along_axis(logp, tok[:, None], 1)[:, 0])

    _, (toks, logps) = jax.lax.scan(body, (logits, cache), jnp.arange(n_new))
    return toks.T, logps.T

  return run(params, prompt_BxP)


def test_decode_over_filled_buckets_same_greedy_tokens_and_logprobs():
  bucketed = mc.tiny(vocab_size=53, cache_block=4)
  whole = bucketed.replace(cache_block=0)
  graphdef, params = tf.init(bucketed, 7)
  # Sharpen the distribution so that greedy choices are far from ties.
  params = jax.tree.map(lambda x: x * 3.0, params)
  prompt = jax.random.randint(jax.random.key(8), (2, 5), 0, 53)
  toks, logps = _greedy_decode(graphdef, params, prompt, 10)
  toks_ref, logps_ref = _greedy_decode(tf.graphdef_for(whole), params, prompt, 10)
  np.testing.assert_array_equal(toks, toks_ref)
  np.testing.assert_allclose(logps, logps_ref, atol=1e-5)

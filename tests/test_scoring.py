"""Chunked scoring vs float64 numpy references; gradients vs the naive (unchunked) version."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.models import config as mc
from opd_jax.models import scoring
from opd_jax.models import transformer as tf


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _batch(vocab, b=3, t=13, seed=1):
  toks = jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)
  mask = np.ones((b, t), bool)
  mask[0, :4] = False      # left padding (a prompt)
  mask[1, 10:] = False     # right padding (after EOS)
  return toks, jnp.asarray(mask)


_forward = jax.jit(tf.forward, static_argnums=0)


def _reference(graphdef, params, toks, mask, temperature):
  """Aligned float64 log-probs from the full-forward logits, masked per the contract."""
  ls = _log_softmax64(np.asarray(_forward(graphdef, params, toks, mask), np.float64)
                      / temperature)
  toks, mask = np.asarray(toks), np.asarray(mask)
  ref = np.zeros(toks.shape)
  for b in range(toks.shape[0]):
    for t in range(1, toks.shape[1]):
      if mask[b, t] and mask[b, t - 1]:
        ref[b, t] = ls[b, t - 1, toks[b, t]]
  return ref, ls


def test_token_and_topk_logprobs_match_float64_reference():
  cfg = mc.tiny(vocab_size=97)
  graphdef, params = tf.init(cfg, 0)
  toks, mask = _batch(97)
  valid = np.asarray(scoring._valid_BxT(mask))
  for temperature in (1.0, 0.7):
    ref, ls = _reference(graphdef, params, toks, mask, temperature)
    # chunk 4 does not divide T = 13: exercises the padded last chunk.
    out = scoring.token_logprobs(graphdef, params, toks, mask, temperature=temperature,
                                 chunk_size=4)
    assert out.dtype == jnp.float32 and out.shape == toks.shape
    np.testing.assert_allclose(out, ref, atol=2e-5)
    assert np.all(np.asarray(out)[~valid] == 0) and np.all(ref[valid] < 0)

    ids, lp = scoring.topk_logprobs(graphdef, params, toks, mask, 5, temperature=temperature,
                                    chunk_size=4)
    assert ids.shape == lp.shape == toks.shape + (5,) and ids.dtype == jnp.int32
    for b, t in zip(*np.nonzero(valid)):
      order = np.argsort(-ls[b, t - 1])[:5]
      np.testing.assert_array_equal(ids[b, t], order)
      np.testing.assert_allclose(lp[b, t], ls[b, t - 1, order], atol=2e-5)
    assert np.all(np.asarray(lp)[~valid] == 0) and np.all(np.asarray(ids)[~valid] == 0)


def test_logprobs_from_hidden_value_and_grad_equal_naive():
  cfg = mc.tiny(vocab_size=61, family="qwen2", tie_embeddings=False)
  graphdef, params = tf.init(cfg, 4)
  toks, mask = _batch(61, seed=5)
  weights = jax.random.normal(jax.random.key(6), toks.shape) * scoring._valid_BxT(mask)

  def chunked(params, temperature):
    h = scoring.shifted_hidden(graphdef, params, toks, mask)
    logp = scoring.logprobs_from_hidden(h, scoring.unembed_fn(graphdef, params), toks,
                                        temperature=temperature, chunk_size=3)
    return jnp.sum(weights * logp), logp

  def naive(params, temperature):
    logits = tf.forward(graphdef, params, toks, mask) / temperature
    ls = jax.nn.log_softmax(logits, axis=-1)[:, :-1]
    logp = jnp.take_along_axis(ls, toks[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(weights[:, 1:] * logp)

  chunked_vg = jax.jit(jax.value_and_grad(chunked, has_aux=True))
  naive_vg = jax.jit(jax.value_and_grad(naive))
  for temperature in (1.0, 0.7):
    (val, logp), grads = chunked_vg(params, temperature)
    ref, _ = _reference(graphdef, params, toks, mask, temperature)
    valid = np.asarray(scoring._valid_BxT(mask))
    np.testing.assert_allclose(np.where(valid, logp, 0), ref, atol=2e-5)
    assert float(logp[0, 0]) == 0.0
    val_ref, grads_ref = naive_vg(params, temperature)
    np.testing.assert_allclose(val, val_ref, rtol=1e-5)
    flat, flat_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    assert len(flat) == len(flat_ref)
    for g, g_ref in zip(flat, flat_ref):
      scale = float(jnp.max(jnp.abs(g_ref))) + 1e-12
      np.testing.assert_allclose(g / scale, g_ref / scale, atol=1e-4)
    assert float(jnp.max(jnp.abs(grads["lm_head"]["kernel"]))) > 0


def test_shifted_hidden_alignment():
  cfg = mc.tiny(vocab_size=50)
  graphdef, params = tf.init(cfg, 2)
  toks, mask = _batch(50, seed=3)
  h = scoring.shifted_hidden(graphdef, params, toks, mask)
  h_full, _ = jax.jit(lambda p: tf.merge(graphdef, p).hidden(toks, mask))(params)
  prev_real = np.pad(np.asarray(mask)[:, :-1], ((0, 0), (1, 0)))
  np.testing.assert_array_equal(np.asarray(h)[~prev_real], 0)
  np.testing.assert_allclose(np.asarray(h)[:, 1:][prev_real[:, 1:]],
                             np.asarray(h_full)[:, :-1][prev_real[:, 1:]], atol=1e-6)


def test_bad_inputs_name_the_problem():
  cfg = mc.tiny(vocab_size=50)
  graphdef, params = tf.init(cfg, 0)
  toks = jnp.full((2, 5), 3, jnp.int32)
  with pytest.raises(ValueError, match="mask_BxT shape"):
    scoring.token_logprobs(graphdef, params, toks, jnp.ones((2, 4), bool))
  bad = np.asarray(toks.at[0, 1].set(50))
  with pytest.raises(ValueError, match="outside the model's vocabulary"):
    scoring.token_logprobs(graphdef, params, bad, np.ones((2, 5), bool))   # numpy: value-checked
  with pytest.raises(ValueError, match="outside the model's vocabulary"):
    scoring.check_tokens_host(bad, 50)
  with pytest.raises(ValueError, match="mask_BxT shape"):
    scoring.check_tokens_host(bad, 50, np.ones((2, 4), bool))
  with pytest.raises(TypeError, match="host"):
    scoring.check_tokens_host(toks, 50)
  scoring.check_tokens_host(np.asarray(toks), 50)
  with pytest.raises(ValueError, match="tokens_BxT must be 2-D"):
    scoring.topk_logprobs(graphdef, params, toks[0], jnp.ones((5,), bool), 2)
  with pytest.raises(ValueError, match="chunk_size"):
    scoring.token_logprobs(graphdef, params, toks, jnp.ones((2, 5), bool), chunk_size=0)
  with pytest.raises(ValueError, match="h_BxTxD shape"):
    scoring.logprobs_from_hidden(jnp.zeros((2, 4, 64)), scoring.unembed_fn(graphdef, params), toks)


def test_scoring_makes_no_host_device_transfer_on_device_inputs():
  """Device inputs: no fetch (ids are not range-checked on device) and no implicit upload (a
  Python temperature is static); a traced temperature still works."""
  cfg = mc.tiny(vocab_size=50)
  graphdef, params = tf.init(cfg, 0)
  toks, mask = _batch(50)
  params, toks, mask = jax.device_put((params, toks, mask))
  ref = scoring.token_logprobs(graphdef, params, toks, mask, temperature=0.7, chunk_size=4)
  ref_ids, ref_lp = scoring.topk_logprobs(graphdef, params, toks, mask, 3, temperature=0.7,
                                          chunk_size=4)
  bad = toks.at[0, 1].set(50)
  with jax.transfer_guard("disallow"):
    out = scoring.token_logprobs(graphdef, params, toks, mask, temperature=0.7, chunk_size=4)
    ids, lp = scoring.topk_logprobs(graphdef, params, toks, mask, 3, temperature=0.7,
                                    chunk_size=4)
    scoring.token_logprobs(graphdef, params, bad, mask, chunk_size=4)  # ids not fetched
  traced = jax.jit(lambda t: scoring.token_logprobs(graphdef, params, toks, mask, temperature=t,
                                                    chunk_size=4))(jnp.float32(0.7))
  np.testing.assert_array_equal(out, ref)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(lp, ref_lp)
  np.testing.assert_allclose(traced, ref, atol=1e-6)


# -- packed rows (segment ids) --------------------------------------------------------------------
def _packed(vocab, seed=0, t=24):
  """Two rows of back-to-back random sequences (segments 1, 2, ...; trailing padding 0)."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((2, t), np.int32)
  segs = np.zeros((2, t), np.int32)
  spans = []  # (row, start, length)
  # Few distinct lengths (each is compiled once for its reference), a one-token segment included.
  for r, lengths in enumerate([(5, 9, 1), (9, 5, 1, 5, 3)]):
    o = 0
    for k, n in enumerate(lengths, start=1):
      tokens[r, o:o + n] = rng.integers(1, vocab, n)
      segs[r, o:o + n] = k
      spans.append((r, o, n))
      o += n
  return tokens, segs, spans


def test_segment_positions_restart_at_each_segment():
  segs = np.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2, 2, 0]], np.int32)
  want = np.asarray([[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 0]])
  assert np.array_equal(np.asarray(tf.segment_positions(segs)), want)


def test_packed_forward_equals_each_sequence_alone_and_segments_do_not_interact():
  cfg = mc.tiny(vocab_size=61)
  graphdef, params = tf.init(cfg, 0)
  tokens, segs, spans = _packed(cfg.vocab_size)
  packed = np.asarray(_forward(graphdef, params, tokens, segs > 0, None, segs))
  for r, o, n in spans:
    alone = np.asarray(_forward(graphdef, params, tokens[None, r, o:o + n]))[0]
    np.testing.assert_allclose(packed[r, o:o + n], alone, atol=1e-5, rtol=0)
  # Perturbing one segment's tokens changes its logits and nothing else.
  r, o, n = spans[1]
  other = tokens.copy()
  other[r, o:o + n] = (other[r, o:o + n] + 7) % cfg.vocab_size
  moved = np.asarray(_forward(graphdef, params, other, segs > 0, None, segs))
  same = segs > 0  # (padding rows attend to nothing: their values are never read)
  same[r, o:o + n] = False
  assert np.array_equal(moved[same], packed[same])
  assert np.abs(moved[r, o:o + n] - packed[r, o:o + n]).max() > 1e-3
  # One segment covering a full row is the plain forward, bit for bit.
  full = np.ones(tokens.shape, np.int32)
  assert np.array_equal(np.asarray(_forward(graphdef, params, tokens, None, None, full)),
                        np.asarray(_forward(graphdef, params, tokens)))


def test_packed_scoring_equals_each_sequence_scored_alone():
  cfg = mc.tiny(vocab_size=61)
  graphdef, params = tf.init(cfg, 1)
  tokens, segs, spans = _packed(cfg.vocab_size, seed=2)
  mask = segs > 0
  # The scoring route (KV-cache chunks smaller than a segment) and the differentiable route.
  logp = np.asarray(scoring.token_logprobs(graphdef, params, tokens, mask, chunk_size=4,
                                           segment_ids_BxT=segs))
  ids, top = scoring.topk_logprobs(graphdef, params, tokens, mask, 3, chunk_size=4,
                                   segment_ids_BxT=segs)
  h = scoring.shifted_hidden(graphdef, params, tokens, mask, segs)
  logp_h = np.asarray(scoring.logprobs_from_hidden(h, scoring.unembed_fn(graphdef, params),
                                                   tokens, chunk_size=8))
  for r, o, n in spans:
    one = tokens[None, r, o:o + n]
    ones = np.ones((1, n), bool)
    ref, ls = _reference(graphdef, params, one, ones, 1.0)
    np.testing.assert_allclose(logp[r, o:o + n], ref[0], atol=1e-5, rtol=0)
    # (logprobs_from_hidden leaves masking to the caller: compare where a token has context.)
    np.testing.assert_allclose(logp_h[r, o + 1:o + n], ref[0, 1:], atol=1e-5, rtol=0)
    assert logp[r, o] == 0.0 and not np.asarray(h)[r, o].any()  # no context at a segment start
    for t in range(1, n):
      order = np.argsort(-ls[0, t - 1])[:3]
      assert np.array_equal(np.asarray(ids)[r, o + t], order)
      np.testing.assert_allclose(np.asarray(top)[r, o + t], ls[0, t - 1, order], atol=1e-5)
  assert not logp[~mask].any()

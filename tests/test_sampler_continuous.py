"""Continuous batching (SamplerConfig.mode='continuous') and the per-row-slot decode it runs on:
rows_decode_attention vs a float64 numpy reference, per-row decode == full forward, continuous ==
static bit for bit (several decoding settings, shared prefill, a fake 8-device mesh), slot knobs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.models import attention
from opd_jax.models import config as mc
from opd_jax.models import sampler
from opd_jax.models import sharding
from opd_jax.models import transformer as tf
from test_sampler import _check_structure, _grouped_prompts, _prompts, _sharp_tiny


def _attention_rows_np(q, k, v, k_new, v_new, slot, kv_mask):
  """float64 reference: row b's query against cache slots < slot[b] allowed by kv_mask plus its
  own key and value."""
  b, _, h, hd = q.shape
  kh = k.shape[2]
  g = h // kh
  out = np.zeros((b, h * hd))
  for r in range(b):
    keep = np.flatnonzero(kv_mask[r, :slot[r]])
    keys = np.concatenate([k[r, keep], k_new[r]], 0).astype(np.float64)     # [n, K, h]
    vals = np.concatenate([v[r, keep], v_new[r]], 0).astype(np.float64)
    for head in range(h):
      kv = head // g
      s = keys[:, kv] @ q[r, 0, head].astype(np.float64) / np.sqrt(hd)
      p = np.exp(s - s.max())
      out[r, head * hd:(head + 1) * hd] = (p / p.sum()) @ vals[:, kv]
  return out[:, None]


def test_rows_decode_attention_matches_reference_and_ignores_other_rows():
  rng = np.random.default_rng(0)
  b, s, h, kh, hd, block = 5, 48, 4, 2, 8, 16
  q = rng.standard_normal((b, 1, h, hd)).astype(np.float32)
  k, v = (rng.standard_normal((b, s, kh, hd)).astype(np.float32) for _ in range(2))
  k_new, v_new = (rng.standard_normal((b, 1, kh, hd)).astype(np.float32) for _ in range(2))
  slot = np.array([0, 7, 16, 33, 47], np.int32)          # 0: only the row's own key
  kv_mask = rng.random((b, s)) > 0.2
  # The cache layout: keys [B, K, h, S], values [B, K, S, h].
  fn = jax.jit(lambda q, k, v, *a: attention.rows_decode_attention(
      q, jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3)), *a, block=block))
  out = np.asarray(fn(q, k, v, k_new, v_new, slot, kv_mask))
  np.testing.assert_allclose(out, _attention_rows_np(q, k, v, k_new, v_new, slot, kv_mask),
                             atol=1e-5)
  # A row's numbers do not depend on the other rows' slots (more blocks read for them) nor on
  # what the cache holds at or above its own slot.
  alone = np.asarray(fn(q[:2], k[:2], v[:2], k_new[:2], v_new[:2], slot[:2], kv_mask[:2]))
  np.testing.assert_array_equal(alone, out[:2])
  k2 = k.copy()
  k2[1, 7:] = 1e3
  np.testing.assert_array_equal(np.asarray(fn(q, k2, v, k_new, v_new, slot, kv_mask))[1], out[1])
  # The same cache held as one buffer per block (`transformer.RowBlocks`): the same bits.
  blocks = jax.jit(lambda q, k, v, *a: attention.rows_block_attention(
      q, [jnp.transpose(k[:, j:j + block], (0, 2, 3, 1)) for j in range(0, s, block)],
      [jnp.transpose(v[:, j:j + block], (0, 2, 1, 3)) for j in range(0, s, block)], *a))
  np.testing.assert_array_equal(np.asarray(blocks(q, k, v, k_new, v_new, slot, kv_mask)), out)
  with pytest.raises(ValueError, match="multiple of the block"):
    attention.rows_decode_attention(q, np.transpose(k[:, :40], (0, 2, 3, 1)),
                                    np.transpose(v[:, :40], (0, 2, 1, 3)), k_new, v_new, slot,
                                    kv_mask[:, :40], block=block)


@pytest.mark.parametrize("writes_first", [True, False, "row_blocks"])
def test_per_row_slot_decode_equals_full_forward(writes_first, monkeypatch):
  """Rows at different steps in one decode batch (row b feeds token t_b at its own slot) give
  the full forward's logits at those positions, whether each layer writes its keys and values
  before its attention (CPU) or every layer's are written after the layer loop, or the cache is
  held as one buffer per (layer, block) with split layer weights (`tf.RowBlocks`: the numbers
  of the stacked cache bit for bit)."""
  row_blocks = writes_first == "row_blocks"
  monkeypatch.setattr(tf, "decode_writes_first", lambda: bool(writes_first))
  cfg = mc.tiny(vocab_size=97, family="qwen2", cache_block=16)
  graphdef, params = tf.init(cfg, 1)
  prompt, pmask = _prompts(97, [3, 6, 1, 4], seed=2)
  b, p = prompt.shape
  m = 9
  cont = np.random.default_rng(3).integers(0, 97, (b, m)).astype(np.int32)
  steps = np.array([0, 8, 3, 5], np.int32)    # row b feeds cont[b, steps[b]] at slot p + steps[b]
  seq, seq_mask = np.concatenate([prompt, cont], 1), np.concatenate([pmask, np.ones((b, m), bool)], 1)
  s = sampler.cache_length(p, m + 1, cfg)
  assert s % attention.row_block(cfg.cache_block) == 0

  @jax.jit
  def run(params):
    model = tf.merge(graphdef, params)
    # The whole sequence in the cache: each row only sees the slots below its own.
    _, cache, kv_mask = sampler.prefill(model, jnp.asarray(seq), jnp.asarray(seq_mask), s)
    plen = jnp.asarray(pmask.sum(1), jnp.int32)
    tok = jnp.asarray(cont)[jnp.arange(b), steps]
    args = (model, tok, plen + steps, p + jnp.asarray(steps))
    logits, new_cache = sampler.decode_step(*args, cache, kv_mask)
    if not row_blocks:
      return logits, new_cache, cache
    weights = sampler.decode_weights(model)
    split_logits, split_cache = sampler.decode_step(*args, cache, kv_mask, weights)
    blocks = tf.to_row_blocks(cache, attention.row_block(cfg.cache_block))
    block_logits, new_blocks = sampler.decode_step(*args, blocks, kv_mask, weights)
    vm_logits, _ = sampler.decode_step(*args, blocks, kv_mask, weights, vocab_major=True)
    return (logits, split_logits, block_logits, vm_logits), (
        new_cache, split_cache, tf.from_row_blocks(new_blocks)), cache

  logits, new_cache, cache = run(params)
  if row_blocks:
    (logits, split_logits, block_logits, vm_logits), (new_cache, split_cache, block_cache) = (
        logits, new_cache)
    np.testing.assert_array_equal(block_logits, split_logits)
    # Vocabulary-major logits ([V, B]) are the same numbers, not transposed.
    np.testing.assert_array_equal(np.asarray(vm_logits).T, block_logits)
    for name in ("k", "v"):
      np.testing.assert_array_equal(block_cache[name], split_cache[name])

  full = np.asarray(jax.jit(tf.forward, static_argnums=0)(graphdef, params, seq, seq_mask))
  np.testing.assert_allclose(logits, full[np.arange(b), p + steps], atol=1e-4)
  # The new keys are written at each row's slot (equal to what the prefill wrote there).
  np.testing.assert_allclose(new_cache["k"], cache["k"], atol=1e-4)


# (decoding settings, group sizes run in 'continuous'): each is compared to 'static'.
CASES = [
    (dict(temperature=0.8, top_k=6, top_p=0.9, eos_id=(7, 11, 13, 17, 19), pad_id=0), (1, 3)),
    (dict(greedy=True, eos_id=7, pad_id=0), (3,)),
    (dict(temperature=1.0, eos_id=(5, 9), pad_id=3), (1,)),
]


@pytest.mark.production_codegen
@pytest.mark.parametrize("i", range(len(CASES)))
def test_continuous_equals_static(i):
  """Rows refilled into freed slots, rows at different steps in one batch, the tail compacted:
  the static sampler's tokens, lengths and log-probs bit for bit with group_size 1; with a shared
  prefill (group_size 3, prefill at a third of the batch) its tokens and lengths, log-probs to
  1e-5."""
  kw, groups = CASES[i]
  g = 3
  cfg, graphdef, params = _sharp_tiny(61, seed=3 + i)
  prompt, pmask = _grouped_prompts(61, [5, 2, 8, 1, 3], g, seed=4 + i)
  key = jax.random.key(i)
  n = 12
  static = sampler.sample(graphdef, params, prompt, pmask, key,
                          sampler.SamplerConfig(n, mode="static", **kw))
  _check_structure(static, prompt, pmask, sampler.SamplerConfig(n, **kw))
  lengths = np.asarray(static.lengths_B)
  if not kw.get("greedy"):
    # Rows end at (at least three) different steps, so slots free up at different steps.
    assert len(set(lengths.tolist())) >= 3 and lengths.min() < n, lengths
  for group_size in groups:
    # 15 rows through 4 slots: most rows enter a freed slot; then buckets 4 -> 2.
    cont = sampler.sample(graphdef, params, prompt, pmask, key, sampler.SamplerConfig(
        n, mode="continuous", slots=4, min_bucket=2, group_size=group_size, **kw))
    if group_size == 1:
      for a, b in zip(cont, static):
        np.testing.assert_array_equal(a, b)
    else:
      for a, b in zip(cont[:4], static[:4]):
        np.testing.assert_array_equal(a, b)
      np.testing.assert_allclose(cont.logp_BxT, static.logp_BxT, atol=1e-5)


def test_continuous_on_fake_mesh_equals_static_single_device():
  g = 2
  cfg, graphdef, params = _sharp_tiny(96, seed=2)
  prompt, pmask = _grouped_prompts(96, [3, 5, 1, 4, 2, 6], g, seed=10)
  kw = dict(temperature=1.0, eos_id=(5, 9, 12), pad_id=0)
  key = jax.random.key(1)
  single = sampler.sample(graphdef, params, prompt, pmask, key,
                          sampler.SamplerConfig(10, mode="static", **kw))
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), sharding.axis_rules(sharding.DEFAULT_RULES):
    assert sampler._batch_shards() == 4
    with pytest.raises(ValueError, match="SamplerConfig.slots=6: 6 decode slots are not a "
                                         "multiple of the mesh's 4 batch shards"):
      sampler.sample(graphdef, params, prompt, pmask, key, sampler.SamplerConfig(
          10, mode="continuous", slots=6, group_size=g, **kw))
    out = sampler.sample(graphdef, params, prompt, pmask, key, sampler.SamplerConfig(
        10, mode="continuous", slots=4, min_bucket=1, group_size=g, **kw))
  assert out.tokens_BxT.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(out.tokens_BxT, single.tokens_BxT)
  np.testing.assert_array_equal(out.lengths_B, single.lengths_B)
  np.testing.assert_allclose(out.logp_BxT, single.logp_BxT, atol=1e-5)


def test_slot_defaults_cache_shapes_and_bad_slots():
  assert sampler.default_slots(64) == 32
  assert sampler.default_slots(64, min_bucket=48) == 48
  assert sampler.default_slots(12, min_bucket=8) == 8
  assert sampler.default_slots(6, min_bucket=8) == 6
  assert sampler.default_slots(44, min_bucket=1, shards=8) == 24
  model_cfg = mc.tiny(cache_block=256)
  assert sampler.cache_length(32, 256, model_cfg) == 320
  kw = dict(eos_id=1, pad_id=0)
  cont = sampler.SamplerConfig(256, mode="continuous", group_size=8, **kw)
  assert sampler.cache_shapes(64, 32, cont, model_cfg) == ((32, 320), (8, 320))
  assert sampler.cache_shapes(64, 32, sampler.SamplerConfig(256, mode="static", **kw),
                              model_cfg) == ((64, 320),)
  with pytest.raises(ValueError, match="slots"):
    sampler.SamplerConfig(4, mode="continuous", slots=-1, **kw)

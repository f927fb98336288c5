"""KV-cache sampler: cached == full forward, greedy == transformers, log-probs == scoring,
sampling frequencies == softmax (chi-square), truncation sets, padding/batching, mesh, no recompile.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

from opd_jax.models import config as mc
from opd_jax.models import hf
from opd_jax.models import sampler
from opd_jax.models import scoring
from opd_jax.models import sharding
from opd_jax.models import transformer as tf
import hf_fixtures

_forward = jax.jit(tf.forward, static_argnums=0)
CHI2_ALPHA = 1e-3   # significance level of the frequency tests (fixed seeds: deterministic)


def _prompts(vocab, lengths, seed=0, pad=0):
  """Left-padded prompts [B, max(lengths)] of random tokens in [1, vocab)."""
  rng = np.random.default_rng(seed)
  p = max(lengths)
  toks = np.full((len(lengths), p), pad, np.int32)
  mask = np.zeros((len(lengths), p), bool)
  for i, n in enumerate(lengths):
    toks[i, p - n:] = rng.integers(1, vocab, n)
    mask[i, p - n:] = True
  return toks, mask


def _softmax64(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _sharp_tiny(vocab, seed=0, **kw):
  """A tiny untied model whose logits are O(1) (the default init is near-uniform)."""
  cfg = mc.tiny(vocab_size=vocab, tie_embeddings=False, **kw)
  graphdef, params = tf.init(cfg, seed)
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 10.0
  return cfg, graphdef, params


def _check_structure(out, prompt, pmask, cfg):
  p = prompt.shape[1]
  toks, mask = np.asarray(out.tokens_BxT), np.asarray(out.mask_BxT)
  loss, lengths, logp = (np.asarray(out.loss_mask_BxT), np.asarray(out.lengths_B),
                         np.asarray(out.logp_BxT))
  assert toks.shape == (prompt.shape[0], p + cfg.max_new_tokens)
  np.testing.assert_array_equal(toks[:, :p][pmask], prompt[pmask])
  np.testing.assert_array_equal(mask[:, :p], pmask)
  assert not loss[:, :p].any() and np.all(logp[:, :p] == 0)
  for b in range(toks.shape[0]):
    resp = toks[b, p:]
    n = lengths[b]
    np.testing.assert_array_equal(loss[b, p:], np.arange(cfg.max_new_tokens) < n)
    np.testing.assert_array_equal(mask[b, p:], loss[b, p:])
    assert not np.isin(resp[:n - 1], cfg.eos_ids).any()
    assert n == cfg.max_new_tokens or resp[n - 1] in cfg.eos_ids
    assert np.all(resp[n:] == cfg.pad_id) and np.all(logp[b, p + n:] == 0)
    assert np.all(logp[b, p:p + n] < 0)


def test_cached_decode_logits_equal_full_forward():
  cfg = mc.tiny(vocab_size=97, family="qwen2")
  graphdef, params = tf.init(cfg, 1)
  prompt, pmask = _prompts(97, [3, 6, 1], seed=2)
  b, p = prompt.shape
  m = 7
  cont = jnp.asarray(np.random.default_rng(3).integers(0, 97, (b, m)), jnp.int32)

  @jax.jit
  def run(params):
    model = tf.merge(graphdef, params)
    logits0, cache, kv_mask = sampler.prefill(model, jnp.asarray(prompt), jnp.asarray(pmask),
                                              p + m)
    plen = jnp.asarray(pmask.sum(1), jnp.int32)

    def body(cache, i):
      logits, cache = sampler.decode_step(model, cont[:, i], plen + i, p + i, cache, kv_mask)
      return cache, logits

    _, logits = jax.lax.scan(body, cache, jnp.arange(m))
    return jnp.concatenate([logits0[:, None], jnp.swapaxes(logits, 0, 1)], axis=1)

  cached = run(params)
  full = _forward(graphdef, params, np.concatenate([prompt, cont], 1),
                  np.concatenate([pmask, np.ones((b, m), bool)], 1))
  np.testing.assert_allclose(cached, full[:, p - 1:], atol=1e-4)


def test_logp_equal_scoring_eos_structure_and_no_recompile():
  temperature = 0.7   # (temperature 1 is checked in the transformers test)
  cfg, graphdef, params = _sharp_tiny(61, seed=3)
  prompt, pmask = _prompts(61, [5, 2, 8, 1], seed=4)
  scfg = sampler.SamplerConfig(12, temperature=temperature, eos_id=(7, 11, 13), pad_id=0)
  out = sampler.sample(graphdef, params, prompt, pmask, jax.random.key(2), scfg)
  _check_structure(out, prompt, pmask, scfg)
  lengths = np.asarray(out.lengths_B)
  assert lengths.min() < scfg.max_new_tokens, "no row hit EOS: the test lost its point"
  ref = scoring.token_logprobs(graphdef, params, out.tokens_BxT, out.mask_BxT,
                               temperature=temperature)
  np.testing.assert_allclose(out.logp_BxT, np.where(out.loss_mask_BxT, ref, 0), atol=1e-4)

  traces = sampler._TRACES["sample"]
  prompt2, pmask2 = _prompts(61, [8, 3, 1, 4], seed=5)
  out2 = sampler.sample(graphdef, params, prompt2, pmask2, jax.random.key(1), scfg)
  assert sampler._TRACES["sample"] == traces, "second call with the same shapes retraced"
  _check_structure(out2, prompt2, pmask2, scfg)
  assert not np.array_equal(out.tokens_BxT, out2.tokens_BxT)


def _first_token_counts(graphdef, params, prompt, n_rows, scfg, seed):
  rows = np.repeat(prompt[None], n_rows, 0)
  out = sampler.sample(graphdef, params, rows, np.ones_like(rows, bool), jax.random.key(seed),
                       scfg)
  first = np.asarray(out.tokens_BxT[:, prompt.shape[0]])
  return np.bincount(first, minlength=params["embed"]["embedding"].shape[0])


def test_sampled_frequencies_match_softmax_chi_square():
  vocab, n_rows, t = 8, 3000, 0.7
  cfg, graphdef, params = _sharp_tiny(vocab, seed=5)
  prompt = np.array([3, 1, 4, 1, 5], np.int32)
  logits = np.asarray(_forward(graphdef, params, prompt[None]), np.float64)[0, -1] / t
  probs = _softmax64(logits)
  assert probs.max() / probs.min() > 5, "near-uniform distribution: the test could not fail"
  order = np.argsort(-probs)

  # Plain temperature sampling.
  scfg = sampler.SamplerConfig(1, temperature=t, eos_id=0, pad_id=0)
  counts = _first_token_counts(graphdef, params, prompt, n_rows, scfg, seed=11)
  assert scipy.stats.chisquare(counts, n_rows * probs).pvalue > CHI2_ALPHA

  # top-k = 3: only the 3 most likely tokens, renormalised.
  scfg = sampler.SamplerConfig(1, temperature=t, top_k=3, eos_id=0, pad_id=0)
  counts = _first_token_counts(graphdef, params, prompt, n_rows, scfg, seed=12)
  assert counts[order[3:]].sum() == 0
  kept = probs[order[:3]] / probs[order[:3]].sum()
  assert scipy.stats.chisquare(counts[order[:3]], n_rows * kept).pvalue > CHI2_ALPHA
  # top-p is checked against its exact set in the two tests below.


def _block_gumbel_max64(noise, logits, block):
  """The two-stage rule in float64 numpy: block by log(mass) + noise, then index by logit + noise."""
  v = logits.shape[-1]
  n = -(-v // block)
  x = np.concatenate([logits, np.full(n * block - v, -np.inf)]).reshape(n, block)
  with np.errstate(divide="ignore"):
    log_mass = np.log(np.sum(np.exp(x - logits.max()), axis=-1))
  j = int(np.argmax(log_mass + noise[:n]))
  return j * block + int(np.argmax(x[j] + noise[n:]))


@pytest.mark.parametrize("vocab,block", [(1000, 128), (8, 128), (250, 16)])
def test_block_gumbel_max_equals_float64_reference(vocab, block):
  rng = np.random.default_rng(vocab)
  logits = rng.standard_normal((40, vocab)) * 3.0
  logits[rng.random((40, vocab)) < 0.3] = -np.inf   # filtered out (top-k / top-p)
  logits[1, :-1], logits[1, -1] = -np.inf, 0.0       # one row with only its last index allowed
  logits[2, : vocab // 2] = -np.inf                  # leading empty blocks
  noise = rng.gumbel(size=(40, sampler.draw_noise_size(vocab, block)))
  got = np.asarray(jax.jit(sampler.block_gumbel_max, static_argnums=2)(
      jnp.asarray(noise, jnp.float32), jnp.asarray(logits, jnp.float32), block))
  expect = [_block_gumbel_max64(nz, row, block) for nz, row in zip(noise, logits)]
  np.testing.assert_array_equal(got, expect)
  assert np.all(np.isfinite(logits[np.arange(40), got]))
  # The same draws from vocabulary-major logits ([V, B], `vocab_axis=0`).
  got_vm = np.asarray(jax.jit(sampler.block_gumbel_max, static_argnums=(2, 3))(
      jnp.asarray(noise, jnp.float32), jnp.asarray(logits.T, jnp.float32), block, 0))
  np.testing.assert_array_equal(got_vm, expect)


def test_block_gumbel_max_frequencies_chi_square():
  vocab, block, n_rows = 300, 32, 20000
  rng = np.random.default_rng(1)
  logits = rng.standard_normal(vocab) * 1.5
  logits[rng.random(vocab) < 0.5] = -np.inf
  probs = np.where(np.isfinite(logits), np.exp(logits - logits.max()), 0.0)
  probs /= probs.sum()
  noise = jax.random.gumbel(jax.random.key(2), (n_rows, sampler.draw_noise_size(vocab, block)))
  toks = np.asarray(jax.jit(sampler.block_gumbel_max, static_argnums=2)(
      noise, jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n_rows, vocab)), block))
  counts = np.bincount(toks, minlength=vocab)
  assert counts[probs == 0].sum() == 0
  assert scipy.stats.chisquare(counts[probs > 0], n_rows * probs[probs > 0]).pvalue > CHI2_ALPHA


def test_first_argmax_equals_numpy_argmax_with_ties_infinities_and_nans():
  """`sampler.first_argmax` against numpy's argmax (the first maximum, or the first NaN) on
  random rows, rows with repeated maxima, -inf / +inf entries and NaNs."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 1000)).astype(np.float32)
  x[1:8] = np.round(x[1:8])                      # many tied maxima
  x[8, :] = -np.inf                              # all -inf: index 0
  x[9, 500:] = np.inf                            # +inf from 500 on
  x[10, 700] = np.nan                            # a NaN after the maximum
  x[11, [3, 600]] = np.nan                       # two NaNs
  x[12, :] = 2.0                                 # a constant row
  got = np.asarray(jax.jit(sampler.first_argmax)(jnp.asarray(x)))
  np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
  assert got.dtype == np.int32
  # Vocabulary-major ([V, B], reduced over axis 0): blocks of `ARGMAX_BLOCK`, a last block cut
  # short (1000 = 3 x 256 + 232), NaNs and maxima in other blocks than the first.
  x[13, 900] = 50.0                              # the maximum in the short last block
  x[14, [256, 511, 512]] = 9.0                   # tied maxima across a block boundary
  x[15, [255, 256]] = np.nan                     # NaNs on both sides of a boundary
  x[16, 300] = np.inf
  x[16, 800] = np.nan                            # a NaN after +inf wins
  for vocab in (1000, 256, 1024):
    got = np.asarray(jax.jit(sampler.first_argmax, static_argnums=1)(
        jnp.asarray(x[:, :vocab].T), 0))
    np.testing.assert_array_equal(got, np.argmax(x[:, :vocab], axis=-1))
    assert got.dtype == np.int32


@pytest.mark.parametrize("settings", [dict(greedy=True), dict(temperature=0.7),
                                      dict(temperature=1.3, top_k=20, top_p=0.8)])
def test_choose_vocab_major_equals_row_major_and_float64_log_softmax(settings):
  """`choose` on vocabulary-major logits ([V, B], `vocab_axis=0`, the decode loop's layout from
  2 rows up) draws the tokens it draws from [B, V], and both give the float64 log_softmax of
  the chosen token (temperature applied, top-k / top-p not)."""
  rng = np.random.default_rng(5)
  b, vocab = 12, 1000
  logits = (rng.standard_normal((b, vocab)) * 3.0).astype(np.float32)
  logits[3, :400] = -np.inf
  cfg = sampler.SamplerConfig(4, eos_id=1, pad_id=0, **settings)
  keys = sampler.row_keys(jax.random.key(7), 2, jnp.arange(b))
  run = jax.jit(sampler.choose, static_argnums=(2, 3))
  tok, logp = run(jnp.asarray(logits), keys, cfg, -1)
  tok_vm, logp_vm = run(jnp.asarray(logits.T), keys, cfg, 0)
  np.testing.assert_array_equal(tok_vm, tok)
  assert tok.dtype == tok_vm.dtype == np.int32
  x = logits.astype(np.float64) / cfg.temperature
  x = x - x.max(1, keepdims=True)
  want = (x - np.log(np.exp(x).sum(1, keepdims=True)))[np.arange(b), np.asarray(tok)]
  for got in (logp, logp_vm):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if cfg.greedy:
    np.testing.assert_array_equal(tok, np.argmax(logits, axis=1))


def test_filter_logits_matches_numpy_reference():
  logits = np.asarray(jax.random.normal(jax.random.key(0), (6, 40)) * 2.0)
  filt = jax.jit(sampler.filter_logits, static_argnums=(1, 2))
  for top_k, top_p in [(5, 1.0), (0, 0.6), (7, 0.5), (3, 0.01)]:
    out = np.asarray(filt(jnp.asarray(logits), top_k, top_p))
    for row, got in zip(logits, out):
      order = np.argsort(-row)
      allowed = order[:top_k] if top_k else order
      if top_p < 1:
        p = _softmax64(row[allowed])
        n = int(np.sum(np.cumsum(p) - p < top_p))
        allowed = allowed[:n]
      expect = np.full_like(row, -np.inf)
      expect[allowed] = row[allowed]
      np.testing.assert_array_equal(got, expect)


def test_truncated_sampling_never_leaves_the_allowed_set():
  vocab = 61
  cfg, graphdef, params = _sharp_tiny(vocab, seed=7)
  prompt, pmask = _prompts(vocab, [4, 2, 6, 5, 3, 6, 1, 2], seed=8)
  scfg = sampler.SamplerConfig(10, temperature=0.8, top_k=6, top_p=0.7, eos_id=9, pad_id=0)
  out = sampler.sample(graphdef, params, prompt, pmask, jax.random.key(3), scfg)
  toks, mask, loss = (np.asarray(out.tokens_BxT), np.asarray(out.mask_BxT),
                      np.asarray(out.loss_mask_BxT))
  logits = np.asarray(_forward(graphdef, params, toks, mask), np.float64) / scfg.temperature
  n_checked = n_binding = 0
  for b, t in zip(*np.nonzero(loss)):
    row = logits[b, t - 1]
    order = np.argsort(-row)[:scfg.top_k]
    p = _softmax64(row[order])
    allowed = order[:int(np.sum(np.cumsum(p) - p < scfg.top_p))]
    assert toks[b, t] in allowed, (b, t)
    n_checked += 1
    n_binding += len(allowed) < scfg.top_k
  assert n_checked >= 20 and n_binding > 0


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_greedy_equals_transformers_generate(family, tmp_path):
  torch_model = hf_fixtures.torch_model(family, tied=family != "llama", seed=3)
  cfg, params = hf.load(hf_fixtures.export(torch_model, tmp_path / "hf"))
  graphdef = tf.graphdef_for(cfg)
  vocab, n_new, pad = cfg.vocab_size, 10, 0
  prompt, pmask = _prompts(vocab, [5, 2, 7], seed=9, pad=pad)
  p = prompt.shape[1]

  def hf_greedy(i, eos):
    ids = torch.as_tensor(prompt[i:i + 1, p - int(pmask[i].sum()):].astype(np.int64))
    with torch.no_grad():
      out = torch_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=n_new, eos_token_id=eos, pad_token_id=pad)
    return out[0, ids.shape[1]:].numpy()

  # EOS = the 4th greedy token of prompt 0, so that at least one row stops early.
  eos = int(hf_greedy(0, eos=vocab - 1)[3])
  expected = [hf_greedy(i, eos) for i in range(len(prompt))]
  scfg = sampler.SamplerConfig(n_new, greedy=True, eos_id=eos, pad_id=pad)
  out = sampler.sample(graphdef, params, prompt, pmask, jax.random.key(0), scfg)
  _check_structure(out, prompt, pmask, scfg)
  for i, exp in enumerate(expected):
    n = int(out.lengths_B[i])
    np.testing.assert_array_equal(np.asarray(out.tokens_BxT[i, p:p + n]), exp[:n])
    assert n == len(exp) or exp[n - 1] == eos
  assert int(out.lengths_B[0]) <= 4

  if family == "qwen3":
    # Greedy log-probs are the temperature-1 log-probs that scoring computes.
    ref = scoring.token_logprobs(graphdef, params, out.tokens_BxT, out.mask_BxT)
    np.testing.assert_allclose(out.logp_BxT, np.where(out.loss_mask_BxT, ref, 0), atol=1e-4)
    # The shortest prompt run alone, unpadded, gives the same tokens and log-probs.
    i = 1
    n_p = int(pmask[i].sum())
    one = sampler.sample(graphdef, params, prompt[i:i + 1, p - n_p:], pmask[i:i + 1, p - n_p:],
                         jax.random.key(0), scfg)
    np.testing.assert_array_equal(one.tokens_BxT[0, n_p:], out.tokens_BxT[i, p:])
    np.testing.assert_allclose(one.logp_BxT[0, n_p:], out.logp_BxT[i, p:], atol=1e-5)


def test_sharded_on_fake_mesh_equals_single_device():
  cfg, graphdef, params = _sharp_tiny(96, seed=2)
  prompt, pmask = _prompts(96, [3, 5, 1, 4], seed=10)
  scfg = sampler.SamplerConfig(8, greedy=True, eos_id=5, pad_id=0)
  single = sampler.sample(graphdef, params, prompt, pmask, jax.random.key(0), scfg)

  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = sharding.DEFAULT_RULES
  specs = jax.tree.map(lambda names: sharding.logical_to_spec(names, rules),
                       tf.logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))
  sharded = jax.device_put(params, jax.tree.map(
      lambda s: jax.sharding.NamedSharding(mesh, s), specs))
  assert len(sharded["layers"]["mlp"]["up_proj"]["kernel"].sharding.device_set) == 8
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    out = sampler.sample(graphdef, sharded, prompt, pmask, jax.random.key(0), scfg)
  assert out.tokens_BxT.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(out.tokens_BxT, single.tokens_BxT)
  np.testing.assert_array_equal(out.lengths_B, single.lengths_B)
  np.testing.assert_allclose(out.logp_BxT, single.logp_BxT, atol=1e-5)


def test_bad_config_and_prompts_name_the_problem():
  with pytest.raises(ValueError, match="temperature"):
    sampler.SamplerConfig(4, temperature=0.0, eos_id=1, pad_id=0)
  with pytest.raises(ValueError, match="top_p"):
    sampler.SamplerConfig(4, top_p=1.5, eos_id=1, pad_id=0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    sampler.SamplerConfig(0, eos_id=1, pad_id=0)
  with pytest.raises(ValueError, match="eos_id"):
    sampler.SamplerConfig(4, eos_id=(), pad_id=0)
  cfg = mc.tiny(vocab_size=50)
  graphdef, params = tf.init(cfg, 0)
  toks, mask = _prompts(50, [2, 3], seed=0)
  scfg = sampler.SamplerConfig(4, eos_id=1, pad_id=0)
  with pytest.raises(ValueError, match=r"rows \[0\] are not left-padded"):
    sampler.sample(graphdef, params, toks, mask[:, ::-1], jax.random.key(0), scfg)
  with pytest.raises(ValueError, match="prompt_mask_BxP shape"):
    sampler.sample(graphdef, params, toks, mask[:, 1:], jax.random.key(0), scfg)
  with pytest.raises(ValueError, match=r"rows \[1\] are not left-padded"):
    bad = mask.copy()
    bad[1] = False
    sampler.check_prompts_host(toks, bad)
  with pytest.raises(ValueError, match="outside the model's vocabulary"):
    sampler.check_prompts_host(np.where(mask, 60, 0), mask, vocab_size=50)
  with pytest.raises(TypeError, match="host"):
    sampler.check_prompts_host(jnp.asarray(toks), mask)
  sampler.check_prompts_host(toks, mask, vocab_size=50)
  # Device prompts: shapes only (values are never fetched; the host validator is the gate).
  with pytest.raises(ValueError, match="prompt_mask_BxP shape"):
    sampler.sample(graphdef, params, jnp.asarray(toks), jnp.asarray(mask[:, 1:]),
                   jax.random.key(0), scfg)
  with pytest.raises(ValueError, match="eos_id=77 is outside the model's vocabulary"):
    sampler.sample(graphdef, params, toks, mask, jax.random.key(0),
                   sampler.SamplerConfig(4, eos_id=77, pad_id=0))


def test_sample_makes_no_host_device_transfer_on_device_inputs():
  """With params, prompts and key on device, `sample` neither fetches (no value checks on device
  arrays) nor uploads anything (its settings are static)."""
  cfg, graphdef, params = _sharp_tiny(64, seed=1)
  prompt, pmask = _prompts(64, [3, 1, 4], seed=2)
  scfg = sampler.SamplerConfig(5, temperature=0.7, top_k=8, top_p=0.9, eos_id=3, pad_id=0)
  ref = sampler.sample(graphdef, params, prompt, pmask, jax.random.key(4), scfg)
  params, prompt_d, pmask_d, key = jax.device_put((params, prompt, pmask, jax.random.key(4)))
  with jax.transfer_guard("disallow"):
    out = sampler.sample(graphdef, params, prompt_d, pmask_d, key, scfg)
    jax.block_until_ready(out)
  for a, b in zip(out, ref):
    np.testing.assert_array_equal(a, b)


def _grouped_prompts(vocab, lengths, g, seed):
  """Left-padded prompts, each repeated g times in consecutive rows (the rollout layout)."""
  toks, mask = _prompts(vocab, lengths, seed=seed)
  return np.repeat(toks, g, 0), np.repeat(mask, g, 0)


def test_buckets_are_bounded_powers_of_two():
  assert sampler.buckets(64, "static", 1) == (64,)
  assert sampler.buckets(64, "compact", 8) == (64, 32, 16, 8)
  assert sampler.buckets(24, "compact", 1) == (24, 16, 8, 4, 2, 1)
  assert sampler.buckets(24, "compact", 1, shards=4) == (24, 16, 8, 4)
  assert sampler.buckets(8, "compact", 8) == (8,)
  assert sampler.buckets(1, "compact", 1) == (1,)


@pytest.mark.production_codegen
def test_compact_and_shared_prefill_equal_static():
  """Compacted decoding (finished rows leave the batch) and the shared prefill of a group's
  prompt give the static sampler's tokens and log-probs on the same key (with top-k / top-p:
  the truncation runs per row too)."""
  g = 3
  cfg, graphdef, params = _sharp_tiny(61, seed=3)
  prompt, pmask = _grouped_prompts(61, [5, 2, 8, 1], g, seed=4)
  kw = dict(temperature=0.8, top_k=6, top_p=0.9, eos_id=(7, 11, 13, 17, 19), pad_id=0)
  key = jax.random.key(1)
  static = sampler.sample(graphdef, params, prompt, pmask, key,
                          sampler.SamplerConfig(16, mode="static", **kw))
  _check_structure(static, prompt, pmask, sampler.SamplerConfig(16, **kw))
  lengths = np.asarray(static.lengths_B)
  # Rows end at spread-out steps, so the loop moves through every bucket (12 -> 8 -> 4).
  assert sampler.buckets(12, "compact", 4) == (12, 8, 4)
  # 8 rows finished before the longest one: it decoded on in the 4-row bucket.
  assert np.sort(lengths)[7] < lengths.max(), lengths
  compact = sampler.sample(graphdef, params, prompt, pmask, key,
                           sampler.SamplerConfig(16, mode="compact", min_bucket=4, **kw))
  for a, b in zip(compact, static):
    np.testing.assert_array_equal(a, b)   # the same computation per row, bit for bit
  shared = sampler.sample(graphdef, params, prompt, pmask, key, sampler.SamplerConfig(
      16, mode="compact", min_bucket=4, group_size=g, **kw))
  np.testing.assert_array_equal(shared.tokens_BxT, static.tokens_BxT)
  np.testing.assert_array_equal(shared.mask_BxT, static.mask_BxT)
  np.testing.assert_array_equal(shared.lengths_B, static.lengths_B)
  # The prefill at a third of the batch may round its matmuls differently.
  np.testing.assert_allclose(shared.logp_BxT, static.logp_BxT, atol=1e-5)
  # The samples of one group differ (each row draws from its own key).
  toks = np.asarray(static.tokens_BxT).reshape(4, g, -1)
  assert any(not np.array_equal(t[0], t[1]) for t in toks)


def test_compact_shared_on_fake_mesh_equals_static_single_device():
  g = 2
  cfg, graphdef, params = _sharp_tiny(96, seed=2)
  prompt, pmask = _grouped_prompts(96, [3, 5, 1, 4], g, seed=10)
  kw = dict(temperature=1.0, eos_id=(5, 9), pad_id=0)
  key = jax.random.key(1)
  single = sampler.sample(graphdef, params, prompt, pmask, key,
                          sampler.SamplerConfig(10, mode="static", **kw))
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = sharding.DEFAULT_RULES
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    assert sampler._batch_shards() == 4
    out = sampler.sample(graphdef, params, prompt, pmask, key, sampler.SamplerConfig(
        10, mode="compact", min_bucket=1, group_size=g, **kw))
  assert out.tokens_BxT.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(out.tokens_BxT, single.tokens_BxT)
  np.testing.assert_array_equal(out.lengths_B, single.lengths_B)
  np.testing.assert_allclose(out.logp_BxT, single.logp_BxT, atol=1e-5)


def test_group_and_mode_settings_name_the_problem():
  with pytest.raises(ValueError, match="mode"):
    sampler.SamplerConfig(4, eos_id=1, pad_id=0, mode="dynamic")
  with pytest.raises(ValueError, match="group_size"):
    sampler.SamplerConfig(4, eos_id=1, pad_id=0, group_size=0)
  with pytest.raises(ValueError, match="min_bucket"):
    sampler.SamplerConfig(4, eos_id=1, pad_id=0, min_bucket=0)
  toks, mask = _grouped_prompts(50, [2, 3], 2, seed=0)
  sampler.check_prompts_host(toks, mask, group_size=2)
  with pytest.raises(ValueError, match="does not divide the batch of 4 rows"):
    sampler.check_prompts_host(toks, mask, group_size=3)
  bad = toks.copy()
  bad[3, -1] = (bad[3, -1] % 49) + 1
  with pytest.raises(ValueError, match=r"groups \[1\] do not repeat one prompt"):
    sampler.check_prompts_host(bad, mask, group_size=2)
  cfg = mc.tiny(vocab_size=50)
  graphdef, params = tf.init(cfg, 0)
  with pytest.raises(ValueError, match="group_size=3 does not divide the batch of 4 rows"):
    sampler.sample(graphdef, params, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(0),
                   sampler.SamplerConfig(4, eos_id=1, pad_id=0, group_size=3))


@pytest.mark.parametrize("tied,dtype", [(False, "float32"), (True, "bfloat16")])
def test_split_weights_equal_the_stacked_weights(tied, dtype):
  """Decoding from the per-layer copy of the weights (`split_weights`; on CPU the default for
  decode buckets of <= SPLIT_MAX_ROWS rows) gives the tokens of decoding from the stacked
  weights and their log-probs to float32 rounding, also when one call mixes both (compact
  buckets 128 -> 64),
  and the sampler's logits are the model's own (`Transformer.logits`). In bfloat16 the two
  layer loops round a logit to neighbouring bfloat16 values now and then, so a sampled token may
  differ where two candidates' noisy scores nearly tie: there, nearly every row must agree, and
  the rows that agree agree in log-probs to bfloat16 rounding."""
  assert jax.default_backend() == "cpu"
  cfg = mc.tiny(vocab_size=97, tie_embeddings=tied, dtype=dtype, param_dtype=dtype)
  graphdef, params = tf.init(cfg, 5)
  prompt, pmask = _prompts(97, [4, 7, 1, 6] * 32, seed=2)
  kw = dict(temperature=0.9, eos_id=tuple(range(3, 23)), pad_id=0)  # rows end at spread steps
  key = jax.random.key(4)

  def run(**k):
    return sampler.sample(graphdef, params, prompt, pmask, key, sampler.SamplerConfig(12, **kw, **k))

  assert sampler.split_max_rows(sampler.SamplerConfig(12, **kw)) == sampler.SPLIT_MAX_ROWS == 64
  assert sampler.buckets(128, "compact", 64) == (128, 64)
  static = run(mode="static")                                   # 128 rows: stacked layers
  lengths = np.asarray(static.lengths_B)
  assert np.sort(lengths)[-65] < lengths.max(), lengths         # the 64-row bucket ran
  for other in (run(mode="compact", min_bucket=64),             # stacked, then split
                run(mode="static", split_weights=True),         # split throughout
                run(mode="compact", min_bucket=64, split_weights=False)):  # never split
    same_B = np.all(np.asarray(other.tokens_BxT) == np.asarray(static.tokens_BxT), axis=1)
    assert same_B.all() if dtype == "float32" else same_B.mean() >= 0.9, same_B
    for name in ("tokens_BxT", "mask_BxT", "loss_mask_BxT", "lengths_B"):
      np.testing.assert_array_equal(np.asarray(getattr(other, name))[same_B],
                                    np.asarray(getattr(static, name))[same_B])
    # Unrolled and scanned layers may round a last bit differently.
    np.testing.assert_allclose(np.asarray(other.logp_BxT)[same_B],
                               np.asarray(static.logp_BxT)[same_B], rtol=0,
                               atol=1e-6 if dtype == "float32" else 2e-2)
  # The [V, D] output matrix gives the model's logits (the same products in another order:
  # float32 rounding, or one bfloat16 ulp where float32 sums round to neighbouring values).
  model = tf.merge(graphdef, params)
  weights = sampler.decode_weights(model)
  assert len(weights.layers) == cfg.n_layers
  h, _ = model.hidden(jnp.asarray(prompt), jnp.asarray(pmask))
  tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=2 ** -7, atol=1e-3)
  np.testing.assert_allclose(sampler._logits(model, h, weights), model.logits(h), **tol)

"""Aggregation, SFT, GRPO advantages and filtering, KL-to-reference penalties, OPD/RLVR mixing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.objectives import reduce, rlvr, sft


def _values_and_mask(seed=0, b=6, t=8):
  rng = np.random.default_rng(seed)
  values = rng.normal(size=(b, t)).astype(np.float32)
  lengths = rng.integers(0, t + 1, size=b)
  lengths[0], lengths[1] = 0, t       # one empty row, one full row
  starts = rng.integers(0, t - lengths + 1)
  mask = np.zeros((b, t), bool)
  for i in range(b):
    mask[i, starts[i]:starts[i] + lengths[i]] = True
  values[~mask] = np.nan              # masked entries must not leak
  return values, mask


def _np_mode(values, mask, mode):
  rows = [values[i][mask[i]].astype(np.float64) for i in range(len(values)) if mask[i].any()]
  if mode == "token_mean":
    return np.concatenate(rows).mean()
  if mode == "seq_mean_token_sum":
    return np.mean([r.sum() for r in rows])
  return np.mean([r.mean() for r in rows])


@pytest.mark.parametrize("mode", reduce.AGGREGATION_MODES)
def test_aggregate_matches_reference_and_is_exact_over_micro_batches(mode):
  values, mask = _values_and_mask()
  total, denom = reduce.aggregate(values, mask, mode)
  np.testing.assert_allclose(total / denom, _np_mode(values, mask, mode), rtol=1e-6)
  # Micro-batches (any split of the batch dimension) sum to the full-batch value.
  parts = [reduce.aggregate(values[a:b], mask[a:b], mode) for a, b in ((0, 1), (1, 4), (4, 6))]
  np.testing.assert_allclose(sum(p[0] for p in parts) / sum(p[1] for p in parts),
                             _np_mode(values, mask, mode), rtol=1e-6)
  # An empty sequence contributes nothing; an empty batch gives (0, 0) and safe_ratio 0.
  empty_t, empty_d = reduce.aggregate(values[:1], mask[:1], mode)
  assert float(empty_t) == 0.0 and float(empty_d) == 0.0
  assert float(reduce.safe_ratio(empty_t, empty_d)) == 0.0


def test_aggregate_validation():
  with pytest.raises(ValueError, match="aggregation mode"):
    reduce.aggregate(jnp.zeros((2, 3)), jnp.ones((2, 3), bool), "mean")
  with pytest.raises(ValueError, match="shape"):
    reduce.aggregate(jnp.zeros((2, 3)), jnp.ones((2, 4), bool), "token_mean")


def test_sft_loss():
  values, mask = _values_and_mask(1)
  logp = -np.abs(values)
  for mode in reduce.AGGREGATION_MODES:
    total, denom, metrics = sft.sft_loss(logp, mask, mode)
    np.testing.assert_allclose(total / denom, _np_mode(-logp, mask, mode), rtol=1e-6)
    np.testing.assert_allclose(metrics["sft/nll"], -logp[mask].astype(np.float64).mean(), rtol=1e-6)
    assert float(metrics["sft/tokens"]) == mask.sum()
  grad = jax.grad(lambda x: sft.sft_loss(x, mask)[0])(jnp.asarray(np.nan_to_num(logp)))
  np.testing.assert_array_equal(grad, np.where(mask, -1.0, 0.0))


def _np_grpo(rewards, g, normalize_std, eps, ddof):
  adv = np.zeros(len(rewards))
  keep = np.zeros(len(rewards), bool)
  filtered = 0
  for start in range(0, len(rewards), g):
    r = rewards[start:start + g].astype(np.float64)
    if np.all(r == r[0]):
      filtered += 1
      continue
    a = r - r.mean()
    if normalize_std:
      a = a / (np.std(r, ddof=ddof) + eps)
    adv[start:start + g] = a
    keep[start:start + g] = True
  return adv, keep, filtered


@pytest.mark.parametrize("normalize_std,ddof", [(True, 1), (True, 0), (False, 1)])
def test_grpo_advantages_and_filtering(normalize_std, ddof):
  rng = np.random.default_rng(2)
  g = 4
  rewards = rng.integers(0, 2, size=6 * g).astype(np.float32)
  rewards[0:g] = 1.0          # all correct: zero variance
  rewards[g:2 * g] = 0.0      # all wrong: zero variance
  rewards[2 * g:3 * g] = [0.0, 1.0, 0.0, 0.0]
  rewards[3 * g:4 * g] = rng.normal(size=g)   # non-binary rewards work too
  adv, keep, metrics = rlvr.grpo_advantages(rewards, g, normalize_std, 1e-6, ddof=ddof)
  want_adv, want_keep, filtered = _np_grpo(rewards, g, normalize_std, 1e-6, ddof)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(keep, want_keep)
  assert filtered >= 2 and float(metrics["rlvr/filtered_groups"]) == filtered
  np.testing.assert_allclose(metrics["rlvr/reward_mean"], rewards.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["rlvr/kept_frac"], want_keep.mean(), rtol=1e-6)
  with pytest.raises(ValueError, match="multiple of group_size"):
    rlvr.grpo_advantages(rewards[:-1], g)
  # Filler rows (whole groups padding a partial last batch) count in no metric.
  valid = np.ones(6 * g, bool)
  valid[g:2 * g] = valid[4 * g:5 * g] = False
  adv_v, keep_v, m = rlvr.grpo_advantages(rewards, g, normalize_std, 1e-6, ddof=ddof,
                                          valid_B=jnp.asarray(valid))
  np.testing.assert_array_equal(adv_v, adv)
  _, _, filtered_v = _np_grpo(rewards[valid], g, normalize_std, 1e-6, ddof)
  assert float(m["rlvr/filtered_groups"]) == filtered_v
  np.testing.assert_allclose(m["rlvr/reward_mean"], rewards[valid].astype(np.float64).mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(m["rlvr/kept_frac"], want_keep[valid].mean(), rtol=1e-6)


def test_broadcast_to_tokens():
  _, mask = _values_and_mask(3)
  adv = np.arange(6, dtype=np.float32) - 2.5
  np.testing.assert_array_equal(rlvr.broadcast_to_tokens(adv, mask),
                                np.where(mask, adv[:, None], 0.0))


def test_kl_penalties():
  rng = np.random.default_rng(4)
  logp = -np.abs(rng.normal(size=(3, 5))).astype(np.float32)
  ref = -np.abs(rng.normal(size=(3, 5))).astype(np.float32)
  d = ref.astype(np.float64) - logp
  np.testing.assert_allclose(rlvr.kl_penalty(logp, ref, "k1"), -d, rtol=1e-5, atol=1e-7)
  k3 = np.asarray(rlvr.kl_penalty(logp, ref, "k3"))
  np.testing.assert_allclose(k3, np.exp(d) - d - 1, rtol=1e-5, atol=1e-7)
  assert np.all(k3 >= 0)
  # d k3 / d logp = 1 - exp(ref - logp)
  grad = jax.grad(lambda x: rlvr.kl_penalty(x, ref, "k3").sum())(logp)
  np.testing.assert_allclose(grad, 1 - np.exp(d), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="k2"):
    rlvr.kl_penalty(logp, ref, "k2")


def test_mixing():
  rng = np.random.default_rng(5)
  a_opd = rng.normal(size=(3, 6)).astype(np.float32)
  a_rlvr = rng.normal(size=(3, 6)).astype(np.float32)
  np.testing.assert_array_equal(rlvr.mix_advantages(a_opd, a_rlvr, 1.0), a_opd)
  np.testing.assert_array_equal(rlvr.mix_advantages(a_opd, a_rlvr, 0.0), a_rlvr)
  for alpha in (0.75, 0.5, 0.25, 0.05, 0.01):
    np.testing.assert_allclose(rlvr.mix_advantages(a_opd, a_rlvr, alpha),
                               alpha * a_opd.astype(np.float64) + (1 - alpha) * a_rlvr, rtol=1e-5,
                               atol=1e-6)
  # A traced alpha (e.g. a schedule) takes the arithmetic path; at 1 and 0 it is still exact here.
  mix = jax.jit(rlvr.mix_advantages)
  np.testing.assert_array_equal(mix(a_opd, a_rlvr, 1.0), a_opd)
  np.testing.assert_array_equal(mix(a_opd, a_rlvr, 0.0), a_rlvr)
  with pytest.raises(ValueError, match="alpha"):
    rlvr.mix_advantages(a_opd, a_rlvr, 1.5)

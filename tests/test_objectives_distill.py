"""Direct-route divergences against numpy float64 references; chunked driver; gradients."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax

from opd_jax.objectives import distill, reduce

# ---------------------------------------------------------------- numpy float64 references


def _lp(logits, temperature):
  return log_softmax(np.asarray(logits, np.float64) / temperature, axis=-1)


def _np_kl(p, q):
  """KL(p || q) in probability space, 0 log 0 = 0."""
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
  return terms.sum(-1)


def ref_divergence(kind, s, t, temperature, beta=0.5, alpha=0.1, k=4):
  ps, pt = np.exp(_lp(s, temperature)), np.exp(_lp(t, temperature))
  if kind == "forward_kl":
    return _np_kl(pt, ps)
  if kind == "reverse_kl":
    return _np_kl(ps, pt)
  if kind == "jsd":
    m = beta * pt + (1 - beta) * ps
    return beta * _np_kl(pt, m) + (1 - beta) * _np_kl(ps, m)
  if kind == "skew_kl":
    return _np_kl(pt, alpha * pt + (1 - alpha) * ps)
  if kind == "skew_reverse_kl":
    return _np_kl(ps, (1 - alpha) * pt + alpha * ps)
  if kind == "tvd":
    return 0.5 * np.abs(pt - ps).sum(-1)
  if kind == "topk_forward_kl":   # teacher's own top-k, k + 1 categories
    ids = np.argsort(-pt, axis=-1, kind="stable")[..., :k]
    return _bucket(pt, ps, ids)
  if kind == "student_topk_reverse_kl":
    ids = np.argsort(-ps, axis=-1, kind="stable")[..., :k]
    return _bucket(ps, pt, ids)
  raise AssertionError(kind)


def _bucket(p, q, ids):
  """KL(p || q) over the categories `ids` plus one tail bucket."""
  pk = np.take_along_axis(p, ids, -1)
  qk = np.take_along_axis(q, ids, -1)
  p_tail = np.clip(1.0 - pk.sum(-1, keepdims=True), 0.0, 1.0)
  q_tail = 1.0 - qk.sum(-1, keepdims=True)
  return _np_kl(np.concatenate([pk, p_tail], -1), np.concatenate([qk, q_tail], -1))


def _logits(rng, shape, scale=2.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def _teacher_topk_forward_kl(s, t, temperature, k):
  logp_k, ids = jax.lax.top_k(distill.log_probs(t, temperature), k)
  return distill.topk_forward_kl(s, ids, logp_k, temperature)


def _all_kinds(s, t, temperature, beta, alpha, k):
  """Every divergence at once (one compilation per shape; temperature may be traced)."""
  return {
      "forward_kl": distill.forward_kl(s, t, temperature),
      "reverse_kl": distill.reverse_kl(s, t, temperature),
      "jsd": distill.jsd(s, t, beta, temperature),
      "skew_kl": distill.skew_kl(s, t, alpha, temperature),
      "skew_reverse_kl": distill.skew_reverse_kl(s, t, alpha, temperature),
      "tvd": distill.tvd(s, t, temperature),
      "topk_forward_kl": _teacher_topk_forward_kl(s, t, temperature, k),
      "student_topk_reverse_kl": distill.student_topk_reverse_kl(s, t, k, temperature),
  }


@functools.partial(jax.jit, static_argnames=("beta", "alpha", "k"))
def _all_kinds_jit(s, t, temperature, beta=0.3, alpha=0.1, k=4):
  return _all_kinds(s, t, temperature, beta, alpha, k)


def test_every_kind_is_registered_in_the_reference_sweep():
  assert set(distill.DIVERGENCES) == set(_all_kinds_jit(jnp.zeros((1, 5)), jnp.zeros((1, 5)), 1.0))


@pytest.mark.parametrize("shape,vocab", [((3,), 7), ((2, 5), 50), ((2, 3, 4), 131)])
def test_divergences_match_float64_reference(shape, vocab):
  rng = np.random.default_rng(vocab)
  for temperature in (0.7, 1.0, 1.6):
    s = _logits(rng, shape + (vocab,))
    t = _logits(rng, shape + (vocab,))
    got = _all_kinds_jit(jnp.asarray(s), jnp.asarray(t), temperature)
    for kind in distill.DIVERGENCES:
      want = ref_divergence(kind, s, t, temperature, beta=0.3, alpha=0.1, k=4)
      assert got[kind].shape == shape
      np.testing.assert_allclose(got[kind], want, rtol=1e-5, atol=1e-5,
                                 err_msg=f"{kind} T={temperature}")
      assert np.all(want >= -1e-12)


def test_token_divergence_dispatch_matches_the_functions():
  rng = np.random.default_rng(9)
  s, t = jnp.asarray(_logits(rng, (2, 3, 20))), jnp.asarray(_logits(rng, (2, 3, 20)))
  cfgs = {kind: distill.DistillConfig(kind=kind, temperature=1.3, beta=0.6, alpha=0.2, top_k=5)
          for kind in distill.DIVERGENCES}
  dispatched = jax.jit(lambda s, t: {k: distill.token_divergence(s, t, c) for k, c in cfgs.items()})
  got = dispatched(s, t)
  for kind in distill.DIVERGENCES:
    want = ref_divergence(kind, s, t, 1.3, beta=0.6, alpha=0.2, k=5)
    np.testing.assert_allclose(got[kind], want, rtol=1e-5, atol=1e-5, err_msg=kind)


def test_topk_forward_kl_given_topk_matches_reference_and_full_logits_path():
  rng = np.random.default_rng(1)
  s = _logits(rng, (2, 6, 40))
  t = _logits(rng, (2, 6, 40))
  temperature = 1.3
  lpt = _lp(t, temperature)
  ids = np.argsort(-lpt, -1, kind="stable")[..., :5]
  ids2 = rng.permuted(np.tile(np.arange(40), (2, 6, 1)), axis=-1)[..., :5]  # arbitrary ids
  f = jax.jit(distill.topk_forward_kl)
  for i in (ids, ids2):
    got = f(jnp.asarray(s), jnp.asarray(i, jnp.int32),
            jnp.asarray(np.take_along_axis(lpt, i, -1), jnp.float32), temperature)
    want = _bucket(np.exp(lpt), np.exp(_lp(s, temperature)), i)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_topk_kinds_with_k_at_least_vocab_are_the_full_kls():
  rng = np.random.default_rng(2)
  s, t = jnp.asarray(_logits(rng, (4, 9))), jnp.asarray(_logits(rng, (4, 9)))
  full_ids = jnp.argsort(-t, axis=-1).astype(jnp.int32)
  topk = distill.TopK(full_ids, jnp.take_along_axis(distill.log_probs(t), full_ids, -1))
  np.testing.assert_allclose(distill.topk_forward_kl(s, topk.ids_BxTxK, topk.logp_BxTxK),
                             distill.forward_kl(s, t), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(distill.student_topk_reverse_kl(s, t, 9), distill.reverse_kl(s, t),
                             rtol=1e-5, atol=1e-6)
  # k = V - 1 runs the tail-bucket path with a one-token tail: k + 1 categories are the whole
  # vocabulary, so the bucketed KLs are the full ones.
  top8 = distill.TopK(full_ids[..., :8], topk.logp_BxTxK[..., :8])
  np.testing.assert_allclose(distill.topk_forward_kl(s, top8.ids_BxTxK, top8.logp_BxTxK),
                             distill.forward_kl(s, t), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(distill.student_topk_reverse_kl(s, t, 8), distill.reverse_kl(s, t),
                             rtol=1e-5, atol=1e-6)


def test_jsd_endpoints_are_forward_and_reverse_kl_exactly():
  rng = np.random.default_rng(3)
  s, t = jnp.asarray(_logits(rng, (5, 33))), jnp.asarray(_logits(rng, (5, 33)))
  got = jax.jit(lambda s, t: (distill.jsd(s, t, 0.0, 1.2), distill.forward_kl(s, t, 1.2),
                              distill.jsd(s, t, 1.0, 1.2), distill.reverse_kl(s, t, 1.2),
                              distill.jsd(s, t, 0.01, 1.2)))(s, t)
  np.testing.assert_array_equal(got[0], got[1])
  np.testing.assert_array_equal(got[2], got[3])
  # Interior betas follow the mixture formula (not the endpoint KLs).
  interior = np.asarray(got[4])
  np.testing.assert_allclose(interior, ref_divergence("jsd", s, t, 1.2, beta=0.01), rtol=1e-4,
                             atol=1e-6)
  with pytest.raises(ValueError, match="beta"):
    distill.jsd(s, t, 1.5)


def test_teacher_with_minus_inf_logits_is_finite():
  rng = np.random.default_rng(4)
  s = _logits(rng, (3, 10))
  t = _logits(rng, (3, 10))
  t[:, 7:] = -np.inf  # e.g. a padded vocabulary
  kinds = ("forward_kl", "jsd", "skew_kl", "tvd", "topk_forward_kl")

  @jax.jit
  def values_and_grads(x):
    out = {}
    for kind in kinds:
      cfg = distill.DistillConfig(kind=kind, top_k=3)
      out[kind] = jax.value_and_grad(
          lambda y, c=cfg: distill.token_divergence(y, jnp.asarray(t), c).sum())(x)
    return out

  got = values_and_grads(jnp.asarray(s))
  for kind in kinds:
    value, grad = got[kind]
    np.testing.assert_allclose(value, ref_divergence(kind, s, t, 1.0, k=3).sum(), rtol=1e-5,
                               err_msg=kind)
    assert np.all(np.isfinite(grad)), kind


def test_gradients_match_finite_differences_of_reference():
  rng = np.random.default_rng(5)
  s = _logits(rng, (2, 12))
  t = _logits(rng, (2, 12))
  temperature = 0.9
  weights = rng.standard_normal(2)

  @jax.jit
  def grads(x):
    return {kind: jax.grad(lambda y, k=kind: (_all_kinds(y, jnp.asarray(t), temperature, 0.4, 0.1,
                                                         4)[k] * weights).sum())(x)
            for kind in distill.DIVERGENCES}

  got = grads(jnp.asarray(s))
  s64, eps = s.astype(np.float64), 1e-6
  for kind in distill.DIVERGENCES:
    f = lambda x, k=kind: (ref_divergence(k, x, t, temperature, beta=0.4, k=4) * weights).sum()  # noqa
    fd = np.zeros_like(s64)
    for idx in np.ndindex(s.shape):
      plus, minus = s64.copy(), s64.copy()
      plus[idx] += eps
      minus[idx] -= eps
      fd[idx] = (f(plus) - f(minus)) / (2 * eps)
    np.testing.assert_allclose(got[kind], fd, rtol=1e-4, atol=2e-6, err_msg=kind)


# ---------------------------------------------------------------- chunked driver


def _setup(seed=6, b=3, t=11, d=6, v=29):
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.standard_normal((d, v)).astype(np.float32))
  h = jnp.asarray(rng.standard_normal((b, t, d)).astype(np.float32))
  wt = jnp.asarray(rng.standard_normal((d, v)).astype(np.float32))
  ht = jnp.asarray(rng.standard_normal((b, t, d)).astype(np.float32))
  mask = np.zeros((b, t), bool)
  mask[0, 3:] = True          # left-padded prompt
  mask[1, 2:7] = True         # padding after EOS
  mask[2, 5:6] = True
  return w, h, wt, ht, jnp.asarray(mask)


CHUNK_CASES = [("topk_forward_kl", "seq_mean_token_mean")]


def test_chunked_equals_unchunked_values_and_gradients():
  w, h, wt, ht, mask = _setup()
  teacher_logits = ht @ wt

  @jax.jit
  def everything(w):
    out = {}
    for kind, mode in CHUNK_CASES:
      # chunk 3 does not divide T = 11 (the last chunk is padded)
      cfg = distill.DistillConfig(kind=kind, temperature=1.1, top_k=5, chunk_size=3, mode=mode)

      def unchunked(w, c=cfg):
        div = distill.token_divergence(h @ w, teacher_logits, c)
        return reduce.safe_ratio(*reduce.aggregate(div, mask, c.mode))

      def chunked(w, c=cfg):
        total, denom, _ = distill.divergence_loss(lambda x: x @ w, h, (lambda x: x @ wt, ht),
                                                  mask, c)
        return total / denom

      out[kind + "/ref"] = jax.value_and_grad(unchunked)(w)
      out[kind + "/chunked"] = jax.value_and_grad(chunked)(w)
    # Full teacher logits give the same as the (logits_fn, h) pair; one chunk = many chunks.
    cfg = distill.DistillConfig(kind="jsd", chunk_size=4, mode="seq_mean_token_sum")
    out["full/4"] = distill.divergence_loss(lambda x: x @ w, h, teacher_logits, mask, cfg)
    out["pair/64"] = distill.divergence_loss(lambda x: x @ w, h, (lambda x: x @ wt, ht), mask,
                                             dataclasses.replace(cfg, chunk_size=64))
    div = distill.token_divergence(h @ w, teacher_logits, cfg)
    out["jsd/ref"] = reduce.aggregate(div, mask, cfg.mode)
    return out

  out = everything(w)
  for kind, _ in CHUNK_CASES:
    want, want_g = out[kind + "/ref"]
    got, got_g = out[kind + "/chunked"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=kind)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-6, err_msg=kind)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out["full/4"],
               out["pair/64"])
  np.testing.assert_allclose(out["full/4"][0], out["jsd/ref"][0], rtol=1e-6)
  np.testing.assert_allclose(out["full/4"][1], out["jsd/ref"][1])


def test_driver_matches_reference_with_masks_and_metrics():
  w, h, wt, ht, mask = _setup(seed=7)
  s_logits, t_logits = np.asarray(h @ w), np.asarray(ht @ wt)
  m = np.asarray(mask)
  cfgs = {mode: distill.DistillConfig(kind="forward_kl", temperature=0.8, chunk_size=4, mode=mode)
          for mode in reduce.AGGREGATION_MODES}
  got = jax.jit(lambda w, tl: {mode: distill.divergence_loss(lambda x: x @ w, h, tl, mask, c)
                               for mode, c in cfgs.items()})(w, jnp.asarray(t_logits))
  per = ref_divergence("forward_kl", s_logits, t_logits, 0.8)
  per_seq = [per[b][m[b]] for b in range(3)]
  want = {"token_mean": per[m].mean(),
          "seq_mean_token_sum": np.mean([x.sum() for x in per_seq]),
          "seq_mean_token_mean": np.mean([x.mean() for x in per_seq])}
  for mode in reduce.AGGREGATION_MODES:
    total, denom, metrics = got[mode]
    np.testing.assert_allclose(total / denom, want[mode], rtol=1e-5, err_msg=mode)
    np.testing.assert_allclose(metrics["distill/forward_kl"], per[m].mean(), rtol=1e-5)
    assert float(metrics["distill/tokens"]) == m.sum()


def test_driver_topk_teacher_and_no_teacher_gradient():
  w, h, wt, ht, mask = _setup(seed=8)
  lpt = distill.log_probs(ht @ wt, 1.0)
  logp_k, ids = jax.lax.top_k(lpt, 6)
  cfg = distill.DistillConfig(kind="topk_forward_kl", chunk_size=5)

  def loss(w, logp_k):
    total, denom, _ = distill.divergence_loss(lambda x: x @ w, h, distill.TopK(ids, logp_k), mask,
                                              cfg)
    return total / denom

  want = _bucket(np.exp(np.asarray(lpt, np.float64)), np.exp(_lp(np.asarray(h @ w), 1.0)),
                 np.asarray(ids))[np.asarray(mask)].mean()
  value, g_teacher = jax.jit(jax.value_and_grad(loss, argnums=1))(w, logp_k)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_array_equal(g_teacher, np.zeros_like(g_teacher))
  g_logits = jax.jit(jax.grad(lambda tl: distill.divergence_loss(
      lambda x: x @ w, h, tl, mask, distill.DistillConfig(chunk_size=4))[0]))(ht @ wt)
  np.testing.assert_array_equal(g_logits, np.zeros_like(g_logits))
  with pytest.raises(ValueError, match="full teacher logits"):
    distill.divergence_loss(lambda x: x @ w, h, distill.TopK(ids, logp_k), mask,
                            distill.DistillConfig(kind="reverse_kl"))


def _max_intermediate(jaxpr) -> int:
  biggest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      biggest = max(biggest, int(np.prod(var.aval.shape)) if hasattr(var.aval, "shape") else 0)
    for param in eqn.params.values():
      subs = param if isinstance(param, (tuple, list)) else [param]
      for sub in subs:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          biggest = max(biggest, _max_intermediate(inner))
  return biggest


def test_chunked_loss_and_gradient_never_materialise_full_logits():
  b, t, d, v, chunk = 2, 64, 8, 1000, 8
  w = jnp.zeros((d, v))
  h = jnp.zeros((b, t, d))
  mask = jnp.ones((b, t), bool)
  cfg = distill.DistillConfig(kind="jsd", chunk_size=chunk)
  fn = lambda w: distill.divergence_loss(lambda x: x @ w, h, (lambda x: x @ w, h), mask, cfg)[0]  # noqa
  jaxpr = jax.make_jaxpr(jax.grad(fn))(w).jaxpr
  biggest = _max_intermediate(jaxpr)
  assert biggest >= b * chunk * v           # the per-chunk logits are there ...
  assert biggest < b * t * v // 4           # ... but never a [B, T, V] array


def test_config_validation():
  with pytest.raises(ValueError, match="kind"):
    distill.DistillConfig(kind="kl")
  with pytest.raises(ValueError, match="temperature"):
    distill.DistillConfig(temperature=0.0)
  with pytest.raises(ValueError, match="aggregation mode"):
    distill.DistillConfig(mode="mean")
  w, h, _, _, mask = _setup()
  with pytest.raises(ValueError, match="teacher array"):
    distill.divergence_loss(lambda x: x @ w, h, jnp.zeros((3, 5, 29)), mask, distill.DistillConfig())


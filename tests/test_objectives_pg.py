"""PG route: rewards, credit estimators, GAE-OPD, surrogates, unbiasedness, sign test, CR-OPD."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import log_softmax

from opd_jax.objectives import distill, log_ratio, reduce, surrogate


def _mask(b=4, t=9):
  m = np.zeros((b, t), bool)
  m[0, 2:] = True        # left-padded prompt of 2, response to the end
  m[1, 3:6] = True       # EOS at 5, pad after
  m[2, 0:1] = True       # a one-token response
  if b > 3:
    m[3, 4:8] = True
  return m


def _py_discounted(r, m, gamma):
  """Python-loop reference: per row, walk the response tokens backwards."""
  out = np.zeros_like(r, np.float64)
  for b in range(r.shape[0]):
    g = 0.0
    for t in reversed(range(r.shape[1])):
      if m[b, t]:
        g = r[b, t] + gamma * g
        out[b, t] = g
  return out


def _py_gae(r, v, m, gamma, lam):
  out = np.zeros_like(r, np.float64)
  for b in range(r.shape[0]):
    idx = [t for t in range(r.shape[1]) if m[b, t]]
    a_next = 0.0
    for j in reversed(range(len(idx))):
      t = idx[j]
      v_next = v[b, idx[j + 1]] if j + 1 < len(idx) else 0.0
      delta = r[b, t] + gamma * v_next - v[b, t]
      a_next = delta + gamma * lam * a_next
      out[b, t] = a_next
  return out


def test_rewards_and_metrics():
  rng = np.random.default_rng(0)
  m = _mask()
  s, t = rng.normal(size=m.shape).astype(np.float32), rng.normal(size=m.shape).astype(np.float32)
  r = np.asarray(log_ratio.rewards(s, t, m))
  np.testing.assert_allclose(r, np.where(m, t.astype(np.float64) - s, 0.0), rtol=1e-6, atol=1e-7)
  metrics = log_ratio.opd_metrics(s, t, m)
  np.testing.assert_allclose(metrics["opd/teacher_gap"], (s - t)[m].mean(), rtol=1e-5)
  kl = np.abs(rng.normal(size=m.shape)).astype(np.float32)
  np.testing.assert_allclose(log_ratio.opd_metrics(s, t, m, kl)["opd/reverse_kl"], kl[m].mean(),
                             rtol=1e-5)


def test_credit_estimators_equal_python_loops():
  rng = np.random.default_rng(1)
  m = _mask()
  m[3, 5] = False  # a hole inside a response is skipped, not counted as a step
  r = np.where(m, rng.normal(size=m.shape), 123.0).astype(np.float32)  # garbage where masked
  kl = np.abs(rng.normal(size=m.shape)).astype(np.float32)
  values = rng.normal(size=m.shape).astype(np.float32)

  @jax.jit
  def run(r, kl, values):
    cfgs = {"immediate": log_ratio.CreditConfig("immediate"),
            "return_to_go": log_ratio.CreditConfig("return_to_go"),
            "discounted": log_ratio.CreditConfig("discounted", gamma=0.9),
            "baseline_corrected": log_ratio.CreditConfig("baseline_corrected"),
            "gae_learned": log_ratio.CreditConfig("gae", gamma=0.95, lam=0.8, value="learned"),
            "gae_neg_kl": log_ratio.CreditConfig("gae", gamma=0.95, lam=0.8, value="neg_kl"),
            "gae_v0_lam1": log_ratio.CreditConfig("gae", gamma=0.9, lam=1.0, value="zero"),
            "gae_v0_gamma0": log_ratio.CreditConfig("gae", gamma=0.0, lam=0.7, value="zero")}
    return {k: log_ratio.advantages(r, m, c, kl_BxT=kl, values_BxT=values) for k, c in cfgs.items()}

  got = run(r, kl, values)
  r0 = np.where(m, r, 0.0).astype(np.float64)
  ref = {"immediate": r0, "return_to_go": _py_discounted(r0, m, 1.0),
         "discounted": _py_discounted(r0, m, 0.9),
         "baseline_corrected": np.where(m, r0 + kl, 0.0),
         "gae_learned": _py_gae(r0, values, m, 0.95, 0.8),
         "gae_neg_kl": _py_gae(r0, -kl.astype(np.float64), m, 0.95, 0.8),
         "gae_v0_lam1": _py_discounted(r0, m, 0.9), "gae_v0_gamma0": r0}
  for k, want in ref.items():
    np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-5, err_msg=k)
    assert np.all(np.asarray(got[k])[~m] == 0), k
  # The special cases hold through `gae` itself with V = 0.
  zeros = np.zeros_like(r)
  np.testing.assert_allclose(log_ratio.gae(r, zeros, m, 0.9, 1.0), log_ratio.discounted(r, m, 0.9),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(log_ratio.gae(r, zeros, m, 0.0, 0.5), log_ratio.immediate(r, m),
                             rtol=1e-6, atol=1e-6)


def test_advantages_validation_and_stop_gradient():
  m = _mask()
  r = jnp.ones(m.shape)
  with pytest.raises(ValueError, match="kl_BxT"):
    log_ratio.advantages(r, m, log_ratio.CreditConfig("baseline_corrected"))
  with pytest.raises(ValueError, match="values_BxT"):
    log_ratio.advantages(r, m, log_ratio.CreditConfig("gae", value="learned"))
  with pytest.raises(ValueError, match="kind"):
    log_ratio.CreditConfig("td")
  g = jax.grad(lambda r: log_ratio.advantages(r, m, log_ratio.CreditConfig("return_to_go")).sum())(r)
  np.testing.assert_array_equal(g, np.zeros(m.shape))


def test_value_head_and_value_loss():
  rng = np.random.default_rng(2)
  m = _mask()
  h = rng.normal(size=m.shape + (5,)).astype(np.float32)
  head = log_ratio.init_value_head(5)
  np.testing.assert_array_equal(log_ratio.value_head(head, h), np.zeros(m.shape))
  head = {"kernel": jnp.asarray(rng.normal(size=5), jnp.float32), "bias": jnp.float32(0.3)}
  np.testing.assert_allclose(log_ratio.value_head(head, h),
                             h.astype(np.float64) @ np.asarray(head["kernel"]) + 0.3, rtol=1e-5)
  returns = rng.normal(size=m.shape).astype(np.float32)

  def loss(head, h, stop):
    v = log_ratio.value_head(head, h, stop_trunk_gradient=stop)
    total, denom, _ = log_ratio.value_loss(v, returns, m)
    return total / denom

  v = h.astype(np.float64) @ np.asarray(head["kernel"]) + 0.3
  np.testing.assert_allclose(loss(head, h, True), (0.5 * (v - returns) ** 2)[m].mean(), rtol=1e-5)
  g_head, g_h = jax.grad(loss, argnums=(0, 1))(head, h, True)
  want_bias = (v - returns)[m].sum() / m.sum()
  np.testing.assert_allclose(g_head["bias"], want_bias, rtol=1e-4)
  np.testing.assert_array_equal(g_h, np.zeros_like(h))       # trunk untouched by default
  assert np.abs(jax.grad(loss, argnums=1)(head, h, False)).sum() > 0
  targets = log_ratio.value_targets(jnp.asarray(returns), v.astype(np.float32), m)
  np.testing.assert_allclose(targets, np.where(m, returns + v, 0.0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- surrogates


def _pg_case(seed=3):
  rng = np.random.default_rng(seed)
  m = _mask()
  old = -np.abs(rng.normal(size=m.shape)).astype(np.float32)
  new = (old + rng.uniform(-0.6, 0.6, size=m.shape)).astype(np.float32)
  adv = rng.normal(size=m.shape).astype(np.float32)
  return m, new, old, adv


def _np_pg(kind, new, old, adv, eps_low, eps_high):
  ratio = np.exp(new.astype(np.float64) - old)
  if kind == "reinforce":
    return -new * adv, np.zeros(new.shape, bool)
  if kind == "is":
    return -ratio * adv, np.zeros(new.shape, bool)
  unclipped = ratio * adv
  clipped_val = np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv
  return -np.minimum(unclipped, clipped_val), clipped_val < unclipped


@pytest.mark.parametrize("mode", reduce.AGGREGATION_MODES)
def test_pg_loss_matches_reference(mode):
  m, new, old, adv = _pg_case()
  for kind in surrogate.PG_KINDS:
    cfg = surrogate.PGConfig(kind=kind, eps_low=0.2, eps_high=0.28, mode=mode)
    total, denom, metrics = surrogate.pg_loss(new, old, adv, m, cfg)
    loss, clipped = _np_pg(kind, new, old, adv, 0.2, 0.28)
    want = {"token_mean": loss[m].mean(),
            "seq_mean_token_sum": np.mean([loss[b][m[b]].sum() for b in range(4)]),
            "seq_mean_token_mean": np.mean([loss[b][m[b]].mean() for b in range(4)])}[mode]
    np.testing.assert_allclose(total / denom, want, rtol=1e-5, err_msg=kind)
    np.testing.assert_allclose(metrics["pg/clip_frac"], clipped[m].mean(), atol=1e-7)
    np.testing.assert_allclose(metrics["pg/ratio_mean"], np.exp(new - old.astype(np.float64))[m].mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["pg/adv_mean"], adv[m].mean(), rtol=1e-5, atol=1e-7)


def test_ppo_clip_gradient_is_exactly_zero_on_the_clipped_branch():
  m, new, old, adv = _pg_case(4)
  cfg = surrogate.PGConfig(kind="ppo_clip", eps_low=0.2, eps_high=0.28, mode="token_mean")
  grad = np.asarray(jax.grad(lambda x: surrogate.pg_loss(x, old, adv, m, cfg)[0])(new))
  ratio = np.exp(new.astype(np.float64) - old)
  clipped = ((adv > 0) & (ratio > 1.28)) | ((adv < 0) & (ratio < 0.8))
  assert (clipped & m).sum() >= 3 and (~clipped & m).sum() >= 3   # both branches present
  assert np.all(grad[clipped] == 0.0)
  assert np.all(grad[~m] == 0.0)
  live = m & ~clipped
  np.testing.assert_allclose(grad[live], (-ratio * adv)[live], rtol=1e-5)
  # Gradients ignore garbage at masked positions and never reach logp_old or the advantages.
  g_old, g_adv = jax.grad(lambda o, a: surrogate.pg_loss(new, o, a, m, cfg)[0], (0, 1))(old, adv)
  np.testing.assert_array_equal(g_old, 0 * g_old)
  np.testing.assert_array_equal(g_adv, 0 * g_adv)


def test_ppo_clip_gradient_stays_zero_where_the_ratio_overflows():
  # log ratios of +-100 overflow / underflow float32's exp: the clipped tokens still get exactly
  # zero gradient and the others their own, finite one.
  new = np.array([[0.0, -1.0, -100.0, -1.0]], np.float32)
  old = np.array([[-100.0, -1.0, 0.0, -1.1]], np.float32)
  adv = np.array([[1.0, 1.0, -1.0, -0.5]], np.float32)
  m = np.ones_like(new, bool)
  cfg = surrogate.PGConfig(kind="ppo_clip", mode="token_mean")
  grad = np.asarray(jax.grad(lambda x: surrogate.pg_loss(x, old, adv, m, cfg)[0])(new))
  want = np.array([[0.0, -1.0, 0.0, 0.5 * np.exp(0.1)]])   # of the sum, not the mean
  np.testing.assert_allclose(grad, want, rtol=1e-6)


def test_on_policy_surrogates_share_the_gradient():
  m, new, _, adv = _pg_case(5)
  grads = [jax.grad(lambda x: surrogate.pg_loss(x, x, adv, m, surrogate.PGConfig(kind=k))[0])(new)
           for k in surrogate.PG_KINDS]
  for g in grads[1:]:
    np.testing.assert_allclose(g, grads[0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(grads[0], np.where(m, -adv, 0.0), rtol=1e-5, atol=1e-7)  # d sum


# ---------------------------------------------------------------- unbiasedness and sign


def _per_sample_grads(z_s, z_t, ys, credit):
  """Per-sample gradient (w.r.t. the student logits) of the PG-route loss for one sampled token."""
  cfg = surrogate.PGConfig(kind="reinforce", mode="token_mean")

  def loss(z, y):
    logp_s = jax.nn.log_softmax(z)
    logp_t = jax.nn.log_softmax(z_t)
    tok_s, tok_t = logp_s[y][None, None], logp_t[y][None, None]
    mask = jnp.ones((1, 1), bool)
    reward = log_ratio.rewards(jax.lax.stop_gradient(tok_s), tok_t, mask)
    kl = distill.reverse_kl(z, z_t)[None, None]
    adv = log_ratio.advantages(reward, mask, log_ratio.CreditConfig(credit), kl_BxT=kl)
    return surrogate.pg_loss(tok_s, jax.lax.stop_gradient(tok_s), adv, mask, cfg)[0]

  return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(z_s, ys)


def _exact_grad_variance(z_s, z_t, baseline):
  """Total variance (trace of the covariance) of -A(y) grad log pS(y), y ~ pS, A = reward + b."""
  lp_s, lp_t = log_softmax(z_s.astype(np.float64)), log_softmax(z_t.astype(np.float64))
  p_s = np.exp(lp_s)
  g = -((lp_t - lp_s) + baseline)[:, None] * (np.eye(len(z_s)) - p_s[None])
  mean = (p_s[:, None] * g).sum(0)
  return (p_s[:, None] * (g - mean) ** 2).sum()


def test_sampled_token_pg_route_is_unbiased_and_baseline_reduces_variance():
  """MC mean of the per-token PG gradient over on-policy samples equals the exact gradient of
  KL(pS || pT); tolerance: 5 standard errors of the MC mean per component (fixed seed).

  The KL baseline is unbiased always but lowers the variance only usually (the variance-optimal
  baseline weights by |grad log p|^2): here (teacher strongly disagreeing) it lowers it by ~23%.
  """
  z_s = np.array([1.0, 0.2, -0.5, 0.3, -1.2], np.float32)
  z_t = np.array([-2.3, 2.4, 0.1, -1.0, 0.6], np.float32)
  n = 40000
  ys = jax.random.categorical(jax.random.PRNGKey(0), jnp.asarray(z_s), shape=(n,))
  lp_s, lp_t = log_softmax(z_s.astype(np.float64)), log_softmax(z_t.astype(np.float64))
  p_s = np.exp(lp_s)
  kl = (p_s * (lp_s - lp_t)).sum()
  exact = p_s * (lp_s - lp_t - kl)            # d KL(pS||pT) / d z_s
  stats = {}
  for credit, baseline in (("immediate", 0.0), ("baseline_corrected", kl)):
    g = np.asarray(_per_sample_grads(jnp.asarray(z_s), jnp.asarray(z_t), ys, credit), np.float64)
    mean, stderr = g.mean(0), g.std(0) / np.sqrt(n)
    assert np.all(np.abs(mean - exact) < 5 * stderr + 1e-6), (credit, mean, exact, stderr)
    stats[credit] = (mean, g.var(0).sum())
    np.testing.assert_allclose(stats[credit][1], _exact_grad_variance(z_s, z_t, baseline),
                               rtol=0.05)
  # Same mean (within the MC error) and lower total variance with the KL baseline.
  np.testing.assert_allclose(stats["immediate"][0], stats["baseline_corrected"][0], atol=0.03)
  assert stats["baseline_corrected"][1] < 0.85 * stats["immediate"][1], stats


def test_one_pg_step_moves_the_student_toward_the_teacher():
  """The classic sign error (A = r_t instead of -r_t) would move pS away from the teacher."""
  z_t = jnp.array([0.0, 0.0, 4.0, 0.0, 0.0])      # the teacher prefers token 2
  z_s = jnp.zeros(5)                               # a uniform toy student: logits are its params
  ys = jax.random.categorical(jax.random.PRNGKey(1), z_s, shape=(64, 6))
  mask = jnp.ones(ys.shape, bool)
  opt = optax.sgd(0.5)

  def loss(z, old_logp):
    logp = jax.nn.log_softmax(z)[ys]
    reward = log_ratio.rewards(old_logp, jax.nn.log_softmax(z_t)[ys], mask)
    adv = log_ratio.advantages(reward, mask, log_ratio.CreditConfig("immediate"))
    total, denom, _ = surrogate.pg_loss(logp, old_logp, adv, mask, surrogate.PGConfig())
    return total / denom

  @jax.jit
  def step(z):
    grads = jax.grad(loss)(z, jax.nn.log_softmax(z)[ys])
    updates, _ = opt.update(grads, opt.init(z))
    z_new = optax.apply_updates(z, updates)
    return z_new, distill.reverse_kl(z, z_t), distill.reverse_kl(z_new, z_t)

  z_new, kl_before, kl_after = step(z_s)
  p_before, p_after = jax.nn.softmax(z_s), jax.nn.softmax(z_new)
  assert p_after[2] > p_before[2] + 0.05
  assert kl_after < kl_before


# ---------------------------------------------------------------- CR-OPD


def _np_cr(s_logits, t_probs, y, adv, cfg):
  """float64 reference of the CR-OPD term and its logit gradient, per state."""
  lp_s = log_softmax(s_logits.astype(np.float64), -1)
  p_s = np.exp(lp_s)
  v = s_logits.shape[-1]
  loss = np.zeros(s_logits.shape[:-1])
  grad = np.zeros(s_logits.shape)
  sizes = np.zeros(s_logits.shape[:-1])
  for idx in np.ndindex(s_logits.shape[:-1]):
    pt, ps = t_probs[idx], p_s[idx]
    t_top = set(np.argsort(-pt, kind="stable")[:cfg.teacher_top_k]) if cfg.teacher_top_k else set()
    s_top = set(np.argsort(-ps, kind="stable")[:cfg.student_top_k]) if cfg.student_top_k else set()
    c = [u for u in range(v) if (pt[u] >= cfg.teacher_min_prob or u in t_top) and pt[u] > 0
         and (u in s_top or ps[u] >= cfg.student_min_prob) and u != y[idx]]
    sizes[idx] = len(c)
    if adv[idx] >= 0 or not c:
      continue
    q = np.zeros(v)
    q[c] = pt[c] / pt[c].sum()
    loss[idx] = cfg.coef * abs(adv[idx]) * -(q[c] * lp_s[idx][c]).sum()
    grad[idx] = cfg.coef * abs(adv[idx]) * (ps - q)
  return loss, grad, sizes


def _cr_case(seed=6, shape=(3, 4), v=12):
  rng = np.random.default_rng(seed)
  s = (1.5 * rng.normal(size=shape + (v,))).astype(np.float32)
  t = (2.0 * rng.normal(size=shape + (v,))).astype(np.float32)
  y = rng.integers(0, v, size=shape)
  adv = rng.normal(size=shape).astype(np.float32)
  return s, t, y, adv


def test_cr_opd_matches_reference_value_and_gradient():
  s, t, y, adv = _cr_case()
  cfg = log_ratio.CROPDConfig(teacher_min_prob=0.05, teacher_top_k=2, student_top_k=3,
                              student_min_prob=0.05, coef=0.7)

  def total(x):
    loss, active, size = log_ratio.cr_opd_token_loss(x, jnp.asarray(t), jnp.asarray(y),
                                                     jnp.asarray(adv), cfg)
    return loss.sum(), (loss, active, size)

  grad, (loss, active, size) = jax.jit(jax.grad(total, has_aux=True))(jnp.asarray(s))
  want_loss, want_grad, want_size = _np_cr(s, np.exp(log_softmax(t.astype(np.float64), -1)), y,
                                           adv, cfg)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(size, want_size)
  assert np.asarray(active).sum() >= 2 and (adv >= 0).sum() >= 2
  # Zero (value and gradient) wherever A_t >= 0.
  assert np.all(np.asarray(loss)[adv >= 0] == 0) and np.all(np.asarray(grad)[adv >= 0] == 0)
  # A TopK teacher (its top-6 ids) defines the same sets when the criteria only use those ids.
  lpt = log_softmax(t.astype(np.float64), -1)
  ids = np.argsort(-lpt, -1, kind="stable")[..., :6]
  topk = distill.TopK(jnp.asarray(ids, jnp.int32),
                      jnp.asarray(np.take_along_axis(lpt, ids, -1), jnp.float32))
  cfg_k = log_ratio.CROPDConfig(teacher_min_prob=2.0, teacher_top_k=3, student_top_k=12)
  got_k = jax.jit(lambda *a: log_ratio.cr_opd_token_loss(*a, cfg_k))(
      jnp.asarray(s), topk, jnp.asarray(y), jnp.asarray(adv))
  want_k = _np_cr(s, np.exp(lpt), y, adv, cfg_k)
  np.testing.assert_allclose(got_k[0], want_k[0], rtol=1e-5, atol=1e-6)


def test_cr_opd_routes_freed_mass_to_the_candidate_set():
  """With coef = 1, REINFORCE + CR has logit gradient |A| (e_y - q) on a negative token: a descent
  step raises every logit in C_t, lowers y_t, leaves all others, and increases pS(C_t)."""
  v = 10
  rng = np.random.default_rng(7)
  z = jnp.asarray(rng.normal(size=v).astype(np.float32))
  z_t = jnp.asarray(rng.normal(size=v).astype(np.float32) * 2)
  y, adv = 3, -0.8
  cfg = log_ratio.CROPDConfig(teacher_min_prob=0.08, student_top_k=6, student_min_prob=2.0)
  mask = jnp.ones((1, 1), bool)

  def loss(z):
    logp = jax.nn.log_softmax(z)[y][None, None]
    pg = surrogate.pg_loss(logp, jax.lax.stop_gradient(logp), jnp.full((1, 1), adv), mask,
                           surrogate.PGConfig(kind="reinforce"))[0]
    cr = log_ratio.cr_opd_token_loss(z, z_t, jnp.asarray(y), jnp.asarray(adv), cfg)[0]
    return pg + cr

  g = np.asarray(jax.jit(jax.grad(loss))(z), np.float64)
  p_s = np.exp(log_softmax(np.asarray(z, np.float64)))
  p_t = np.exp(log_softmax(np.asarray(z_t, np.float64)))
  s_top = set(np.argsort(-p_s)[:6])
  in_c = np.array([(p_t[u] >= 0.08) and (u in s_top) and u != y for u in range(v)])
  assert 1 <= in_c.sum() < v - 1
  q = np.where(in_c, p_t, 0) / p_t[in_c].sum()
  np.testing.assert_allclose(g, abs(adv) * (np.eye(v)[y] - q), atol=1e-6)
  assert np.all(g[in_c] < 0) and g[y] > 0
  others = ~in_c & (np.arange(v) != y)
  np.testing.assert_allclose(g[others], 0.0, atol=1e-7)
  z_new = np.asarray(z, np.float64) - 0.1 * g
  p_new = np.exp(log_softmax(z_new))
  assert p_new[in_c].sum() > p_s[in_c].sum() and p_new[y] < p_s[y]


def test_cr_opd_chunked_driver_and_metrics():
  rng = np.random.default_rng(8)
  b, t, d, v = 3, 7, 5, 16
  w = jnp.asarray(rng.normal(size=(d, v)).astype(np.float32))
  h = jnp.asarray(rng.normal(size=(b, t, d)).astype(np.float32))
  tl = jnp.asarray(2 * rng.normal(size=(b, t, v)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, v, size=(b, t)))
  adv = jnp.asarray(rng.normal(size=(b, t)).astype(np.float32))
  m = _mask(b, t)
  cfg = log_ratio.CROPDConfig(chunk_size=3, student_min_prob=0.02)

  @jax.jit
  def run(w):
    driver = jax.value_and_grad(
        lambda w: log_ratio.cr_opd_loss(lambda x: x @ w, h, tl, y, adv, m, cfg)[0])(w)
    direct = jax.value_and_grad(
        lambda w: (log_ratio.cr_opd_token_loss(h @ w, tl, y, adv, cfg)[0] * m).sum())(w)
    return driver, direct, log_ratio.cr_opd_loss(lambda x: x @ w, h, tl, y, adv, m, cfg)

  (v1, g1), (v2, g2), (_, denom, metrics) = run(w)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)
  assert float(denom) == m.sum()
  want_loss, _, sizes = _np_cr(np.asarray(h @ w), np.exp(log_softmax(np.asarray(tl, np.float64), -1)),
                               np.asarray(y), np.asarray(adv), cfg)
  active = (want_loss > 0) & m
  np.testing.assert_allclose(metrics["cr/loss"], want_loss[m].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["cr/active_frac"], active[m].mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["cr/set_size"], sizes[active].mean(), rtol=1e-6)

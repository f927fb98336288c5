"""OPD, policy-gradient route: log-ratio rewards, temporal-credit estimators, GAE-OPD, CR-OPD.

Reward convention (fixed for the project): `reward_t = log pT(y_t|s_t) - log pS(y_t|s_t) = -r_t`,
with r_t the log-ratio of paper_facts. The immediate advantage is the reward. Everything here is
zero on masked positions (prompt, padding, post-EOS) and is meant to be computed *outside* the
differentiated function (the dispatcher `advantages` returns a stop-gradient array).

Estimators (all discount over the masked-in positions of a row, in order; masked positions are
skipped, and the return after the last response token is 0: EOS is terminal and a response cut at
the length limit is not bootstrapped):
  immediate            A_t = reward_t                                   (gamma = 0; the default)
  return_to_go         A_t = sum_{t' >= t} reward_t'
  discounted(gamma)    A_t = sum_k gamma^k reward_{t+k}
  baseline_corrected   A_t = reward_t + stopgrad(KL_t), KL_t = KL(pS(.|s_t) || pT(.|s_t)): since
                       E_{y~pS}[reward_t] = -KL_t, this subtracts the exact per-state mean (unbiased)
  gae(gamma, lam)      delta_t = reward_t + gamma V(s_{t+1}) - V(s_t); A_t = sum_l (gamma lam)^l
                       delta_{t+l}; V a learned value head ('learned', targets A + V) or the
                       critic-free V(s_t) = -KL_t ('neg_kl'), or 0 ('zero', for ablations).

`values_BxT[:, t]` is V(s_t), the value of the state that predicts token t, i.e. aligned exactly like
`scoring.shifted_hidden`'s h[:, t]; `value_head` maps those hidden states to values.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from opd_jax.objectives import distill, reduce


def rewards(student_logp_BxT: jax.Array, teacher_logp_BxT: jax.Array,
            mask_BxT: jax.Array) -> jax.Array:
  """reward_BxT = teacher - student log-prob of the sampled token, zero where masked."""
  diff = teacher_logp_BxT.astype(jnp.float32) - student_logp_BxT.astype(jnp.float32)
  return jnp.where(mask_BxT.astype(bool), diff, 0.0)


def opd_metrics(student_logp_BxT: jax.Array, teacher_logp_BxT: jax.Array, mask_BxT: jax.Array,
                kl_BxT: jax.Array | None = None) -> dict[str, jax.Array]:
  """`opd/teacher_gap`: token-mean r_t = student - teacher log-prob (a Monte-Carlo estimate of the
  per-token reverse KL on on-policy samples); `opd/reverse_kl`: token-mean exact KL_t when `kl_BxT`
  is given, else the same Monte-Carlo estimate."""
  gap = reduce.masked_mean(-rewards(student_logp_BxT, teacher_logp_BxT, mask_BxT), mask_BxT)
  kl = gap if kl_BxT is None else reduce.masked_mean(kl_BxT, mask_BxT)
  return {"opd/teacher_gap": gap, "opd/reverse_kl": kl}


def _reverse_scan(step, init, xs_BxT: tuple[jax.Array, ...]) -> jax.Array:
  """Runs `step(carry, x_B...) -> (carry, y_B)` right to left over T; returns y_BxT."""
  xs = tuple(x.T for x in xs_BxT)
  _, y_TxB = jax.lax.scan(step, init, xs, reverse=True)
  return y_TxB.T


def discounted(reward_BxT: jax.Array, mask_BxT: jax.Array, gamma: float) -> jax.Array:
  """A_t = sum_k gamma^k reward_{t+k} over the masked-in positions (gamma may be traced)."""
  mask = mask_BxT.astype(bool)
  reward = jnp.where(mask, reward_BxT.astype(jnp.float32), 0.0)

  def step(g_next, x):
    r, m = x
    g = jnp.where(m, r + gamma * g_next, g_next)
    return g, jnp.where(m, g, 0.0)

  return _reverse_scan(step, jnp.zeros(reward.shape[0], jnp.float32), (reward, mask))


def immediate(reward_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """A_t = reward_t (zero where masked)."""
  return jnp.where(mask_BxT.astype(bool), reward_BxT.astype(jnp.float32), 0.0)


def return_to_go(reward_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """A_t = sum_{t' >= t} reward_t'."""
  return discounted(reward_BxT, mask_BxT, 1.0)


def baseline_corrected(reward_BxT: jax.Array, mask_BxT: jax.Array, kl_BxT: jax.Array) -> jax.Array:
  """A_t = reward_t + stopgrad(KL_t), KL_t = KL(pS(.|s_t) || pT(.|s_t)) (e.g. `distill.reverse_kl`).

  Unbiased (E_{y~pS}[KL_t grad log pS(y)] = 0) and mean-zero per state. It usually lowers the
  variance of the gradient estimate, but not always: the variance-optimal baseline weights by
  |grad log pS(y)|^2, and e.g. a student confident in a token the teacher rejects can see it rise.
  """
  kl = jax.lax.stop_gradient(kl_BxT.astype(jnp.float32))
  return jnp.where(mask_BxT.astype(bool), reward_BxT.astype(jnp.float32) + kl, 0.0)


def gae(reward_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array, gamma: float,
        lam: float) -> jax.Array:
  """Generalized advantage estimation over the log-ratio rewards (GAE-OPD).

  delta_t = reward_t + gamma V(s_next) - V(s_t), A_t = delta_t + gamma lam A_next, where "next" is
  the next masked-in position and V after the last one is 0. V = 0, lam = 1 gives `discounted`;
  V = 0, gamma = 0 gives `immediate`.
  """
  mask = mask_BxT.astype(bool)
  reward = jnp.where(mask, reward_BxT.astype(jnp.float32), 0.0)
  values = jnp.where(mask, values_BxT.astype(jnp.float32), 0.0)

  def step(carry, x):
    v_next, a_next = carry
    r, v, m = x
    a = r + gamma * v_next - v + gamma * lam * a_next
    carry = (jnp.where(m, v, v_next), jnp.where(m, a, a_next))
    return carry, jnp.where(m, a, 0.0)

  zeros = jnp.zeros(reward.shape[0], jnp.float32)
  return _reverse_scan(step, (zeros, zeros), (reward, values, mask))


def value_targets(adv_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """GAE value targets (lambda-returns) A_t + V(s_t), zero where masked, no gradient."""
  target = jax.lax.stop_gradient(adv_BxT.astype(jnp.float32) + values_BxT.astype(jnp.float32))
  return jnp.where(mask_BxT.astype(bool), target, 0.0)


def init_value_head(d_model: int) -> dict[str, jax.Array]:
  """A linear value head on the student's final-normed hidden states, zero-initialised (so GAE-OPD
  starts as the V = 0 estimator): {'kernel': [D], 'bias': []} float32."""
  return {"kernel": jnp.zeros((d_model,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}


def value_head(head_params: dict[str, jax.Array], h_BxTxD: jax.Array, *,
               stop_trunk_gradient: bool = True) -> jax.Array:
  """values_BxT = h . kernel + bias (float32). By default the trunk gets no gradient from the value
  loss (`stop_trunk_gradient=True`), so the student's weights, and their geometry, move only by the
  policy objective; pass False to train a shared trunk."""
  if stop_trunk_gradient:
    h_BxTxD = jax.lax.stop_gradient(h_BxTxD)
  h = h_BxTxD.astype(jnp.float32)
  return jnp.einsum("btd,d->bt", h, head_params["kernel"].astype(jnp.float32)) + head_params["bias"]


def value_loss(values_BxT: jax.Array, returns_BxT: jax.Array, mask_BxT: jax.Array,
               mode: str = "token_mean") -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """1/2 (V - stopgrad(target))^2 aggregated by `mode`; metrics `value/mse`, `value/mean`."""
  err = values_BxT.astype(jnp.float32) - jax.lax.stop_gradient(returns_BxT.astype(jnp.float32))
  total, denom = reduce.aggregate(0.5 * err**2, mask_BxT, mode)
  metrics = {"value/mse": reduce.masked_mean(jax.lax.stop_gradient(err**2), mask_BxT),
             "value/mean": reduce.masked_mean(jax.lax.stop_gradient(values_BxT), mask_BxT)}
  return total, denom, metrics


VALUE_SOURCES = ("neg_kl", "learned", "zero")


@dataclasses.dataclass(frozen=True)
class CreditConfig:
  """Temporal credit for the PG route.

  Attributes:
    kind: one of `CREDIT_KINDS` (default 'immediate', the paper's gamma = 0).
    gamma: discount for 'discounted' and 'gae' (default 1.0).
    lam: GAE lambda (default 0.95).
    value: GAE value source, one of `VALUE_SOURCES` (default the critic-free 'neg_kl').
  """
  kind: str = "immediate"
  gamma: float = 1.0
  lam: float = 0.95
  value: str = "neg_kl"

  def __post_init__(self):
    if self.kind not in CREDIT_KINDS:
      raise ValueError(f"CreditConfig.kind {self.kind!r} is not one of {CREDIT_KINDS}")
    if self.value not in VALUE_SOURCES:
      raise ValueError(f"CreditConfig.value {self.value!r} is not one of {VALUE_SOURCES}")
    if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
      raise ValueError(f"CreditConfig.gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")


def _need(x, name: str, why: str) -> jax.Array:
  if x is None:
    raise ValueError(f"{name} is required for {why}")
  return x


def _gae_values(mask, cfg: CreditConfig, kl, values):
  if cfg.value == "neg_kl":
    return -_need(kl, "kl_BxT", "GAE with value='neg_kl'")
  if cfg.value == "learned":
    return _need(values, "values_BxT", "GAE with value='learned'")
  return jnp.zeros(mask.shape, jnp.float32)


# The single registry of credit estimators: kind -> f(reward, mask, cfg, kl, values).
_CREDIT_FNS: dict[str, Callable[..., jax.Array]] = {
    "immediate": lambda r, m, c, kl, v: immediate(r, m),
    "return_to_go": lambda r, m, c, kl, v: return_to_go(r, m),
    "discounted": lambda r, m, c, kl, v: discounted(r, m, c.gamma),
    "baseline_corrected": lambda r, m, c, kl, v: baseline_corrected(
        r, m, _need(kl, "kl_BxT", "credit kind 'baseline_corrected'")),
    "gae": lambda r, m, c, kl, v: gae(r, _gae_values(m, c, kl, v), m, c.gamma, c.lam),
}
CREDIT_KINDS = tuple(_CREDIT_FNS)


def advantages(reward_BxT: jax.Array, mask_BxT: jax.Array, cfg: CreditConfig,
               kl_BxT: jax.Array | None = None, values_BxT: jax.Array | None = None) -> jax.Array:
  """Per-token advantages (stop-gradient, zero where masked) for the credit estimator `cfg.kind`.

  `kl_BxT` (exact per-state reverse KL) is needed by 'baseline_corrected' and GAE with 'neg_kl';
  `values_BxT` by GAE with 'learned'.
  """
  adv = _CREDIT_FNS[cfg.kind](reward_BxT, mask_BxT, cfg, kl_BxT, values_BxT)
  return jax.lax.stop_gradient(adv)


# ----------------------------------------------------------------------------------------------
# CR-OPD (experimental)


@dataclasses.dataclass(frozen=True)
class CROPDConfig:
  """CR-OPD (experimental; the survey's hypothesis, exact form chosen here, see `cr_opd_token_loss`).

  Attributes:
    coef: lambda, weight of the routing term (1.0 = the freed mass is routed exactly; see below).
    teacher_min_prob: tau; v is teacher-supported if pT(v) >= tau ... (default 0.05; > 1 disables).
    teacher_top_k: ... or v is in the teacher's top-k (default 0 = criterion off).
    student_top_k: v is student-reachable if it is in the student's top-k ... (default 20; 0 off).
    student_min_prob: ... or pS(v) >= eps (default 1e-3; > 1 disables).
    temperature: divides both models' logits (a TopK teacher's log-probs are used as given).
    chunk_size: sequence positions per chunk in `cr_opd_loss`.
    mode: aggregation mode; use the surrogate's mode (and mask) so the two sums can be added.
  """
  coef: float = 1.0
  teacher_min_prob: float = 0.05
  teacher_top_k: int = 0
  student_top_k: int = 20
  student_min_prob: float = 1e-3
  temperature: float = 1.0
  chunk_size: int = 128
  mode: str = "token_mean"

  def __post_init__(self):
    if self.teacher_min_prob > 1 and self.teacher_top_k == 0:
      raise ValueError("CROPDConfig: no teacher-support criterion (teacher_min_prob > 1 and "
                       "teacher_top_k == 0)")
    if self.student_min_prob > 1 and self.student_top_k == 0:
      raise ValueError("CROPDConfig: no student-reachability criterion (student_min_prob > 1 and "
                       "student_top_k == 0)")
    if self.teacher_top_k < 0 or self.student_top_k < 0 or self.chunk_size < 1:
      raise ValueError("CROPDConfig: top-k sizes must be >= 0 and chunk_size >= 1")
    if not self.temperature > 0:
      raise ValueError(f"CROPDConfig.temperature must be > 0, got {self.temperature}")
    reduce.check_mode(self.mode)


def _top_k_member(score_xV: jax.Array, k: int) -> jax.Array:
  vocab = score_xV.shape[-1]
  if k == 0:
    return jnp.zeros(score_xV.shape, bool)
  _, ids = jax.lax.top_k(score_xV, min(k, vocab))
  return distill.ids_member_mask(ids, vocab)


def cr_opd_token_loss(student_logits_xV: jax.Array, teacher, token_ids_x: jax.Array,
                      adv_x: jax.Array, cfg: CROPDConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-state CR-OPD routing term. Returns (loss_x, active_x, set_size_x).

  Exact form. With pS, pT the student / teacher distributions at state s_t and y_t the sampled
  token:
    C_t = {v : (pT(v) >= tau or v in teacher top-k) and pT(v) > 0
               and (v in student top-k or pS(v) >= eps)} minus {y_t}
    q_t(v) = pT(v) / sum_{u in C_t} pT(u)  on C_t (0 elsewhere)
    loss_t = coef * |A_t| * ( - sum_{v in C_t} q_t(v) log pS(v) )   if A_t < 0 and C_t non-empty,
    loss_t = 0                                                          otherwise.
  The sets and q_t carry no gradient (membership and weights are computed from stopped values).
  Its gradient w.r.t. the student logits z is coef |A_t| (pS - q_t). Added to the REINFORCE term
  -A_t log pS(y_t), whose logit gradient is |A_t| (e_{y_t} - pS) for A_t < 0, with coef = 1 the sum
  is |A_t| (e_{y_t} - q_t): a descent step lowers z_{y_t}, raises z_v for every v in C_t in
  proportion to q_t, and leaves every other logit unchanged. The probability mass removed from the
  negatively rewarded token is thus routed to C_t (by teacher preference) instead of being spread
  over the whole vocabulary in proportion to pS, and to first order pS(C_t) increases.

  `teacher` is full teacher logits [..., V] or a `distill.TopK` (then pT is known, and supported,
  only on the given ids).
  """
  vocab = student_logits_xV.shape[-1]
  logp_s = distill.log_probs(student_logits_xV, cfg.temperature)
  if isinstance(teacher, distill.TopK):
    ids = jnp.clip(teacher.ids_BxTxK.astype(jnp.int32), 0, vocab - 1)
    p_k = jnp.exp(teacher.logp_BxTxK.astype(jnp.float32))
    lead = ids.shape[:-1]
    flat_ids = ids.reshape(-1, ids.shape[-1])
    rows = jnp.arange(flat_ids.shape[0])[:, None]
    p_t = jnp.zeros((flat_ids.shape[0], vocab), jnp.float32).at[rows, flat_ids].set(
        p_k.reshape(flat_ids.shape)).reshape(*lead, vocab)
  else:
    p_t = jnp.exp(distill.log_probs(teacher, cfg.temperature))
  p_t = jax.lax.stop_gradient(p_t)
  p_s = jax.lax.stop_gradient(jnp.exp(logp_s))
  supported = ((p_t >= cfg.teacher_min_prob) | _top_k_member(p_t, cfg.teacher_top_k)) & (p_t > 0)
  reachable = (p_s >= cfg.student_min_prob) | _top_k_member(p_s, cfg.student_top_k)
  not_sampled = jnp.arange(vocab) != token_ids_x[..., None].astype(jnp.int32)
  in_set = supported & reachable & not_sampled
  weight = jnp.where(in_set, p_t, 0.0)
  total = weight.sum(-1)
  q = weight / jnp.where(total > 0, total, 1.0)[..., None]
  adv = jax.lax.stop_gradient(adv_x.astype(jnp.float32))
  active = (adv < 0) & (total > 0)
  cross_entropy = -jnp.sum(jnp.where(in_set, q * logp_s, 0.0), axis=-1)
  loss = jnp.where(active, cfg.coef * jnp.abs(adv) * cross_entropy, 0.0)
  return loss, active, in_set.sum(-1).astype(jnp.float32)


def cr_opd_loss(student_logits_fn: Callable[[jax.Array], jax.Array], student_h_BxTxD: jax.Array,
                teacher: distill.Teacher, tokens_BxT: jax.Array, adv_BxT: jax.Array,
                mask_BxT: jax.Array, cfg: CROPDConfig
                ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """CR-OPD term over a batch, chunked over T like `distill.divergence_loss` (teacher: full logits,
  `(logits_fn, h)` pair or `TopK`). Add `loss_sum` to the surrogate's (same mode and mask).

  Metrics: `cr/loss` (token mean), `cr/active_frac` (fraction of masked tokens where the term is
  active), `cr/set_size` (mean |C_t| over active tokens).
  """
  fn = lambda s, t, y, a: cr_opd_token_loss(s, t, y, a, cfg)  # noqa: E731
  loss_BxT, active_BxT, size_BxT = distill.chunked_token_map(
      fn, student_logits_fn, student_h_BxTxD, teacher, mask_BxT, cfg.chunk_size,
      extras=(tokens_BxT, jax.lax.stop_gradient(adv_BxT)))
  total, denom = reduce.aggregate(loss_BxT, mask_BxT, cfg.mode)
  active = active_BxT & mask_BxT.astype(bool)
  metrics = {"cr/loss": reduce.masked_mean(jax.lax.stop_gradient(loss_BxT), mask_BxT),
             "cr/active_frac": reduce.masked_mean(active.astype(jnp.float32), mask_BxT),
             "cr/set_size": reduce.masked_mean(size_BxT, active)}
  return total, denom, metrics

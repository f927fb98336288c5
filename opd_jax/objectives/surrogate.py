"""Policy-gradient surrogates over sampled tokens: REINFORCE, importance-sampled, PPO-clip.

Per token, with ratio = exp(logp_new - stopgrad(logp_old)) and A = stopgrad(adv):
  reinforce  objective = logp_new * A
  is         objective = ratio * A                                  (no clipping)
  ppo_clip   objective = min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A)
and loss = -objective, aggregated by `mode`. On-policy (logp_old = logp_new) all three have the
same gradient A grad log pi. In PPO-clip the clipped branch is selected explicitly where it is the
minimum (A > 0 and ratio > 1 + eps_high, or A < 0 and ratio < 1 - eps_low), so the gradient there is
exactly zero (this equals `min` except on exact ties, where it keeps the unclipped gradient).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from opd_jax.objectives import reduce

PG_KINDS = ("reinforce", "is", "ppo_clip")


@dataclasses.dataclass(frozen=True)
class PGConfig:
  """Surrogate settings.

  Attributes:
    kind: one of `PG_KINDS` (default 'ppo_clip').
    eps_low: lower clip 1 - eps_low (default 0.2).
    eps_high: upper clip 1 + eps_high (default 0.28, DAPO clip-higher, as the paper's RLVR runs;
      the paper does not state OPD's clip range; set eps_high = eps_low for symmetric PPO, or 1.0
      for the off-policy control's "clipping effectively off").
    mode: aggregation mode (`reduce.AGGREGATION_MODES`, default 'token_mean').
  """
  kind: str = "ppo_clip"
  eps_low: float = 0.2
  eps_high: float = 0.28
  mode: str = "token_mean"

  def __post_init__(self):
    if self.kind not in PG_KINDS:
      raise ValueError(f"PGConfig.kind {self.kind!r} is not one of {PG_KINDS}")
    if not (0.0 <= self.eps_low <= 1.0 and self.eps_high >= 0.0):
      raise ValueError(f"PGConfig.eps_low must be in [0, 1] and eps_high >= 0, got "
                       f"{self.eps_low}, {self.eps_high}")
    reduce.check_mode(self.mode)


def pg_loss(logp_new_BxT: jax.Array, logp_old_BxT: jax.Array, adv_BxT: jax.Array,
            mask_BxT: jax.Array, cfg: PGConfig
            ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Surrogate loss; gradient flows only through `logp_new_BxT`.

  Returns (loss_sum, denominator, metrics) with metrics `pg/clip_frac` (fraction of masked tokens
  on the clipped branch; 0 unless 'ppo_clip'), `pg/ratio_mean`, `pg/adv_mean`, and `pg/approx_kl`
  (token mean of the k3 estimate of KL(pi_old || pi_new)).
  """
  mask = mask_BxT.astype(bool)
  logp_new = logp_new_BxT.astype(jnp.float32)
  logp_old = jax.lax.stop_gradient(logp_old_BxT.astype(jnp.float32))
  adv = jax.lax.stop_gradient(adv_BxT.astype(jnp.float32))
  log_ratio = jnp.where(mask, logp_new - logp_old, 0.0)
  ratio = jnp.exp(log_ratio)
  clipped = jnp.zeros(mask.shape, bool)
  if cfg.kind == "reinforce":
    objective = logp_new * adv
  elif cfg.kind == "is":
    objective = ratio * adv
  else:
    # Decided in log space, and the unclipped branch exponentiates only the tokens it keeps: a
    # ratio that overflows float32 on the clipped branch would otherwise send 0 * inf = NaN back
    # through the branch `where` does not pick.
    clipped = (((adv > 0) & (log_ratio > jnp.log1p(cfg.eps_high)))
               | ((adv < 0) & (log_ratio < jnp.log1p(-cfg.eps_low))))
    kept_ratio = jnp.exp(jnp.where(clipped, 0.0, log_ratio))
    clipped_ratio = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high))
    objective = jnp.where(clipped, clipped_ratio * adv, kept_ratio * adv)
  loss_BxT = jnp.where(mask, -objective, 0.0)
  total, denom = reduce.aggregate(loss_BxT, mask, cfg.mode)
  sg_log_ratio = jax.lax.stop_gradient(log_ratio)
  metrics = {
      "pg/clip_frac": reduce.masked_mean((clipped & mask).astype(jnp.float32), mask),
      "pg/ratio_mean": reduce.masked_mean(jax.lax.stop_gradient(ratio), mask),
      "pg/adv_mean": reduce.masked_mean(adv, mask),
      "pg/approx_kl": reduce.masked_mean(jnp.expm1(sg_log_ratio) - sg_log_ratio, mask),
  }
  return total, denom, metrics

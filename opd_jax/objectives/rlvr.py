"""RLVR: GRPO group advantages with zero-variance filtering, optional KL-to-reference, OPD mixing.

The PPO surrogate with DAPO clip-higher (eps_low 0.2, eps_high 0.28) is `surrogate.pg_loss` with
`PGConfig(kind='ppo_clip')`; this module only produces advantages and the optional KL penalty.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from opd_jax.objectives import reduce


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """GRPO advantages.

  Attributes:
    group_size: G samples per prompt; groups are consecutive blocks of G rows. Not a config key
      of a training run: the run plan fills it from `rollout.group_size` (one copy of the knob).
    normalize_std: divide by the group std (False: Dr.GRPO-style mean-centering only).
    eps: added to the std before dividing.
    ddof: std degrees of freedom (default 1, the unbiased std of torch's `.std()` used by TRL and
      veRL; 0 for the population std).

  The KL-to-reference penalty is a knob of the PG step (`train.steps.PGStepConfig.kl_coef` /
  `kl_kind`), not of the advantages.
  """
  group_size: int = dataclasses.field(default=8, metadata={"derived": "rollout.group_size"})
  normalize_std: bool = True
  eps: float = 1e-6
  ddof: int = 1

  def __post_init__(self):
    if self.group_size < 1:
      raise ValueError(f"GRPOConfig.group_size must be >= 1, got {self.group_size}")
    if self.ddof not in (0, 1):
      raise ValueError(f"GRPOConfig.ddof must be 0 or 1, got {self.ddof}")


def grpo_advantages(rewards_B: jax.Array, group_size: int, normalize_std: bool = True,
                    eps: float = 1e-6, *, ddof: int = 1, valid_B: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """GRPO advantages (R - mean_group) / (std_group + eps) (or R - mean_group).

  Groups are consecutive blocks of `group_size` rows. A group whose rewards are all equal (zero
  variance, detected exactly) is filtered: its rows get advantage 0 and keep False.

  Returns:
    (adv_B float32, keep_B bool, metrics) with metrics `rlvr/reward_mean`,
    `rlvr/filtered_groups` (count of zero-variance groups), `rlvr/kept_frac` (fraction of rows
    kept), over the rows of `valid_B` (default: all; filler rows that pad a partial last batch
    come in whole groups).
  """
  (b,) = rewards_B.shape
  if b % group_size:
    raise ValueError(f"rewards_B has {b} rows, not a multiple of group_size={group_size}")
  r_GxN = rewards_B.astype(jnp.float32).reshape(b // group_size, group_size)
  mean_G = r_GxN.mean(axis=1, keepdims=True)
  centered = r_GxN - mean_G
  varied_G = (r_GxN.max(axis=1) > r_GxN.min(axis=1))[:, None]
  if normalize_std:
    dof = max(group_size - ddof, 1)
    std_G = jnp.sqrt((centered**2).sum(axis=1, keepdims=True) / dof)
    centered = centered / (std_G + eps)
  keep_GxN = jnp.broadcast_to(varied_G, r_GxN.shape)
  adv_B = jnp.where(keep_GxN, centered, 0.0).reshape(b)
  valid = jnp.ones(b, bool) if valid_B is None else valid_B.astype(bool)
  valid_G = valid.reshape(b // group_size, group_size).all(axis=1)[:, None]
  rows = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
  metrics = {"rlvr/reward_mean": jnp.where(valid, rewards_B.astype(jnp.float32), 0.0).sum() / rows,
             "rlvr/filtered_groups": (~varied_G & valid_G).sum().astype(jnp.float32),
             "rlvr/kept_frac": (keep_GxN.reshape(b) & valid).sum().astype(jnp.float32) / rows}
  return adv_B, keep_GxN.reshape(b), metrics


def broadcast_to_tokens(adv_B: jax.Array, loss_mask_BxT: jax.Array) -> jax.Array:
  """Sequence advantage on every loss-mask token, zero elsewhere."""
  return jnp.where(loss_mask_BxT.astype(bool), adv_B.astype(jnp.float32)[:, None], 0.0)


KL_KINDS = ("k1", "k3")


def kl_penalty(logp_BxT: jax.Array, ref_logp_BxT: jax.Array, kind: str) -> jax.Array:
  """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi, differentiable in `logp`.

  k1 = logp - ref_logp; k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 (>= 0, the GRPO choice).
  Aggregate it with the surrogate's mask and mode and add kl_coef times it to the loss.
  """
  if kind not in KL_KINDS:
    raise ValueError(f"kl_penalty kind {kind!r} is not one of {KL_KINDS}")
  log_r = ref_logp_BxT.astype(jnp.float32) - logp_BxT.astype(jnp.float32)
  if kind == "k1":
    return -log_r
  return jnp.expm1(log_r) - log_r


def mix_advantages(a_opd_BxT: jax.Array, a_rlvr_BxT: jax.Array, alpha: float) -> jax.Array:
  """alpha * A_OPD + (1 - alpha) * A_RLVR on raw advantages (no renormalisation); alpha = 1 and 0
  return the pure OPD and pure RLVR advantages exactly."""
  a_opd = a_opd_BxT.astype(jnp.float32)
  a_rlvr = a_rlvr_BxT.astype(jnp.float32)
  if isinstance(alpha, (int, float)):
    if not 0.0 <= alpha <= 1.0:
      raise ValueError(f"mix_advantages alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:
      return a_opd
    if alpha == 0.0:
      return a_rlvr
  return alpha * a_opd + (1.0 - alpha) * a_rlvr

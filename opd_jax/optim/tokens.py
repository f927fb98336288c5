"""Token sparsification as optax transforms over per-token signals (the paper's control experiment).

The "updates" these transforms see are per-token advantage / signal pytrees whose leaves are
[B, T] (or [B, T, ...]) arrays aligned with `tokens_BxT`; the per-token log-ratio and the loss mask
arrive as keyword extra args:

    tx = optax.chain(top_kl_retention(0.5), optax.scale(2.0))
    state = tx.init(adv_BxT)
    adv_BxT, state = tx.update(adv_BxT, state, signal=r_BxT, mask=loss_mask_BxT)

For each response b with T_b = sum_t mask[b, t] real tokens, exactly k_b = ceil(rho * T_b) tokens
are kept (0 when T_b = 0); kept values are multiplied by T_b / k_b (so the rescaled keep-mask sums to
T_b, the paper's T / sum(m)), all other entries become 0. Padding and post-EOS tokens (mask False)
are never kept.

  * `top_kl_retention(rho)`: keeps the k_b tokens with the largest *signed* `signal` (pass
    r_t = log pS - log pT, so the kept tokens are where the student is most over-confident relative
    to the teacher); ties go to the earlier position.
  * `random_retention(rho, seed)`: keeps a uniformly random subset of k_b tokens; the base key is
    in the state and every update folds in a counter (reproducible per seed and call index).

`rho` may be a traced value (e.g. under `optax.inject_hyperparams`): k_b is then computed on
device as ceil(rho * T_b) in float32 with a 1e-6 relative tolerance (rho * T_b within 1e-6
relative above an integer n counts as n, so that 0.3 * 10 keeps 3, not 4); wrap with
`optax.inject_hyperparams(..., hyperparam_dtype=jnp.float32)`, since optax otherwise stores rho in
the updates' dtype and bfloat16 signals would turn 0.3 into 0.30078125. The transforms hold no
shape-dependent state, so batch shapes may vary between calls. Every leaf of the updates is
sparsified with the same per-token selection; to sparsify only some leaves, wrap the transform in
`optax.masked(tx, leaf_mask)` (the `mask=` extra arg of `update` is the loss mask, not a leaf
mask). `kept_frac(opt_state)` reads the
fraction of real tokens kept by the last update, as the metric `tokens/kept_frac`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class RetentionState(NamedTuple):
  """State of `top_kl_retention`: the fraction of real tokens the last update kept."""
  kept_frac: jax.Array


class RandomRetentionState(NamedTuple):
  """State of `random_retention`: base key (uint32[2]), update counter, last kept fraction."""
  key: jax.Array
  count: jax.Array
  kept_frac: jax.Array


def retention_counts(mask_BxT: jax.Array, rho) -> tuple[jax.Array, jax.Array]:
  """(T_B, k_B) int32: real tokens per row and ceil(rho * T_b) tokens to keep (rho may be traced)."""
  length_B = mask_BxT.astype(bool).sum(axis=-1).astype(jnp.int32)
  rho = jnp.asarray(rho, jnp.float32)
  target = rho * length_B.astype(jnp.float32) * (1.0 - 1e-6)
  keep_B = jnp.clip(jnp.ceil(target).astype(jnp.int32), 0, length_B)
  return length_B, keep_B


def keep_top(score_BxT: jax.Array, mask_BxT: jax.Array, keep_B: jax.Array) -> jax.Array:
  """Boolean [B, T]: per row, the keep_B[b] masked-in positions with the largest score (ties to the
  earlier position); masked-out positions are never selected."""
  mask = mask_BxT.astype(bool)
  score = jnp.where(mask, score_BxT.astype(jnp.float32), 0.0)
  order_BxT = jnp.lexsort((-score, ~mask), axis=-1)  # real tokens first, then by score descending
  rank_BxT = jnp.argsort(order_BxT, axis=-1)
  return (rank_BxT < keep_B[:, None]) & mask


def _check_rho(rho):
  if isinstance(rho, (int, float)) and not 0.0 <= rho <= 1.0:
    raise ValueError(f"token retention rho must be in [0, 1], got {rho}")


def _check_inputs(who: str, updates: Any, mask, signal=None, needs_signal: bool = False):
  if mask is None or (needs_signal and signal is None):
    missing = "mask" if mask is None else "signal"
    raise ValueError(f"{who}.update needs the extra arg {missing}= (a [B, T] array)")
  if signal is not None and needs_signal and signal.shape != mask.shape:
    raise ValueError(f"{who}: signal {signal.shape} and mask {mask.shape} differ in shape")
  for leaf in jax.tree.leaves(updates):
    if leaf.shape[:2] != mask.shape:
      raise ValueError(f"{who}: update leaf of shape {leaf.shape} does not start with the mask's "
                       f"[B, T] = {mask.shape}")


def _apply(updates: Any, keep_BxT: jax.Array, length_B, keep_B):
  """Zeroes dropped tokens and rescales kept ones by T_b / k_b in every leaf."""
  scale_B = jnp.where(keep_B > 0, length_B.astype(jnp.float32) / jnp.maximum(keep_B, 1), 0.0)
  factor_BxT = jnp.where(keep_BxT, scale_B[:, None], 0.0)

  def one(leaf):
    factor = factor_BxT.reshape(factor_BxT.shape + (1,) * (leaf.ndim - 2))
    return (leaf * factor).astype(leaf.dtype)

  kept_frac = keep_BxT.sum() / jnp.maximum(length_B.sum(), 1)
  return jax.tree.map(one, updates), kept_frac.astype(jnp.float32)


def top_kl_retention(rho: float) -> optax.GradientTransformationExtraArgs:
  """Keeps ceil(rho * T_b) tokens per response with the largest signed `signal` (r_t), rescaled.

  Extra args of `update`: `signal` ([B, T] per-token log-ratio r_t) and `mask` ([B, T] loss mask).
  """
  _check_rho(rho)

  def init_fn(params):
    del params
    return RetentionState(kept_frac=jnp.ones((), jnp.float32))

  def update_fn(updates, state, params=None, *, signal=None, mask=None, **extra_args):
    del state, params, extra_args
    _check_inputs("top_kl_retention", updates, mask, signal, needs_signal=True)
    mask = mask.astype(bool)
    length_B, keep_B = retention_counts(mask, rho)
    keep_BxT = keep_top(signal, mask, keep_B)
    updates, frac = _apply(updates, keep_BxT, length_B, keep_B)
    return updates, RetentionState(kept_frac=frac)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def random_retention(rho: float, seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Keeps a uniformly random ceil(rho * T_b) tokens per response, rescaled.

  Extra arg of `update`: `mask` ([B, T] loss mask); `signal` is accepted and ignored (so the two
  transforms are drop-in swaps). The key for update n is fold_in(PRNGKey(seed), n).
  """
  _check_rho(rho)

  def init_fn(params):
    del params
    return RandomRetentionState(key=jax.random.PRNGKey(seed), count=jnp.zeros((), jnp.int32),
                                kept_frac=jnp.ones((), jnp.float32))

  def update_fn(updates, state, params=None, *, signal=None, mask=None, **extra_args):
    del params, extra_args
    _check_inputs("random_retention", updates, mask, signal)
    mask = mask.astype(bool)
    key = jax.random.fold_in(state.key, state.count)
    score_BxT = jax.random.uniform(key, mask.shape, jnp.float32)
    length_B, keep_B = retention_counts(mask, rho)
    keep_BxT = keep_top(score_BxT, mask, keep_B)
    updates, frac = _apply(updates, keep_BxT, length_B, keep_B)
    return updates, RandomRetentionState(key=state.key, count=optax.safe_increment(state.count),
                                         kept_frac=frac)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def kept_frac(opt_state: Any) -> dict[str, jax.Array]:
  """{'tokens/kept_frac': fraction of real tokens kept by the last update} from a state holding a
  retention transform anywhere inside (chain, inject_hyperparams, ...)."""
  values = optax.tree_utils.tree_get_all_with_path(opt_state, "kept_frac")
  if not values:
    raise ValueError("kept_frac: the optimizer state holds no token retention transform")
  if len(values) > 1:
    raise ValueError(f"kept_frac: found {len(values)} retention transforms; read them one by one")
  return {"tokens/kept_frac": values[0][1]}

"""Loss aggregation: per-token values -> (sum, denominator) that aggregate exactly.

Every objective returns `(loss_sum, denominator, metrics)`. The full-batch loss is
`sum(loss_sum over micro-batches and hosts) / sum(denominator over micro-batches and hosts)`, and for
every mode below that equals the value the mode defines on the concatenated batch (the per-sequence
parts of a mode never straddle micro-batches, since micro-batches split the batch dimension).

Modes (`AGGREGATION_MODES` is the single list of valid names):

* ``token_mean``: sum_{b,t} m v / sum_{b,t} m (every real token weighs the same; DAPO's
  "token-level" loss). Denominator: number of masked-in tokens.
* ``seq_mean_token_sum``: mean over sequences of sum_t m v (a sequence weighs by its length; Dr.GRPO
  / the "sequence-mean of token-sums" of the paper). Denominator: number of sequences with at least
  one masked-in token.
* ``seq_mean_token_mean``: mean over sequences of (sum_t m v / sum_t m) (every sequence weighs the
  same; the original GRPO loss). Denominator: number of sequences with at least one masked-in token.

Sequences whose mask is empty contribute nothing to either the sum or the denominator. A batch
with no masked-in tokens yields (0, 0); use `safe_ratio` to finish it (it returns 0 then).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATION_MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")


def check_mode(mode: str) -> str:
  """Returns `mode` if it is an aggregation mode, else raises ValueError naming the valid ones."""
  if mode not in AGGREGATION_MODES:
    raise ValueError(f"aggregation mode {mode!r} is not one of {AGGREGATION_MODES}")
  return mode


def aggregate(values_BxT: jax.Array, mask_BxT: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
  """(sum, denominator) of `values_BxT` over `mask_BxT` for an aggregation `mode` (float32).

  Masked-out entries are ignored even if they hold inf/nan (they are selected away, not multiplied).
  """
  check_mode(mode)
  if values_BxT.shape != mask_BxT.shape:
    raise ValueError(f"values_BxT {values_BxT.shape} and mask_BxT {mask_BxT.shape} differ in shape")
  mask = mask_BxT.astype(bool)
  values = jnp.where(mask, values_BxT.astype(jnp.float32), 0.0)
  if mode == "token_mean":
    return values.sum(), mask.sum().astype(jnp.float32)
  tokens_B = mask.sum(axis=-1).astype(jnp.float32)
  has_tokens_B = tokens_B > 0
  n_seq = has_tokens_B.sum().astype(jnp.float32)
  seq_sum_B = values.sum(axis=-1)
  if mode == "seq_mean_token_sum":
    return seq_sum_B.sum(), n_seq
  seq_mean_B = jnp.where(has_tokens_B, seq_sum_B / jnp.maximum(tokens_B, 1.0), 0.0)
  return seq_mean_B.sum(), n_seq


def safe_ratio(total: jax.Array, denominator: jax.Array) -> jax.Array:
  """total / denominator, and 0 where the denominator is 0 (an empty batch)."""
  return jnp.where(denominator > 0, total / jnp.maximum(denominator, 1e-30), 0.0)


def masked_mean(values_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Token mean of `values_BxT` over `mask_BxT` (0 for an empty mask); for metrics."""
  return safe_ratio(*aggregate(values_BxT, mask_BxT, "token_mean"))

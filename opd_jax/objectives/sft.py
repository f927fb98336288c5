"""Supervised fine-tuning: token negative log-likelihood on demonstration (response) tokens.

Packed rows (`segment_ids_BxT`, 0 = padding, 1.. = the example within the row) aggregate per
example: the sequence-level modes of `objectives.reduce` treat each (row, segment) as one sequence,
so a packed batch gives the same (sum, denominator) as its examples one per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opd_jax.objectives import reduce


def _aggregate_segments(values_BxT, mask_BxT, segment_ids_BxT, mode: str):
  """`reduce.aggregate` with every (row, segment) as one sequence."""
  if mode == "token_mean":
    return reduce.aggregate(values_BxT, mask_BxT, mode)
  reduce.check_mode(mode)
  b, t = values_BxT.shape
  mask = mask_BxT.astype(bool) & (segment_ids_BxT > 0)
  values = jnp.where(mask, values_BxT.astype(jnp.float32), 0.0)
  # One id per (row, segment); a row holds at most t segments, so ids stay below b * (t + 1).
  ids = (jnp.arange(b, dtype=jnp.int32)[:, None] * (t + 1) + segment_ids_BxT).reshape(-1)
  n = b * (t + 1)
  seq_sum = jax.ops.segment_sum(values.reshape(-1), ids, num_segments=n)
  seq_tokens = jax.ops.segment_sum(mask.reshape(-1).astype(jnp.float32), ids, num_segments=n)
  has_tokens = seq_tokens > 0
  n_seq = has_tokens.sum().astype(jnp.float32)
  if mode == "seq_mean_token_sum":
    return seq_sum.sum(), n_seq
  return jnp.where(has_tokens, seq_sum / jnp.maximum(seq_tokens, 1.0), 0.0).sum(), n_seq


def sft_loss(logp_BxT: jax.Array, loss_mask_BxT: jax.Array, mode: str = "token_mean",
             segment_ids_BxT: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """NLL of the demonstrated tokens.

  Args:
    logp_BxT: aligned log-probs of `tokens_BxT` under the model (scoring.py convention).
    loss_mask_BxT: response tokens that are targets (never prompt or pad).
    mode: aggregation mode (`reduce.AGGREGATION_MODES`); the default token mean is the usual SFT loss.
    segment_ids_BxT: packed rows (module docstring): sequence modes aggregate per segment.

  Returns:
    (loss_sum, denominator, metrics) with metrics `sft/nll` (token-mean NLL of this batch, whatever
    the mode) and `sft/tokens` (number of target tokens).
  """
  nll_BxT = -logp_BxT.astype(jnp.float32)
  if segment_ids_BxT is None:
    total, denom = reduce.aggregate(nll_BxT, loss_mask_BxT, mode)
  else:
    total, denom = _aggregate_segments(nll_BxT, loss_mask_BxT, segment_ids_BxT, mode)
  nll_sum, n_tokens = reduce.aggregate(nll_BxT, loss_mask_BxT, "token_mean")
  metrics = {"sft/nll": reduce.safe_ratio(nll_sum, n_tokens), "sft/tokens": n_tokens}
  return total, denom, metrics

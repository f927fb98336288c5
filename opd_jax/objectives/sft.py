"""Supervised fine-tuning: token negative log-likelihood on demonstration (response) tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opd_jax.objectives import reduce


def sft_loss(logp_BxT: jax.Array, loss_mask_BxT: jax.Array, mode: str = "token_mean"
             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """NLL of the demonstrated tokens.

  Args:
    logp_BxT: aligned log-probs of `tokens_BxT` under the model (scoring.py convention).
    loss_mask_BxT: response tokens that are targets (never prompt or pad).
    mode: aggregation mode (`reduce.AGGREGATION_MODES`); the default token mean is the usual SFT loss.

  Returns:
    (loss_sum, denominator, metrics) with metrics `sft/nll` (token-mean NLL of this batch, whatever
    the mode) and `sft/tokens` (number of target tokens).
  """
  nll_BxT = -logp_BxT.astype(jnp.float32)
  total, denom = reduce.aggregate(nll_BxT, loss_mask_BxT, mode)
  nll_sum, n_tokens = reduce.aggregate(nll_BxT, loss_mask_BxT, "token_mean")
  metrics = {"sft/nll": reduce.safe_ratio(nll_sum, n_tokens), "sft/tokens": n_tokens}
  return total, denom, metrics

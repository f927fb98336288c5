"""Per-token log-probs of given tokens, chunked so that [B, T, V] float32 is never materialised.

This is how the teacher scores student rollouts and how losses get per-token log-probs. Alignment
(the project-wide convention): every output is aligned with `tokens_BxT`,

    logp_BxT[:, t] = log p(tokens[:, t] | tokens[:, :t])        (logp[:, 0] = 0)

i.e. position t holds the distribution computed from the hidden state at t - 1. Shifting happens
here, once. A position whose predecessor is padding (t = 0, the first real token of a left-padded
row) has no context, so it gets logp 0 (and a zero hidden state in `shifted_hidden`), as do
positions where `mask_BxT` is False.

Packed rows: every function takes an optional `segment_ids_BxT` (0 = padding, 1.. = the sequence
within the row; see `transformer.py`). Attention then stays within a segment, positions restart,
and the first token of each segment has no context (logp 0, zero hidden state), exactly as if each
segment were scored alone. Without segment ids nothing changes.

Temperature divides the logits before the log-softmax (log-softmax(logits / temperature)). A
Python-number temperature is a static argument of the jitted scorers (no transfer per call).

Multi-host: nothing here fetches device values. Token ids are range-checked only for numpy inputs;
validate host batches with `check_tokens_host` before they are put on devices.

Two ways in:
  * `token_logprobs` / `topk_logprobs` (scoring, e.g. the teacher or pi_old): the forward pass runs
    over the sequence in chunks of `chunk_size` positions through the KV cache, and each chunk's
    hidden states are unembedded and reduced at once. Neither the [B, T, V] logits nor the
    [B, H, T, T] attention scores of a full-length forward are ever materialised: peak memory is
    the params + the KV cache + one [B, chunk, V] logits block + one chunk's [B, H, chunk, S]
    attention scores, S the filled cache prefix rounded up to `ModelConfig.cache_block`. Differentiable, but the backward
    pass of this path keeps one cache per chunk: inside a loss use the next route.
  * `shifted_hidden` + `logprobs_from_hidden` (inside a loss): one ordinary forward pass, then the
    unembedding + log-softmax in sequence chunks, each rematerialised in the backward pass
    (`jax.checkpoint`), so the backward pass also never holds [B, T, V].

`chunk_size` (default `DEFAULT_CHUNK` = 64 positions) bounds the [B, chunk, V] float32 block:
8 x 64 x 151,936 x 4 bytes = 0.29 GiB (scoring [8, 2048] with the `small` body peaks at ~1.5 GiB
of RSS, see bench/scoring.py). Lower it for larger batches; raise it when memory allows (fewer
chunks = fewer passes over the KV cache).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import trace_cache
from opd_jax.models import sharding
from opd_jax.models import transformer

DEFAULT_CHUNK = 64

LogitsFn = Callable[[jax.Array], jax.Array]


# -- helpers --------------------------------------------------------------------------------------
def _check_batch(tokens_BxT, mask_BxT=None, vocab_size=None):
  """Shape checks (always); token-range checks only when `tokens_BxT` is a numpy array (a
  jax.Array is never fetched: validate host batches with `check_tokens_host` before device_put)."""
  if jnp.ndim(tokens_BxT) != 2:
    raise ValueError(f"tokens_BxT must be 2-D [batch, length], got shape {jnp.shape(tokens_BxT)}")
  if mask_BxT is not None and jnp.shape(mask_BxT) != jnp.shape(tokens_BxT):
    raise ValueError(f"mask_BxT shape {jnp.shape(mask_BxT)} != tokens_BxT shape "
                     f"{jnp.shape(tokens_BxT)}")
  if vocab_size is not None and isinstance(tokens_BxT, np.ndarray):
    check_tokens_host(tokens_BxT, vocab_size)


def check_tokens_host(tokens_BxT: np.ndarray, vocab_size: int, mask_BxT=None) -> None:
  """Validates a host (numpy) token batch before it is put on devices: 2-D, the mask (if given)
  of the same shape, every id in [0, vocab_size). Raises ValueError naming the problem."""
  if isinstance(tokens_BxT, jax.Array) or isinstance(mask_BxT, jax.Array):
    raise TypeError("check_tokens_host takes host (numpy) arrays; validate before device_put")
  _check_batch(tokens_BxT, mask_BxT)
  toks = np.asarray(tokens_BxT)
  if toks.size and (toks.min() < 0 or toks.max() >= vocab_size):
    raise ValueError(f"tokens_BxT has ids in [{toks.min()}, {toks.max()}], outside the model's "
                     f"vocabulary [0, {vocab_size})")


def _temperature_args(temperature):
  """(traced, static) temperature for the jitted scorers: a Python number becomes a static
  argument (no host-to-device transfer per call); a jax value (e.g. a tracer) stays traced."""
  if isinstance(temperature, (jax.Array, np.ndarray)):
    return temperature, None
  return None, float(temperature)


def _valid_BxT(mask_BxT, segment_ids_BxT=None) -> jax.Array:
  """Positions with a real token whose predecessor is also real (t = 0 is never valid) and, in
  packed rows, of the same segment."""
  mask_BxT = mask_BxT.astype(bool)
  prev = jnp.pad(mask_BxT[:, :-1], ((0, 0), (1, 0)))
  if segment_ids_BxT is not None:
    seg = jnp.asarray(segment_ids_BxT)
    prev = prev & jnp.pad(seg[:, 1:] == seg[:, :-1], ((0, 0), (1, 0)))
  return mask_BxT & prev


def _check_segments(tokens_BxT, segment_ids_BxT):
  if segment_ids_BxT is not None and jnp.shape(segment_ids_BxT) != jnp.shape(tokens_BxT):
    raise ValueError(f"segment_ids_BxT shape {jnp.shape(segment_ids_BxT)} != tokens_BxT shape "
                     f"{jnp.shape(tokens_BxT)}")


def _pad_to(x, length, value=0):
  extra = length - x.shape[1]
  if extra == 0:
    return x
  widths = [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)
  return jnp.pad(x, widths, constant_values=value)


def _to_chunks(x, n, c):
  """[B, n*c, ...] -> [n, B, c, ...]."""
  b = x.shape[0]
  return jnp.swapaxes(x.reshape((b, n, c) + x.shape[2:]), 0, 1)


def _from_chunks(x, length):
  """[n, B, c, ...] -> [B, length, ...]."""
  n, b, c = x.shape[:3]
  return jnp.swapaxes(x, 0, 1).reshape((b, n * c) + x.shape[3:])[:, :length]


def _chunk_logp(logits_fn, temperature, h_BxCxD, tokens_BxC):
  logits = logits_fn(h_BxCxD).astype(jnp.float32) / temperature
  lse = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, tokens_BxC[..., None], axis=-1)[..., 0]
  return target - lse


def _chunk_topk(logits_fn, temperature, k, h_BxCxD):
  logits = logits_fn(h_BxCxD).astype(jnp.float32) / temperature
  lse = jax.nn.logsumexp(logits, axis=-1)
  vals, ids = jax.lax.top_k(logits, k)
  return ids.astype(jnp.int32), vals - lse[..., None]


# -- the differentiable route ---------------------------------------------------------------------
def unembed_fn(graphdef, params, after=None) -> LogitsFn:
  """h_BxCxD -> float32 logits_BxCxV with the model's (tied or untied) output matrix.

  `after`: the trunk's hidden states. Where programs order their collectives (multi-process
  CPU, `sharding.orders_collectives`), the output matrix is then gathered whole over the batch once
  those are computed (`sharding.gathered_after`): one gather, after the trunk's layer scan and
  before the backward pass reads it, instead of gathers that race the scans."""
  model = transformer.merge(graphdef, params)
  w_DxV = model.unembed_matrix()
  if after is not None:
    w_DxV = sharding.gathered_after(after, w_DxV, ("embed", "vocab"))
  cfg = model.cfg
  return lambda h_BxCxD: transformer.unembed(h_BxCxD, w_DxV, cfg)


def shifted_hidden(graphdef, params, tokens_BxT, mask_BxT, segment_ids_BxT=None, *,
                   return_router_logits: bool = False):
  """Final-normed hidden states aligned with the tokens they predict.

  h[:, t] is the hidden state at t - 1 (which predicts token t); h[:, 0] = 0, and h[:, t] = 0
  wherever token t - 1 is padding (or, in packed rows, of another segment). One ordinary forward
  pass (differentiable). With `return_router_logits=True` returns (h, router logits [L, B, T, E]
  of a mixture-of-experts model, unshifted, or None for a dense one) for
  `transformer.load_balancing_loss`.
  """
  _check_batch(tokens_BxT, mask_BxT)
  _check_segments(tokens_BxT, segment_ids_BxT)
  model = transformer.merge(graphdef, params)
  mask_BxT = jnp.asarray(mask_BxT).astype(bool)
  h, _, router_logits = model.hidden(tokens_BxT, mask_BxT, segment_ids_BxT=segment_ids_BxT,
                                     return_router_logits=True)
  prev_real = jnp.pad(mask_BxT[:, :-1], ((0, 0), (1, 0)))
  if segment_ids_BxT is not None:
    seg = jnp.asarray(segment_ids_BxT)
    prev_real = prev_real & jnp.pad(seg[:, 1:] == seg[:, :-1], ((0, 0), (1, 0)))
  h_prev = jnp.pad(h[:, :-1], ((0, 0), (1, 0), (0, 0)))
  h_prev = jnp.where(prev_real[..., None], h_prev, jnp.zeros((), h.dtype))
  return (h_prev, router_logits) if return_router_logits else h_prev


def logprobs_from_hidden(h_BxTxD, logits_fn: LogitsFn, tokens_BxT, *, temperature=1.0,
                         chunk_size: int = DEFAULT_CHUNK) -> jax.Array:
  """log-softmax(logits_fn(h) / temperature) gathered at `tokens_BxT`, float32 [B, T].

  Chunked over the sequence (`lax.map` over blocks of `chunk_size` positions) with each block
  rematerialised in the backward pass, so neither direction holds a [B, T, V] array (with a
  single block, chunk_size >= T, nothing is rematerialised: the forward holds [B, T, V] anyway).
  Differentiable w.r.t. `h_BxTxD` and whatever `logits_fn` closes over (the params).
  `logp[:, 0]` is 0; other positions are returned as computed (the caller masks: padded positions
  of `shifted_hidden` hold h = 0, i.e. uniform logits).
  """
  if jnp.ndim(h_BxTxD) != 3 or jnp.shape(h_BxTxD)[:2] != jnp.shape(tokens_BxT):
    raise ValueError(f"h_BxTxD shape {jnp.shape(h_BxTxD)} does not match tokens_BxT shape "
                     f"{jnp.shape(tokens_BxT)} (expected [B, T, D] and [B, T])")
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  _, t = tokens_BxT.shape
  c = min(chunk_size, t)
  n = -(-t // c)
  h_c = _to_chunks(_pad_to(h_BxTxD, n * c), n, c)
  tok_c = _to_chunks(_pad_to(jnp.asarray(tokens_BxT, jnp.int32), n * c), n, c)
  one = functools.partial(_chunk_logp, logits_fn, temperature)
  if n == 1:  # one block: the forward holds [B, T, V] anyway and the backward starts right here,
    logp_c = one(h_c[0], tok_c[0])[None]  # so rematerialising it would only redo its matmul
  else:
    one = jax.checkpoint(one)
    logp_c = jax.lax.map(lambda xs: one(*xs), (h_c, tok_c))
  logp = _from_chunks(logp_c, t)
  return logp.at[:, 0].set(0.0)


# -- the scoring route (chunked forward through the KV cache) -------------------------------------
def _chunked_scan(model, tokens_BxT, mask_BxT, chunk_size, per_chunk, segment_ids_BxT=None):
  """Runs the forward pass in sequence chunks through a KV cache; `per_chunk(h_pred, toks)` gets
  the predicting hidden states [B, c, D] of each chunk's tokens [B, c]. Returns the stacked
  per-chunk outputs converted back to [B, T, ...]."""
  cfg = model.cfg
  b, t = tokens_BxT.shape
  c = min(chunk_size, t)
  n = -(-t // c)
  tokens_p = _pad_to(jnp.asarray(tokens_BxT, jnp.int32), n * c)
  mask_p = _pad_to(jnp.asarray(mask_BxT).astype(bool), n * c, False)
  if segment_ids_BxT is None:
    pos_p = transformer.default_positions(mask_p)
    seg_p = None
  else:
    seg_p = _pad_to(jnp.asarray(segment_ids_BxT, jnp.int32), n * c)
    pos_p = transformer.segment_positions(seg_p)
  cache = transformer.constrain_cache(transformer.init_cache(cfg, b, n * c))
  h0 = jnp.zeros((b, cfg.d_model), jnp.dtype(cfg.dtype))

  def body(carry, xs):
    cache, h_last = carry
    tok_c, pos_c, start = xs[:3]
    seg_kw = {} if seg_p is None else dict(segment_ids_BxT=xs[3], kv_segment_ids_BxS=seg_p)
    h, cache = model.hidden(tok_c, positions_BxT=pos_c, cache=cache, cache_index=start,
                            kv_mask_BxS=mask_p, **seg_kw)
    h_pred = jnp.concatenate([h_last[:, None], h[:, :-1]], axis=1)
    return (cache, h[:, -1]), per_chunk(h_pred, tok_c)

  xs = (_to_chunks(tokens_p, n, c), _to_chunks(pos_p, n, c), jnp.arange(n, dtype=jnp.int32) * c)
  if seg_p is not None:
    xs = xs + (_to_chunks(seg_p, n, c),)
  _, out = jax.lax.scan(body, (cache, h0), xs)
  return jax.tree.map(lambda a: _from_chunks(a, t), out)


@trace_cache.jit(static_argnums=(0,), static_argnames=("static_temperature", "chunk_size", "rules"))
def _token_logprobs(graphdef, params, tokens_BxT, mask_BxT, temperature,
                    segment_ids_BxT=None, *, static_temperature, chunk_size, rules):
  if temperature is None:
    temperature = static_temperature
  with sharding.axis_rules(rules):
    params = transformer.gathered(graphdef, params)
    model = transformer.merge(graphdef, params)
    logits_fn = unembed_fn(graphdef, params)
    per_chunk = functools.partial(_chunk_logp, logits_fn, temperature)
    logp = _chunked_scan(model, tokens_BxT, mask_BxT, chunk_size, per_chunk, segment_ids_BxT)
    return jnp.where(_valid_BxT(mask_BxT, segment_ids_BxT), logp, 0.0)


@trace_cache.jit(static_argnums=(0,),
                 static_argnames=("static_temperature", "k", "chunk_size", "rules"))
def _topk_logprobs(graphdef, params, tokens_BxT, mask_BxT, temperature,
                   segment_ids_BxT=None, *, static_temperature, k, chunk_size, rules):
  if temperature is None:
    temperature = static_temperature
  with sharding.axis_rules(rules):
    params = transformer.gathered(graphdef, params)
    model = transformer.merge(graphdef, params)
    logits_fn = unembed_fn(graphdef, params)
    per_chunk = lambda h, _: _chunk_topk(logits_fn, temperature, k, h)  # noqa: E731
    ids, logp = _chunked_scan(model, tokens_BxT, mask_BxT, chunk_size, per_chunk,
                              segment_ids_BxT)
    valid = _valid_BxT(mask_BxT, segment_ids_BxT)[..., None]
    return jnp.where(valid, ids, 0), jnp.where(valid, logp, 0.0)


def _vocab_size(params) -> int:
  return jnp.shape(params["embed"]["embedding"])[0]


def token_logprobs(graphdef, params, tokens_BxT, mask_BxT, *, temperature=1.0,
                   chunk_size: int = DEFAULT_CHUNK, segment_ids_BxT=None) -> jax.Array:
  """Aligned float32 log-probs [B, T] of `tokens_BxT` under the model (scoring route).

  Zero at t = 0, where `mask_BxT` is False, and where the previous token is padding. The forward
  pass runs in chunks of `chunk_size` positions through the KV cache (see the module docstring);
  axis rules installed with `sharding.axis_rules` are honoured (batch over the data axes).
  `segment_ids_BxT`: packed rows (module docstring); the first token of each segment gets 0.
  """
  _check_batch(tokens_BxT, mask_BxT, _vocab_size(params))
  _check_segments(tokens_BxT, segment_ids_BxT)
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  temp, static_temp = _temperature_args(temperature)
  return _token_logprobs(graphdef, params, tokens_BxT, mask_BxT, temp, segment_ids_BxT,
                         static_temperature=static_temp, chunk_size=chunk_size,
                         rules=sharding.current_rules())


def topk_logprobs(graphdef, params, tokens_BxT, mask_BxT, k: int, *, temperature=1.0,
                  chunk_size: int = DEFAULT_CHUNK, segment_ids_BxT=None
                  ) -> tuple[jax.Array, jax.Array]:
  """Aligned top-k of the predicting distribution: (ids_BxTxK int32, logp_BxTxK float32).

  Position t holds the k most likely ids for token t (descending) and their full-vocabulary
  log-probs (log-softmax(logits / temperature), not renormalised over the k). Both are zero at
  invalid positions (t = 0, padding, first token after padding or of a segment).
  """
  _check_batch(tokens_BxT, mask_BxT, _vocab_size(params))
  _check_segments(tokens_BxT, segment_ids_BxT)
  if k <= 0:
    raise ValueError(f"k must be positive, got {k}")
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  temp, static_temp = _temperature_args(temperature)
  return _topk_logprobs(graphdef, params, tokens_BxT, mask_BxT, temp, segment_ids_BxT,
                        static_temperature=static_temp, k=k, chunk_size=chunk_size,
                        rules=sharding.current_rules())

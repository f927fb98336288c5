"""Attention math of the decoder: the one-shot reference, blocked (flash-style) causal attention for
full-sequence forwards, and prefix-bucketed attention over a KV cache.

Shapes: B batch, T queries, S keys (cache slots), H query heads, K kv heads (GQA: G = H / K query
heads share one kv head), h head_dim. Every function returns the attention output [B, T, H * h]
in float32 (the caller casts it back to the compute dtype); scores, softmax and the weighted sum
always run in float32, as in the reference.

* `reference_attention`: the whole [B, K, G, T, S] score tensor at once, masked by `allowed`
  (the model's original attention, kept as the reference path and used for short sequences).
  Its custom VJP keeps one [B, K, G, T, S] array for the backward pass, the probabilities
  (JAX's own differentiation of the softmax kept four, two after XLA's simplification).
* `causal_attention` (training and scoring forwards without a cache, T = S): above `block`
  positions it runs `flash_attention` (blocks evened out by `flash_block`): queries and keys in blocks of `block`, an online softmax
  (running max and sum in float32), key blocks above the diagonal never computed (the loop over
  key blocks stops at the query block), padding and segment masks applied per block pair. A
  custom VJP recomputes each block's probabilities from the saved log-sum-exp in the backward
  pass (FlashAttention-2), so forward and backward hold O(B H T h) plus one block pair's
  [B, H, block, block] scores, never [B, H, T, T]. T need not be a multiple of `block` (the
  sequence is padded to whole blocks with masked keys).
* `cached_attention` (decode, prefill and chunked scoring through a KV cache): queries at slots
  [cache_index, cache_index + T) can only see slots below cache_index + T, so attention runs over
  the cache prefix of that length rounded up to a whole bucket of `block` slots (`lax.switch`
  over the bucket lengths when cache_index is traced): the empty tail of the cache is never read.

KV caches are laid out for the decode step's two products (`transformer.init_cache`): keys
k_BxKxhxS (slots last: a query's scores against a block of slots are a [G, h] x [h, w] product
with no transpose) and values v_BxKxSxh (the probabilities' product [G, w] x [w, h], again no
transpose). With slots-then-heads caches ([B, S, K, h]) XLA's CPU backend transposed every block
it read: a loop of the `small` preset's per-row decode attention at 64 rows took 1.6x as long
(AMD EPYC, 2 cores), the sampler's 64-row decode ~5% longer and the OPD rollout ~9%.

Query rows with no allowed key at all (padding queries, e.g. the left padding of a prompt) are
unspecified in every path (finite; the blocked path returns zeros there, the reference a uniform
average): they are padding, never attended to by real tokens and never read by a loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from opd_jax.models.sharding import constrain

# Longest prefix of cache buckets `cached_attention` compiles a branch for; longer caches get
# buckets of several blocks (a bucket is then at most S / _MAX_BUCKETS slots wide).
_MAX_BUCKETS = 16


def allowed_mask(q_slot_T, kv_mask_BxS, q_segment_ids_BxT=None, kv_segment_ids_BxS=None):
  """[B, T, S] bool: key slot s is visible to the query at slot q_slot_T[t] (causal by slot,
  real keys only, same segment when segment ids are given)."""
  s = kv_mask_BxS.shape[1]
  allowed_TxS = jnp.arange(s)[None, :] <= q_slot_T[:, None]
  allowed_BxTxS = allowed_TxS[None] & kv_mask_BxS[:, None, :]
  if q_segment_ids_BxT is not None:
    allowed_BxTxS = allowed_BxTxS & (q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :])
  return allowed_BxTxS


def reference_attention(q_BxTxHxh, k_BxSxKxh, v_BxSxKxh, allowed_BxTxS):
  """One-shot attention: softmax over all S keys of each query, masked keys at float32 min."""
  return _one_shot(q_BxTxHxh, k_BxSxKxh, v_BxSxKxh, allowed_BxTxS, kv_heads=k_BxSxKxh.shape[2],
                   k_dims="bskh", v_dims="bskh")


def _cache_attention(q_BxTxHxh, k_BxKxhxS, v_BxKxSxh, allowed_BxTxS):
  """`reference_attention` over keys and values in the cache layout (module docstring)."""
  return _one_shot(q_BxTxHxh, k_BxKxhxS, v_BxKxSxh, allowed_BxTxS, kv_heads=k_BxKxhxS.shape[1],
                   k_dims="bkhs", v_dims="bksh")


def _one_shot(q_BxTxHxh, k, v, allowed_BxTxS, *, kv_heads: int, k_dims: str, v_dims: str):
  """The one-shot attention of `reference_attention`, keys and values laid out as the einsum
  subscripts `k_dims` / `v_dims` say (b batch, s slot, k kv head, h head dim)."""
  b, t, h, hd = q_BxTxHxh.shape
  q_BxTxKxGxh = q_BxTxHxh.reshape(b, t, kv_heads, h // kv_heads, hd)
  out_BxTxKxGxh = _one_shot_core(q_BxTxKxGxh.astype(jnp.float32), k.astype(jnp.float32),
                                 v.astype(jnp.float32), allowed_BxTxS, k_dims, v_dims)
  return out_BxTxKxGxh.reshape(b, t, h * hd)


def _one_shot_forward(q_BxTxKxGxh, k, v, allowed_BxTxS, k_dims, v_dims):
  """(out [B, T, K, G, h], probabilities [B, K, G, T, S]) of float32 q, k and v."""
  hd = q_BxTxKxGxh.shape[-1]
  scores_BxKxGxTxS = jnp.einsum(f"btkgh,{k_dims}->bkgts", q_BxTxKxGxh, k) * (hd ** -0.5)
  scores_BxKxGxTxS = jnp.where(allowed_BxTxS[:, None, None], scores_BxKxGxTxS,
                               jnp.finfo(jnp.float32).min)
  probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1)
  return jnp.einsum(f"bkgts,{v_dims}->btkgh", probs_BxKxGxTxS, v), probs_BxKxGxTxS


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _one_shot_core(q_BxTxKxGxh, k, v, allowed_BxTxS, k_dims, v_dims):
  """The one-shot attention of float32 inputs; its backward keeps q, k, v, the mask and the
  probabilities (the gradients JAX's differentiation gives, up to summation order). In the
  scanned layers of a training step every kept array is stacked over the layers: the `small`
  preset's [8, 256] SFT step kept two [L, B, K, G, T, S] stacks (128 MiB each) before."""
  return _one_shot_forward(q_BxTxKxGxh, k, v, allowed_BxTxS, k_dims, v_dims)[0]


def _one_shot_core_fwd(q, k, v, allowed, k_dims, v_dims):
  out, probs = _one_shot_forward(q, k, v, allowed, k_dims, v_dims)
  return out, (q, k, v, allowed, probs)


def _one_shot_core_bwd(k_dims, v_dims, res, dout_BxTxKxGxh):
  # softmax backward: dscores = p * (dp - sum(dp * p)); disallowed pairs get none (the rows
  # with no allowed key, whose probabilities are uniform, pass gradients to v only).
  q, k, v, allowed_BxTxS, probs_BxKxGxTxS = res
  scale = q.shape[-1] ** -0.5
  dv = jnp.einsum(f"bkgts,btkgh->{v_dims}", probs_BxKxGxTxS, dout_BxTxKxGxh)
  dprobs = jnp.einsum(f"btkgh,{v_dims}->bkgts", dout_BxTxKxGxh, v)
  dscores = probs_BxKxGxTxS * (dprobs - jnp.sum(dprobs * probs_BxKxGxTxS, -1, keepdims=True))
  dscores = jnp.where(allowed_BxTxS[:, None, None], dscores, 0.0) * scale
  dq = jnp.einsum(f"bkgts,{k_dims}->btkgh", dscores, k)
  dk = jnp.einsum(f"bkgts,btkgh->{k_dims}", dscores, q)
  return dq, dk, dv, None


_one_shot_core.defvjp(_one_shot_core_fwd, _one_shot_core_bwd)


# -- blocked (flash-style) causal attention -------------------------------------------------------
def _pair_allowed(i, j, block, valid_BxP, seg_BxP):
  """[B, block, block] bool of query block i against key block j (padded positions P)."""
  q_pos = i * block + jnp.arange(block)
  k_pos = j * block + jnp.arange(block)
  valid_Bxk = jax.lax.dynamic_slice_in_dim(valid_BxP, j * block, block, axis=1)
  allowed = (k_pos[None, :] <= q_pos[:, None])[None] & valid_Bxk[:, None, :]
  if seg_BxP is not None:
    seg_Bxq = jax.lax.dynamic_slice_in_dim(seg_BxP, i * block, block, axis=1)
    seg_Bxk = jax.lax.dynamic_slice_in_dim(seg_BxP, j * block, block, axis=1)
    allowed = allowed & (seg_Bxq[:, :, None] == seg_Bxk[:, None, :])
  return allowed


def _q_block(x_BxKxGxPxh, i, block):
  """Query block i as [B, K, G * block, h] (the G heads of a kv head stacked as rows)."""
  b, kh, g, _, hd = x_BxKxGxPxh.shape
  blk = jax.lax.dynamic_slice_in_dim(x_BxKxGxPxh, i * block, block, axis=3)
  return blk.reshape(b, kh, g * block, hd)


def _row_block(x_BxKxGxP, i, block):
  b, kh, g, _ = x_BxKxGxP.shape
  return jax.lax.dynamic_slice_in_dim(x_BxKxGxP, i * block, block, axis=3).reshape(
      b, kh, g * block)


def _masked(scores_BxKxRxk, allowed_Bxqxk, g, fill):
  """Scores with disallowed pairs set to `fill` (rows R = G * block, query-major per head)."""
  b, kh, r, k = scores_BxKxRxk.shape
  s5 = scores_BxKxRxk.reshape(b, kh, g, r // g, k)
  return jnp.where(allowed_Bxqxk[:, None, None], s5, fill).reshape(b, kh, r, k)


def _flash_forward(q_BxKxGxPxh, k_BxKxPxh, v_BxKxPxh, valid_BxP, seg_BxP, block):
  """(out [B, K, G, P, h], log-sum-exp [B, K, G, P]; +inf for rows with no allowed key)."""
  b, kh, g, p, hd = q_BxKxGxPxh.shape
  n_blocks = p // block

  def query_block(i):
    q_BxKxRxh = _q_block(q_BxKxGxPxh, i, block)

    def key_block(j, carry):
      max_BxKxR, sum_BxKxR, acc_BxKxRxh = carry
      k_BxKxkxh = jax.lax.dynamic_slice_in_dim(k_BxKxPxh, j * block, block, axis=2)
      v_BxKxkxh = jax.lax.dynamic_slice_in_dim(v_BxKxPxh, j * block, block, axis=2)
      scores_BxKxRxk = jnp.einsum("bkqh,bksh->bkqs", q_BxKxRxh, k_BxKxkxh)
      scores_BxKxRxk = _masked(scores_BxKxRxk, _pair_allowed(i, j, block, valid_BxP, seg_BxP),
                               g, -jnp.inf)
      new_max = jnp.maximum(max_BxKxR, jnp.max(scores_BxKxRxk, axis=-1))
      safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
      probs_BxKxRxk = jnp.exp(scores_BxKxRxk - safe_max[..., None])
      rescale = jnp.exp(max_BxKxR - safe_max)
      sum_BxKxR = rescale * sum_BxKxR + jnp.sum(probs_BxKxRxk, axis=-1)
      acc_BxKxRxh = rescale[..., None] * acc_BxKxRxh + jnp.einsum(
          "bkqs,bksh->bkqh", probs_BxKxRxk, v_BxKxkxh)
      return new_max, sum_BxKxR, acc_BxKxRxh

    r = g * block
    init = (jnp.full((b, kh, r), -jnp.inf, jnp.float32), jnp.zeros((b, kh, r), jnp.float32),
            jnp.zeros((b, kh, r, hd), jnp.float32))
    # Key blocks 0..i only: blocks above the diagonal are never computed.
    max_BxKxR, sum_BxKxR, acc_BxKxRxh = jax.lax.fori_loop(0, i + 1, key_block, init)
    has_key = sum_BxKxR > 0
    out_BxKxRxh = acc_BxKxRxh / jnp.where(has_key, sum_BxKxR, 1.0)[..., None]
    lse_BxKxR = jnp.where(has_key, max_BxKxR + jnp.log(jnp.where(has_key, sum_BxKxR, 1.0)),
                          jnp.inf)
    return out_BxKxRxh.reshape(b, kh, g, block, hd), lse_BxKxR.reshape(b, kh, g, block)

  out_NxBxKxGxqxh, lse_NxBxKxGxq = jax.lax.map(query_block, jnp.arange(n_blocks))
  out = jnp.moveaxis(out_NxBxKxGxqxh, 0, 3).reshape(b, kh, g, p, hd)
  lse = jnp.moveaxis(lse_NxBxKxGxq, 0, 3).reshape(b, kh, g, p)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q_BxKxGxPxh, k_BxKxPxh, v_BxKxPxh, valid_BxP, seg_BxP, block):
  return _flash_forward(q_BxKxGxPxh, k_BxKxPxh, v_BxKxPxh, valid_BxP, seg_BxP, block)[0]


def _flash_fwd(q, k, v, valid, seg, block):
  out, lse = _flash_forward(q, k, v, valid, seg, block)
  return out, (q, k, v, valid, seg, out, lse)


def _flash_bwd(block, res, dout_BxKxGxPxh):
  """FlashAttention-2 backward: per key block j, query blocks j..N-1 (those below the diagonal),
  probabilities recomputed from the saved log-sum-exp; dq accumulated across key blocks."""
  q_BxKxGxPxh, k_BxKxPxh, v_BxKxPxh, valid_BxP, seg_BxP, out_BxKxGxPxh, lse_BxKxGxP = res
  b, kh, g, p, hd = q_BxKxGxPxh.shape
  n_blocks = p // block
  delta_BxKxGxP = jnp.sum(dout_BxKxGxPxh * out_BxKxGxPxh, axis=-1)

  def key_block(dq_BxKxGxPxh, j):
    k_BxKxkxh = jax.lax.dynamic_slice_in_dim(k_BxKxPxh, j * block, block, axis=2)
    v_BxKxkxh = jax.lax.dynamic_slice_in_dim(v_BxKxPxh, j * block, block, axis=2)

    def query_block(i, carry):
      dq, dk_BxKxkxh, dv_BxKxkxh = carry
      q_BxKxRxh = _q_block(q_BxKxGxPxh, i, block)
      do_BxKxRxh = _q_block(dout_BxKxGxPxh, i, block)
      lse_BxKxR = _row_block(lse_BxKxGxP, i, block)
      delta_BxKxR = _row_block(delta_BxKxGxP, i, block)
      scores_BxKxRxk = jnp.einsum("bkqh,bksh->bkqs", q_BxKxRxh, k_BxKxkxh)
      probs_BxKxRxk = _masked(jnp.exp(scores_BxKxRxk - lse_BxKxR[..., None]),
                              _pair_allowed(i, j, block, valid_BxP, seg_BxP), g, 0.0)
      dv_BxKxkxh = dv_BxKxkxh + jnp.einsum("bkqs,bkqh->bksh", probs_BxKxRxk, do_BxKxRxh)
      dprobs_BxKxRxk = jnp.einsum("bkqh,bksh->bkqs", do_BxKxRxh, v_BxKxkxh)
      dscores_BxKxRxk = probs_BxKxRxk * (dprobs_BxKxRxk - delta_BxKxR[..., None])
      dk_BxKxkxh = dk_BxKxkxh + jnp.einsum("bkqs,bkqh->bksh", dscores_BxKxRxk, q_BxKxRxh)
      dq_BxKxRxh = jnp.einsum("bkqs,bksh->bkqh", dscores_BxKxRxk, k_BxKxkxh)
      dq_old = jax.lax.dynamic_slice_in_dim(dq, i * block, block, axis=3)
      dq = jax.lax.dynamic_update_slice_in_dim(
          dq, dq_old + dq_BxKxRxh.reshape(b, kh, g, block, hd), i * block, axis=3)
      return dq, dk_BxKxkxh, dv_BxKxkxh

    zeros_kv = jnp.zeros((b, kh, block, hd), jnp.float32)
    dq_BxKxGxPxh, dk_BxKxkxh, dv_BxKxkxh = jax.lax.fori_loop(
        j, n_blocks, query_block, (dq_BxKxGxPxh, zeros_kv, zeros_kv))
    return dq_BxKxGxPxh, (dk_BxKxkxh, dv_BxKxkxh)

  dq, (dk_NxBxKxkxh, dv_NxBxKxkxh) = jax.lax.scan(key_block, jnp.zeros_like(q_BxKxGxPxh),
                                                   jnp.arange(n_blocks))
  dk = jnp.moveaxis(dk_NxBxKxkxh, 0, 2).reshape(b, kh, p, hd)
  dv = jnp.moveaxis(dv_NxBxKxkxh, 0, 2).reshape(b, kh, p, hd)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BxTxHxh, k_BxTxKxh, v_BxTxKxh, kv_mask_BxT, segment_ids_BxT=None, *,
                    block: int):
  """Blocked causal self-attention (module docstring) [B, T, H * h] float32; T padded to a
  multiple of `block` internally. Equals `reference_attention` with the causal / padding /
  segment mask on every query that has at least one allowed key."""
  b, t, h, hd = q_BxTxHxh.shape
  kh = k_BxTxKxh.shape[2]
  g = h // kh
  p = -(-t // block) * block
  pad = p - t

  def pad_t(x, value=0):
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value) if pad else x

  # The 1/sqrt(h) scale is folded into q; [B, K, G, P, h] puts each kv head's G query heads and
  # positions in one row axis of a plain batched matmul against that head's keys.
  q32 = q_BxTxHxh.astype(jnp.float32) * (hd ** -0.5)
  q_BxKxGxPxh = jnp.transpose(pad_t(q32.reshape(b, t, kh, g, hd)), (0, 2, 3, 1, 4))
  k_BxKxPxh = jnp.transpose(pad_t(k_BxTxKxh.astype(jnp.float32)), (0, 2, 1, 3))
  v_BxKxPxh = jnp.transpose(pad_t(v_BxTxKxh.astype(jnp.float32)), (0, 2, 1, 3))
  q_BxKxGxPxh = constrain(q_BxKxGxPxh, ("batch", "act_kv_heads", None, "length", None))
  k_BxKxPxh = constrain(k_BxKxPxh, ("batch", "act_kv_heads", "length", None))
  v_BxKxPxh = constrain(v_BxKxPxh, ("batch", "act_kv_heads", "length", None))
  valid_BxP = pad_t(kv_mask_BxT.astype(bool), False)
  seg_BxP = None if segment_ids_BxT is None else pad_t(segment_ids_BxT.astype(jnp.int32), 0)
  out_BxKxGxPxh = _flash(q_BxKxGxPxh, k_BxKxPxh, v_BxKxPxh, valid_BxP, seg_BxP, block)
  out_BxKxGxPxh = constrain(out_BxKxGxPxh, ("batch", "act_kv_heads", None, "length", None))
  out_BxPxKxGxh = jnp.transpose(out_BxKxGxPxh, (0, 3, 1, 2, 4))
  return out_BxPxKxGxh[:, :t].reshape(b, t, h * hd)


def flash_block(t: int, block: int) -> int:
  """The block `causal_attention` uses for T positions under the knob `block` (0 = none, the
  one-shot reference): as many blocks as `block` needs, evened out (rounded up to a multiple of
  8, at most `block`) so that the last one is not mostly padding; T itself when T <= block."""
  if block <= 0 or t <= block:
    return t
  n = -(-t // block)
  return min(block, -(-(-(-t // n)) // 8) * 8)


def causal_attention(q_BxTxHxh, k_BxTxKxh, v_BxTxKxh, kv_mask_BxT, segment_ids_BxT=None, *,
                     block: int):
  """Causal self-attention of a full sequence: the reference for T <= block (or block <= 0),
  `flash_attention` with `flash_block(T, block)` above."""
  t = q_BxTxHxh.shape[1]
  blk = flash_block(t, block)
  if blk >= t:
    allowed = allowed_mask(jnp.arange(t), kv_mask_BxT, segment_ids_BxT, segment_ids_BxT)
    return reference_attention(q_BxTxHxh, k_BxTxKxh, v_BxTxKxh, allowed)
  return flash_attention(q_BxTxHxh, k_BxTxKxh, v_BxTxKxh, kv_mask_BxT, segment_ids_BxT,
                         block=blk)


# -- attention over a KV cache --------------------------------------------------------------------
def bucket_lengths(cache_len: int, block: int) -> tuple[int, ...]:
  """Prefix lengths `cached_attention` may attend over: multiples of the bucket width (`block`
  slots, widened to whole blocks so that there are at most `_MAX_BUCKETS`), the last = cache_len."""
  n = -(-cache_len // block)
  width = block * -(-n // _MAX_BUCKETS)
  return tuple(min(w, cache_len) for w in range(width, cache_len + width, width))


def cached_attention(q_BxTxHxh, k_BxKxhxS, v_BxKxSxh, cache_index, kv_mask_BxS,
                     q_segment_ids_BxT=None, kv_segment_ids_BxS=None, *, block: int):
  """Attention of T queries at cache slots [cache_index, cache_index + T) over the cache prefix
  that can hold their keys: slots [0, L) with L the smallest bucket length >= cache_index + T
  (`bucket_lengths`). Slots at or above cache_index + T are causally hidden from every query, so
  the result equals the reference over all S slots. `block` <= 0 or S <= block: all S slots.
  Keys and values in the cache layout (module docstring)."""
  t = q_BxTxHxh.shape[1]
  s = k_BxKxhxS.shape[3]
  segments = q_segment_ids_BxT is not None

  def over_prefix(length, q, k, v, kv_mask, q_seg, kv_seg):
    allowed = allowed_mask(cache_index + jnp.arange(t), kv_mask[:, :length],
                           q_seg if segments else None, kv_seg[:, :length] if segments else None)
    return _cache_attention(q, k[..., :length], v[:, :, :length], allowed)

  operands = (q_BxTxHxh, k_BxKxhxS, v_BxKxSxh, kv_mask_BxS,
              q_segment_ids_BxT if segments else jnp.zeros((), jnp.int32),
              kv_segment_ids_BxS if segments else jnp.zeros((), jnp.int32))
  if block <= 0 or s <= block:
    return over_prefix(s, *operands)
  lengths = bucket_lengths(s, block)
  if isinstance(cache_index, int):
    need = cache_index + t
    length = next((n for n in lengths if n >= need), s)
    return over_prefix(length, *operands)
  need = cache_index + t
  # Index of the first bucket that covers `need` slots (buckets are equal width but the last).
  width = lengths[0]
  branch = jnp.clip((need - 1) // width, 0, len(lengths) - 1)
  branches = [functools.partial(over_prefix, n) for n in lengths]
  return jax.lax.switch(branch, branches, *operands)


# -- one decode token per row, each row at its own cache slot -------------------------------------
# Width (slots) of the cache blocks `rows_decode_attention` reads: the prefix a step reads is the
# longest row's, rounded up to this (at most `cache_block`).
ROW_BLOCK = 64


def row_block(cache_block: int) -> int:
  """Block width of `rows_decode_attention` under the model's `cache_block` knob."""
  return min(ROW_BLOCK, cache_block) if cache_block > 0 else ROW_BLOCK


def rows_decode_attention(q_Bx1xHxh, k_BxKxhxS, v_BxKxSxh, k_new_Bx1xKxh, v_new_Bx1xKxh, slot_B,
                          kv_mask_BxS, *, block: int, layer=None):
  """Attention of one new token per row, row b at its own cache slot `slot_B[b]`, over its own
  key and value (`k_new`, `v_new`; the cache's slot slot_B[b] is never read, whether or not they
  are already written there) and the cache slots below slot_B[b] allowed by `kv_mask_BxS`. Keys
  and values in the cache layout (module docstring); S must be a multiple of `block`. With
  `layer` (an int or traced scalar) the cache arguments are every layer's ([L, B, K, h, S] and
  [L, B, K, S, h]) and layer `layer` is read (each block sliced straight from the stacked cache).

  An online softmax started from the row's own key, then the cache blocks of `block` slots that
  the longest row needs: a block entirely at or above a row's slot leaves that row's running
  max, sum and output bit for bit unchanged (its scores are -inf: rescale exp(0) = 1, probabilities
  0), so a row's result does not depend on the other rows of the batch (a decode batch may mix
  rows at different steps and still give each row the numbers it gets alone).
  """
  kh, s = k_BxKxhxS.shape[-3], k_BxKxhxS.shape[-1]
  if s % block:
    raise ValueError(f"rows_decode_attention: {s} cache slots are not a multiple of the block "
                     f"{block}")
  b, _, _, hd = q_Bx1xHxh.shape
  q_BxKxGxh, init = _rows_start(q_Bx1xHxh, k_new_Bx1xKxh, v_new_Bx1xKxh)
  stacked = () if layer is None else (layer,)
  lead = () if layer is None else (1,)

  def one_block(j, carry):
    k_BxKxhxw = jax.lax.dynamic_slice(k_BxKxhxS, stacked + (0, 0, 0, j * block),
                                      lead + (b, kh, hd, block)).reshape(b, kh, hd, block)
    v_BxKxwxh = jax.lax.dynamic_slice(v_BxKxSxh, stacked + (0, 0, j * block, 0),
                                      lead + (b, kh, block, hd)).reshape(b, kh, block, hd)
    return _rows_block(carry, q_BxKxGxh, k_BxKxhxw, v_BxKxwxh, j * block, slot_B, kv_mask_BxS)

  # Blocks holding any slot below the longest row's slot.
  n_blocks = (jnp.max(slot_B) + block - 1) // block
  return _rows_finish(jax.lax.fori_loop(0, n_blocks, one_block, init), q_Bx1xHxh.shape)


def rows_block_attention(q_Bx1xHxh, k_blocks, v_blocks, k_new_Bx1xKxh, v_new_Bx1xKxh, slot_B,
                         kv_mask_BxS):
  """`rows_decode_attention` over one layer's cache held as one buffer per block of slots
  (`k_blocks[j]` [B, K, h, w], `v_blocks[j]` [B, K, w, h]: slots [j * w, (j + 1) * w)), the
  same numbers bit for bit. Each block the longest row needs is read in place under a
  `lax.cond`: XLA's CPU backend copies any slice of a larger buffer that it hands to a product,
  and those copies were ~3/4 of the decode attention's time (`transformer.RowBlocks`). The first
  block is read without one (a block at or above every row's slot changes nothing, and a decode
  step's rows sit past their prompts): one conditional fewer per layer, ~3% of a 16- or 64-row
  greedy decode call of the `small` preset (2 AMD EPYC cores, alternated in one process)."""
  block = k_blocks[0].shape[-1]
  q_BxKxGxh, carry = _rows_start(q_Bx1xHxh, k_new_Bx1xKxh, v_new_Bx1xKxh)
  n_blocks = (jnp.max(slot_B) + block - 1) // block
  for j, (k_BxKxhxw, v_BxKxwxh) in enumerate(zip(k_blocks, v_blocks, strict=True)):
    def read(c, k_BxKxhxw, v_BxKxwxh, start=j * block):
      return _rows_block(c, q_BxKxGxh, k_BxKxhxw, v_BxKxwxh, start, slot_B, kv_mask_BxS)

    if j == 0:   # every decode step reads it (a row's slot is past its prompt)
      carry = read(carry, k_BxKxhxw, v_BxKxwxh)
    else:
      carry = jax.lax.cond(j < n_blocks, read, lambda c, k, v: c, carry, k_BxKxhxw, v_BxKxwxh)
  return _rows_finish(carry, q_Bx1xHxh.shape)


def _rows_start(q_Bx1xHxh, k_new_Bx1xKxh, v_new_Bx1xKxh):
  """(scaled queries [B, K, G, h], the online softmax's (max, sum, output) started from each
  row's own key and value)."""
  b, _, h, hd = q_Bx1xHxh.shape
  kh = k_new_Bx1xKxh.shape[2]
  q_BxKxGxh = q_Bx1xHxh.reshape(b, kh, h // kh, hd).astype(jnp.float32) * (hd ** -0.5)
  score_new_BxKxG = jnp.einsum("bkgh,bkh->bkg", q_BxKxGxh, k_new_Bx1xKxh[:, 0].astype(jnp.float32))
  return q_BxKxGxh, (score_new_BxKxG, jnp.ones_like(score_new_BxKxG),
                     jnp.broadcast_to(v_new_Bx1xKxh[:, 0, :, None].astype(jnp.float32),
                                      q_BxKxGxh.shape))


def _rows_block(carry, q_BxKxGxh, k_BxKxhxw, v_BxKxwxh, start, slot_B, kv_mask_BxS):
  """The online softmax after the cache block of slots [start, start + w)."""
  max_BxKxG, sum_BxKxG, acc_BxKxGxh = carry
  w = k_BxKxhxw.shape[-1]
  valid_Bxw = jax.lax.dynamic_slice_in_dim(kv_mask_BxS, start, w, axis=1)
  allowed_Bxw = valid_Bxw & (start + jnp.arange(w)[None, :] < slot_B[:, None])
  scores_BxKxGxw = jnp.einsum("bkgh,bkhw->bkgw", q_BxKxGxh, k_BxKxhxw.astype(jnp.float32))
  scores_BxKxGxw = jnp.where(allowed_Bxw[:, None, None], scores_BxKxGxw, -jnp.inf)
  new_max = jnp.maximum(max_BxKxG, jnp.max(scores_BxKxGxw, axis=-1))
  probs_BxKxGxw = jnp.exp(scores_BxKxGxw - new_max[..., None])
  rescale = jnp.exp(max_BxKxG - new_max)
  sum_BxKxG = rescale * sum_BxKxG + jnp.sum(probs_BxKxGxw, axis=-1)
  acc_BxKxGxh = rescale[..., None] * acc_BxKxGxh + jnp.einsum(
      "bkgw,bkwh->bkgh", probs_BxKxGxw, v_BxKxwxh.astype(jnp.float32))
  return new_max, sum_BxKxG, acc_BxKxGxh


def _rows_finish(carry, q_shape):
  """The attention output [B, 1, H * h] of the online softmax's final state."""
  _, sum_BxKxG, acc_BxKxGxh = carry
  b, _, h, hd = q_shape
  return (acc_BxKxGxh / sum_BxKxG[..., None]).reshape(b, 1, h * hd)

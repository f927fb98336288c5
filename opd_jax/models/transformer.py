"""NNX decoder for the qwen3 / qwen2 / llama / qwen3_moe families.

Parameters carry logical axis names (see `sharding.py`); layers are stacked on a leading `layers`
axis and run with `lax.scan` (or unrolled, `cfg.scan_layers=False`) over the same layout.

Functional use at the jit boundary (as in flax's gemma example, with plain-dict params):

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = split(model)          # params: nested dict of arrays
    logits = forward(graphdef, params, tokens_BxT, mask_BxT)   # inside jit

Parameter tree (shapes; L layers, D d_model, H heads, K kv heads, h head_dim, F d_ff, V vocab)::

    embed/embedding                  [V, D]
    layers/attn/{q,k,v}_proj/kernel  [L, D, H*h] / [L, D, K*h] / [L, D, K*h]   (in, out)
    layers/attn/{q,k,v}_proj/bias    [L, H*h] / [L, K*h] / [L, K*h]            (qwen2 only)
    layers/attn/o_proj/kernel        [L, H*h, D]
    layers/attn/{q,k}_norm/scale     [L, h]                                    (qwen3 only)
    layers/mlp/{gate,up}_proj/kernel [L, D, F];  layers/mlp/down_proj/kernel [L, F, D]
    layers/mlp/router/kernel         [L, D, E]                       (qwen3_moe, instead of
    layers/mlp/experts/{gate,up}_proj/kernel [L, E, D, Fe]            the dense mlp; E experts
    layers/mlp/experts/down_proj/kernel      [L, E, Fe, D]            of width Fe = moe_d_ff)
    layers/{input,post_attn}_norm/scale [L, D]
    final_norm/scale                 [D]
    lm_head/kernel                   [D, V]                                    (untied only)

Kernels are (in, out): a PyTorch weight W (out, in) is the transpose.

Padding and positions: a sequence may be padded anywhere (left-padded prompts, right padding after
EOS). `mask_BxT` marks real tokens; positions default to `cumsum(mask) - 1`, so a left-padded
prompt gets the same RoPE positions as the unpadded one. Padded keys are never attended to.

Packed sequences: `segment_ids_BxT` (int, 0 = padding, 1.. = the sequence within the row) makes
attention block-diagonal (a query attends only to earlier keys of its own segment), positions
restart at 0 at each segment's first token (`segment_positions`), and the mask defaults to
`segment_ids_BxT > 0`. Each segment then gets exactly the hidden states it would get alone,
unpadded. Without segment ids nothing changes (not one extra operation). With a KV cache,
`kv_segment_ids_BxS` gives the segment of every cache slot (the scoring route knows the whole
sequence up front).

KV cache: `init_cache(cfg, B, S)` gives {'k': [L, B, K, h, S], 'v': [L, B, K, S, h]} (the layout
the decode attention reads without transposes: `attention` module docstring). `hidden(...,
cache=, cache_index=)` writes the T new keys at slots [cache_index, cache_index + T) and attends
causally by slot, masked by `kv_mask_BxS`, over the cache prefix that can be filled (slots below
cache_index + T, rounded up to a bucket of `cfg.cache_block` slots), never the empty tail.
`cache_index` may also be an int array [B] with T = 1 (one decode token per row, row b at its own
slot: `attention.rows_decode_attention`, S a multiple of `attention.row_block(cfg.cache_block)`);
a row's result then does not depend on the other rows' slots. The CPU backend's decode loop holds
that cache as `RowBlocks` instead (one buffer per layer and block of slots, read in place).

Attention math lives in `attention.py`: without a cache, sequences longer than
`cfg.attention_block` use blocked (flash-style) causal attention, linear in T in memory; shorter
ones the one-shot reference. Both give the same outputs on every real query. In a rematerialised
model (`cfg.remat`) the MLP of such sequences runs in blocks of the same length, each
rematerialised (`_blocked_swiglu`), so its backward never holds [B, T, d_ff] activations.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.models import attention
from opd_jax.models.config import ModelConfig
from opd_jax.models.sharding import constrain, gathered_after, orders_collectives

Params = dict[str, Any]
Cache = dict[str, jax.Array]

_INIT_STD = 0.02


def _dtype(name: str):
  return jnp.dtype(name)


def _param(rngs, shape, names, cfg, init="normal"):
  if init == "normal":
    value = _INIT_STD * jax.random.normal(rngs.params(), shape, _dtype(cfg.param_dtype))
  elif init == "ones":
    value = jnp.ones(shape, _dtype(cfg.param_dtype))
  else:
    value = jnp.zeros(shape, _dtype(cfg.param_dtype))
  return nnx.Param(value, out_sharding=names)


def _one_row_halves(x, w) -> bool:
  """Whether `_dense` multiplies one row `x` by `w` as two half products (`_dense`): on the CPU
  backend, for a single row (a batch-1 decode step) and an even d."""
  return (jax.default_backend() == "cpu" and math.prod(x.shape[:-1]) == 1
          and w.shape[0] % 2 == 0)


@jax.custom_vjp
def _dense(x, w):
  """x [..., d] @ w [d, f] with float32 accumulation, in x's dtype (x and w share it).

  One row on CPU (`_one_row_halves`): the sum of the products of the two halves of d, one
  batched [2, 1, d/2] x [2, d/2, f] product (a free reshape of w). XLA's CPU backend runs a
  one-row product as one matrix-vector call that streams w at ~21 GB/s, the batched pair at
  ~28-35 (a jitted sum: ~30-33; the `small` preset's layer products, 2 AMD EPYC cores; batches
  of 4 or 8 pieces were slower than 2). Only the summation order differs."""
  if _one_row_halves(x, w):
    d, f = w.shape
    x_2xMxh = x.reshape(1, 2, d // 2).swapaxes(0, 1)
    y_2xMxf = jnp.einsum("cmh,chf->cmf", x_2xMxh, w.reshape(2, d // 2, f),
                         preferred_element_type=jnp.float32)
    return y_2xMxf.sum(0).reshape(*x.shape[:-1], f).astype(x.dtype)
  return jnp.einsum("...d,df->...f", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _dense_fwd(x, w):
  return _dense(x, w), (x, w)


def _dense_bwd(res, dy):
  # The gradients autodiff would give, written so that the weight gradient contracts the token
  # axes of x and dy as they are: autodiff's dW^T = dy^T x makes XLA (CPU) transpose dy, fused
  # into the elementwise backward that produces it, at a fraction of memory bandwidth.
  x, w = res
  dx = jnp.einsum("...f,df->...d", dy, w, preferred_element_type=jnp.float32).astype(x.dtype)
  dw = jnp.einsum("...d,...f->df", x, dy, preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


_dense.defvjp(_dense_fwd, _dense_bwd)


def _mm(x, w, dtype):
  """x [..., d] @ w [d, f] in the compute dtype with float32 accumulation."""
  return _dense(x.astype(dtype), w.astype(dtype))


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs, axis_name: str = "norm"):
    self.scale = _param(rngs, (dim,), (axis_name,), cfg, init="ones")
    self.eps = cfg.rms_eps

  def __call__(self, x):
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...].astype(jnp.float32) * x32.astype(dtype).astype(jnp.float32)
            ).astype(dtype)


class Proj(nnx.Module):
  """A (in, out) kernel with an optional bias."""

  def __init__(self, d_in, d_out, names, cfg, *, rngs, bias=False):
    self.kernel = _param(rngs, (d_in, d_out), names, cfg)
    self.bias = _param(rngs, (d_out,), (names[1],), cfg, init="zeros") if bias else None
    self.dtype = _dtype(cfg.dtype)

  def __call__(self, x):
    y = _mm(x, self.kernel[...], self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies [h/2] as transformers computes them (default / linear / llama3), float32.

  'llama3' (Llama 3.1+) follows transformers' `_compute_llama3_parameters` op for op in float32:
  with wavelength w = 2 pi / f, frequencies with w > original / low_freq_factor are divided by
  `rope_factor`, those with w < original / high_freq_factor are kept, and the band between is
  (1 - s) f / factor + s f with s = (original / w - low) / (high - low).
  """
  exponent = jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** exponent)
  if cfg.rope_type == "linear":
    inv_freq = inv_freq / cfg.rope_factor
  elif cfg.rope_type == "llama3":
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_position
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    inv_freq = jnp.where(medium, smoothed, scaled)
  return inv_freq


def apply_rope(x_BxTxNxh, positions_BxT, inv_freq):
  """Non-interleaved ('rotate_half') RoPE, as in transformers' Llama/Qwen."""
  angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, h/2]
  emb = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  x = x_BxTxNxh.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos + rotated * sin).astype(x_BxTxNxh.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.q_proj = Proj(d, h * hd, ("embed", "heads"), cfg, rngs=rngs, bias=cfg.qkv_bias)
    self.k_proj = Proj(d, k * hd, ("embed", "kv_heads"), cfg, rngs=rngs, bias=cfg.qkv_bias)
    self.v_proj = Proj(d, k * hd, ("embed", "kv_heads"), cfg, rngs=rngs, bias=cfg.qkv_bias)
    self.o_proj = Proj(h * hd, d, ("heads", "embed"), cfg, rngs=rngs)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(hd, cfg, rngs=rngs, axis_name="head_dim")
      self.k_norm = RMSNorm(hd, cfg, rngs=rngs, axis_name="head_dim")
    else:
      self.q_norm = self.k_norm = None
    self.cfg = cfg

  def __call__(self, x_BxTxD, positions_BxT, kv_mask_BxS, cache_kv, cache_index, segments=None):
    """`segments`: None, or (query segment ids [B, T], key segment ids [B, S]); a query then
    attends only to keys of its own segment."""
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    h, k, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = self.q_proj(x_BxTxD).reshape(b, t, h, hd)
    kk = self.k_proj(x_BxTxD).reshape(b, t, k, hd)
    v = self.v_proj(x_BxTxD).reshape(b, t, k, hd)
    if self.q_norm is not None:
      q, kk = self.q_norm(q), self.k_norm(kk)
    inv_freq = rope_frequencies(cfg)
    q = apply_rope(q, positions_BxT, inv_freq)
    kk = apply_rope(kk, positions_BxT, inv_freq)
    q = constrain(q, ("batch", "length", "act_heads", None))

    q_seg, kv_seg = segments if segments is not None else (None, None)
    if cache_kv is None:
      out = attention.causal_attention(q, kk, v, kv_mask_BxS, q_seg, block=cfg.attention_block)
      new_cache = None
    elif isinstance(cache_kv, RowBlocks):
      if t != 1 or segments is not None or jnp.ndim(cache_index) != 1:
        raise ValueError("a RowBlocks cache takes one token per row (cache_index [B]) and no "
                         "segment ids")
      ks, vs = write_block_slots(cache_kv.k, cache_kv.v, cache_index, kk[:, 0], v[:, 0])
      new_cache = RowBlocks(ks, vs)
      out = attention.rows_block_attention(q, ks, vs, kk, v, cache_index, kv_mask_BxS)
    elif jnp.ndim(cache_index) == 1:
      if t != 1 or segments is not None:
        raise ValueError("per-row cache_index [B] takes one token per row and no segment ids")
      # One token per row, row b at cache slot cache_index[b]: attention over the cache slots
      # below each row's own and the row's own key and value as computed here. `cache_kv` is
      # (all layers' k [L, B, K, h, S] and v [L, B, K, S, h], this layer's index, whether to
      # write first): the attention reads only the blocks it needs of this layer, never a copy
      # of the layer's whole cache.
      ck, cv, layer, write_first = cache_kv
      if write_first:
        # This layer's new key and value go into the carried caches before the attention
        # reads them (`decode_writes_first`).
        ck, cv = write_row_slots(ck, cv, layer, cache_index, kk[:, 0], v[:, 0])
        new_cache = (ck, cv)
      else:   # returned; `hidden` writes every layer's after the layer loop
        new_cache = (kk.astype(ck.dtype), v.astype(cv.dtype))
      out = attention.rows_decode_attention(q, ck, cv, kk, v, cache_index, kv_mask_BxS,
                                            block=attention.row_block(cfg.cache_block),
                                            layer=layer)
    else:
      ck, cv = cache_kv
      keys = jax.lax.dynamic_update_slice(ck, kk.transpose(0, 2, 3, 1).astype(ck.dtype),
                                          (0, 0, 0, cache_index))
      values = jax.lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3).astype(cv.dtype),
                                            (0, 0, cache_index, 0))
      new_cache = (keys, values)
      out = attention.cached_attention(q, keys, values, cache_index, kv_mask_BxS, q_seg, kv_seg,
                                       block=cfg.cache_block)
    out = out.astype(x_BxTxD.dtype)
    return self.o_proj(out), new_cache


def write_row_slots(k_LxBxKxhxS, v_LxBxKxSxh, layer, slot_B, k_new, v_new):
  """Every layer's caches with row b's new key and value written at slot `slot_B[b]`: of layer
  `layer` (an int or traced scalar; `k_new`, `v_new` [B, K, h]) or, with `layer` None, of every
  layer at once (`k_new`, `v_new` [L, B, K, h])."""
  rows_B = jnp.arange(slot_B.shape[0])
  if layer is None:
    # Non-adjacent advanced indices put their [B] dimension first: [B, L, K, h] is written.
    k_new, v_new = jnp.swapaxes(k_new, 0, 1), jnp.swapaxes(v_new, 0, 1)
    k_at = k_LxBxKxhxS.at[:, rows_B, :, :, slot_B]
    v_at = v_LxBxKxSxh.at[:, rows_B, :, slot_B]
  else:
    k_at = k_LxBxKxhxS.at[layer, rows_B, :, :, slot_B]
    v_at = v_LxBxKxSxh.at[layer, rows_B, :, slot_B]
  return (k_at.set(k_new.astype(k_LxBxKxhxS.dtype), unique_indices=True),
          v_at.set(v_new.astype(v_LxBxKxSxh.dtype), unique_indices=True))


class RowBlocks(NamedTuple):
  """A per-row decode cache held as one buffer per (layer, block of `w` slots): `k[l][j]`
  [B, K, h, w] and `v[l][j]` [B, K, w, h] hold slots [j * w, (j + 1) * w) of layer l (the
  stacked cache's `k[l, ..., j * w:(j + 1) * w]`, `v[l, :, :, j * w:(j + 1) * w]`).

  For the CPU backend's decode loop (`sampler`): XLA's CPU backend copies every slice of a
  larger buffer that it hands to a product, so a decode step over the stacked cache copied each
  block it read (measured: ~3/4 of the decode attention's time at 32 rows x ~250 slots); here
  every block is a buffer of its own, read in place. `hidden` takes it with one token per row
  and split layer weights (`layer_states`); the numbers are those of the stacked cache bit for
  bit (`attention.rows_block_attention`)."""

  k: tuple
  v: tuple


def to_row_blocks(cache: Cache, block: int) -> RowBlocks:
  """The stacked cache as `RowBlocks` of `block` slots (S a multiple of `block`)."""
  k, v = cache["k"], cache["v"]
  n_layers, s = k.shape[0], k.shape[-1]
  if s % block:
    raise ValueError(f"to_row_blocks: {s} cache slots are not a multiple of the block {block}")
  sl = lambda j: slice(j * block, (j + 1) * block)  # noqa: E731
  axes = {name: CACHE_AXES[name][1:] for name in CACHE_AXES}
  return RowBlocks(
      k=tuple(tuple(constrain(k[i, ..., sl(j)], axes["k"]) for j in range(s // block))
              for i in range(n_layers)),
      v=tuple(tuple(constrain(v[i, :, :, sl(j)], axes["v"]) for j in range(s // block))
              for i in range(n_layers)))


def from_row_blocks(blocks: RowBlocks) -> Cache:
  """The stacked cache of `RowBlocks`."""
  return constrain_cache({
      "k": jnp.stack([jnp.concatenate(layer, axis=-1) for layer in blocks.k]),
      "v": jnp.stack([jnp.concatenate(layer, axis=-2) for layer in blocks.v])})


def write_block_slots(k_blocks, v_blocks, slot_B, k_new_BxKxh, v_new_BxKxh):
  """One layer's `RowBlocks` buffers with row b's new key and value at slot `slot_B[b]`: each
  block scatters the rows whose slot it holds (the others' indices fall outside it: dropped)."""
  rows_B = jnp.arange(slot_B.shape[0])
  w = k_blocks[0].shape[-1]
  ks, vs = [], []
  for j, (k_j, v_j) in enumerate(zip(k_blocks, v_blocks, strict=True)):
    at_B = jnp.where(slot_B // w == j, slot_B % w, w)
    ks.append(k_j.at[rows_B, :, :, at_B].set(k_new_BxKxh.astype(k_j.dtype), mode="drop",
                                             unique_indices=True))
    vs.append(v_j.at[rows_B, :, at_B].set(v_new_BxKxh.astype(v_j.dtype), mode="drop",
                                          unique_indices=True))
  return tuple(ks), tuple(vs)


def decode_writes_first() -> bool:
  """Whether a per-row decode step (`hidden` with cache_index [B]) writes each layer's new keys
  and values into the stacked caches before that layer's attention reads them (the caches then
  travel through the layer loop), rather than once for every layer after it.

  On the CPU backend, writing after the reads made XLA copy both whole caches twice a decode step
  (measured, `small` preset on 2 AMD EPYC cores: the copies took ~1.6 ms of a ~28 ms step at 16
  rows; without them the sampler's 16-row decode went from ~570 to ~680 tokens/s). Not where
  programs order their collectives (`sharding.orders_collectives`: the multi-process CPU
  runtime): a per-layer scatter into caches sharded by row gathers its indices and rows, and
  inside the layer loop those collectives race the decode loop's own
  (`train.collective_order`). Accelerator programs write once after the layer loop (one
  scatter, its collectives outside the loop).
  """
  return jax.default_backend() == "cpu" and not orders_collectives()


@jax.custom_vjp
def _silu_mul(gate, up):
  """silu(gate) * up (the SwiGLU MLP's hidden activations), whose backward keeps only `gate`
  and `up` and recomputes the sigmoid: JAX's own differentiation kept three more [..., F]
  arrays (the sigmoid among them), each stacked over the scanned layers of a training step
  (the `small` preset's [8, 256] SFT step: 12 MiB per array and layer)."""
  return jax.nn.silu(gate) * up


def _silu_mul_fwd(gate, up):
  return _silu_mul(gate, up), (gate, up)


def _silu_mul_bwd(res, dy):
  gate, up = res
  s = jax.nn.sigmoid(gate)
  d_gate = dy * up * (s * (1 + gate * (1 - s)))
  return d_gate.astype(gate.dtype), (dy * (gate * s)).astype(up.dtype)


_silu_mul.defvjp(_silu_mul_fwd, _silu_mul_bwd)


def _swiglu(x_BxTxD, gate_DxF, up_DxF, down_FxD, dtype):
  hidden = _silu_mul(_mm(x_BxTxD, gate_DxF, dtype), _mm(x_BxTxD, up_DxF, dtype))
  hidden = constrain(hidden, ("batch", "length", "act_mlp"))
  return _mm(hidden, down_FxD, dtype)


def _blocked_swiglu(x_BxTxD, gate_DxF, up_DxF, down_FxD, dtype, block: int):
  """`_swiglu` over sequence blocks of `block` positions, each rematerialised: the backward
  holds one block's [B, block, F] intermediates at a time instead of the whole sequence's. The
  MLP is position-wise, so the blocks compute the same function (the sequence is zero-padded to
  whole blocks and the padding dropped)."""
  b, t, d = x_BxTxD.shape
  n = -(-t // block)
  x_BxPxD = jnp.pad(x_BxTxD, ((0, 0), (0, n * block - t), (0, 0)))
  x_NxBxCxD = x_BxPxD.reshape(b, n, block, d).swapaxes(0, 1)
  one_block = jax.checkpoint(
      lambda x_BxCxD: _swiglu(x_BxCxD, gate_DxF, up_DxF, down_FxD, dtype),
      policy=jax.checkpoint_policies.nothing_saveable)
  y_NxBxCxD = jax.lax.map(one_block, x_NxBxCxD)
  return y_NxBxCxD.swapaxes(0, 1).reshape(b, n * block, d)[:, :t]


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.gate_proj = Proj(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg, rngs=rngs)
    self.up_proj = Proj(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg, rngs=rngs)
    self.down_proj = Proj(cfg.d_ff, cfg.d_model, ("mlp", "embed"), cfg, rngs=rngs)
    # Sequences longer than this run in rematerialised blocks (`_blocked_swiglu`): only in a
    # rematerialised model, whose backward would otherwise hold the whole [B, T, F] activations.
    self.block = cfg.attention_block if cfg.remat else 0

  def __call__(self, x):
    weights = (self.gate_proj.kernel[...], self.up_proj.kernel[...], self.down_proj.kernel[...])
    dtype = self.gate_proj.dtype
    if self.block and x.shape[1] > self.block:
      return _blocked_swiglu(x, *weights, dtype, self.block)
    return _swiglu(x, *weights, dtype)


class ExpertProj(nnx.Module):
  """Stacked expert kernels [E, in, out] (logical axes ('expert', in, out))."""

  def __init__(self, n_experts, d_in, d_out, names, cfg, *, rngs):
    self.kernel = _param(rngs, (n_experts, d_in, d_out), ("expert",) + tuple(names), cfg)


class Experts(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e, d, f = cfg.num_experts, cfg.d_model, cfg.moe_d_ff
    self.gate_proj = ExpertProj(e, d, f, ("embed", "mlp"), cfg, rngs=rngs)
    self.up_proj = ExpertProj(e, d, f, ("embed", "mlp"), cfg, rngs=rngs)
    self.down_proj = ExpertProj(e, f, d, ("mlp", "embed"), cfg, rngs=rngs)


def route_top_k(router_logits, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """(weights [..., k] float32, expert ids [..., k]): softmax over experts, the top-k kept
  (optionally renormalised to sum to one, Qwen3's `norm_topk_prob`)."""
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  top, idx = jax.lax.top_k(probs, cfg.experts_per_token)
  if cfg.norm_topk_prob:
    top = top / jnp.sum(top, axis=-1, keepdims=True)
  return top, idx


def route(router_logits_BxTxE, cfg: ModelConfig) -> jax.Array:
  """Dense routing weights [B, T, E] (float32): `route_top_k`'s weights at their experts, zeros
  elsewhere."""
  top, idx = route_top_k(router_logits_BxTxE, cfg)
  onehot = jax.nn.one_hot(idx, cfg.num_experts, dtype=jnp.float32)  # [B, T, k, E]
  return jnp.einsum("btk,btke->bte", top, onehot)


class MoE(nnx.Module):
  """Qwen3-MoE sparse MLP: router linear -> softmax -> top-k (-> renormalise) -> SwiGLU experts.

  Parameters: `router/kernel` [D, E] (transformers' `mlp.gate`) and `experts/{gate,up,down}_proj/
  kernel` [E, D, F] / [E, D, F] / [E, F, D], (in, out) per expert.

  `cfg.moe_impl='dense'` (default) computes *densely over experts*: every expert runs on every
  token ([B, T, E, F] intermediates) and the outputs are summed with the routing weights, which
  are zero outside each token's top-k. The result equals transformers' sparse dispatch (up to
  summation order), and gradients reach the router through the kept top-k probabilities exactly
  as in transformers. It costs E / k times the FLOPs of a sparse dispatch: right for correctness,
  tests, small models and meshes (plain einsums that shard like the dense MLP), not an efficient
  kernel for a 128-expert teacher. `cfg.moe_impl='ragged'` is the sparse dispatch: the B T k
  (token, expert) pairs sorted by expert, grouped matmuls (`jax.lax.ragged_dot`), outputs
  scattered back with their weights; same function, top-k FLOPs (tested equal to 'dense').
  As in transformers, the router logits are computed in the compute dtype, softmax and top-k in
  float32, and the routing weights are cast back to the compute dtype.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.router = Proj(cfg.d_model, cfg.num_experts, ("embed", "expert"), cfg, rngs=rngs)
    self.experts = Experts(cfg, rngs=rngs)
    self.cfg = cfg

  def __call__(self, x_BxTxD):
    """(output [B, T, D], router logits [B, T, E] in float32)."""
    cfg = self.cfg
    dtype = _dtype(cfg.dtype)
    x = x_BxTxD.astype(dtype)
    logits = self.router(x)
    weights = route(logits, cfg).astype(dtype)

    def mm(spec, a, w):
      return jnp.einsum(spec, a, w.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)

    ex = self.experts
    if cfg.moe_impl == "ragged":
      return self._ragged(x, logits), logits.astype(jnp.float32)
    gate = mm("btd,edf->btef", x, ex.gate_proj.kernel[...])
    up = mm("btd,edf->btef", x, ex.up_proj.kernel[...])
    hidden = constrain(_silu_mul(gate, up), ("batch", "length", None, "act_mlp"))
    # sum_e w_e down_e(h_e) as one contraction over (expert, F) of the weighted hidden states (no
    # [B, T, E, D] intermediate, and no batched dot: XLA:CPU has no bf16 x bf16 -> f32 one).
    return (mm("btef,efd->btd", hidden * weights[..., None], ex.down_proj.kernel[...]),
            logits.astype(jnp.float32))

  def _ragged(self, x_BxTxD, logits_BxTxE):
    """Sparse dispatch: sort the (token, expert) pairs by expert, grouped matmuls, scatter back."""
    cfg, ex = self.cfg, self.experts
    dtype = x_BxTxD.dtype
    b, t, d = x_BxTxD.shape
    k = cfg.experts_per_token
    top, idx = route_top_k(logits_BxTxE, cfg)  # [B, T, k]
    flat_expert = idx.reshape(-1)  # [N k], pair p = token p // k
    order = jnp.argsort(flat_expert, stable=True)
    token = order // k
    group_sizes = jnp.bincount(flat_expert, length=cfg.num_experts).astype(jnp.int32)
    xs = x_BxTxD.reshape(b * t, d)[token]  # [N k, D], grouped by expert
    weight = top.reshape(-1)[order].astype(dtype)

    def gmm(a, w):
      return jax.lax.ragged_dot(a, w.astype(dtype), group_sizes,
                                preferred_element_type=jnp.float32).astype(dtype)

    hidden = _silu_mul(gmm(xs, ex.gate_proj.kernel[...]), gmm(xs, ex.up_proj.kernel[...]))
    out = jax.lax.ragged_dot(hidden * weight[:, None], ex.down_proj.kernel[...].astype(dtype),
                             group_sizes, preferred_element_type=jnp.float32)
    y = jnp.zeros((b * t, d), jnp.float32).at[token].add(out)
    return y.reshape(b, t, d).astype(dtype)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    self.mlp = MoE(cfg, rngs=rngs) if cfg.is_moe else MLP(cfg, rngs=rngs)
    self.is_moe = cfg.is_moe

  def __call__(self, x, positions, kv_mask, cache_kv, cache_index, segments=None):
    """(x, new cache, router logits [B, T, E] or None for a dense MLP)."""
    attn_out, new_cache = self.attn(self.input_norm(x), positions, kv_mask, cache_kv, cache_index,
                                    segments)
    x = x + attn_out
    router_logits = None
    if self.is_moe:
      mlp_out, router_logits = self.mlp(self.post_attn_norm(x))
    else:
      mlp_out = self.mlp(self.post_attn_norm(x))
    x = x + mlp_out
    return constrain(x, ("batch", "length", "act_embed")), new_cache, router_logits


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, param_dtype=_dtype(cfg.param_dtype),
                           embedding_init=nnx.with_partitioning(
                               nnx.initializers.normal(_INIT_STD), ("vocab", "embed")),
                           rngs=rngs)

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(r):
      return Block(cfg, rngs=r)

    self.layers = make_layers(rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    self.lm_head = (None if cfg.tie_embeddings else
                    Proj(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), cfg, rngs=rngs))

  # -- pieces -------------------------------------------------------------------------------------
  def unembed_matrix(self) -> jax.Array:
    """The [D, V] output matrix (the embedding transposed when tied)."""
    if self.lm_head is None:
      return self.embed.embedding[...].T
    return self.lm_head.kernel[...]

  def logits(self, h_BxTxD) -> jax.Array:
    """float32 logits of final hidden states (use `scoring.py` for large vocabularies)."""
    return unembed(h_BxTxD, self.unembed_matrix(), self.cfg)

  def layer_states(self) -> list:
    """Each layer's parameters as its own arrays (a copy of the stacked [L, ...] weights).

    For a loop that runs the layers many times (decoding): slice once outside the loop and pass
    the list as `hidden(..., layer_states=...)`. XLA's CPU backend does not fuse a slice of the
    stacked weights into the matmul that reads it: every layer of every step would copy its
    weights first (measured: a batch-1 decode step of the `small` preset 2-3x the time of
    reading the weights once).
    """
    _, state = nnx.split(self.layers)
    return [jax.tree.map(lambda a, i=i: a[i], state) for i in range(self.cfg.n_layers)]

  def hidden(self, tokens_BxT, mask_BxT=None, positions_BxT=None, *, cache: Cache | None = None,
             cache_index=0, kv_mask_BxS=None, return_router_logits: bool = False,
             segment_ids_BxT=None, kv_segment_ids_BxS=None, layer_states=None):
    """Final (normed) hidden states [B, T, D] and the updated cache (None without a cache).

    `layer_states`: the layers' parameters already split per layer (`layer_states()`); the
    layers then run unrolled on them (the stacked weights in the model are not read). With
    them and a per-row `cache_index` [B], `cache` may be `RowBlocks` (returned as such).

    With `return_router_logits=True` a third element: the router logits [L, B, T, E] (float32)
    of a mixture-of-experts model (None for a dense one), for `load_balancing_loss`.
    `segment_ids_BxT` packs several sequences per row (module docstring); with a cache it needs
    `kv_segment_ids_BxS`, the segment of every cache slot.
    """
    cfg = self.cfg
    segments = None
    if segment_ids_BxT is not None:
      segment_ids_BxT = jnp.asarray(segment_ids_BxT, jnp.int32)
      if segment_ids_BxT.shape != tokens_BxT.shape:
        raise ValueError(f"segment_ids_BxT shape {segment_ids_BxT.shape} != tokens_BxT shape "
                         f"{tokens_BxT.shape}")
      if cache is None:
        kv_segment_ids_BxS = segment_ids_BxT
      elif kv_segment_ids_BxS is None:
        raise ValueError("hidden: segment_ids_BxT with a cache needs kv_segment_ids_BxS")
      segments = (segment_ids_BxT, jnp.asarray(kv_segment_ids_BxS, jnp.int32))
      if mask_BxT is None:
        mask_BxT = segment_ids_BxT > 0
      if positions_BxT is None:
        positions_BxT = segment_positions(segment_ids_BxT)
    elif kv_segment_ids_BxS is not None:
      raise ValueError("hidden: kv_segment_ids_BxS without segment_ids_BxT")
    if mask_BxT is None:
      mask_BxT = jnp.ones(tokens_BxT.shape, bool)
    mask_BxT = mask_BxT.astype(bool)
    if positions_BxT is None:
      positions_BxT = default_positions(mask_BxT)
    if kv_mask_BxS is None:
      kv_mask_BxS = mask_BxT
    x = self.embed(tokens_BxT).astype(_dtype(cfg.dtype))
    x = constrain(x, ("batch", "length", "act_embed"))

    graphdef, layer_state = nnx.split(self.layers)

    if isinstance(cache, RowBlocks):
      if layer_states is None or jnp.ndim(cache_index) != 1 or return_router_logits:
        raise ValueError("hidden: a RowBlocks cache needs layer_states and a per-row "
                         "cache_index [B] (and returns no router logits)")
      ks, vs = list(cache.k), list(cache.v)
      for i in range(cfg.n_layers):
        block = nnx.merge(graphdef, layer_states[i])
        x, (ks[i], vs[i]), _ = block(x, positions_BxT, kv_mask_BxS, RowBlocks(ks[i], vs[i]),
                                     cache_index, segments)
      return self.final_norm(x), RowBlocks(tuple(ks), tuple(vs))

    per_row = cache is not None and jnp.ndim(cache_index) == 1

    write_first = per_row and decode_writes_first()

    def body(carry, xs):
      layer_params, layer_cache = xs
      if per_row:   # layer_cache is the layer index: the attention slices the stacked cache
        if write_first:   # the caches travel in the carry
          carry, ck, cv = carry
        else:
          ck, cv = cache["k"], cache["v"]
        layer_cache = (ck, cv, layer_cache, write_first)
      block = nnx.merge(graphdef, layer_params)
      y, new_cache, router_logits = block(carry, positions_BxT, kv_mask_BxS, layer_cache,
                                          cache_index, segments)
      if write_first:
        return (y, *new_cache), (None, router_logits)
      return y, (new_cache, router_logits)

    if cfg.remat:
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)

    layer_cache = None if cache is None else (cache["k"], cache["v"])
    if per_row:
      layer_cache = jnp.arange(cfg.n_layers, dtype=jnp.int32)
    if layer_states is not None and len(layer_states) != cfg.n_layers:
      raise ValueError(f"hidden: {len(layer_states)} layer_states for {cfg.n_layers} layers")
    carry = (x, cache["k"], cache["v"]) if write_first else x
    if cfg.scan_layers and layer_states is None:
      carry, (new_cache, router_logits) = jax.lax.scan(body, carry, (layer_state, layer_cache))
    else:
      outs = []
      for i in range(cfg.n_layers):
        params_i = (jax.tree.map(lambda a: a[i], layer_state) if layer_states is None
                    else layer_states[i])
        carry, c = body(carry, (params_i, jax.tree.map(lambda a: a[i], layer_cache)))
        outs.append(c)
      new_cache, router_logits = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    if write_first:   # the layers wrote their keys and values into the carried caches
      x, ck, cv = carry
      new_cache = {"k": ck, "v": cv}
    else:
      x = carry
      if per_row:
        # The layers returned the new [L, B, 1, K, h] keys and values; one scatter writes row
        # b's at slot cache_index[b] of every layer.
        k_new, v_new = new_cache
        ck, cv = write_row_slots(cache["k"], cache["v"], None, cache_index, k_new[:, :, 0],
                                 v_new[:, :, 0])
        new_cache = {"k": ck, "v": cv}
      elif cache is not None:
        new_cache = {"k": new_cache[0], "v": new_cache[1]}
    h = self.final_norm(x)
    if return_router_logits:
      return h, new_cache, router_logits
    return h, new_cache

  def __call__(self, tokens_BxT, mask_BxT=None, positions_BxT=None, segment_ids_BxT=None):
    h, _ = self.hidden(tokens_BxT, mask_BxT, positions_BxT, segment_ids_BxT=segment_ids_BxT)
    return self.logits(h)


def load_balancing_loss(router_logits_LxBxTxE, top_k: int, mask_BxT=None) -> jax.Array:
  """Switch-Transformer auxiliary load-balancing loss, as transformers' `load_balancing_loss_func`
  (Qwen3-MoE): E * sum_e f_e P_e, where over all layers and (unmasked) tokens f_e is the mean
  number of top-k assignments to expert e and P_e the mean routing probability of e.

  Takes the [L, B, T, E] router logits of `Transformer.hidden(..., return_router_logits=True)`;
  `mask_BxT` (optional) excludes padding. The train steps (`train.steps`) add
  `cfg.router_aux_loss_coef` times this to an MoE student's loss; the forward pass never does.
  """
  logits = router_logits_LxBxTxE.astype(jnp.float32)
  n_experts = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)
  _, idx = jax.lax.top_k(probs, top_k)
  counts = jnp.sum(jax.nn.one_hot(idx, n_experts, dtype=jnp.float32), axis=-2)  # [L, B, T, E]
  if mask_BxT is None:
    w = jnp.ones(logits.shape[1:3], jnp.float32)
  else:
    w = mask_BxT.astype(jnp.float32)
  rows = logits.shape[0] * jnp.sum(w)
  tokens_per_expert = jnp.einsum("lbte,bt->e", counts, w) / rows
  prob_per_expert = jnp.einsum("lbte,bt->e", probs, w) / rows
  return n_experts * jnp.sum(tokens_per_expert * prob_per_expert)


def forward_with_aux(graphdef, params, tokens_BxT, mask_BxT=None, positions_BxT=None,
                     segment_ids_BxT=None):
  """(float32 logits [B, T, V], load-balancing loss) of a mixture-of-experts model (the loss is
  0.0 for a dense one), padding excluded from the loss via `mask_BxT` (or `segment_ids_BxT`)."""
  model = merge(graphdef, params)
  if mask_BxT is None and segment_ids_BxT is not None:
    mask_BxT = jnp.asarray(segment_ids_BxT) > 0
  h, _, router_logits = model.hidden(tokens_BxT, mask_BxT, positions_BxT,
                                     return_router_logits=True, segment_ids_BxT=segment_ids_BxT)
  if router_logits is None:
    return model.logits(h), jnp.zeros((), jnp.float32)
  return model.logits(h), load_balancing_loss(router_logits, model.cfg.experts_per_token,
                                              mask_BxT)


def unembed(h_BxTxD, w_DxV, cfg: ModelConfig) -> jax.Array:
  logits = _mm(h_BxTxD, w_DxV, _dtype(cfg.dtype)).astype(jnp.float32)
  return constrain(logits, ("batch", "length", "act_vocab"))


def default_positions(mask_BxT) -> jax.Array:
  """RoPE positions that skip padding: cumsum(mask) - 1, clipped at 0."""
  return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def segment_positions(segment_ids_BxT) -> jax.Array:
  """RoPE positions of packed rows: t minus the index of the first token of t's segment (a run
  of equal ids), so every segment starts at 0; padding (id 0) gets positions too, never read."""
  seg = jnp.asarray(segment_ids_BxT, jnp.int32)
  t = jnp.arange(seg.shape[-1], dtype=jnp.int32)
  starts = jnp.concatenate([jnp.ones(seg.shape[:-1] + (1,), bool), seg[..., 1:] != seg[..., :-1]],
                           axis=-1)
  first = jax.lax.cummax(jnp.where(starts, t, 0), axis=seg.ndim - 1)
  return t - first


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
  """An empty KV cache of `length` slots: {'k': [L, B, K, h, S], 'v': [L, B, K, S, h]} (module
  docstring)."""
  dt = _dtype(cfg.dtype) if dtype is None else dtype
  return {name: jnp.zeros(shape, dt)
          for name, shape in cache_shapes(cfg, batch, length).items()}


def cache_shapes(cfg: ModelConfig, batch: int, length: int) -> dict[str, tuple[int, ...]]:
  """Shapes of `init_cache`'s arrays."""
  lead = (cfg.n_layers, batch, cfg.n_kv_heads)
  return {"k": lead + (cfg.head_dim, length), "v": lead + (length, cfg.head_dim)}


# Logical axes of the cache arrays (a pytree like the cache), and where their batch (the same in
# both) and slot dimensions are.
CACHE_AXES = {"k": ("layers", "batch", "act_kv_heads", None, "cache_length"),
              "v": ("layers", "batch", "act_kv_heads", "cache_length", None)}
CACHE_BATCH_AXIS = CACHE_AXES["k"].index("batch")
CACHE_SLOT_AXIS = {name: axes.index("cache_length") for name, axes in CACHE_AXES.items()}


def constrain_cache(cache: Cache) -> Cache:
  """The cache with every array constrained to its `CACHE_AXES`."""
  return {name: constrain(a, CACHE_AXES[name]) for name, a in cache.items()}


# -- functional API -------------------------------------------------------------------------------
def create(cfg: ModelConfig, seed: int | jax.Array = 0) -> Transformer:
  """Builds a model with unsharded parameters (place them with `train.mesh`)."""
  with nnx.use_eager_sharding(False):
    rngs = nnx.Rngs(params=seed) if isinstance(seed, int) else nnx.Rngs(params=seed)
    return Transformer(cfg, rngs=rngs)


def split(model: Transformer) -> tuple[nnx.GraphDef, Params]:
  """(graphdef, params) with params a plain nested dict of arrays."""
  graphdef, state = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


def init(cfg: ModelConfig, seed: int | jax.Array = 0) -> tuple[nnx.GraphDef, Params]:
  return split(create(cfg, seed))


@functools.lru_cache(maxsize=None)
def _abstract_split(cfg: ModelConfig):
  """(graphdef, abstract Param state) of `cfg`: shapes only, nothing allocated, cached per config.

  Built outside any mesh in context: logical names are not mesh axes, so NNX must not try to
  place the abstract variables on the current mesh (that is `train.mesh`'s job, via rules).
  """
  with jax.set_mesh(jax.sharding.Mesh(np.empty((), dtype=object), ())), \
       nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(abstract, nnx.Param)


def graphdef_for(cfg: ModelConfig) -> nnx.GraphDef:
  """The graphdef of `cfg` from abstract shapes (nothing allocated); cached per config."""
  return _abstract_split(cfg)[0]


def abstract_params(cfg: ModelConfig) -> Params:
  """ShapeDtypeStructs of the params of `cfg` (nothing allocated)."""
  return nnx.to_pure_dict(_abstract_split(cfg)[1])


def logical_axes(cfg: ModelConfig) -> Params:
  """Tuples of logical axis names, one per parameter, in the params-dict structure."""
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    state = _abstract_split(cfg)[1]
  specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def merge(graphdef: nnx.GraphDef, params: Params) -> Transformer:
  return nnx.merge(graphdef, params)


def gathered(graphdef: nnx.GraphDef, params: Params, after=None) -> Params:
  """`params` gathered whole over the batch's devices once, up front, for inference that loops
  over decode steps or chunks, or for a frozen model inside a train step; `after`: gather only
  once that is computed (`sharding.gathered_after`).

  Every loop then reads those arrays: none gathers weights of its own, and XLA hoists no gather
  out of one loop that could race another loop's collectives on CPU (`train.collective_order`).
  XLA hoists the gathers of an FSDP layout out of such loops anyway; this holds them for the
  whole call instead of per loop. Only where `sharding.orders_collectives()` (a multi-process
  CPU run): elsewhere `params` as they are."""
  if not orders_collectives():
    return params
  # The logical names from the merged model's own metadata (`logical_axes` builds an abstract
  # model, which cannot happen inside `jit`).
  state = nnx.state(merge(graphdef, params), nnx.Param)
  logical = jax.tree.map(tuple, nnx.to_pure_dict(nnx.get_partition_spec(state)),
                         is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return gathered_after(after, params, logical)


def forward(graphdef, params, tokens_BxT, mask_BxT=None, positions_BxT=None,
            segment_ids_BxT=None) -> jax.Array:
  """float32 logits [B, T, V] (small vocabularies; see `scoring.py` for large ones)."""
  return merge(graphdef, params)(tokens_BxT, mask_BxT, positions_BxT, segment_ids_BxT)

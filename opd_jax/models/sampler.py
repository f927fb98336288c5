"""Batched generation with a KV cache: one jitted prefill + `lax.while_loop` decode.

    out = sample(graphdef, params, prompt_BxP, prompt_mask_BxP, rng, SamplerConfig(...))

Prompts arrive LEFT-padded (`prompt_mask_BxP` False on the left; every row needs at least one
real token). The whole call (prefill and decode loop) is one jitted function with the model
graphdef, the `SamplerConfig` and the installed axis rules as static arguments: it compiles once
per (batch, prompt length, config) and never per token or per call.

Outputs (`SampleOutput`, T = P + max_new_tokens):
  tokens_BxT    prompt (padding replaced by `pad_id`) then the response; `pad_id` after EOS.
  mask_BxT      real tokens (prompt tokens and generated tokens up to and including EOS).
  loss_mask_BxT generated tokens up to and including EOS.
  lengths_B     response lengths including EOS (= max_new_tokens when no EOS was produced).
  logp_BxT      log-prob of each generated token under the *sampling distribution before
                truncation*: log_softmax(logits / temperature)[token], i.e. temperature applied,
                top-k / top-p NOT applied (they only restrict which tokens can be drawn). At
                temperature 1 this is the model's log-prob. `scoring.token_logprobs(...,
                temperature=same)` returns the same numbers. Greedy decoding reports the same
                quantity (log_softmax(logits / temperature) of the argmax). Zero elsewhere.

Sampling order per step (as in transformers): logits / temperature -> top-k -> top-p (the smallest
set of most likely tokens whose probability reaches top_p; the most likely token is always kept;
ties at the threshold are kept) -> a two-stage Gumbel-max draw (`block_gumbel_max`) with row b's
own key `fold_in(fold_in(rng, step), b)` (`row_keys`). Sequences stop independently at EOS; the
loop exits as soon as every row has stopped.

Work per call: with `group_size` g > 1 each distinct prompt is prefilled once and its cache rows
repeated for its g samples. With `mode='compact'` (the default) finished rows stop costing decode:
the loop runs over the whole batch until the running rows fit the next smaller power of two, then
moves them (tokens, cache rows, masks) into that smaller batch, and so on down to `min_bucket`
(and a multiple of the mesh's batch shards); one compiled loop per bucket size, all in the one
jitted call. With `mode='continuous'` the decode runs a fixed number of slots (`slots`): rows
queue in row order, and after each step every slot whose row ended (EOS or budget) takes the
next queued row, its cache rows copied from its prompt's prefill, its own position, step and
key; once the queue is empty the running slots compact through the power-of-two buckets. Every
mode decodes with per-row cache slots (`decode_step` with a [B] slot: the new keys scattered at
each row's slot, attention in blocks that are exact no-ops for rows below them,
`attention.rows_decode_attention`), so per-row results do not depend on the mode, the slots,
the buckets or the group sharing, up to the rounding of the products: a shared prefill may round
the logits differently, and so may split and stacked weights (`SamplerConfig.split_weights`) and,
at sizes where XLA's CPU matrix products pick their kernel by row count, a bucket of another size
(the `small` preset's 512 x 1536 products round rows differently at 2-32 rows than at 64; the
tests' tiny shapes do not: there the modes agree bit for bit). In float32 the tokens are then
equal and the log-probs agree to ~2e-6 (measured, `small` preset, 'continuous' and 'compact'
against 'static'); in bfloat16 a logit may round to a neighbouring value, and a sampled token can
then differ where two candidates' noisy scores nearly tie.

Sharding: with a mesh and rules in context (`jax.set_mesh(mesh)`, `sharding.axis_rules(rules)`),
the batch dimension of the cache, logits and token buffers is constrained to the `batch` logical
axis (e.g. ('data', 'fsdp')) and params keep their own shardings.

Multi-host: `sample` never fetches device values (no np.asarray on global arrays). Prompt values
(left padding, token range) are validated on host numpy by `check_prompts_host` before the batch
is put on devices; given jax.Arrays, `sample` checks shapes only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import trace_cache
from opd_jax.models import attention
from opd_jax.models import sharding
from opd_jax.models import transformer


MODES = ("continuous", "compact", "static")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Decoding settings (hashable: a static argument of the jitted sampler).

  Attributes:
    max_new_tokens: tokens generated per sequence (the response budget).
    temperature: divides the logits (> 0). Also defines what `logp_BxT` means (module docstring).
    top_k: keep only the k most likely tokens (0 = off).
    top_p: nucleus threshold in (0, 1] (1 = off).
    greedy: argmax decoding (temperature / top-k / top-p do not change the choice).
    eos_id: end-of-sequence id, or a tuple of ids (e.g. Qwen's <|im_end|> and <|endoftext|>).
    pad_id: written after EOS and over prompt padding.
    group_size: rows per prompt: rows g*i .. g*i + g - 1 must hold the same prompt (the rollout
      layout, `data.pipeline`); each distinct prompt is prefilled once and its KV cache shared
      by its g samples. 1 = every row prefilled on its own. Must divide the batch.
    mode: 'continuous' (a fixed number of decode slots, `slots`; when a row ends, the next
      pending row takes its slot, its cache rows copied from its prompt's prefill, so the loop
      runs at full occupancy until no row is pending, then compacts the tail like 'compact'),
      'compact' (finished rows stop costing decode: the loop runs at the batch size, then
      at each smaller power of two >= min_bucket once the running rows fit it, moving them
      there) or
      'static' (every row decodes until the last one finishes; the baseline). All give the
      same tokens and log-probs up to the products' rounding (module docstring: each row draws
      from its own key, `row_keys`, and its decode attention does not depend on the other rows,
      `attention.rows_decode_attention`).
    min_bucket: 'compact' and 'continuous' (its tail): the smallest bucket (every bucket is one
      more compiled loop; on CPU a decode step below 8 rows still costs less than at 8: the
      `small` preset's layer products ~5.0 ms at 2 or 4 rows, ~6.0-6.3 at 8, ~3.3 at 1, and
      `bench/rollout.py` gains 2-13% from 2 against 8, its compilation ~1.5x as long).
    slots: 'continuous' only: decode slots (rows decoded per step); 0 = `default_slots`: half
      the batch, at least min_bucket, a multiple of the mesh's batch shards, at most
      the batch.
    split_weights: decode from a per-layer copy of the weights made once per call before the
      decode loop (`DecodeWeights`), instead of slicing the stacked [L, ...] weights inside it.
      True: every decode batch; False: none; None: on the CPU backend, decode batches (buckets)
      of at most `SPLIT_MAX_ROWS` rows. XLA's CPU backend copies a sliced weight before the
      matmul that reads it, every layer of every step: where reading the weights bounds a step
      (few rows) that copy costs as much again (`small` preset, batch 1: 20 -> 12 ms a step
      split); at 64 rows split layers are still 4-10% faster. Other backends read slices in
      place; there the copy would only cost memory. A bucket that reads split layers where each
      layer writes its keys first (single-process CPU) also holds its KV cache as
      `transformer.RowBlocks` (one buffer per layer and block: XLA's CPU backend copied every
      cache block it read out of the stacked cache; a 64-row step 60 -> 47 ms).
  """

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  eos_id: int | tuple[int, ...] = dataclasses.field(kw_only=True)
  pad_id: int = dataclasses.field(kw_only=True)
  group_size: int = dataclasses.field(default=1, kw_only=True)
  mode: str = dataclasses.field(default="compact", kw_only=True)
  min_bucket: int = dataclasses.field(default=8, kw_only=True)
  slots: int = dataclasses.field(default=0, kw_only=True)
  split_weights: bool | None = dataclasses.field(default=None, kw_only=True)

  def __post_init__(self):
    def bad(field, why):
      raise ValueError(f"SamplerConfig.{field}={getattr(self, field)!r}: {why}")

    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
      bad("max_new_tokens", "must be a positive int")
    if not self.temperature > 0:
      bad("temperature", "must be > 0 (use greedy=True for argmax decoding)")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      bad("top_k", "must be an int >= 0 (0 = off)")
    if not 0 < self.top_p <= 1:
      bad("top_p", "must be in (0, 1] (1 = off)")
    if isinstance(self.eos_id, list):
      object.__setattr__(self, "eos_id", tuple(self.eos_id))
    if not self.eos_ids or any(not isinstance(e, (int, np.integer)) or e < 0
                               for e in self.eos_ids):
      bad("eos_id", "must be a non-negative int or a non-empty tuple of them")
    if not isinstance(self.pad_id, (int, np.integer)) or self.pad_id < 0:
      bad("pad_id", "must be a non-negative int")
    if not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1:
      bad("group_size", "must be an int >= 1")
    if self.mode not in MODES:
      bad("mode", f"must be one of {MODES}")
    if not isinstance(self.min_bucket, (int, np.integer)) or self.min_bucket < 1:
      bad("min_bucket", "must be an int >= 1")
    if not isinstance(self.slots, (int, np.integer)) or self.slots < 0:
      bad("slots", "must be an int >= 0 (0 = derived from the batch)")
    if self.split_weights not in (None, True, False):
      bad("split_weights", "must be True, False or None (= on the CPU backend)")

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return tuple(self.eos_id) if isinstance(self.eos_id, tuple) else (self.eos_id,)


class SampleOutput(NamedTuple):
  tokens_BxT: jax.Array
  mask_BxT: jax.Array
  loss_mask_BxT: jax.Array
  lengths_B: jax.Array
  logp_BxT: jax.Array


# -- pieces (used by the loop; public so tests can drive them step by step) -----------------------
class DecodeWeights(NamedTuple):
  """The weights a decode step reads, each in its own buffer: every layer's parameters
  (`Transformer.layer_states`; None: the model's stacked weights) and the output matrix as
  [V, D] (for tied embeddings the embedding itself, no copy). XLA's CPU backend transposes a
  [D, V] matrix built from the embedding at every step, and multiplies [16, D] rows by a [D, V]
  matrix at half the speed of the same product against [V, D] (measured at the `small`
  preset's 512 x 32768)."""

  layers: list | None
  output_VxD: jax.Array


# `SamplerConfig.split_weights=None`: on CPU, decode batches up to this many rows read split
# weights (measured on the `small` preset: faster at 1 and 16 rows; at 64 rows 4-10% faster
# once the decode stopped copying its caches, `transformer.decode_writes_first`, ~10% slower
# before; larger batches not measured).
SPLIT_MAX_ROWS = 64


def split_max_rows(cfg: SamplerConfig) -> int:
  """The largest decode batch that reads split weights under `cfg.split_weights` (0: none)."""
  if cfg.split_weights is None:
    return SPLIT_MAX_ROWS if jax.default_backend() == "cpu" else 0
  return np.iinfo(np.int32).max if cfg.split_weights else 0


def decode_weights(model, split_layers: bool = True) -> DecodeWeights:
  """The model's weights for decoding (`DecodeWeights`), the layers split or not; made once per
  call, before the decode loop."""
  if model.lm_head is None:
    output_VxD = model.embed.embedding[...]
  else:
    output_VxD = model.lm_head.kernel[...].T
  return DecodeWeights(model.layer_states() if split_layers else None, output_VxD)


def _reads_row_blocks(weights: DecodeWeights | None) -> bool:
  """Whether a decode loop reading `weights` holds its cache as `transformer.RowBlocks` (one
  buffer per layer and block, read in place): split layers where each layer writes its keys
  first (`transformer.decode_writes_first`: the single-process CPU backend)."""
  return weights is not None and weights.layers is not None and transformer.decode_writes_first()


def _decode_cache(cache, weights: DecodeWeights | None, model):
  """The stacked cache as the decode loop that reads `weights` holds it (`_reads_row_blocks`)."""
  if not _reads_row_blocks(weights):
    return cache
  return transformer.to_row_blocks(cache, attention.row_block(model.cfg.cache_block))


def _stacked_cache(cache):
  """A decode loop's cache back in the stacked layout (the moves between buckets take rows of
  it)."""
  return transformer.from_row_blocks(cache) if isinstance(cache, transformer.RowBlocks) else cache


def _refill_row_blocks(blocks, prompt_cache, prompt_row, slot, p: int):
  """`RowBlocks` with decode slot `slot`'s first `p` cache slots taken from row `prompt_row` of
  the stacked `prompt_cache` (every layer; the blocks past slot p keep what they hold)."""
  w = blocks.k[0][0].shape[-1]
  src = {name: _prompt_slots(name, prompt_cache[name], prompt_row, p) for name in ("k", "v")}
  ks, vs = [list(layer) for layer in blocks.k], [list(layer) for layer in blocks.v]
  for i in range(len(ks)):
    for j in range(-(-p // w)):
      part = slice(j * w, min((j + 1) * w, p))
      ks[i][j] = jax.lax.dynamic_update_slice(
          ks[i][j], src["k"][i, ..., part].astype(ks[i][j].dtype), (slot, 0, 0, 0))
      vs[i][j] = jax.lax.dynamic_update_slice(
          vs[i][j], src["v"][i, :, :, part].astype(vs[i][j].dtype), (slot, 0, 0, 0))
  return transformer.RowBlocks(tuple(map(tuple, ks)), tuple(map(tuple, vs)))


def _row_start(row, ndim: int) -> tuple:
  """Start index of cache row `row` (first slot, first of everything else)."""
  start = [0] * ndim
  start[transformer.CACHE_BATCH_AXIS] = row
  return tuple(start)


def _prompt_slots(name: str, cache_array, row, p: int):
  """Cache array `name`'s first `p` slots of row `row` (batch dimension kept, size 1)."""
  size = list(cache_array.shape)
  size[transformer.CACHE_BATCH_AXIS] = 1
  size[transformer.CACHE_SLOT_AXIS[name]] = p
  return jax.lax.dynamic_slice(cache_array, _row_start(row, cache_array.ndim), size)


def _split_weights(model, cfg: SamplerConfig, sizes):
  """(weights of the decode buckets of at most `split_max_rows` rows, of the larger ones): the
  layers split once if any bucket reads them; every bucket reads the same [V, D] output matrix,
  so a row's logits depend on its bucket only through the products' rounding. (None, None)
  where nothing is split."""
  split_max = split_max_rows(cfg)
  if not split_max:
    return None, None
  split = decode_weights(model, any(size <= split_max for size in sizes))
  return split, split._replace(layers=None)


def _bucket_weights(weights, size: int, cfg: SamplerConfig):
  """The weights a decode bucket of `size` rows reads (`_split_weights`)."""
  split, stacked = weights
  return split if size <= split_max_rows(cfg) else stacked


def prefill(model, prompt_BxP, prompt_mask_BxP, cache_len: int,
            weights: DecodeWeights | None = None):
  """Runs the left-padded prompt into a fresh cache of `cache_len` slots.

  Returns (logits_BxV of the first new token, cache, kv_mask_BxS). Slots >= P are marked valid
  in `kv_mask_BxS` up front (causality by slot hides them until they are written). `weights`
  (`decode_weights`): read those instead of the model's.
  """
  b, p = prompt_BxP.shape
  cache = transformer.constrain_cache(transformer.init_cache(model.cfg, b, cache_len))
  kv_mask = jnp.concatenate([prompt_mask_BxP, jnp.ones((b, cache_len - p), bool)], axis=1)
  kv_mask = sharding.constrain(kv_mask, ("batch", "cache_length"))
  h, cache = model.hidden(prompt_BxP, prompt_mask_BxP, cache=cache, cache_index=0,
                          kv_mask_BxS=kv_mask,
                          layer_states=None if weights is None else weights.layers)
  return _logits(model, h[:, -1:], weights)[:, 0], cache, kv_mask


def _logits(model, h_BxTxD, weights: DecodeWeights | None, vocab_major: bool = False):
  """float32 logits [B, T, V] of final hidden states, from `weights` when given; with
  `vocab_major` (needs `weights`) [V, B, T], not transposed."""
  if weights is None:
    if vocab_major:
      raise ValueError("vocabulary-major logits read DecodeWeights; none were given")
    return model.logits(h_BxTxD)
  # As `transformer.unembed`: the compute dtype with float32 accumulation, rounded to the
  # compute dtype, returned as float32 (`model.logits`' numbers up to summation order).
  # Vocabulary-major ([V, D] x [D, B T]): XLA's CPU backend runs it faster at every row count
  # than [B T, D] x [D, V] (`small` preset, 2 AMD EPYC cores, the transpose to [B, T, V]
  # included: 1 row 2.1 -> 1.9 ms, 16 rows 8.0 -> 4.6 ms, 64 rows 14.3 -> 12.2 ms).
  dtype = transformer._dtype(model.cfg.dtype)
  logits_VxBxT = jnp.einsum("vd,btd->vbt", weights.output_VxD.astype(dtype),
                            h_BxTxD.astype(dtype), preferred_element_type=jnp.float32)
  logits_VxBxT = logits_VxBxT.astype(dtype).astype(jnp.float32)
  if vocab_major:
    return sharding.constrain(logits_VxBxT, ("act_vocab", "batch", "length"))
  logits = jnp.transpose(logits_VxBxT, (1, 2, 0))
  return sharding.constrain(logits, ("batch", "length", "act_vocab"))


def decodes_vocab_major(weights: DecodeWeights | None, rows: int) -> bool:
  """Whether a decode batch of `rows` rows reading `weights` keeps its logits vocabulary-major
  ([V, B]) through `choose`: wherever `weights` exist and rows > 1. XLA's CPU backend reduces
  [V, B] over its vocabulary without the transpose to [B, V] (a copy of the logits) and without
  materialising the [B, V] temporaries of a row-wise argmax: the greedy choice and log-prob
  after the unembedding took 2.7-2.9 -> 0.6 ms at 16 rows and 5.2-5.8 -> 1.7-1.9 ms at 64
  (`small` preset, 32k vocabulary, 2 AMD EPYC cores; a whole 64-row greedy step's non-product
  operations ~4.4 -> ~1.5 ms). One row stays [1, V] (the same bytes; [V, 1] reduces slower)."""
  return weights is not None and rows > 1


def decode_step(model, token_B, position_B, slot, cache, kv_mask_BxS,
                weights: DecodeWeights | None = None, vocab_major: bool = False):
  """Feeds one token per row at cache slot `slot` (an int, or [B]: row b at slot[b]); returns
  (next logits, cache): logits_BxV, or logits_VxB with `vocab_major` (`decodes_vocab_major`;
  needs `weights`). `weights` (`decode_weights`): read those instead of the model's."""
  h, cache = model.hidden(token_B[:, None], positions_BxT=position_B[:, None], cache=cache,
                          cache_index=slot, kv_mask_BxS=kv_mask_BxS,
                          layer_states=None if weights is None else weights.layers)
  logits = _logits(model, h, weights, vocab_major)
  return (logits[:, :, 0] if vocab_major else logits[:, 0]), cache


def filter_logits(logits_BxV, top_k: int, top_p: float) -> jax.Array:
  """Sets logits outside the top-k / top-p (nucleus) set to -inf (top-k first, then top-p)."""
  v = logits_BxV.shape[-1]
  k = top_k if 0 < top_k < v else 0
  if k == 0 and top_p >= 1.0:
    return logits_BxV
  neg_inf = jnp.array(-jnp.inf, logits_BxV.dtype)
  # Descending values of the candidate set (the top k, or the whole vocabulary).
  sorted_BxK = jax.lax.top_k(logits_BxV, k if k else v)[0]
  threshold_B = sorted_BxK[:, -1]
  if top_p < 1.0:
    probs = jax.nn.softmax(sorted_BxK, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    threshold_B = jnp.min(jnp.where(keep, sorted_BxK, jnp.inf), axis=-1)
  return jnp.where(logits_BxV < threshold_B[:, None], neg_inf, logits_BxV)


def first_argmax(x, axis: int = -1) -> jax.Array:
  """`jnp.argmax(x, axis)` (the first index of the maximum, or of the first NaN) as two plain
  reductions: the maximum, then the smallest index holding it. XLA's CPU backend does not
  vectorise argmax's (value, index) reduction: over a 32k vocabulary it took ~4x as long
  (1.7 ms against 0.4 ms at 16 rows, 2 cores). Over the first axis of a [V, B] matrix with V >
  `ARGMAX_BLOCK` it runs in blocks (`_first_argmax_blocked`)."""
  axis = axis % x.ndim
  if axis == 0 and x.ndim == 2 and x.shape[0] > ARGMAX_BLOCK:
    return _first_argmax_blocked(x)
  return _first_argmax_one_stage(x, axis)


def _first_argmax_one_stage(x, axis: int) -> jax.Array:
  v = x.shape[axis]
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
  mx = jnp.max(x, axis=axis, keepdims=True)
  # A NaN's index minus V sorts below every maximum's index (NaN wins, as in argmax, whether or
  # not the maximum itself came out NaN).
  key = jnp.where(jnp.isnan(x), iota - v, jnp.where(x == mx, iota, v))
  first = jnp.min(key, axis=axis)
  return jnp.where(first < 0, first + v, first)


# Width of the blocks of `_first_argmax_blocked`.
ARGMAX_BLOCK = 256


def _first_argmax_blocked(x_VxB, block: int = ARGMAX_BLOCK) -> jax.Array:
  """`first_argmax` over the first axis of [V, B] in two stages: the first block of `block`
  indices whose maximum is the column's, then the first index of that block holding it. XLA's
  CPU backend materialises the whole [V, B] index key of the one-stage form and reduces it over
  V slowly: a vocabulary-major decode's greedy choice took 2.1 -> 1.0 ms at 64 rows of a 32k
  vocabulary and 1.1 -> 0.4 ms at 16 (2 AMD EPYC cores).

  XLA's CPU maximum reductions may skip NaNs (its YNNPACK reductions do), so the blocks'
  maxima cannot be trusted to carry one: where the sum of all of `x_VxB` is not finite (a NaN,
  an infinity, or an overflow) the one-stage form answers instead (one `lax.cond`; the sum is
  a plain pass over the logits, the NaN test of every block was a slow boolean reduction)."""
  v, b = x_VxB.shape
  n = -(-v // block)

  def blocked(x_VxB):
    x_NxCxB = jnp.pad(x_VxB, ((0, n * block - v), (0, 0)),
                      constant_values=-jnp.inf).reshape(n, block, b)
    top_NxB = jnp.max(x_NxCxB, axis=1)
    mx_B = jnp.max(top_NxB, axis=0)
    block_B = jnp.argmax(top_NxB == mx_B, axis=0).astype(jnp.int32)
    inner_CxB = jnp.take_along_axis(x_NxCxB, block_B[None, None, :], axis=0)[0]
    return block_B * block + jnp.argmax(inner_CxB == mx_B, axis=0).astype(jnp.int32)

  return jax.lax.cond(jnp.isfinite(jnp.sum(x_VxB)), blocked,
                      functools.partial(_first_argmax_one_stage, axis=0), x_VxB)


# Width of the vocabulary blocks of `block_gumbel_max`.
DRAW_BLOCK = 128


def draw_noise_size(vocab: int, block: int = DRAW_BLOCK) -> int:
  """Gumbel numbers one row's draw uses: one per vocabulary block, one per index of a block."""
  return -(-vocab // block) + block


def block_gumbel_max(gumbel_BxG, logits, block: int = DRAW_BLOCK,
                     vocab_axis: int = -1) -> jax.Array:
  """A draw from softmax(logits) per row, by Gumbel-max in two stages: the block of `block`
  indices with the largest log(block mass) + Gumbel noise, then, inside it, the index with the
  largest logit + Gumbel noise. The block is drawn with probability (its mass / total) and the
  index with (its mass / its block's mass): the softmax distribution exactly, from
  `draw_noise_size(V)` Gumbel numbers per row (`gumbel_BxG`: the first V / block for the blocks,
  the last `block` for the indices) instead of V (`jax.random.categorical`: 10 ms a step at 16
  rows of a 32k vocabulary on 2 CPU cores, against ~0.5 ms). -inf logits are never drawn. Like
  one-stage Gumbel-max, and unlike an inverse-CDF draw, the choice moves only when two noisy
  scores nearly tie, so logits that differ by rounding (a shared prefill, split weights) draw
  the same token almost always. `logits`: [B, V] (`vocab_axis` -1) or [V, B] (0).
  """
  ax = vocab_axis % 2
  v = logits.shape[ax]
  n = -(-v // block)
  pad = [(0, 0), (0, 0)]
  pad[ax] = (0, n * block - v)
  # [B, N, C] or [N, C, B]: the vocabulary cut into N blocks of C = `block` indices.
  x = jnp.pad(logits, pad, constant_values=-jnp.inf)
  x = x.reshape(x.shape[:ax] + (n, block) + x.shape[ax + 1:])
  mx = jnp.expand_dims(jnp.max(logits, axis=ax), (ax, ax + 1))
  # log of each block's mass, relative to the row's maximum (-inf for an empty block).
  mass = jnp.sum(jnp.exp(x - mx), axis=ax + 1)
  noise_blocks, noise_inner = gumbel_BxG[:, :n], gumbel_BxG[:, n:]
  if ax == 0:
    noise_blocks, noise_inner = noise_blocks.T, noise_inner.T
  block_B = first_argmax(jnp.log(mass) + noise_blocks, axis=ax)
  inner = jnp.take_along_axis(x, jnp.expand_dims(block_B, (ax, ax + 1)), axis=ax)
  index_B = first_argmax(jnp.squeeze(inner, ax) + noise_inner, axis=ax)
  return (block_B * block + index_B).astype(jnp.int32)


def choose(logits, keys_B, cfg: SamplerConfig, vocab_axis: int = -1):
  """Next tokens [B] int32 and their log-probs under log_softmax(logits / temperature).

  `logits`: [B, V] (`vocab_axis` -1) or [V, B] (0: a decode step's vocabulary-major logits,
  `decodes_vocab_major`). `keys_B`: one key per row (`row_keys`); row b draws its Gumbel numbers
  from keys_B[b] and takes `block_gumbel_max` of its own (top-k / top-p filtered) logits, so
  its token does not depend on the other rows. Greedy ignores it.
  """
  ax = vocab_axis % 2
  scaled = logits.astype(jnp.float32) / cfg.temperature
  if cfg.greedy:
    tok = first_argmax(scaled, axis=ax)
  else:
    v = scaled.shape[ax]
    if ax == 0 and (0 < cfg.top_k < v or cfg.top_p < 1.0):
      scaled, ax = scaled.T, 1   # the top-k / top-p sort reads rows
    # top-k / top-p are static settings: disabled, `filter_logits` returns its input (no sort).
    size = draw_noise_size(v)
    gumbel_BxG = jax.vmap(lambda key: jax.random.gumbel(key, (size,), jnp.float32))(keys_B)
    drawn = filter_logits(scaled, cfg.top_k, cfg.top_p) if ax == 1 else scaled
    tok = block_gumbel_max(gumbel_BxG, drawn, vocab_axis=ax)
  tok = tok.astype(jnp.int32)
  # log_softmax at the chosen token only: x[tok] - max - log(sum(exp(x - max))), the same
  # operations as log_softmax(x)[tok] without its [B, V] output (the same float result over
  # [B, V]; over [V, B] the sum may run in another order).
  mx = jax.lax.stop_gradient(jnp.max(scaled, axis=ax))
  lse = jnp.log(jnp.sum(jnp.exp(scaled - jnp.expand_dims(mx, ax)), axis=ax))
  picked = jnp.squeeze(jnp.take_along_axis(scaled, jnp.expand_dims(tok, ax), axis=ax), ax)
  return tok, (picked - mx) - lse


# -- the loop -------------------------------------------------------------------------------------
def _batch_logits(logits, vocab_major: bool):
  """A decode step's logits ([B, V], or [V, B] when `vocab_major`) with the batch dimension on
  the `batch` logical axis and the vocabulary whole."""
  return sharding.constrain(logits, (None, "batch") if vocab_major else ("batch", None))


class _Rows(NamedTuple):
  """Per-row decode state of one batch bucket (rows in any order; `row_B` says which)."""
  row_B: jax.Array         # original row index of each bucket row
  last_B: jax.Array        # token written at step - 1
  done_B: jax.Array
  prompt_len_B: jax.Array  # position of the first new token
  kv_mask_BxS: jax.Array
  cache: dict


class _LoopState(NamedTuple):
  step: jax.Array          # index of the next new token to write (shared by every row)
  rows: _Rows
  tokens_BxN: jax.Array    # indexed by original row
  logp_BxN: jax.Array


_TRACES = {"sample": 0}   # incremented when `_sample` is traced (tests assert no recompilation)


def row_keys(rng, step, row_B):
  """The draw key of each row at `step`: fold_in(fold_in(rng, step), original row index).

  A row's tokens depend on its own index only, never on the batch it is decoded in, so
  compacted and static decoding (and shared and unshared prefill) draw the same tokens.
  """
  return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(rng, step), row_B)


def slot_keys(rng, step_B, row_B):
  """`row_keys` with a step per row: row_B[i]'s key at its own step step_B[i] (the same keys)."""
  return jax.vmap(lambda st, r: jax.random.fold_in(jax.random.fold_in(rng, st), r))(step_B, row_B)


def _batch_shards() -> int:
  """Devices the `batch` logical axis is split over in the current mesh (1 without one)."""
  rules = sharding.current_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh is None or mesh.empty:
    return 1
  spec = sharding.logical_to_spec(("batch",), rules, mesh.axis_names)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def buckets(batch: int, mode: str, min_bucket: int = 1, shards: int = 1) -> tuple[int, ...]:
  """Batch sizes the decode loop runs at: (batch,) for 'static'; for 'compact' the batch, then
  every smaller power of two >= min_bucket that is a multiple of `shards` (one compiled loop
  each: at most log2(batch / min_bucket) + 1)."""
  out = [batch]
  if mode == "compact":
    b = 1 << ((batch - 1).bit_length() - 1) if batch > 1 else 0
    while b >= max(shards, min_bucket, 1) and b % max(shards, 1) == 0:
      out.append(b)
      b //= 2
  return tuple(out)


def default_slots(batch: int, min_bucket: int = 8, shards: int = 1) -> int:
  """'continuous' decode slots when `SamplerConfig.slots` is 0: half the batch, at least
  `min_bucket`, rounded up to a multiple of `shards`, at most the batch.

  Half, not fewer: a decode step reads every weight whatever its rows, so few slots pay that
  read more often (`bench/rollout.py`, 64 rows, AMD EPYC: 16 slots 2.03x the static sampler,
  24 2.37x, 32 2.45x, 64 2.18x; 32 beat 16 on three Intel days too). The slots' cache is still
  half the static sampler's."""
  k = max(batch // 2, min_bucket, 1)
  k = -(-k // shards) * shards
  return min(k, batch)


def slot_count(batch: int, cfg: SamplerConfig, shards: int = 1) -> int:
  """Decode slots of a 'continuous' call (`cfg.slots`, or `default_slots`); refused in one line
  when the batch shards do not divide it."""
  k = min(cfg.slots, batch) if cfg.slots else default_slots(batch, cfg.min_bucket, shards)
  if k % shards:
    raise ValueError(f"SamplerConfig.slots={cfg.slots}: {k} decode slots are not a multiple of "
                     f"the mesh's {shards} batch shards")
  return k


def cache_length(prompt_len: int, max_new_tokens: int, model_cfg) -> int:
  """Slots of the decode KV cache: prompt + max_new - 1, rounded up to whole blocks of
  `attention.row_block` (the decode reads it in those blocks)."""
  rb = attention.row_block(model_cfg.cache_block)
  return -(-(prompt_len + max_new_tokens - 1) // rb) * rb


def cache_shapes(batch: int, prompt_len: int, cfg: SamplerConfig, model_cfg, shards: int = 1
                 ) -> tuple[tuple[int, int], ...]:
  """(rows, slots) of each KV cache one call holds (`transformer.init_cache` layout) for memory
  planning: 'static' / 'compact': the batch x `cache_length` (group_size > 1: plus the distinct
  prompts' prefill cache, repeated into it); 'continuous': the decode slots x `cache_length`
  plus the distinct prompts' prefill cache (x `cache_length`) the slots are refilled from."""
  full = cache_length(prompt_len, cfg.max_new_tokens, model_cfg)
  prompts = batch // cfg.group_size
  if cfg.mode == "continuous" and cfg.max_new_tokens > 1:
    return ((slot_count(batch, cfg, shards), full), (prompts, full))
  if cfg.group_size > 1:
    return ((batch, full), (prompts, full))
  return ((batch, full),)


class _Slots(NamedTuple):
  """'continuous' decode state: one entry per decode slot."""
  row_K: jax.Array         # original row decoded in the slot (stale once the slot is free)
  step_K: jax.Array        # index of the row's next new token
  last_K: jax.Array        # the row's token at step - 1
  done_K: jax.Array        # the slot is free (its row ended, or none was assigned yet)
  prompt_len_K: jax.Array
  kv_mask_KxS: jax.Array
  cache: dict


def _take_slots(sl: _Slots, idx_J) -> _Slots:
  take = lambda a: a[idx_J]  # noqa: E731
  return _Slots(row_K=take(sl.row_K), step_K=take(sl.step_K), last_K=take(sl.last_K),
                done_K=take(sl.done_K), prompt_len_K=take(sl.prompt_len_K),
                kv_mask_KxS=take(sl.kv_mask_KxS),
                cache=jax.tree.map(lambda a: jnp.take(a, idx_J, axis=transformer.CACHE_BATCH_AXIS),
                                   sl.cache))


def _take_rows(rows: _Rows, idx_K) -> _Rows:
  return _Rows(row_B=sharding.whole(rows.row_B[idx_K]), last_B=rows.last_B[idx_K],
               done_B=rows.done_B[idx_K], prompt_len_B=sharding.whole(rows.prompt_len_B[idx_K]),
               kv_mask_BxS=rows.kv_mask_BxS[idx_K],
               cache=jax.tree.map(lambda a: jnp.take(a, idx_K, axis=transformer.CACHE_BATCH_AXIS),
                                  rows.cache))


def _sample_impl(graphdef, params, prompt_BxP, prompt_mask_BxP, rng, *, cfg: SamplerConfig,
                 rules):
  _TRACES["sample"] += 1
  with sharding.axis_rules(rules):
    model = transformer.merge(graphdef, transformer.gathered(graphdef, params))
    vocab = model.cfg.vocab_size
    for name, ids in (("eos_id", cfg.eos_ids), ("pad_id", (cfg.pad_id,))):
      if max(ids) >= vocab:
        raise ValueError(f"SamplerConfig.{name}={getattr(cfg, name)!r} is outside the model's "
                         f"vocabulary of {vocab}")
    b, p = prompt_BxP.shape
    g = cfg.group_size
    if b % g:
      raise ValueError(f"SamplerConfig.group_size={g} does not divide the batch of {b} rows")
    n = cfg.max_new_tokens
    cache_len = cache_length(p, n, model.cfg)
    batch = lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))  # noqa: E731
    prompt_mask_BxP = batch(prompt_mask_BxP.astype(bool))
    prompt_BxP = batch(jnp.where(prompt_mask_BxP, prompt_BxP.astype(jnp.int32), cfg.pad_id))
    # Row ids and prompt lengths whole (`sharding.whole`): the moves between buckets read them
    # by row.
    prompt_len_B = sharding.whole(jnp.sum(prompt_mask_BxP, axis=1, dtype=jnp.int32))
    eos = jnp.asarray(cfg.eos_ids, jnp.int32)

    if cfg.mode == "continuous" and n > 1:
      tokens_BxN, logp_BxN = _continuous(model, prompt_BxP, prompt_mask_BxP, prompt_len_B, rng,
                                         cfg, cache_len)
      return _outputs(prompt_BxP, prompt_mask_BxP, tokens_BxN, logp_BxN, cfg)
    # 'static': one loop over the whole batch until every row is done. 'compact': a loop per
    # bucket size; a bucket's loop stops once its running rows fit the next bucket, and the
    # running rows (finished ones fill any spare slots) move there with their cache rows.
    # (n == 1: the prefill drew every token; no loop.)
    sizes = buckets(b, cfg.mode, cfg.min_bucket, _batch_shards()) if n > 1 else ()
    weights = _split_weights(model, cfg, sizes)
    if g == 1:
      logits, cache, kv_mask = prefill(model, prompt_BxP, prompt_mask_BxP, cache_len, weights[0])
    else:
      # Rows g*i .. g*i + g - 1 hold the same prompt: prefill each distinct prompt once and
      # repeat its logits, cache rows and mask for the group's g samples.
      logits, cache, kv_mask = prefill(model, prompt_BxP[::g], prompt_mask_BxP[::g], cache_len,
                                        weights[0])
      logits = batch(jnp.repeat(logits, g, axis=0))
      kv_mask = batch(jnp.repeat(kv_mask, g, axis=0))
      cache = transformer.constrain_cache(jax.tree.map(
          lambda a: jnp.repeat(a, g, axis=transformer.CACHE_BATCH_AXIS), cache))
    row_B = sharding.whole(jnp.arange(b, dtype=jnp.int32))

    def keys(step, rows_B):
      # Greedy decoding draws nothing: no per-row keys are derived.
      return None if cfg.greedy else row_keys(rng, step, rows_B)

    tok, logp = choose(logits, keys(0, row_B), cfg)
    state = _LoopState(
        step=jnp.int32(1),
        rows=_Rows(row_B=row_B, last_B=tok, done_B=jnp.isin(tok, eos),
                   prompt_len_B=prompt_len_B, kv_mask_BxS=kv_mask, cache=cache),
        tokens_BxN=batch(jnp.full((b, n), cfg.pad_id, jnp.int32).at[:, 0].set(tok)),
        logp_BxN=batch(jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp)))

    def body(s: _LoopState, in_order: bool, weights: DecodeWeights | None):
      r = s.rows
      slot_B = jnp.full(r.last_B.shape, p + s.step - 1, jnp.int32)
      vm = decodes_vocab_major(weights, slot_B.shape[0])
      logits, cache = decode_step(model, r.last_B, r.prompt_len_B + s.step - 1, slot_B, r.cache,
                                  r.kv_mask_BxS, weights, vm)
      tok, logp = choose(_batch_logits(logits, vm), keys(s.step, r.row_B), cfg, 0 if vm else -1)
      tok = jnp.where(r.done_B, cfg.pad_id, tok)
      logp = jnp.where(r.done_B, 0.0, logp)
      if in_order:   # the bucket is the whole batch in its original order
        tokens = jax.lax.dynamic_update_slice(s.tokens_BxN, tok[:, None], (0, s.step))
        logps = jax.lax.dynamic_update_slice(s.logp_BxN, logp[:, None], (0, s.step))
      else:          # distinct original rows: a scatter of one token per row
        tokens = s.tokens_BxN.at[r.row_B, s.step].set(tok, unique_indices=True)
        logps = s.logp_BxN.at[r.row_B, s.step].set(logp, unique_indices=True)
      return _LoopState(step=s.step + 1, tokens_BxN=tokens, logp_BxN=logps,
                        rows=r._replace(last_B=tok, done_B=r.done_B | jnp.isin(tok, eos),
                                        cache=cache))

    for i, size in enumerate(sizes):
      nxt = sizes[i + 1] if i + 1 < len(sizes) else 0

      def cond(s: _LoopState, nxt=nxt):
        running = ~s.rows.done_B
        go = (s.step < n) & jnp.any(running)
        return go & (jnp.sum(running, dtype=jnp.int32) > nxt) if nxt else go

      bucket_weights = _bucket_weights(weights, size, cfg)
      state = state._replace(rows=state.rows._replace(
          cache=_decode_cache(state.rows.cache, bucket_weights, model)))
      state = jax.lax.while_loop(cond, functools.partial(
          body, in_order=i == 0, weights=bucket_weights), state)
      state = state._replace(rows=state.rows._replace(cache=_stacked_cache(state.rows.cache)))
      if nxt:
        # Stable: running rows first, in their current order.
        order = jnp.argsort(state.rows.done_B, stable=True)[:nxt]
        state = state._replace(rows=_take_rows(state.rows, order))

    return _outputs(prompt_BxP, prompt_mask_BxP, state.tokens_BxN, state.logp_BxN, cfg)


# Jitted with the graph definition and sampler config static; a warm start reads its trace from
# the trace cache (`opd_jax.trace_cache`) instead of tracing it.
_sample = trace_cache.CachedJit(_sample_impl, name="sample", static_argnums=(0,),
                                static_argnames=("cfg", "rules"))


def _outputs(prompt_BxP, prompt_mask_BxP, tokens_BxN, logp_BxN, cfg: SamplerConfig):
  b, p = prompt_BxP.shape
  is_eos = jnp.isin(tokens_BxN, jnp.asarray(cfg.eos_ids, jnp.int32))
  # A token is real iff no EOS came strictly before it.
  eos_before = jnp.cumsum(is_eos, axis=1) - is_eos
  resp_mask = eos_before == 0
  lengths = jnp.sum(resp_mask, axis=1, dtype=jnp.int32)
  tokens = jnp.concatenate([prompt_BxP, jnp.where(resp_mask, tokens_BxN, cfg.pad_id)], 1)
  no_prompt = jnp.zeros((b, p), bool)
  return SampleOutput(
      tokens_BxT=tokens,
      mask_BxT=jnp.concatenate([prompt_mask_BxP, resp_mask], axis=1),
      loss_mask_BxT=jnp.concatenate([no_prompt, resp_mask], axis=1),
      lengths_B=lengths,
      logp_BxT=jnp.concatenate([jnp.zeros((b, p), jnp.float32),
                                jnp.where(resp_mask, logp_BxN, 0.0)], axis=1))


def _continuous(model, prompt_BxP, prompt_mask_BxP, prompt_len_B, rng, cfg: SamplerConfig,
                cache_len: int):
  """The 'continuous' decode (SamplerConfig.mode): (tokens_BxN, logp_BxN) by original row.

  Each distinct prompt is prefilled once into a prompt-length cache. Every row's first token is
  drawn from its prompt's logits up front (as the other modes do); the rows that did not end
  there queue in row order. A decode step feeds every slot's last token at the slot's own cache
  position; after it, each free slot takes the next queued row (its prompt's cache rows and mask
  copied in, its step set to 1). Once the queue is empty the running rows compact into smaller
  power-of-two buckets (`buckets`), as in 'compact'.
  """
  b, p = prompt_BxP.shape
  g, n = cfg.group_size, cfg.max_new_tokens
  batch = lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))  # noqa: E731
  eos = jnp.asarray(cfg.eos_ids, jnp.int32)
  n_slots = slot_count(b, cfg, _batch_shards())
  sizes = buckets(n_slots, "compact", cfg.min_bucket, _batch_shards())
  weights = _split_weights(model, cfg, sizes)

  # The prefill runs into a cache of the decode's length, as in the other modes (the same
  # attention length, hence the same numbers); only its first p slots are copied into slots.
  logits, prompt_cache, _ = prefill(model, prompt_BxP[::g], prompt_mask_BxP[::g], cache_len,
                                    weights[0])
  # What a refill reads by row (the prompts' cache and masks, the queue, the first tokens) is
  # whole (`sharding.whole`): no gather of it is hoisted out of the refill loop, beside the
  # decode loops.
  refill_cache = jax.tree.map(sharding.whole, prompt_cache)
  refill_mask_BxP = sharding.whole(prompt_mask_BxP)
  if g > 1:
    logits = batch(jnp.repeat(logits, g, axis=0))
  row_B = jnp.arange(b, dtype=jnp.int32)
  tok0, logp0 = choose(logits, None if cfg.greedy else row_keys(rng, 0, row_B), cfg)
  tok0_whole = sharding.whole(tok0)
  tokens_BxN = batch(jnp.full((b, n), cfg.pad_id, jnp.int32).at[:, 0].set(tok0))
  logp_BxN = batch(jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp0))
  # Rows that still decode after their first token, in row order.
  ended0 = jnp.isin(tok0, eos)
  queue_B = sharding.whole(jnp.argsort(ended0, stable=True).astype(jnp.int32))
  n_queued = jnp.sum(~ended0, dtype=jnp.int32)

  cache = transformer.init_cache(model.cfg, n_slots, cache_len)
  slots = _Slots(row_K=jnp.full((n_slots,), b, jnp.int32), step_K=jnp.ones((n_slots,), jnp.int32),
                 last_K=jnp.zeros((n_slots,), jnp.int32), done_K=jnp.ones((n_slots,), bool),
                 prompt_len_K=jnp.zeros((n_slots,), jnp.int32),
                 kv_mask_KxS=batch(jnp.ones((n_slots, cache_len), bool)),
                 cache=transformer.constrain_cache(cache))

  def refill(sl: _Slots, qi):
    """Free slots take queued rows (first free slot, next queued row) until either runs out."""
    def cond(c):
      sl, qi = c
      return jnp.any(sl.done_K) & (qi < n_queued)

    def body(c):
      sl, qi = c
      k = jnp.argmax(sl.done_K).astype(jnp.int32)
      r = queue_B[qi]
      if isinstance(sl.cache, transformer.RowBlocks):
        cache = _refill_row_blocks(sl.cache, refill_cache, r // g, k, p)
      else:
        cache = {name: jax.lax.dynamic_update_slice(
            sl.cache[name], _prompt_slots(name, refill_cache[name], r // g, p),
            _row_start(k, a.ndim)) for name, a in refill_cache.items()}
      mask_row = jax.lax.dynamic_slice_in_dim(refill_mask_BxP, r, 1, axis=0)
      kv_mask = jax.lax.dynamic_update_slice(sl.kv_mask_KxS, mask_row, (k, 0))
      sl = _Slots(row_K=sl.row_K.at[k].set(r), step_K=sl.step_K.at[k].set(1),
                  last_K=sl.last_K.at[k].set(tok0_whole[r]), done_K=sl.done_K.at[k].set(False),
                  prompt_len_K=sl.prompt_len_K.at[k].set(prompt_len_B[r]), kv_mask_KxS=kv_mask,
                  cache=cache)
      return sl, qi + 1

    return jax.lax.while_loop(cond, body, (sl, qi))

  def step(c, refilling: bool, weights: DecodeWeights | None):
    sl, qi, tokens, logps = c
    # Free slots take queued rows first, then every slot decodes: the step's later collectives
    # (its token scatters) read the refill's result, so none races the refill loop.
    if refilling:
      sl, qi = refill(sl, qi)
    running_K = ~sl.done_K
    # A free slot decodes a throwaway token at slot 0 (its cache rows are rewritten on refill).
    slot_K = jnp.where(running_K, p + sl.step_K - 1, 0)
    vm = decodes_vocab_major(weights, slot_K.shape[0])
    logits, cache = decode_step(model, sl.last_K, sl.prompt_len_K + sl.step_K - 1, slot_K,
                                sl.cache, sl.kv_mask_KxS, weights, vm)
    tok, logp = choose(_batch_logits(logits, vm),
                       None if cfg.greedy else slot_keys(rng, sl.step_K, sl.row_K), cfg,
                       0 if vm else -1)
    dest_K = jnp.where(running_K, sl.row_K, b)   # free slots write nothing (dropped)
    tokens = tokens.at[dest_K, sl.step_K].set(tok, mode="drop")
    logps = logps.at[dest_K, sl.step_K].set(logp, mode="drop")
    ended = jnp.isin(tok, eos) | (sl.step_K + 1 >= n)
    sl = sl._replace(step_K=sl.step_K + running_K, last_K=tok, done_K=sl.done_K | ended,
                     cache=cache)
    return sl, qi, tokens, logps

  carry = (slots, jnp.int32(0), tokens_BxN, logp_BxN)
  for i, size in enumerate(sizes):
    nxt = sizes[i + 1] if i + 1 < len(sizes) else 0

    def cond(c, nxt=nxt, first=i == 0):
      sl, qi = c[0], c[1]
      running = jnp.sum(~sl.done_K, dtype=jnp.int32)
      if first:  # (the step refills before it decodes: queued rows count as running)
        return (running > nxt) | (qi < n_queued)
      return (running > nxt) & (running > 0)

    bucket_weights = _bucket_weights(weights, size, cfg)
    carry = (carry[0]._replace(cache=_decode_cache(carry[0].cache, bucket_weights, model)),
             ) + carry[1:]
    carry = jax.lax.while_loop(cond, functools.partial(
        step, refilling=i == 0, weights=bucket_weights), carry)
    carry = (carry[0]._replace(cache=_stacked_cache(carry[0].cache)),) + carry[1:]
    if nxt:
      order = jnp.argsort(carry[0].done_K, stable=True)[:nxt]
      carry = (_take_slots(carry[0], order),) + carry[1:]
  return carry[2], carry[3]


def _check_prompt_shapes(prompt_BxP, prompt_mask_BxP):
  if jnp.ndim(prompt_BxP) != 2:
    raise ValueError(f"prompt_BxP must be 2-D [batch, prompt_len], got shape "
                     f"{jnp.shape(prompt_BxP)}")
  if jnp.shape(prompt_mask_BxP) != jnp.shape(prompt_BxP):
    raise ValueError(f"prompt_mask_BxP shape {jnp.shape(prompt_mask_BxP)} != prompt_BxP shape "
                     f"{jnp.shape(prompt_BxP)}")
  if 0 in jnp.shape(prompt_BxP):
    raise ValueError(f"empty prompt batch: prompt_BxP shape {jnp.shape(prompt_BxP)}")


def check_prompts_host(prompt_BxP: np.ndarray, prompt_mask_BxP: np.ndarray,
                       vocab_size: int | None = None, group_size: int = 1) -> None:
  """Validates a host (numpy) prompt batch before it is put on devices.

  Shapes, left padding with at least one real token per row, and (with `vocab_size`) token ids
  of the real positions in [0, vocab_size), and (with `group_size` g > 1) that rows
  g*i .. g*i + g - 1 hold the same prompt. Raises ValueError naming the problem. The data
  pipeline / loop calls this on its process-local numpy batch; `sample` itself only checks
  values when it is handed numpy arrays (it never fetches device arrays).
  """
  _check_prompt_shapes(prompt_BxP, prompt_mask_BxP)
  if isinstance(prompt_BxP, jax.Array) or isinstance(prompt_mask_BxP, jax.Array):
    raise TypeError("check_prompts_host takes host (numpy) arrays; validate before device_put")
  mask = np.asarray(prompt_mask_BxP).astype(bool)
  bad_rows = np.flatnonzero(np.any(mask[:, :-1] & ~mask[:, 1:], axis=1) | ~mask[:, -1])
  if bad_rows.size:
    raise ValueError(f"prompt_mask_BxP rows {bad_rows[:8].tolist()} are not left-padded with at "
                     "least one real token (mask must be False...False True...True)")
  if vocab_size is not None:
    toks = np.asarray(prompt_BxP)[mask]
    if toks.size and (toks.min() < 0 or toks.max() >= vocab_size):
      raise ValueError(f"prompt_BxP has ids in [{toks.min()}, {toks.max()}], outside the "
                       f"model's vocabulary [0, {vocab_size})")
  if group_size > 1:
    b = mask.shape[0]
    if b % group_size:
      raise ValueError(f"group_size={group_size} does not divide the batch of {b} rows")
    real = np.where(mask, np.asarray(prompt_BxP), -1).reshape(b // group_size, group_size, -1)
    bad_groups = np.flatnonzero(np.any(real != real[:, :1], axis=(1, 2)))
    if bad_groups.size:
      raise ValueError(f"group_size={group_size}: groups {bad_groups[:8].tolist()} do not repeat "
                       "one prompt in their consecutive rows (a shared prefill needs them equal)")


def _check_prompts(prompt_BxP, prompt_mask_BxP, group_size=1):
  """Shape checks always; value checks only for numpy inputs (never a device fetch)."""
  if isinstance(prompt_BxP, np.ndarray) and isinstance(prompt_mask_BxP, np.ndarray):
    check_prompts_host(prompt_BxP, prompt_mask_BxP, group_size=group_size)
  else:
    _check_prompt_shapes(prompt_BxP, prompt_mask_BxP)


def sample(graphdef, params, prompt_BxP, prompt_mask_BxP, rng, cfg: SamplerConfig
           ) -> SampleOutput:
  """Generates `cfg.max_new_tokens` tokens after each left-padded prompt (module docstring).

  Never reads device values: with jax.Array prompts only shapes are checked (validate the host
  batch with `check_prompts_host` before `device_put` / `make_array_from_process_local_data`);
  numpy prompts are value-checked here and transferred by the jitted call. With device inputs
  (params, prompts, key) the call makes no host-to-device transfer.
  """
  if not isinstance(cfg, SamplerConfig):
    raise TypeError(f"cfg must be a SamplerConfig, got {type(cfg).__name__}")
  _check_prompts(prompt_BxP, prompt_mask_BxP, cfg.group_size)
  return _sample(graphdef, params, prompt_BxP, prompt_mask_BxP, rng, cfg=cfg,
                 rules=sharding.current_rules())

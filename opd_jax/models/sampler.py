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
ties at the threshold are kept) -> categorical draw with `jax.random.fold_in(rng, step)`.
Sequences stop independently at EOS; the loop exits as soon as every row has stopped.

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

from opd_jax.models import sharding
from opd_jax.models import transformer


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
  """

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  eos_id: int | tuple[int, ...] = dataclasses.field(kw_only=True)
  pad_id: int = dataclasses.field(kw_only=True)

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
def prefill(model, prompt_BxP, prompt_mask_BxP, cache_len: int):
  """Runs the left-padded prompt into a fresh cache of `cache_len` slots.

  Returns (logits_BxV of the first new token, cache, kv_mask_BxS). Slots >= P are marked valid
  in `kv_mask_BxS` up front (causality by slot hides them until they are written).
  """
  b, p = prompt_BxP.shape
  cache = transformer.init_cache(model.cfg, b, cache_len)
  cache = jax.tree.map(lambda a: sharding.constrain(a, transformer.CACHE_AXES), cache)
  kv_mask = jnp.concatenate([prompt_mask_BxP, jnp.ones((b, cache_len - p), bool)], axis=1)
  kv_mask = sharding.constrain(kv_mask, ("batch", "cache_length"))
  h, cache = model.hidden(prompt_BxP, prompt_mask_BxP, cache=cache, cache_index=0,
                          kv_mask_BxS=kv_mask)
  return model.logits(h[:, -1:])[:, 0], cache, kv_mask


def decode_step(model, token_B, position_B, slot, cache, kv_mask_BxS):
  """Feeds one token per row at cache slot `slot`; returns (next logits_BxV, cache)."""
  h, cache = model.hidden(token_B[:, None], positions_BxT=position_B[:, None], cache=cache,
                          cache_index=slot, kv_mask_BxS=kv_mask_BxS)
  return model.logits(h)[:, 0], cache


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


def choose(logits_BxV, key, cfg: SamplerConfig):
  """Next tokens [B] int32 and their log-probs under log_softmax(logits / temperature)."""
  scaled = logits_BxV.astype(jnp.float32) / cfg.temperature
  if cfg.greedy:
    tok = jnp.argmax(scaled, axis=-1)
  else:
    tok = jax.random.categorical(key, filter_logits(scaled, cfg.top_k, cfg.top_p), axis=-1)
  tok = tok.astype(jnp.int32)
  logp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tok[:, None], axis=-1)[:, 0]
  return tok, logp


# -- the loop -------------------------------------------------------------------------------------
class _LoopState(NamedTuple):
  step: jax.Array          # index of the next new token to write
  last_B: jax.Array        # token written at step - 1
  tokens_BxN: jax.Array
  logp_BxN: jax.Array
  done_B: jax.Array
  cache: dict


_TRACES = {"sample": 0}   # incremented when `_sample` is traced (tests assert no recompilation)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("cfg", "rules"))
def _sample(graphdef, params, prompt_BxP, prompt_mask_BxP, rng, *, cfg: SamplerConfig, rules):
  _TRACES["sample"] += 1
  with sharding.axis_rules(rules):
    model = transformer.merge(graphdef, params)
    vocab = model.cfg.vocab_size
    for name, ids in (("eos_id", cfg.eos_ids), ("pad_id", (cfg.pad_id,))):
      if max(ids) >= vocab:
        raise ValueError(f"SamplerConfig.{name}={getattr(cfg, name)!r} is outside the model's "
                         f"vocabulary of {vocab}")
    b, p = prompt_BxP.shape
    n = cfg.max_new_tokens
    batch = lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))  # noqa: E731
    prompt_mask_BxP = batch(prompt_mask_BxP.astype(bool))
    prompt_BxP = batch(jnp.where(prompt_mask_BxP, prompt_BxP.astype(jnp.int32), cfg.pad_id))
    prompt_len_B = jnp.sum(prompt_mask_BxP, axis=1, dtype=jnp.int32)
    eos = jnp.asarray(cfg.eos_ids, jnp.int32)

    logits, cache, kv_mask = prefill(model, prompt_BxP, prompt_mask_BxP, p + n - 1)
    tok, logp = choose(logits, jax.random.fold_in(rng, 0), cfg)
    state = _LoopState(
        step=jnp.int32(1), last_B=tok,
        tokens_BxN=batch(jnp.full((b, n), cfg.pad_id, jnp.int32).at[:, 0].set(tok)),
        logp_BxN=batch(jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp)),
        done_B=jnp.isin(tok, eos), cache=cache)

    def cond(s: _LoopState):
      return (s.step < n) & ~jnp.all(s.done_B)

    def body(s: _LoopState):
      logits, cache = decode_step(model, s.last_B, prompt_len_B + s.step - 1, p + s.step - 1,
                                  s.cache, kv_mask)
      tok, logp = choose(batch(logits), jax.random.fold_in(rng, s.step), cfg)
      tok = jnp.where(s.done_B, cfg.pad_id, tok)
      logp = jnp.where(s.done_B, 0.0, logp)
      return _LoopState(
          step=s.step + 1, last_B=tok,
          tokens_BxN=jax.lax.dynamic_update_slice(s.tokens_BxN, tok[:, None], (0, s.step)),
          logp_BxN=jax.lax.dynamic_update_slice(s.logp_BxN, logp[:, None], (0, s.step)),
          done_B=s.done_B | jnp.isin(tok, eos), cache=cache)

    final = jax.lax.while_loop(cond, body, state)
    is_eos = jnp.isin(final.tokens_BxN, eos)
    # A token is real iff no EOS came strictly before it.
    eos_before = jnp.cumsum(is_eos, axis=1) - is_eos
    resp_mask = eos_before == 0
    lengths = jnp.sum(resp_mask, axis=1, dtype=jnp.int32)
    tokens = jnp.concatenate([prompt_BxP, jnp.where(resp_mask, final.tokens_BxN, cfg.pad_id)], 1)
    no_prompt = jnp.zeros((b, p), bool)
    return SampleOutput(
        tokens_BxT=tokens,
        mask_BxT=jnp.concatenate([prompt_mask_BxP, resp_mask], axis=1),
        loss_mask_BxT=jnp.concatenate([no_prompt, resp_mask], axis=1),
        lengths_B=lengths,
        logp_BxT=jnp.concatenate([jnp.zeros((b, p), jnp.float32),
                                  jnp.where(resp_mask, final.logp_BxN, 0.0)], axis=1))


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
                       vocab_size: int | None = None) -> None:
  """Validates a host (numpy) prompt batch before it is put on devices.

  Shapes, left padding with at least one real token per row, and (with `vocab_size`) token ids
  of the real positions in [0, vocab_size). Raises ValueError naming the problem. The data
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


def _check_prompts(prompt_BxP, prompt_mask_BxP):
  """Shape checks always; value checks only for numpy inputs (never a device fetch)."""
  if isinstance(prompt_BxP, np.ndarray) and isinstance(prompt_mask_BxP, np.ndarray):
    check_prompts_host(prompt_BxP, prompt_mask_BxP)
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
  _check_prompts(prompt_BxP, prompt_mask_BxP)
  return _sample(graphdef, params, prompt_BxP, prompt_mask_BxP, rng, cfg=cfg,
                 rules=sharding.current_rules())

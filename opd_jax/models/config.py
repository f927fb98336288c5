"""Model configuration for the decoder families opd_jax supports (qwen3, qwen2, llama and
qwen3_moe).

A `ModelConfig` is a frozen dataclass: hashable, so it can be a static argument of a jitted function.
Presets are plain functions returning configs; `hf.py` converts to and from `config.json`.
"""

from __future__ import annotations

import dataclasses
import numbers

FAMILIES = ("qwen3", "qwen2", "llama", "qwen3_moe")
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16")
MOE_IMPLS = ("dense", "ragged")


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of a decoder-only transformer.

  Attributes:
    family: 'qwen3' (qk-norm, no qkv bias), 'qwen2' (qkv bias), 'llama', or 'qwen3_moe' (qwen3
      attention with a sparse mixture-of-experts MLP; see num_experts).
    vocab_size: number of token ids (embedding rows).
    d_model: residual width D.
    n_layers: number of decoder blocks L.
    n_heads: query heads H.
    n_kv_heads: key/value heads (GQA); must divide n_heads.
    head_dim: per-head width (need not equal d_model / n_heads, as in qwen3).
    d_ff: SwiGLU hidden width F.
    rope_theta: RoPE base.
    rope_type: 'default', 'linear' or 'llama3' (transformers `rope_parameters['rope_type']`).
    rope_factor: scaling factor for 'linear' and 'llama3' RoPE (`rope_parameters['factor']`).
    rope_low_freq_factor, rope_high_freq_factor, rope_original_max_position: 'llama3' RoPE only
      (`low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`): wavelengths
      longer than original / low are divided by `rope_factor`, shorter than original / high are
      kept, and the band between is interpolated (transformers' `_compute_llama3_parameters`).
    rms_eps: RMSNorm epsilon.
    tie_embeddings: lm_head shares the embedding matrix.
    qk_norm: RMSNorm over head_dim on q and k before RoPE (qwen3).
    qkv_bias: biases on the q, k, v projections (qwen2).
    max_position: longest supported position (informational; RoPE is computed on the fly).
    param_dtype: storage dtype of parameters.
    dtype: compute dtype of matmuls; softmax, norms and log-probs always run in float32.
    scan_layers: run the layer stack with `lax.scan` (compile time independent of depth) instead of
      an unrolled Python loop. The parameter layout is stacked ([L, ...]) either way.
    remat: rematerialise each block in the backward pass (training memory).
    num_experts: 0 for a dense SwiGLU MLP in every block; E > 0 (family 'qwen3_moe' only) for a
      sparse mixture-of-experts MLP in every block (Qwen3-MoE with `decoder_sparse_step=1` and no
      `mlp_only_layers`, as in Qwen3-30B-A3B / 235B-A22B). `d_ff` is then unused by the model (it
      is kept for config.json's `intermediate_size`).
    experts_per_token: top-k experts per token (`num_experts_per_tok`).
    moe_d_ff: SwiGLU hidden width of each expert (`moe_intermediate_size`).
    norm_topk_prob: renormalise the top-k routing probabilities to sum to one (Qwen3's
      `norm_topk_prob`).
    router_aux_loss_coef: weight of `transformer.load_balancing_loss` (transformers'
      `router_aux_loss_coef`): training an MoE student (`train.steps`: SFT, PG, distill) adds
      coef x the loss over the real tokens of each micro-batch to the objective and reports it as
      `loss/router_aux`; 0 turns it off (the step is then exactly the dense-objective one). The
      model's forward pass itself never adds it.
    moe_impl: how the experts run (the same function either way; not an architecture field):
      'dense' runs every expert on every token and weights the outputs by the (zero outside the
      top-k) routing weights: E / k times the FLOPs, but plain einsums that shard like the dense
      MLP; 'ragged' sorts the N * k (token, expert) pairs by expert and runs grouped matmuls
      (`jax.lax.ragged_dot`): top-k FLOPs only, for single-device / replicated-expert use.
    attention_block: block size of the blocked (flash-style) causal attention of full-sequence
      forwards (training, `shifted_hidden`): sequences longer than this run in query / key blocks
      of this many positions with an online softmax, causal blocks above the diagonal skipped,
      so attention memory is linear in T (`attention.flash_attention`); sequences up to this
      length, or any length with 0, use the one-shot [B, H, T, T] reference. With `remat`, the
      MLP of such sequences also runs in rematerialised blocks of this many positions, so the
      backward holds one block's [B, block, d_ff] activations instead of the sequence's. Not an
      architecture field: the same function either way.
    cache_block: bucket width (slots) of attention over a KV cache (decode, prefill, chunked
      scoring): queries attend over the cache prefix that can be filled, rounded up to whole
      buckets, never the empty tail (`attention.cached_attention`); 0 = always the whole cache.
    bos_token_id, eos_token_id, pad_token_id: the special-token ids of the checkpoint this config
      came from (its config.json's, via `hf.config_from_hf` / `hf.load`), kept so that `hf.save`
      writes them back (config.json and generation_config.json) even without a tokenizer.
      `eos_token_id` is an int or, as in some Hugging Face configs, a tuple of ints (a list is
      stored as a tuple). None = unknown (transformers' defaults then apply when reading). Metadata
      only: they change no model math, are never read inside traced code, and are left out of
      `==` and `hash` (configs that differ only in them share compiled programs and caches).
  """

  family: str = "qwen3"
  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 16
  d_ff: int = 128
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  rms_eps: float = 1e-6
  tie_embeddings: bool = True
  qk_norm: bool = True
  qkv_bias: bool = False
  max_position: int = 4096
  param_dtype: str = "float32"
  dtype: str = "float32"
  scan_layers: bool = True
  remat: bool = False
  num_experts: int = 0
  experts_per_token: int = 0
  moe_d_ff: int = 0
  norm_topk_prob: bool = False
  router_aux_loss_coef: float = 0.001
  moe_impl: str = "dense"
  attention_block: int = 512
  cache_block: int = 256
  bos_token_id: int | None = dataclasses.field(default=None, compare=False)
  eos_token_id: int | tuple[int, ...] | None = dataclasses.field(default=None, compare=False)
  pad_token_id: int | None = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    def bad(field, why):
      raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {why}")

    if self.family not in FAMILIES:
      bad("family", f"unsupported family; expected one of {FAMILIES}")
    if self.rope_type not in ROPE_TYPES:
      bad("rope_type", f"unsupported RoPE type; expected one of {ROPE_TYPES}")
    for f in ("param_dtype", "dtype"):
      if getattr(self, f) not in DTYPES:
        bad(f, f"expected one of {DTYPES}")
    for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
      if getattr(self, f) <= 0:
        bad(f, "must be positive")
    if self.n_heads % self.n_kv_heads:
      bad("n_kv_heads", f"must divide n_heads={self.n_heads}")
    for f in ("attention_block", "cache_block"):
      if not isinstance(getattr(self, f), int) or getattr(self, f) < 0:
        bad(f, "must be an int >= 0 (0 = off)")
    if self.head_dim % 2:
      bad("head_dim", "must be even for RoPE")
    if self.family == "qwen3_moe":
      if self.num_experts <= 0:
        bad("num_experts", "family 'qwen3_moe' needs num_experts > 0")
      if not 0 < self.experts_per_token <= self.num_experts:
        bad("experts_per_token", f"must be in [1, num_experts={self.num_experts}]")
      if self.moe_d_ff <= 0:
        bad("moe_d_ff", "must be positive")
      if self.moe_impl not in MOE_IMPLS:
        bad("moe_impl", f"expected one of {MOE_IMPLS}")
    elif self.num_experts:
      bad("num_experts", f"mixture-of-experts MLPs need family 'qwen3_moe' (got {self.family!r})")
    if self.rope_type == "llama3":
      if not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
        bad("rope_high_freq_factor", "llama3 RoPE needs rope_high_freq_factor > "
            f"rope_low_freq_factor={self.rope_low_freq_factor} > 0")
      if self.rope_original_max_position <= 0:
        bad("rope_original_max_position", "must be positive")
    for f in ("bos_token_id", "eos_token_id", "pad_token_id"):
      value = getattr(self, f)
      if value is None:
        continue
      if _is_int(value):
        object.__setattr__(self, f, int(value))
      elif f == "eos_token_id" and isinstance(value, (list, tuple)) and all(map(_is_int, value)):
        object.__setattr__(self, f, tuple(int(v) for v in value))  # hashable; JSON gives lists
      else:
        bad(f, "expected None or an int" + (" or a list of ints" if f == "eos_token_id" else ""))

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  @property
  def num_params(self) -> int:
    """Exact parameter count of the model this config builds."""
    d, h, kv, hd, f = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    if self.qkv_bias:
      attn += h * hd + 2 * kv * hd
    if self.qk_norm:
      attn += 2 * hd
    if self.is_moe:
      mlp = d * self.num_experts + self.num_experts * 3 * d * self.moe_d_ff
    else:
      mlp = 3 * d * f
    block = attn + mlp + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.n_layers * block + emb + d


def tiny(vocab_size: int = 256, family: str = "qwen3", **kw) -> ModelConfig:
  """A 2-layer model that runs in tests in seconds."""
  base = dict(family=family, vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4,
              n_kv_heads=2, head_dim=16, d_ff=128, qk_norm=family in ("qwen3", "qwen3_moe"),
              qkv_bias=family == "qwen2")
  base.update(kw)
  return ModelConfig(**base)


def tiny_moe(vocab_size: int = 256, **kw) -> ModelConfig:
  """A 2-layer qwen3_moe model (4 experts of width 32, top-2, renormalised) for tests."""
  base = dict(num_experts=4, experts_per_token=2, moe_d_ff=32, norm_topk_prob=True)
  base.update(kw)
  return tiny(vocab_size=vocab_size, family="qwen3_moe", **base)


def small(vocab_size: int = 32768, family: str = "qwen3", **kw) -> ModelConfig:
  """~42M parameters (8 x 512, tied 32k vocabulary): the benchmark preset."""
  base = dict(family=family, vocab_size=vocab_size, d_model=512, n_layers=8, n_heads=8,
              n_kv_heads=4, head_dim=64, d_ff=1536, qk_norm=family in ("qwen3", "qwen3_moe"),
              qkv_bias=family == "qwen2")
  base.update(kw)
  return ModelConfig(**base)


def qwen3_0_6b(**kw) -> ModelConfig:
  base = dict(family="qwen3", vocab_size=151936, d_model=1024, n_layers=28, n_heads=16,
              n_kv_heads=8, head_dim=128, d_ff=3072, rope_theta=1e6, tie_embeddings=True,
              max_position=40960)
  base.update(kw)
  return ModelConfig(**base)


def qwen3_8b(**kw) -> ModelConfig:
  base = dict(family="qwen3", vocab_size=151936, d_model=4096, n_layers=36, n_heads=32,
              n_kv_heads=8, head_dim=128, d_ff=12288, rope_theta=1e6, tie_embeddings=False,
              max_position=40960, dtype="bfloat16", remat=True)
  base.update(kw)
  return ModelConfig(**base)


def qwen3_32b(**kw) -> ModelConfig:
  base = dict(family="qwen3", vocab_size=151936, d_model=5120, n_layers=64, n_heads=64,
              n_kv_heads=8, head_dim=128, d_ff=25600, rope_theta=1e6, tie_embeddings=False,
              max_position=40960, dtype="bfloat16", remat=True)
  base.update(kw)
  return ModelConfig(**base)


def qwen3_30b_a3b(**kw) -> ModelConfig:
  """Qwen3-30B-A3B: 48 layers, 128 experts of width 768, top-8 (renormalised)."""
  base = dict(family="qwen3_moe", vocab_size=151936, d_model=2048, n_layers=48, n_heads=32,
              n_kv_heads=4, head_dim=128, d_ff=6144, rope_theta=1e6, tie_embeddings=False,
              max_position=40960, num_experts=128, experts_per_token=8, moe_d_ff=768,
              norm_topk_prob=True, dtype="bfloat16", remat=True)
  base.update(kw)
  return ModelConfig(**base)


def llama3_2_3b(**kw) -> ModelConfig:
  """Llama-3.2-3B: tied, llama3 RoPE (factor 32, original 8192)."""
  base = dict(family="llama", vocab_size=128256, d_model=3072, n_layers=28, n_heads=24,
              n_kv_heads=8, head_dim=128, d_ff=8192, rope_theta=5e5, rope_type="llama3",
              rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
              rope_original_max_position=8192, rms_eps=1e-5, tie_embeddings=True,
              qk_norm=False, max_position=131072, dtype="bfloat16", remat=True)
  base.update(kw)
  return ModelConfig(**base)


PRESETS = {"tiny": tiny, "tiny_moe": tiny_moe, "small": small, "qwen3_0_6b": qwen3_0_6b,
           "qwen3_8b": qwen3_8b, "qwen3_32b": qwen3_32b, "qwen3_30b_a3b": qwen3_30b_a3b,
           "llama3_2_3b": llama3_2_3b}


def preset(name: str, **kw) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
  return PRESETS[name](**kw)

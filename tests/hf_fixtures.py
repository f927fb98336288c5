"""Tiny random transformers (torch CPU) models for parity tests; nothing is downloaded.

    model = torch_model("qwen3", tied=True, seed=0)         # f32, eager attention, random weights
    directory = export(model, tmp_path / "hf")              # save_pretrained (safetensors)
    tokens, mask = padded_batch(seed=1, vocab_size=model.config.vocab_size)
    logits = torch_logits(model, tokens, mask)              # positions = cumsum(mask) - 1

Weights are re-drawn at a scale where logits are O(1) and every norm scale / bias differs from its
default, so a mapping error cannot hide behind ones and zeros. Each family also exercises a config
detail: qwen3 a head_dim != hidden/heads, qwen2 q/k/v biases, llama linear RoPE scaling, qwen3_moe
4 experts of width 32, top-2 with renormalised routing weights (`norm_topk_prob`).
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file  # noqa: F401 (re-exported for tests)

FAMILIES = ("qwen3", "qwen2", "llama")

# Llama 3.1-style RoPE scaled down to a tiny model: with head_dim 16 and theta 5e5 the wavelengths
# are 6.3, 32.5, 167, ... so original / high = 16 and original / low = 64 put one frequency in each
# band (kept, interpolated, divided by `factor`); positions beyond 64 exercise the scaling.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def hf_config(family: str, *, tied: bool, vocab_size: int = 97, **overrides):
  """A tiny transformers config (2 layers, d=64, 4 heads / 2 kv heads)."""
  kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=tied, rms_norm_eps=1e-6)
  if family == "qwen3":
    kw.update(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
  elif family == "qwen2":
    kw.update(rope_parameters={"rope_type": "default", "rope_theta": 1e4})
  elif family == "qwen3_moe":
    kw.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
              num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
              norm_topk_prob=True)
  elif family == "llama":
    kw.update(rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0})
  else:
    raise ValueError(f"unknown family {family!r}")
  kw.update(overrides)
  config = transformers.AutoConfig.for_model(family, **kw)
  config.architectures = [f"{config.__class__.__name__[:-len('Config')]}ForCausalLM"]
  return config


@torch.no_grad()
def randomize_(model, seed: int):
  """Re-draws every parameter: matrices (and stacked expert matrices [E, out, in]) ~
  N(0, 1/fan_in), embeddings ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.2^2), biases ~ N(0, 0.2^2)."""
  gen = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
    if name.endswith("norm.weight"):
      value = 1.0 + 0.2 * noise
    elif name.endswith("bias"):
      value = 0.2 * noise
    elif "embed_tokens" in name:
      value = 0.1 * noise
    else:
      value = noise / math.sqrt(p.shape[-1])
    p.copy_(value.to(p.dtype))
  return model


def torch_model(family: str, *, tied: bool, seed: int = 0, vocab_size: int = 97, **overrides):
  """A float32 `*ForCausalLM` with random weights, in eval mode, eager attention."""
  config = hf_config(family, tied=tied, vocab_size=vocab_size, **overrides)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                        attn_implementation="eager")
  return randomize_(model, seed).eval()


def export(model, directory, **save_kw) -> pathlib.Path:
  """`model.save_pretrained(directory)` (safetensors); returns the directory."""
  directory = pathlib.Path(directory)
  model.save_pretrained(str(directory), **save_kw)
  return directory


def load_torch(directory, dtype=torch.float32):
  """`AutoModelForCausalLM.from_pretrained` of a local directory (eager attention, eval mode)."""
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(directory), dtype=dtype, attn_implementation="eager", local_files_only=True).eval()


def padded_batch(seed: int, vocab_size: int, batch: int = 3, length: int = 9):
  """int32 tokens [B, T] and bool mask: row 0 full, row 1 left-padded, row 2 right-padded."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab_size, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), bool)
  if batch > 1:
    mask[1, :3] = False
  if batch > 2:
    mask[2, -2:] = False
  tokens[~mask] = 0
  return tokens, mask


@torch.no_grad()
def torch_logits(model, tokens, mask) -> np.ndarray:
  """float32 logits [B, T, V] with RoPE positions cumsum(mask) - 1 (as opd_jax uses)."""
  mask = np.asarray(mask, bool)
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  out = model(input_ids=torch.as_tensor(np.asarray(tokens, np.int64)),
              attention_mask=torch.as_tensor(mask.astype(np.int64)),
              position_ids=torch.as_tensor(positions))
  return out.logits.float().numpy()


def state_dict_numpy(model) -> dict[str, np.ndarray]:
  """float32 numpy copies of the state dict (tied lm_head included as its own entry)."""
  return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}

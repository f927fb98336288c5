"""Decode throughput of the opd_jax sampler vs transformers `generate` on the same weights.

    python bench/sampler.py [--quick]

The `small` preset (float32 params and compute) gets random weights, is exported with `hf.save` and
loaded by `transformers.AutoModelForCausalLM.from_pretrained` (torch CPU, float32, default
attention). Both generate greedily from the same random prompts (same prompt length, same number of
new tokens, no early EOS: the EOS id is one neither model emits, checked) at batch 1, 16 and 64.

Throughput = generated tokens / wall time of one whole generate call (prefill + decode, as the
caller sees it), best of `--repeats` calls. opd_jax's first call (tracing + XLA compilation) is
reported separately as `compile_s_b{B}` and excluded. The last line of stdout is one JSON object
(with `cpu_model`, the CPU's model name, family / model numbers and last-level cache as
`timing.cpu_model` gives them, and `xla_flags`).

Batch 1 against the memory-bandwidth limit: a decode step at batch 1 reads every weight (and
the filled KV cache) once, so tokens/s cannot exceed read bandwidth / bytes read per token. The
read bandwidth is measured in the same run (best of a jitted sum over a 256 MiB float32 array,
just before and after the batch-1 timing) and reported as `read_bandwidth_gb_s`,
`bytes_per_token_b1`, `bandwidth_limit_tok_s_b1` and `fraction_of_bandwidth_limit_b1` (whole
generate calls, prefill included, as for the other numbers).

bfloat16 weights (`--no-bf16` skips it): the same weights cast to bfloat16 (bfloat16 matmul
inputs, float32 accumulation; norms / softmax in float32) decode the same prompts; reported
beside the float32 numbers as `opd_bf16_tok_s_b{B}`, `ratio_vs_hf_bf16_b{B}` (against
transformers in float32) and `same_tokens_frac_bf16_b{B}` (agreement with opd_jax float32 greedy
tokens; bfloat16 rounding changes some argmaxes).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

from opd_jax.models import config as mc
from opd_jax.models import hf
from opd_jax.models import sampler
from opd_jax.models import transformer as tf
from opd_jax.train import timing


def _best_time(fn, repeats):
  best = float("inf")
  out = None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t0)
  return best, out


def read_bandwidth(repeats: int = 5, n_bytes: int = 256 << 20) -> float:
  """Bytes/s of the best of `repeats` jitted sums over an `n_bytes` float32 array (every byte
  read once from memory: the array is far larger than the caches)."""
  x = jax.numpy.ones((n_bytes // 4,), jax.numpy.float32)
  total = jax.jit(jax.numpy.sum)
  total(x).block_until_ready()
  best, _ = _best_time(lambda: total(x).block_until_ready(), repeats)
  return n_bytes / best


def bytes_per_token(cfg, prompt_len: int, new_tokens: int) -> float:
  """Bytes a batch-1 decode step reads, averaged over the decode: every parameter (float32)
  and the K and V cache slots filled so far (prompt_len + i at step i)."""
  kv_per_slot = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
  mean_slots = prompt_len + (new_tokens - 1) / 2
  return 4 * cfg.num_params + kv_per_slot * mean_slots


def main(argv=None):
  from opd_jax import host_malloc
  host_malloc.tune()   # $OPD_JAX_HOST_MALLOC (on by default on CPU): before the first JAX op
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer tokens (< 2 minutes)")
  parser.add_argument("--batches", default="1,16,64")
  parser.add_argument("--prompt-len", type=int, default=None)
  parser.add_argument("--new-tokens", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16-weights mode")
  args = parser.parse_args(argv)
  prompt_len = args.prompt_len or (16 if args.quick else 32)
  new_tokens = args.new_tokens or (24 if args.quick else 64)
  repeats = args.repeats or (1 if args.quick else 2)
  batches = [int(b) for b in args.batches.split(",")]

  import torch
  import transformers

  cfg = mc.small()
  graphdef, params = tf.init(cfg, 0)
  vocab = cfg.vocab_size
  rng = np.random.default_rng(0)
  eos_id, pad_id = vocab - 1, 0
  prompts = rng.integers(1, vocab - 1, (max(batches), prompt_len)).astype(np.int32)
  scfg = sampler.SamplerConfig(new_tokens, greedy=True, eos_id=eos_id, pad_id=pad_id)

  result = {"preset": "small", "num_params": cfg.num_params, "dtype": "float32",
            "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "quick": args.quick, "jax_backend": jax.default_backend(),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu_model": timing.cpu_model(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "host_malloc_tuned": host_malloc.tune().applied}
  print(f"cpu: {result['cpu_model']}; XLA_FLAGS={result['xla_flags']!r}", file=sys.stderr)
  bf16 = None
  if not args.no_bf16:
    cfg16 = mc.small(param_dtype="bfloat16", dtype="bfloat16")
    graphdef16 = tf.init(cfg16, 0)[0]
    bf16 = (graphdef16, jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), params))
  with tempfile.TemporaryDirectory() as tmp:
    directory = hf.save(pathlib.Path(tmp) / "small", cfg, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32, local_files_only=True).eval()
  result["hf_attn_implementation"] = model.config._attn_implementation

  def hf_generate(ids):
    with torch.inference_mode():
      return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            eos_token_id=eos_id, pad_token_id=pad_id)

  hf_generate(torch.as_tensor(prompts[:1, :4].astype(np.int64)))  # warm-up (lazy init)
  for b in batches:
    prompt = prompts[:b]
    mask = np.ones_like(prompt, bool)
    key = jax.random.key(0)
    bandwidth = read_bandwidth() if b == 1 else None
    t0 = time.perf_counter()
    out = jax.block_until_ready(sampler.sample(graphdef, params, prompt, mask, key, scfg))
    result[f"compile_s_b{b}"] = round(time.perf_counter() - t0, 3)
    opd_s, out = _best_time(lambda: jax.block_until_ready(  # noqa: B023
        sampler.sample(graphdef, params, prompt, mask, key, scfg)), repeats)
    if b == 1:
      bandwidth = max(bandwidth, read_bandwidth())
    if not np.all(np.asarray(out.lengths_B) == new_tokens):
      raise RuntimeError(f"batch {b}: opd_jax stopped early (EOS {eos_id} emitted)")

    ids = torch.as_tensor(prompt.astype(np.int64))
    hf_s, hf_out = _best_time(lambda: hf_generate(ids), repeats)  # noqa: B023
    if hf_out.shape[1] != prompt_len + new_tokens:
      raise RuntimeError(f"batch {b}: transformers generated {hf_out.shape[1] - prompt_len}")
    same = np.mean(hf_out[:, prompt_len:].numpy() == np.asarray(out.tokens_BxT[:, prompt_len:]))

    opd_tps, hf_tps = b * new_tokens / opd_s, b * new_tokens / hf_s
    result[f"opd_tok_s_b{b}"] = round(opd_tps, 1)
    result[f"hf_tok_s_b{b}"] = round(hf_tps, 1)
    result[f"ratio_vs_hf_b{b}"] = round(opd_tps / hf_tps, 3)
    result[f"same_tokens_frac_b{b}"] = round(float(same), 4)
    if b == 1:
      per_token = bytes_per_token(cfg, prompt_len, new_tokens)
      result["read_bandwidth_gb_s"] = round(bandwidth / 1e9, 2)
      result["bytes_per_token_b1"] = int(per_token)
      result["bandwidth_limit_tok_s_b1"] = round(bandwidth / per_token, 1)
      result["fraction_of_bandwidth_limit_b1"] = round(opd_tps * per_token / bandwidth, 3)
      print(f"batch 1: read bandwidth {bandwidth / 1e9:.1f} GB/s, {per_token / 1e6:.0f} MB per "
            f"token: limit {bandwidth / per_token:.1f} tok/s, opd_jax at "
            f"{opd_tps * per_token / bandwidth:.2f} of it", file=sys.stderr, flush=True)
    print(f"batch {b}: opd_jax {opd_tps:.1f} tok/s, transformers {hf_tps:.1f} tok/s, "
          f"ratio {opd_tps / hf_tps:.2f}, compile {result[f'compile_s_b{b}']:.1f}s, "
          f"identical tokens {same:.3f}", file=sys.stderr, flush=True)
    if bf16 is not None:
      run16 = lambda: jax.block_until_ready(  # noqa: E731
          sampler.sample(*bf16, prompt, mask, key, scfg))  # noqa: B023
      run16()   # compile
      s16, out16 = _best_time(run16, repeats)
      n16 = int(np.asarray(out16.lengths_B).sum())   # bfloat16 may emit the EOS id
      same16 = np.mean(np.asarray(out16.tokens_BxT[:, prompt_len:]) ==
                       np.asarray(out.tokens_BxT[:, prompt_len:]))
      result[f"opd_bf16_tok_s_b{b}"] = round(n16 / s16, 1)
      result[f"ratio_vs_hf_bf16_b{b}"] = round(n16 / s16 / hf_tps, 3)
      result[f"same_tokens_frac_bf16_b{b}"] = round(float(same16), 4)
      print(f"batch {b}: opd_jax bfloat16 weights {n16 / s16:.1f} tok/s", file=sys.stderr,
            flush=True)
  print(json.dumps(result))


if __name__ == "__main__":
  main()

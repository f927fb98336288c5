"""OPD rollout throughput: the rollout sampler vs the static sampler vs transformers `generate`.

    python bench/rollout.py [--quick]

Workload (the OPD / GRPO rollout): `--prompts` random prompts of `--prompt-len` tokens, each
sampled G = `--group` times in consecutive rows (the rollout batch layout), temperature 1, no
top-k / top-p, up to `--max-new` tokens. Model: the `small` preset (float32) with random weights,
exported with `hf.save` for transformers (torch CPU, float32).

Synthetic EOS distribution: a random-init model's next-token distribution is close to uniform, so
the EOS set is `--eos-count` token ids: a response stops at each step with probability about
eos_count / vocab (1 / 64 by default, budget 256: a geometric length distribution with mean ~64,
long-tailed, ~2% of rows run to the budget; `--quick`: 4 prompts x 8, 1 / 16, budget 64), as a
policy's response lengths spread from a few tokens to the budget. The measured length
distribution is printed and reported (`lengths_*`).

Useful tokens = response tokens up to and including EOS (what training consumes). Reported as
useful tokens per second of one whole sampling call (prefill + decode, best of `--repeats`;
opd_jax's first call, which compiles, is timed separately as `compile_s_*`):
  rollout   `sampler.sample` with the rollout's settings: shared prefill per prompt
            (group_size = G) and continuous batching (mode='continuous', `--slots` decode slots,
            0 = `sampler.default_slots`: half the rows; `--mode compact` for the
            power-of-two compaction instead);
  static    the baseline: every row prefilled on its own, every row decoded until the last one
            ends (mode='static', group_size=1). Same keys: the same tokens as `rollout` (checked);
  hf        transformers `generate(do_sample=True, top_k=0, top_p=1)` on the same prompts x G
            rows and EOS set (its own random stream: same length distribution, other samples).
The last line of stdout is one JSON object with `speedup_vs_static` (rollout / static) and
`ratio_vs_hf` (rollout / hf).
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
  best, out = float("inf"), None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t0)
  return best, out


def _length_stats(lengths, budget):
  lengths = np.asarray(lengths)
  return {"mean": round(float(lengths.mean()), 2), "median": float(np.median(lengths)),
          "p90": round(float(np.percentile(lengths, 90)), 1), "min": int(lengths.min()),
          "max": int(lengths.max()), "at_budget_frac": round(float(np.mean(lengths >= budget)), 4)}


def main(argv=None):
  from opd_jax import host_malloc
  host_malloc.tune()   # $OPD_JAX_HOST_MALLOC (on by default on CPU): before the first JAX op
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a small workload (< 1 minute)")
  parser.add_argument("--prompts", type=int, default=None)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--prompt-len", type=int, default=None)
  parser.add_argument("--max-new", type=int, default=None)
  parser.add_argument("--eos-count", type=int, default=None,
                      help="EOS ids (stop probability ~ eos_count / vocab per step)")
  parser.add_argument("--min-bucket", type=int, default=8)
  parser.add_argument("--mode", default="continuous", choices=("continuous", "compact"),
                      help="the rollout sampler's decode mode")
  parser.add_argument("--slots", type=int, default=0,
                      help="'continuous' decode slots (0 = sampler.default_slots)")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--no-hf", action="store_true", help="skip transformers generate")
  args = parser.parse_args(argv)
  n_prompts = args.prompts or (4 if args.quick else 8)
  prompt_len = args.prompt_len or (16 if args.quick else 32)
  max_new = args.max_new or (64 if args.quick else 256)
  repeats = args.repeats or (1 if args.quick else 2)
  g = args.group

  cfg = mc.small()
  vocab = cfg.vocab_size
  eos_count = args.eos_count or vocab // (16 if args.quick else 64)
  graphdef, params = tf.init(cfg, 0)
  rng = np.random.default_rng(0)
  pad_id = 0
  eos_ids = tuple(int(i) for i in range(vocab - eos_count, vocab))
  prompts = rng.integers(1, vocab - eos_count, (n_prompts, prompt_len)).astype(np.int32)
  rows = np.repeat(prompts, g, axis=0)
  mask = np.ones_like(rows, bool)
  b = rows.shape[0]
  base = dict(temperature=1.0, eos_id=eos_ids, pad_id=pad_id)
  configs = {
      "rollout": sampler.SamplerConfig(max_new, group_size=g, mode=args.mode,
                                       min_bucket=args.min_bucket, slots=args.slots, **base),
      "static": sampler.SamplerConfig(max_new, mode="static", **base),
  }
  result = {"bench": "rollout", "preset": "small", "num_params": cfg.num_params,
            "dtype": "float32", "prompts": n_prompts, "group": g, "rows": b,
            "prompt_len": prompt_len, "max_new_tokens": max_new, "eos_count": eos_count,
            "eos_stop_prob_uniform": round(eos_count / vocab, 5), "temperature": 1.0,
            "repeats": repeats, "quick": args.quick,
            "mode": args.mode,
            "slots": (sampler.slot_count(b, configs["rollout"]) if args.mode == "continuous"
                      else None),
            "buckets": list(sampler.buckets(
                sampler.slot_count(b, configs["rollout"]) if args.mode == "continuous" else b,
                "compact", args.min_bucket)),
            "cpu_model": timing.cpu_model(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "host_malloc_tuned": host_malloc.tune().applied,
            "jax_backend": jax.default_backend(), "cpu_count": os.cpu_count()}
  print(f"cpu: {result['cpu_model']}; XLA_FLAGS={result['xla_flags']!r}", file=sys.stderr)

  key = jax.random.key(0)
  outs = {}
  for name, scfg in configs.items():
    t0 = time.perf_counter()
    jax.block_until_ready(sampler.sample(graphdef, params, rows, mask, key, scfg))
    result[f"compile_s_{name}"] = round(time.perf_counter() - t0, 3)
    secs, out = _best_time(lambda: jax.block_until_ready(  # noqa: B023
        sampler.sample(graphdef, params, rows, mask, key, scfg)), repeats)  # noqa: B023
    outs[name] = out
    useful = int(np.asarray(out.lengths_B).sum())
    result[f"{name}_s"] = round(secs, 4)
    result[f"{name}_useful_tok_s"] = round(useful / secs, 1)
    print(f"{name}: {useful} useful tokens in {secs:.3f}s = {useful / secs:.1f} tok/s "
          f"(compile {result[f'compile_s_{name}']:.1f}s)", file=sys.stderr, flush=True)
  same = np.array_equal(np.asarray(outs["rollout"].tokens_BxT),
                        np.asarray(outs["static"].tokens_BxT))
  result["same_tokens_rollout_vs_static"] = bool(same)
  if not same:
    raise RuntimeError("the rollout sampler and the static sampler drew different tokens")
  lengths = np.asarray(outs["static"].lengths_B)
  result.update({f"lengths_{k}": v for k, v in _length_stats(lengths, max_new).items()})
  result["useful_tokens"] = int(lengths.sum())
  result["decoded_slots_static"] = int(b * lengths.max())
  result["speedup_vs_static"] = round(
      result["rollout_useful_tok_s"] / result["static_useful_tok_s"], 3)

  if not args.no_hf:
    import torch
    import transformers
    result["torch_threads"] = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
      directory = hf.save(pathlib.Path(tmp) / "small", cfg, params)
      model = transformers.AutoModelForCausalLM.from_pretrained(
          str(directory), dtype=torch.float32, local_files_only=True).eval()
    eos_list = list(eos_ids)

    def hf_generate(ids):
      with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                              temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new,
                              eos_token_id=eos_list, pad_token_id=pad_id)

    torch.manual_seed(0)
    hf_generate(torch.as_tensor(rows[:1, :4].astype(np.int64)))  # warm-up (lazy init)
    ids = torch.as_tensor(rows.astype(np.int64))
    hf_s, hf_out = _best_time(lambda: hf_generate(ids), repeats)
    resp = hf_out[:, prompt_len:].numpy()
    is_eos = np.isin(resp, eos_ids)
    ended = is_eos.any(1)
    hf_len = np.where(ended, is_eos.argmax(1) + 1, resp.shape[1])
    result["hf_s"] = round(hf_s, 4)
    result["hf_useful_tok_s"] = round(float(hf_len.sum()) / hf_s, 1)
    result.update({f"hf_lengths_{k}": v for k, v in _length_stats(hf_len, max_new).items()})
    result["ratio_vs_hf"] = round(result["rollout_useful_tok_s"] / result["hf_useful_tok_s"], 3)
    result["static_ratio_vs_hf"] = round(result["static_useful_tok_s"] / result["hf_useful_tok_s"],
                                         3)
    print(f"hf: {int(hf_len.sum())} useful tokens in {hf_s:.3f}s = "
          f"{result['hf_useful_tok_s']:.1f} tok/s", file=sys.stderr)
  print(f"lengths: mean {result['lengths_mean']}, median {result['lengths_median']}, "
        f"p90 {result['lengths_p90']}, max {result['lengths_max']}, "
        f"at budget {result['lengths_at_budget_frac']}", file=sys.stderr)
  print(json.dumps(result))


if __name__ == "__main__":
  main()

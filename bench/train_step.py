"""Achieved FLOP/s of `sft_step` and `pg_step` on the `small` preset vs the measured matmul peak.

Prints progress to stderr and ONE JSON object as the last line of stdout. FLOPs are counted
analytically as model FLOPs: 6 x (matmul parameters, the unembedding included) x tokens, plus
causal attention counted once, MaxText's convention: QK^T and PV over the unmasked half of the
T x T scores, 6 x 2 x (T / 2) x (H x head_dim) per token and layer (masked scores, and the
blocks the blocked attention skips, are not useful work). Recomputation is not counted (with
`--chunk` below the sequence length the log-softmax blocks are rematerialised in the backward
pass, with `--remat` every block's forward, with the blocked attention each score block; the
default single chunk is not). `peak_rss_bytes` is the process's peak resident memory
(`resource.getrusage(...).ru_maxrss`, the whole run: both steps and the matmul peak), and
`{sft,pg}_xla_temp_bytes` XLA's temporary buffers of each compiled step. XLA's own `cost_analysis()` count is reported
alongside (it counts a loop body once, so it undercounts the scanned layers). The peak is a jitted loop of 2048 x 2048 matmuls in the same dtype, measured in the
same run: before and after all steps (`matmul_peak_flops_per_s`, the larger of the two), and
around every timed step (`*_fraction_of_adjacent_peak_*`: each step's FLOP/s over the larger of
the peaks measured right before and after it, which is robust to load from other processes on a
shared machine). `fraction_of_peak` = the smaller of the sft / pg medians of the adjacent-peak
fractions.

    python bench/train_step.py [--batch 8] [--seq 256] [--iters 3] [--dtype float32]
                               [--chunk N (default: seq, one chunk)] [--remat]
                               [--attention-block N (default: the preset's; 0 = one-shot)]
                               [--steps sft,pg] [--quick] [--long]

`--long` is the long-sequence memory check: batch 8 x 4096, one timed iteration of the SFT step,
`--remat`, log-softmax chunks of 256 (the [8, 4096, 32k] logits would be 4 GiB alone), blocked
attention; its `peak_rss_bytes` is the number to hold under 4 GiB. Compare the attention paths at
one length with `--attention-block 0` (the one-shot reference) against the default.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.models import config as model_config
from opd_jax.models import transformer
from opd_jax.optim import factory
from opd_jax.train import mesh as mesh_lib
from opd_jax.train import steps
from opd_jax.train import timing


def log(msg: str):
  print(msg, file=sys.stderr, flush=True)


@functools.partial(jax.jit, static_argnames=("reps",))
def _matmul_loop(x, w, reps):
  def body(_, y):
    return jnp.dot(y, w, preferred_element_type=jnp.float32).astype(x.dtype)
  return jax.lax.fori_loop(0, reps, body, x)


@functools.lru_cache(maxsize=None)
def _matmul_operands(dtype_name: str, n: int):
  key = jax.random.key(0)
  a = jax.random.normal(key, (n, n), jnp.float32) / np.sqrt(n)
  b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32) / np.sqrt(n)
  return a.astype(dtype_name), b.astype(dtype_name)


def matmul_peak(dtype, n: int = 2048, reps: int = 16, trials: int = 3) -> float:
  """FLOP/s of a jitted loop of n x n matmuls (float32 accumulation), best of `trials`."""
  a, b = _matmul_operands(jnp.dtype(dtype).name, n)
  _matmul_loop(a, b, reps).block_until_ready()  # compiled once per reps
  best = float("inf")
  for _ in range(trials):
    t = time.perf_counter()
    _matmul_loop(a, b, reps).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 * reps / best


def model_flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3 x forward)."""
  d, h, kv, hd, f, v = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                        cfg.vocab_size)
  matmul_params = cfg.n_layers * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f) + d * v
  # QK^T and PV, forward, over the causal (unmasked) half of the T x T scores.
  attention = cfg.n_layers * 2 * 2 * (seq_len / 2) * h * hd
  return 3.0 * (2.0 * matmul_params + attention)


def make_batch(kind: str, b: int, t: int, vocab: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
  mask = np.ones((b, t), bool)
  loss_mask = mask.copy()
  loss_mask[:, : t // 4] = False  # a prompt quarter
  batch = {"tokens_BxT": tokens, "mask_BxT": mask, "loss_mask_BxT": loss_mask}
  if kind == "pg":
    batch["old_logp_BxT"] = (-np.log(vocab) + 0.1 * rng.standard_normal((b, t))).astype(np.float32)
    batch["adv_BxT"] = rng.standard_normal((b, t)).astype(np.float32)
  return batch


def time_step(kind: str, cfg, batch_size: int, seq_len: int, iters: int, peak_dtype,
              chunk_size: int = steps.scoring.DEFAULT_CHUNK) -> dict:
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(1, 1, 1)))
  graphdef, params = mesh_lib.init_sharded_params(cfg, mesh, seed=0)
  tx = factory.make_optimizer(factory.OptimConfig(lr=1e-5), params)
  shardings = mesh_lib.state_shardings(tx, mesh_lib.param_shardings(cfg, mesh),
                                       transformer.abstract_params(cfg))
  state = mesh_lib.init_sharded_state(params, tx, 0, shardings)
  batch = mesh_lib.global_batch(make_batch(kind, batch_size, seq_len, cfg.vocab_size), mesh)
  if kind == "sft":
    fn, knobs = steps.sft_step, dict(cfg=steps.SFTStepConfig(chunk_size=chunk_size))
  else:
    fn, knobs = steps.pg_step, dict(cfg=steps.PGStepConfig(chunk_size=chunk_size))
  step = steps.jit_step(fn, mesh, shardings, mesh_lib.batch_shardings(batch, mesh),
                        graphdef=graphdef, tx=tx, **knobs)
  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
  state, metrics = step(state, batch)  # warm-up (compiled above, cached)
  jax.block_until_ready(metrics)
  flops = model_flops_per_token(cfg, seq_len) * batch_size * seq_len
  times, fractions = [], []
  peak_prev = matmul_peak(peak_dtype, reps=8, trials=1)
  for _ in range(iters):
    t = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    dt = time.perf_counter() - t
    peak_next = matmul_peak(peak_dtype, reps=8, trials=1)
    times.append(dt)
    # Peak measured right before and after this step (the larger one: noise only lowers it).
    fractions.append(flops / dt / max(peak_prev, peak_next))
    peak_prev = peak_next
  best = min(times)
  return {"step_seconds": best, "step_seconds_median": float(np.median(times)),
          "model_flops": flops, "flops_per_s": flops / best, "xla_flops": xla_flops,
          "xla_flops_per_s": xla_flops / best, "compile_seconds": compile_s,
          "trace_count": step.trace_count, "loss": float(metrics["train/loss"]),
          "xla_temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem else 0,
          "fraction_of_adjacent_peak_median": float(np.median(fractions)),
          "fraction_of_adjacent_peak_best": float(max(fractions))}


def main(argv=None):
  from opd_jax import host_malloc
  host_malloc.tune()   # $OPD_JAX_HOST_MALLOC (on by default on CPU): before the first JAX op
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--chunk", type=int, default=0,
                      help="sequence chunk of the log-softmax (the step configs' chunk_size); "
                           "default 0 = the whole sequence in one chunk, which fits easily at the "
                           "small preset's 32k vocabulary and is the fastest setting on CPU")
  parser.add_argument("--remat", action="store_true",
                      help="rematerialise each block in the backward pass (long sequences)")
  parser.add_argument("--attention-block", type=int, default=None,
                      help="ModelConfig.attention_block (default: the preset's; 0 = the one-shot "
                           "[B, H, T, T] reference attention at every length)")
  parser.add_argument("--steps", default="sft,pg", help="which steps to time (comma-separated)")
  parser.add_argument("--quick", action="store_true", help="batch 4 x 128, 2 iterations")
  parser.add_argument("--long", action="store_true",
                      help="batch 8 x 4096, 1 iteration, SFT only, --remat, chunk 256: the peak "
                           "RSS check of the blocked attention")
  args = parser.parse_args(argv)
  if args.quick:
    args.batch, args.seq, args.iters = 4, 128, 2
  if args.long:
    args.batch, args.seq, args.iters, args.remat, args.steps = 8, 4096, 1, True, "sft"
    args.chunk = args.chunk or 256
  args.chunk = args.chunk or args.seq
  kinds = tuple(k for k in args.steps.split(",") if k)
  if not kinds or set(kinds) - {"sft", "pg"}:
    parser.error(f"--steps must name sft and/or pg, got {args.steps!r}")
  overrides = {"remat": args.remat}
  if args.attention_block is not None:
    overrides["attention_block"] = args.attention_block
  cfg = model_config.small(dtype=args.dtype, **overrides)
  dtype = jnp.dtype(args.dtype)
  log(f"cpu: {timing.cpu_model()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  log(f"small preset: {cfg.num_params:,} params; batch {args.batch} x {args.seq}; {args.dtype}; "
      f"attention_block {cfg.attention_block}; remat {cfg.remat}")
  peak_before = matmul_peak(dtype)
  log(f"matmul peak: {peak_before / 1e9:.1f} GFLOP/s")
  results = {}
  for kind in kinds:
    results[kind] = time_step(kind, cfg, args.batch, args.seq, args.iters, dtype, args.chunk)
    r = results[kind]
    log(f"{kind}_step: {r['step_seconds']:.3f} s, {r['flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"(compile {r['compile_seconds']:.1f} s)")
  peak_after = matmul_peak(dtype)
  peak = max(peak_before, peak_after)
  out = {
      "cpu_model": timing.cpu_model(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "host_malloc_tuned": host_malloc.tune().applied,
      "preset": "small", "num_params": cfg.num_params, "dtype": args.dtype,
      "batch": args.batch, "seq_len": args.seq, "chunk_size": args.chunk,
      "attention_block": cfg.attention_block, "remat": cfg.remat,
      "attention_flops": "causal, counted once (half of T x T)",
      "devices": jax.device_count(),
      "backend": jax.default_backend(),
      "matmul_peak_flops_per_s": peak,
      "matmul_peak_before": peak_before, "matmul_peak_after": peak_after,
  }
  for kind, r in results.items():
    for k, v in r.items():
      out[f"{kind}_{k}"] = v
    out[f"{kind}_fraction_of_run_peak"] = r["flops_per_s"] / peak
    out[f"{kind}_fraction_of_peak"] = r["fraction_of_adjacent_peak_median"]
  out["fraction_of_peak"] = min(out[f"{kind}_fraction_of_peak"] for kind in kinds)
  # ru_maxrss is in KiB on Linux.
  out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  out["peak_rss_gib"] = out["peak_rss_bytes"] / float(1 << 30)
  print(json.dumps(out))


if __name__ == "__main__":
  main()

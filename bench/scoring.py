"""Peak memory of scoring a [8, 2048] batch with a 151,936-token vocabulary (`small` body).

    python bench/scoring.py [--quick] [--chunk-size N]

Runs the measurement in a fresh subprocess (so nothing else this script imported counts) and
reports that process's peak resident set size (`ru_maxrss`), which covers everything it did:
the jax runtime, pseudo-random float32 params (~0.4 GB: a 151,936 x 512 tied embedding + 8 x
512 layers, each leaf written by one fused jitted op), the token batch, compilation and one
`scoring.token_logprobs` call. A materialised [8, 2048, 151936] float32 log-softmax alone would be
9.3 GiB. `baseline_rss_gib` is the peak before scoring starts (runtime + params). Also reports
the scoring wall time (compile included: one call) and a float64 spot check of a few positions.
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import subprocess
import sys
import time

VOCAB = 151_936


def _peak_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child(batch: int, length: int, chunk_size: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from opd_jax.models import config as mc
  from opd_jax.models import scoring
  from opd_jax.models import transformer as tf

  cfg = mc.small(vocab_size=VOCAB)
  graphdef = tf.graphdef_for(cfg)
  shapes = tf.abstract_params(cfg)
  leaves, treedef = jax.tree.flatten_with_path(shapes)

  # Pseudo-random params from an integer hash of the element index: one fused elementwise op per
  # leaf writes the output directly (jax.random would allocate its bits first, inflating the
  # peak before scoring even starts). Uniform with std 0.02 (0.2 for the embedding: O(1) logits;
  # norm scales 1 +- 0.1).
  @functools.partial(jax.jit, static_argnums=(1, 2))
  def draw(seed, shape, std, mean):
    x = jnp.arange(math.prod(shape), dtype=jnp.uint32) * jnp.uint32(2654435761) + seed
    x = (x ^ (x >> 16)) * jnp.uint32(0x45D9F3B)
    x = (x ^ (x >> 16)) * jnp.uint32(0x45D9F3B)
    x = x ^ (x >> 16)
    u = (x >> 8).astype(jnp.float32) * (2.0 ** -24) - 0.5
    return (mean + u * (std * 12 ** 0.5)).reshape(shape)

  def spec(path, shape):  # (std, mean): norm scales ~ 1 +- 0.1, embedding 0.2, kernels 0.02
    name = jax.tree_util.keystr(path)
    return (0.1, 1.0) if "scale" in name else (0.2, 0.0) if "embedding" in name else (0.02, 0.0)

  params = jax.tree.unflatten(treedef, [
      draw(jnp.uint32(i), s.shape, *spec(path, s.shape)) for i, (path, s) in enumerate(leaves)])
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (batch, length)), jnp.int32)
  mask = np.ones((batch, length), bool)
  mask[0, :100] = False          # a left-padded row
  mask[1, length - 300:] = False  # a right-padded row
  mask = jnp.asarray(mask)
  jax.block_until_ready((params, tokens, mask))
  baseline = _peak_gib()

  t0 = time.perf_counter()
  logp = jax.block_until_ready(
      scoring.token_logprobs(graphdef, params, tokens, mask, chunk_size=chunk_size))
  score_s = time.perf_counter() - t0

  # Spot check: a few positions of row 2 against a float64 log-softmax of the full forward
  # of a short prefix (logits of 64 positions only).
  pre = 64
  logits = np.asarray(tf.forward(graphdef, params, tokens[2:3, :pre]), np.float64)[0]
  ls = logits - logits.max(-1, keepdims=True)
  ls = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
  ref = ls[np.arange(pre - 1), np.asarray(tokens[2, 1:pre])]
  err = float(np.max(np.abs(np.asarray(logp[2, 1:pre]) - ref)))
  return {"baseline_rss_gib": round(baseline, 3), "peak_rss_gib": round(_peak_gib(), 3),
          "score_s_incl_compile": round(score_s, 3),
          "max_abs_err_vs_float64": err, "finite": bool(np.all(np.isfinite(logp)))}


def main(argv=None):
  from opd_jax import host_malloc
  host_malloc.tune()   # $OPD_JAX_HOST_MALLOC (on by default on CPU): before the first JAX op
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="same shapes (the target is memory)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=2048)
  parser.add_argument("--chunk-size", type=int, default=None)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  from opd_jax.models import scoring
  chunk = args.chunk_size or scoring.DEFAULT_CHUNK
  if args.child:
    print(json.dumps(child(args.batch, args.length, chunk)))
    return
  cmd = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--length",
         str(args.length), "--chunk-size", str(chunk)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    sys.stderr.write(proc.stderr)
    raise SystemExit(f"scoring child failed with exit code {proc.returncode}")
  measured = json.loads(proc.stdout.strip().splitlines()[-1])
  from opd_jax.train import timing
  result = {"cpu_model": timing.cpu_model(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "batch": args.batch, "length": args.length, "vocab_size": VOCAB, "body": "small",
            "chunk_size": chunk, "materialised_logsoftmax_gib": round(
                args.batch * args.length * VOCAB * 4 / 2**30, 2), **measured,
            "target_peak_rss_gib": 2.0}
  print(json.dumps(result))


if __name__ == "__main__":
  main()

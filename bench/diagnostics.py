"""The full diagnostics suite on a Qwen2.5-0.5B-shaped pair: opd_jax vs a float64 numpy/scipy
reference, in the same run.

The pair is built directly as our params dict with numpy (nothing is allocated through the NNX
module): 24 layers, d_model 896, 14 heads / 2 kv heads of width 64 (q/k/v biases), d_ff 4864,
vocab 151,936, tied embeddings; float32 W_0 ~ N(0, 0.02^2) and W_1 = W_0 + a structured update per
matrix: rank 32 with singular values decaying as 0.9^i (entry rms 3e-5, about half a bf16 ULP of
a typical weight, so that about half of the bf16 codes change) plus a sparse part (2% of the
entries, std 1e-4). Trajectory snapshots (4 intermediate + W_1) are built lazily one at a time:
W_t = W_0 + f_t (W_1 - W_0) + a rank-4 drift that fades by the end.

Suites: the endpoint suite (`EndpointConfig()`: k = 512, r = 64, alpha = 0.5, every matrix and
1-D parameter) and the trajectory suite (`TrajectoryConfig()`: attention q/k/v/o of every layer,
Hill k = 16, Sim_16). opd_jax times include compilation. The reference (for the endpoint, the
tests' `tests/geometry_reference.py`) computes, per matrix, full
float64 SVDs (`scipy.linalg.svd`, gesdd) of W_0 and W_1 (of dW_t for the trajectory), principal
angles with `scipy.linalg.subspace_angles` (Knyazev-Argentati), bf16 codes via `ml_dtypes`, and
the masks with `np.partition`. opd_jax runs first, so `peak_rss_gib` (the process's peak resident
memory, the two checkpoints included) is the opd_jax phase's; the reference's is reported apart.

Prints progress to stderr and ONE JSON object as the last line of stdout.

    python bench/diagnostics.py            # the full pair (several minutes; ~4 GB for the pair)
    python bench/diagnostics.py --quick    # 2 layers and a 16,384-token vocabulary
"""

from __future__ import annotations

import os
import sys

# Threads are fixed before numpy / jax load: single-threaded BLAS / LAPACK inside each call (numpy,
# scipy, and the LAPACK kernels jax calls), for both implementations alike (`--threads all` keeps
# the defaults). On this shared 2-core machine OpenBLAS's spinning worker threads make LAPACK calls
# 3-20x slower and erratic under load. XLA keeps its own thread pool (it runs batched LAPACK calls
# and matmuls in parallel across the batch).
if "--threads" not in sys.argv or sys.argv[sys.argv.index("--threads") + 1] != "all":
  for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from opd_jax.geometry import endpoint, matrices, trajectory  # noqa: E402
from opd_jax.train import timing  # noqa: E402

# The float64 reference the tests check opd_jax against (tests/geometry_reference.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import geometry_reference as reference  # noqa: E402

D, HEADS, KV, HD, FF, VOCAB, LAYERS = 896, 14, 2, 64, 4864, 151_936, 24


def log(msg: str):
  print(msg, file=sys.stderr, flush=True)


def rss_peak_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


# -- the pair -----------------------------------------------------------------------------------
def _shapes(layers: int, vocab: int) -> dict:
  return {
      "embed": {"embedding": (vocab, D)},
      "layers": {
          "attn": {"q_proj": {"kernel": (layers, D, HEADS * HD), "bias": (layers, HEADS * HD)},
                   "k_proj": {"kernel": (layers, D, KV * HD), "bias": (layers, KV * HD)},
                   "v_proj": {"kernel": (layers, D, KV * HD), "bias": (layers, KV * HD)},
                   "o_proj": {"kernel": (layers, HEADS * HD, D)}},
          "mlp": {"gate_proj": {"kernel": (layers, D, FF)}, "up_proj": {"kernel": (layers, D, FF)},
                  "down_proj": {"kernel": (layers, FF, D)}},
          "input_norm": {"scale": (layers, D)}, "post_attn_norm": {"scale": (layers, D)}},
      "final_norm": {"scale": (D,)},
  }


def _map(fn, tree, path=()):
  if isinstance(tree, dict):
    return {k: _map(fn, v, path + (k,)) for k, v in tree.items()}
  return fn(path, tree)


def build_pair(layers: int, vocab: int, seed: int = 0):
  """(W_0, W_1) as float32 numpy params dicts; the update is written chunk by chunk in place."""
  rng = np.random.default_rng(seed)

  def base(path, shape):
    if path[-1] == "scale":
      return (1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

  p0 = _map(base, _shapes(layers, vocab))

  def tuned(path, w0):
    w1 = w0.copy()
    if w0.ndim == 2 and path[-1] != "embedding":  # stacked norms / biases: sparse change
      mask = rng.random(w0.shape) < 0.3
      w1[mask] += np.float32(1e-2) * rng.standard_normal(int(mask.sum()), dtype=np.float32)
      return w1
    if w0.ndim == 1:
      w1[: w0.size // 3] += np.float32(1e-2)
      return w1
    mats = w1 if w0.ndim == 3 else w1[None]
    for m in mats:  # per layer: rank 32 (decaying) + sparse, added in row chunks
      rows, cols = m.shape
      sv = 0.9 ** np.arange(32, dtype=np.float32)
      sv *= np.float32(3e-5 * math.sqrt(rows * cols)) / np.linalg.norm(sv)  # entry rms 3e-5
      a = np.linalg.qr(rng.standard_normal((rows, 32), dtype=np.float32))[0] * sv
      b = np.linalg.qr(rng.standard_normal((cols, 32), dtype=np.float32))[0].T
      for r0 in range(0, rows, 8192):
        r1 = min(rows, r0 + 8192)
        blk = a[r0:r1] @ b
        mask = rng.random(blk.shape, dtype=np.float32) < 0.02
        blk[mask] += np.float32(1e-4) * rng.standard_normal(int(mask.sum()), dtype=np.float32)
        m[r0:r1] += blk
    return w1

  return p0, _map(tuned, p0)


class Snapshots(Sequence):
  """Lazily built snapshots: attention kernels at fractions f_t of the update plus a fading
  rank-4 drift; other leaves are W_1's (the trajectory reads only q/k/v/o). The last is W_1."""

  def __init__(self, p0, p1, fractions):
    self.p0, self.p1, self.fractions = p0, p1, tuple(fractions)

  def __len__(self):
    return len(self.fractions) + 1

  def __getitem__(self, t):
    if t == len(self.fractions):
      return self.p1
    f = self.fractions[t]
    rng = np.random.default_rng(1000 + t)
    attn = {}
    for name, mod in self.p0["layers"]["attn"].items():
      w0, w1 = mod["kernel"], self.p1["layers"]["attn"][name]["kernel"]
      lead, (m, n) = w0.shape[:1], w0.shape[1:]
      drift = (rng.standard_normal(lead + (m, 4), dtype=np.float32)
               @ rng.standard_normal(lead + (4, n), dtype=np.float32)) * np.float32(
                   1e-5 * (1 - f))
      attn[name] = dict(mod, kernel=(w0 + np.float32(f) * (w1 - w0) + drift).astype(np.float32))
    layers = dict(self.p1["layers"], attn=attn)
    return dict(self.p1, layers=layers)


# -- the float64 numpy/scipy reference (endpoint: tests/geometry_reference.py) ------------------
def ref_endpoint(p0, p1, k=512, r=64, alpha=0.5) -> dict:
  out = {}
  for m0, m1 in zip(matrices.named_matrices(p0, include_1d=True),
                    matrices.named_matrices(p1, include_1d=True)):
    if m0.is_matrix:
      out[m0.name] = reference.matrix_metrics(m0.array, m1.array, k=k, r=r, alpha=alpha)
    else:
      ch = reference.relative_changed(m0.array, m1.array)
      out[m0.name] = {"n": ch.size, "changed": int(ch.sum())}
  return out


def ref_trajectory(p0, snapshots, hill_k=16, sim_k=16) -> dict:
  bases, out = {}, {}
  for t in range(len(snapshots)):
    snap = snapshots[t]
    for m0, mt in zip(matrices.named_matrices(p0, types=matrices.ATTENTION_TYPES),
                      matrices.named_matrices(snap, types=matrices.ATTENTION_TYPES)):
      d = np.asarray(mt.array, np.float64) - np.asarray(m0.array, np.float64)
      u, s, _ = np.linalg.svd(d, full_matrices=False)
      rec = out.setdefault(m0.name, {"stable_rank": [], "frobenius": [], "hill": []})
      rec["frobenius"].append(float(np.linalg.norm(d)))
      rec["stable_rank"].append(float(np.sum(s ** 2) / s[0] ** 2))
      top = s[:hill_k]
      rec["hill"].append(float(1.0 / np.mean(np.log(top[:-1] / top[-1]))))
      bases.setdefault(m0.name, []).append(u[:, :sim_k])
    del snap
  for name, bs in bases.items():
    out[name]["sim_end"] = [float(np.sum((b.T @ bs[-1]) ** 2) / sim_k) for b in bs]
  return out


# -- main -----------------------------------------------------------------------------------------
def main() -> int:
  from opd_jax import host_malloc
  host_malloc.tune()   # $OPD_JAX_HOST_MALLOC (on by default on CPU): before the first JAX op
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="2 layers, 16,384-token vocabulary")
  ap.add_argument("--layers", type=int, default=None)
  ap.add_argument("--vocab", type=int, default=None)
  ap.add_argument("--snapshots", type=int, default=4, help="intermediate snapshots")
  ap.add_argument("--no-reference", action="store_true", help="opd_jax only")
  ap.add_argument("--threads", choices=("1", "all"), default="1",
                  help="BLAS/LAPACK and XLA threads for both implementations (default 1)")
  args = ap.parse_args()
  layers = args.layers or (2 if args.quick else LAYERS)
  vocab = args.vocab or (16_384 if args.quick else VOCAB)

  t = time.perf_counter()
  p0, p1 = build_pair(layers, vocab)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(p0))
  ckpt_gib = 4 * n_params / 2 ** 30
  fractions = [(i + 1) / (args.snapshots + 1) for i in range(args.snapshots)]
  steps = [round(300 * f) for f in fractions] + [300]
  snaps = Snapshots(p0, p1, fractions)
  log(f"pair built: {n_params / 1e6:.1f}M params, {ckpt_gib:.2f} GiB per f32 checkpoint, "
      f"{time.perf_counter() - t:.1f}s, rss peak {rss_peak_gib():.2f} GiB")

  t0 = time.perf_counter()
  ep = endpoint.endpoint_metrics(p0, p1, endpoint.EndpointConfig(progress=True))
  t1 = time.perf_counter()
  tr = trajectory.trajectory_metrics(p0, snaps, steps, trajectory.TrajectoryConfig(progress=True))
  t2 = time.perf_counter()
  peak = rss_peak_gib()
  log(f"opd_jax: endpoint {t1 - t0:.1f}s, trajectory {t2 - t1:.1f}s, peak rss {peak:.2f} GiB")
  result = {
      "bench": "diagnostics", "layers": layers, "vocab": vocab, "d_model": D, "d_ff": FF,
      "heads": HEADS, "kv_heads": KV, "head_dim": HD, "snapshots": len(snaps),
      "n_params": int(n_params), "checkpoint_f32_gib": ckpt_gib,
      "opd_jax_endpoint_s": t1 - t0, "opd_jax_trajectory_s": t2 - t1,
      "opd_jax_total_s": t2 - t0, "peak_rss_gib": peak, "peak_rss_over_checkpoint": peak / ckpt_gib,
      "randomized_topk_fraction": float(np.mean([x for m in tr["matrices"].values()
                                                 for x in m["randomized"]])),
      "endpoint_overall": ep["overall"],
      "trajectory_overall": {k: v for k, v in tr["overall"].items()},
      "threads": args.threads, "load_avg": os.getloadavg(),
      "cpu_model": timing.cpu_model(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  if not args.no_reference:
    t3 = time.perf_counter()
    ref_ep = ref_endpoint(p0, p1)
    t4 = time.perf_counter()
    ref_tr = ref_trajectory(p0, snaps)
    t5 = time.perf_counter()
    log(f"reference: endpoint {t4 - t3:.1f}s, trajectory {t5 - t4:.1f}s")
    result.update(compare(ep, tr, ref_ep, ref_tr))
    result.update({
        "reference_endpoint_s": t4 - t3, "reference_trajectory_s": t5 - t4,
        "reference_total_s": t5 - t3, "reference_peak_rss_gib": rss_peak_gib(),
        "speedup_vs_reference": (t5 - t3) / (t2 - t0),
        "speedup_endpoint": (t4 - t3) / (t1 - t0),
        "speedup_trajectory": (t5 - t4) / (t2 - t1),
    })
    result["targets"] = {"speedup_vs_reference": 3.0, "max_angle_err_deg": 0.01,
                         "peak_rss_over_checkpoint": 3.0}
    result["meets_targets"] = (result["speedup_vs_reference"] >= 3.0
                               and result["max_angle_err_deg"] <= 0.01
                               and result["peak_rss_over_checkpoint"] <= 3.0)
  print(json.dumps(result, default=float))
  return 0


def compare(ep, tr, ref_ep, ref_tr) -> dict:
  angle_err, nss_err, ov_err, count_err = 0.0, 0.0, 0.0, 0
  for name, want in ref_ep.items():
    got = ep["matrices"][name]
    count_err += abs(got["changed"] - want["changed"])
    if "nss" not in want:
      continue
    for key in ("max_angle_in_deg", "max_angle_out_deg"):
      angle_err = max(angle_err, abs(got[key] - want[key]))
    nss_err = max(nss_err, abs(got["nss"] - want["nss"]) / max(want["nss"], 1e-300))
    for key in ("overlap_principal", "overlap_low"):
      if not math.isnan(want[key]):
        ov_err = max(ov_err, abs(got[key] - want[key]))
  rep = ep["representative"]
  want = ref_ep[rep["name"]]
  curve_err = max(np.abs(np.asarray(rep["angles_in_deg"]) - want["angles_in_deg"]).max(),
                  np.abs(np.asarray(rep["angles_out_deg"]) - want["angles_out_deg"]).max())
  traj_err = {}
  for metric in ("stable_rank", "frobenius", "hill", "sim_end"):
    errs = [abs(g - w) / max(abs(w), 1e-300)
            for name, rec in ref_tr.items()
            for g, w in zip(tr["matrices"][name][metric], rec[metric])]
    traj_err[metric] = float(max(errs))
  return {"max_angle_err_deg": float(max(angle_err, curve_err)),
          "max_max_angle_err_deg": float(angle_err), "representative_curve_err_deg":
          float(curve_err), "max_nss_rel_err": float(nss_err),
          "max_overlap_abs_err": float(ov_err), "changed_count_mismatch": int(count_err),
          "trajectory_max_rel_err": traj_err}


if __name__ == "__main__":
  sys.exit(main())

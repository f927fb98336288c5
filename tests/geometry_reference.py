"""Independent float64 numpy / scipy references of the geometry diagnostics (paper_facts.md
section 1), written from the definitions, for the tests of opd_jax.geometry.

Matrices are given as numpy arrays in any orientation together with which axis is the input side,
so the same code serves our (in, out) kernels and PyTorch (out, in) weights.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import scipy.linalg

ETA = 1e-3


def relative_changed(x0, x1) -> np.ndarray:
  """Cast to bf16; changed iff |b1 - b0| > eta max(|b0|, |b1|)."""
  b0 = np.asarray(x0, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
  b1 = np.asarray(x1, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
  return ~(np.abs(b1 - b0) <= ETA * np.maximum(np.abs(b0), np.abs(b1)))


def matrix_metrics(w0, w1, *, k: int, r: int, alpha: float, input_axis: int = 0) -> dict:
  """Per-matrix endpoint metrics; `input_axis` is the axis of w indexing input features.
  (Frees what it no longer needs as it goes: bench/diagnostics.py runs it on a 151,936 x 896
  embedding.)"""
  upd = relative_changed(w0, w1).ravel()
  w0 = np.asarray(w0, np.float64)
  n = w0.size
  u0, s0, v0t = scipy.linalg.svd(w0, full_matrices=False, check_finite=False)
  u1, s1, v1t = scipy.linalg.svd(np.asarray(w1, np.float64), full_matrices=False,
                                 check_finite=False)
  tol = 1e-6
  rank = min(int(np.sum(s0 > tol * s0[0])), int(np.sum(s1 > tol * s1[0])))
  k = min(k, rank)
  left = np.degrees(scipy.linalg.subspace_angles(u0[:, :k], u1[:, :k]))
  right = np.degrees(scipy.linalg.subspace_angles(v0t[:k].T, v1t[:k].T))
  del u1, v1t
  a_in, a_out = (left, right) if input_axis == 0 else (right, left)
  c = min(max(int(round(alpha * n)), 1), n)
  kp = np.abs((u0[:, :r] * s0[:r]) @ v0t[:r]).ravel()
  del u0, v0t
  m_princ = kp >= np.partition(kp, n - c)[n - c]  # the c-th largest
  del kp
  kl = np.abs(w0).ravel()
  del w0
  m_low = kl <= np.partition(kl, c - 1)[c - 1]    # the c-th smallest
  nu = int(upd.sum())
  return {
      "n": n, "changed": nu, "sparsity": 1 - nu / n, "density": nu / n, "k": k,
      "max_angle_in_deg": float(a_in.max()), "max_angle_out_deg": float(a_out.max()),
      "max_angle_deg": float(max(a_in.max(), a_out.max())),
      "angles_in_deg": np.sort(a_in), "angles_out_deg": np.sort(a_out),
      "nss": float(np.linalg.norm(s1 - s0) / np.linalg.norm(s0)),
      "overlap_principal": float((m_princ & upd).sum() / nu) if nu else math.nan,
      "overlap_low": float((m_low & upd).sum() / nu) if nu else math.nan,
      "frac_principal": float(m_princ.mean()), "frac_low": float(m_low.mean()),
  }


def vector_metrics(x0, x1) -> dict:
  changed = relative_changed(x0, x1)
  n = changed.size
  return {"n": n, "changed": int(changed.sum()), "sparsity": 1 - changed.sum() / n}


def trajectory_metrics(w0, snapshots, *, hill_k: int, sim_k: int, input_axis: int = 0) -> dict:
  """Per-snapshot stable rank, Frobenius, Hill and Sim_K (t, t_end) / (t, t-1) of dW_t."""
  w0 = np.asarray(w0, np.float64)
  out = {m: [] for m in ("stable_rank", "frobenius", "hill", "sim_end", "sim_prev")}
  bases = []
  for w in snapshots:
    d = np.asarray(w, np.float64) - w0
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    if s[0] == 0:  # no update: every metric but the norm is undefined
      bases.append(None)
      out["frobenius"].append(0.0)
      out["stable_rank"].append(math.nan)
      out["hill"].append(math.nan)
      continue
    v_in = u if input_axis == 0 else vt.T
    bases.append(v_in[:, :sim_k])
    out["frobenius"].append(float(np.linalg.norm(d)))
    out["stable_rank"].append(float(np.sum(s ** 2) / s[0] ** 2))
    top = s[:hill_k]
    out["hill"].append(float(1.0 / np.mean(np.log(top[:-1] / top[-1]))))
  sim = lambda a, b: math.nan if a is None or b is None else float(  # noqa: E731
      np.sum((a.T @ b) ** 2) / sim_k)
  for t, b in enumerate(bases):
    out["sim_end"].append(sim(b, bases[-1]))
    out["sim_prev"].append(math.nan if t == 0 else sim(b, bases[t - 1]))
  return out


def nanmean(values) -> float:
  vals = [v for v in values if not math.isnan(v)]
  return float(np.mean(vals)) if vals else math.nan

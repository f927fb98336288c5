"""Linear algebra for the geometry diagnostics: float64 where angles need it, batched, jitted.

Precision scope. `float64()` is `jax.enable_x64(True)` as a context manager: the diagnostics enter
it around their own computations only, so nothing else in the process changes precision. The
float64 kernels below refuse to run outside it (they would silently compute in float32).

Batching. Every kernel takes a leading batch axis N of same-shape matrices (a chunk of the
stacked `[L, in, out]` layers) and is jitted, so it compiles once per (N, shape) and the callers
pick N so that N divides L (one shape per group).

Endpoint path (`pair_grams` -> `pair_spectra`). For a pair (A0, A1 = A0 + dA) with short side S
and long side l, the three S x S Gram matrices G00 = B0 B0^T, G0d = B0 dB^T, Gdd = dB dB^T
(B = the matrix oriented with its short side as rows; accumulated over column chunks of the long
side, so memory is bounded) are the only O(S^2 l) work. From them, one `eigh` per matrix gives
every singular value (NSS) and the short-side singular vectors; the long-side principal angles
follow from the Grams without forming the long-side vectors:
  cos: C = V0k^T V1k = S0 (Q0^T Q1) S1^-1 + S0^-1 (Q0^T G0d Q1) S1^-1,
  sin: D = (I - V0k V0k^T) V1k = B0^T X + dB^T Y1 with X = (Q1 - Q0 Q0^T Q1) S1^-1 -
       Q0 S0^-2 (Q0^T G0d Q1) S1^-1, Y1 = Q1 S1^-1, and D^T D from the Grams.
The largest angle uses the sine when sin^2 < 1/2 and the cosine otherwise (Knyazev-Argentati; the
cosine's SVD runs only for members that need it, under `lax.cond`, so members are processed one
after another with `lax.map`; the short-side sines come from the smaller of the k x k and the
(S - k) x (S - k) Gram of the part of span(Q1k) outside span(Q0k)), so
it is accurate to about eps * (s_1 / s_k)^2 radians (the Gram squares the condition number of the
top-k block; s_1 / s_k is O(10-100) for trained weights). The numerical rank counts singular values
above sqrt(4 S eps) s_1, the resolution of a Gram; k is capped at it. (Each SVD is
thus computed once per matrix, from its Gram, and reused for NSS, angles and the rank-r mask.)
Full angle curves (`principal_angles`) use explicit orthonormal bases on both sides
(`top_subspaces`), accurate for small angles too (sine formula on explicit residuals).

Trajectory path (`top_k_svd`). Randomized range finding with block subspace iteration: block
b = k + oversample, Rayleigh-Ritz every iteration, until every top-k Ritz triple has residual
||A v_i - s_i u_i|| <= tol * s_1 (A^T u_i = s_i v_i holds exactly by construction). Stated
accuracy: singular values within tol * s_1 (absolute), and the top-k subspaces within
tol * s_1 / gap_k radians (Wedin), gap_k = s_k - s_{k+1}. A matrix that does not converge within
`max_iters` is recomputed exactly (`top_k_exact`, Gram + eigh in float64), so results are exact
to round-off either way; `TopK.converged` says which path was taken.
`spectral_norm` is plain power iteration on A^T A (stable rank without the subspace metrics).

LAPACK calls are serialised. jaxlib 0.10's CPU LAPACK kernels split a batch into chunks on XLA's
intra-op thread pool and block until they finish; when as many batched kernels as the pool has
threads run at once (independent calls in one computation, e.g. the eigh of A0 and of A1), every
thread waits on chunks that no thread is free to run: a deadlock (seen with two 896-wide eighs on
a 2-core machine). `_after` makes each LAPACK call in a computation depend on the previous one,
so at most one is in flight and the pool always has a thread for its chunks.
(jax 0.11 removes the parallel path; drop `_after` when the pin moves.)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

F64 = jnp.float64
_HI = lax.Precision.HIGHEST


def float64():
  """Context manager enabling float64 for the code inside it (and only there)."""
  return jax.enable_x64(True)


def _require_x64(where: str) -> None:
  if not jax.config.jax_enable_x64:
    raise RuntimeError(f"{where} computes in float64: call it inside `with linalg.float64():`")


def _mm(spec, *ops):
  return jnp.einsum(spec, *ops, precision=_HI)


def _after(x, *deps):
  """x, computed only once `deps` are (orders LAPACK calls; see the module docstring).

  A real data dependency: x + 0 * (a finite scalar read from each dep), which XLA does not fold
  for floats. (`lax.optimization_barrier` is not enough: it aliases its buffers and adds no edge
  to the CPU runtime's dependency graph.) Exact: x + 0.0 == x."""
  s = sum(jnp.ravel(d)[0].astype(x.dtype) for d in deps)
  return x + jnp.zeros((), x.dtype) * jnp.where(jnp.isfinite(s), s, 0)


# -- bf16 codes ---------------------------------------------------------------------------------
def bf16_codes(x) -> jax.Array:
  """uint16 bfloat16 codes of `x`, with -0 mapped to +0.

  bfloat16 input is read bitwise. Other floats are rounded to bfloat16 (round to nearest even)
  by integer arithmetic on the float32 bits, which keeps subnormals exact whatever the backend's
  flush-to-zero mode (float64 input is first rounded to float32: a double rounding, off by one
  code only for values within 2^-29 relative of a bf16 rounding boundary). NaNs map to a quiet
  NaN code of the same sign.
  """
  x = jnp.asarray(x)
  if x.dtype == jnp.bfloat16:
    code = lax.bitcast_convert_type(x, jnp.uint16)
  else:
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    nan = (bits & jnp.uint32(0x7FFFFFFF)) > jnp.uint32(0x7F800000)
    rounded = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) >> 16
    code = jnp.where(nan, (bits >> 16) | jnp.uint32(0x0040), rounded).astype(jnp.uint16)
  return jnp.where((code & jnp.uint16(0x7FFF)) == 0, jnp.uint16(0), code)


def bf16_changed(x0, x1) -> jax.Array:
  """Bool mask of entries whose bfloat16 value changed (+0 and -0 count as equal).

  Equals the paper's relative test |b1 - b0| <= eta max(|b0|, |b1|) with eta = 1e-3 < 2^-9 on
  finite values (adjacent bf16 numbers differ by more than 2^-8 relative).
  """
  return bf16_codes(x0) != bf16_codes(x1)


# -- endpoint: Grams and spectra ----------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("short",))
def _pair_grams(a0, a1, short):
  if short == "output":  # contract the minor axis: XLA's CPU dot runs A^T A at half speed
    a0, a1 = jnp.swapaxes(a0, -1, -2), jnp.swapaxes(a1, -1, -2)
  x0 = a0.astype(F64)
  d = a1.astype(F64) - x0
  spec = "nic,njc->nij"
  return _mm(spec, x0, x0), _mm(spec, x0, d), _mm(spec, d, d)


def pair_grams(a0_NxIxO, a1_NxIxO, short: str):
  """(G00, G0d, Gdd), each [N, S, S] float64, of a batch of (in, out) matrix pairs on their
  `short` side: G00 = B0 B0^T, G0d = B0 dB^T, Gdd = dB dB^T with B = oriented(A, short),
  dB = B1 - B0 (exact in float64). Additive over column chunks of the long side."""
  _require_x64("pair_grams")
  return _pair_grams(a0_NxIxO, a1_NxIxO, short)


class PairSpectra(NamedTuple):
  """Per member of a batch: singular values (descending) of A0 and A1, NSS, the largest
  principal angle (degrees) between the top-k singular subspaces on the short and the long side,
  the top-r short-side singular vectors of A0 (for the principal mask) and numerical ranks."""

  sigma0: jax.Array         # [N, S]
  sigma1: jax.Array         # [N, S]
  nss: jax.Array            # [N]
  max_angle_short: jax.Array  # [N] degrees
  max_angle_long: jax.Array   # [N] degrees
  basis0_r: jax.Array       # [N, S, r]
  rank0: jax.Array          # [N] int
  rank1: jax.Array          # [N] int


def _descending_eigh(g):
  lam, q = jnp.linalg.eigh(g)
  return lam[..., ::-1], q[..., ::-1]


def _numerical_rank(sigma):
  """Singular values above sqrt(4 S eps) s_1: the resolution of singular values from a Gram."""
  tol = jnp.sqrt(4.0 * sigma.shape[-1] * jnp.finfo(sigma.dtype).eps) * sigma[..., :1]
  return jnp.sum(sigma > tol, axis=-1)


def _largest_angle(cos_min, sin_max):
  """Largest principal angle (radians) from the smallest cosine and the largest sine."""
  sin_max = jnp.clip(sin_max, 0.0, 1.0)
  return jnp.where(sin_max ** 2 < 0.5, jnp.arcsin(sin_max),
                   jnp.arccos(jnp.clip(cos_min, 0.0, 1.0)))


def _smallest_sv_if(needed, m, *deps):
  """The smallest singular value of m where `needed`, else 1 (an SVD only when it is used)."""
  return lax.cond(needed, lambda x: jnp.linalg.svd(_after(x, *deps), compute_uv=False)[-1],
                  lambda x: jnp.ones((), x.dtype), m)


def _spectra_one(g00, g0d, gdd, k, r):
  s_dim = g00.shape[-1]
  lam0, q0 = _descending_eigh(g00)
  lam1, q1 = _descending_eigh(_after(g00 + g0d + g0d.T + gdd, lam0))
  s0 = jnp.sqrt(jnp.maximum(lam0, 0.0))
  s1 = jnp.sqrt(jnp.maximum(lam1, 0.0))
  nss = jnp.linalg.norm(s1 - s0) / jnp.linalg.norm(s0)
  q0k, q1k, s0k, s1k = q0[:, :k], q1[:, :k], s0[:k], s1[:k]
  # Short side: explicit orthonormal bases. The sines are the singular values of the part of
  # span(q1k) outside span(q0k): rs = q1k - q0k t, or equally z = q0c^T q1k with q0c the
  # complement of q0k in the full eigenbasis; the smaller of the two Grams is decomposed.
  t = q0k.T @ q1k
  rs = q1k - q0k @ t
  if k == s_dim:
    sin2_short = jnp.zeros((), g00.dtype)  # both subspaces are the whole space
  elif s_dim - k < k:
    z = q0[:, k:].T @ q1k
    sin2_short = jnp.linalg.eigvalsh(_after(z @ z.T, lam1))[-1]
  else:
    sin2_short = jnp.linalg.eigvalsh(_after(rs.T @ rs, lam1))[-1]
  sin_short = jnp.sqrt(jnp.clip(sin2_short, 0.0, 1.0))
  # The cosine is used only for angles above 45 degrees (`_largest_angle`).
  cos_short = _smallest_sv_if(sin_short ** 2 >= 0.5, t, sin_short)
  # Long side: from the Grams (see the module docstring).
  inv0 = jnp.where(s0k > 0, 1.0 / s0k, 0.0)
  inv1 = jnp.where(s1k > 0, 1.0 / s1k, 0.0)
  e = q0k.T @ g0d @ q1k
  x = rs * inv1[None, :] - q0k @ (inv0[:, None] ** 2 * e * inv1[None, :])
  y1 = q1k * inv1[None, :]
  cross = x.T @ g0d @ y1
  dtd = x.T @ g00 @ x + cross + cross.T + y1.T @ gdd @ y1
  sin_long = jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(_after(dtd, cos_short))[-1], 0.0))
  c = s0k[:, None] * t * inv1[None, :] + inv0[:, None] * e * inv1[None, :]
  cos_long = _smallest_sv_if(jnp.clip(sin_long, 0.0, 1.0) ** 2 >= 0.5, c, sin_long)
  deg = 180.0 / jnp.pi
  return PairSpectra(s0, s1, nss, _largest_angle(cos_short, sin_short) * deg,
                     _largest_angle(cos_long, sin_long) * deg, q0[:, :r],
                     _numerical_rank(s0), _numerical_rank(s1))


@functools.partial(jax.jit, static_argnames=("k", "r"))
def _pair_spectra(g00, g0d, gdd, k, r):
  # Members one after another (`lax.map`): the LAPACK calls gain nothing from a batch here, and
  # the conditional SVDs then run only where needed.
  return lax.map(lambda g: _spectra_one(*g, k=k, r=r), (g00, g0d, gdd))


def pair_spectra(g00, g0d, gdd, *, k: int, r: int) -> PairSpectra:
  """Spectra, NSS and largest top-k principal angles of a batch from its Grams (float64).

  k must not exceed the numerical rank of either matrix (check `rank0`/`rank1` and call again
  with a smaller k where it does: singular vectors beyond the rank are undefined).
  """
  _require_x64("pair_spectra")
  s = g00.shape[-1]
  if not 0 < k <= s or not 0 < r <= s:
    raise ValueError(f"pair_spectra: k={k}, r={r} must be in [1, {s}]")
  return _pair_spectra(g00, g0d, gdd, k, r)


# -- explicit subspaces and full angle curves ---------------------------------------------------
class Subspaces(NamedTuple):
  """Top-k singular triples of an (in, out) matrix: input-side vectors [in, k], singular values
  (descending) [k], output-side vectors [out, k]."""

  input: jax.Array
  sigma: jax.Array
  output: jax.Array


@functools.partial(jax.jit, static_argnames=("k",))
def _top_subspaces(a, k):
  a = a.astype(F64)
  short = "input" if a.shape[0] <= a.shape[1] else "output"
  b = a if short == "input" else a.T
  lam, q = _descending_eigh(b @ b.T)
  s = jnp.sqrt(jnp.maximum(lam[:k], 0.0))
  qk = q[:, :k]
  other = b.T @ (qk / s[None, :])  # orthonormal up to eps (s_1/s_k)^2
  other = other @ (1.5 * jnp.eye(k, dtype=F64) - 0.5 * (other.T @ other))  # Newton-Schulz
  if short == "input":
    return Subspaces(qk, s, other)
  return Subspaces(other, s, qk)


def top_subspaces(a_IxO, k: int) -> Subspaces:
  """Exact top-k singular triples of one (in, out) matrix in float64 (Gram + eigh on the short
  side; the long side from A^T Q S^-1, re-orthonormalised by a Newton-Schulz step, which keeps
  each column its singular vector). Requires k <= numerical rank."""
  _require_x64("top_subspaces")
  if not 0 < k <= min(a_IxO.shape):
    raise ValueError(f"top_subspaces: k={k} not in [1, {min(a_IxO.shape)}]")
  return _top_subspaces(a_IxO, k)


@jax.jit
def _principal_angles(q0, q1):
  t = _mm("...ik,...il->...kl", q0, q1)
  cos = jnp.linalg.svd(t, compute_uv=False)  # descending: angles ascending
  res = _after(q1 - _mm("...ik,...kl->...il", q0, t), cos)
  sin = jnp.linalg.svd(res, compute_uv=False)[..., ::-1]  # ascending: angles ascending
  sin = jnp.clip(sin, 0.0, 1.0)
  theta = jnp.where(sin ** 2 < 0.5, jnp.arcsin(sin), jnp.arccos(jnp.clip(cos, 0.0, 1.0)))
  return theta * (180.0 / jnp.pi)


def principal_angles(q0_MxK, q1_MxK) -> jax.Array:
  """Principal angles (degrees, ascending) between span(q0) and span(q1), both with orthonormal
  columns [..., m, k]: cosines from sigma(q0^T q1), sines from sigma(q1 - q0 q0^T q1), each used
  where it is accurate (Knyazev & Argentati 2002)."""
  _require_x64("principal_angles")
  if q0_MxK.shape != q1_MxK.shape:
    raise ValueError(f"principal_angles: shapes differ {q0_MxK.shape} vs {q1_MxK.shape}")
  return _principal_angles(q0_MxK, q1_MxK)


# -- trajectory: top-k by randomized subspace iteration -----------------------------------------
class TopK(NamedTuple):
  """Top-k singular triples of a batch [N, m, n]: u [N, m, k], s [N, k], v [N, n, k]; whether
  the randomized path converged (else the exact path was used) and its iteration count."""

  u: jax.Array
  s: jax.Array
  v: jax.Array
  converged: np.ndarray
  iterations: np.ndarray


def _orth(y):
  """An orthonormal basis of the column span of y [..., m, b] (left singular vectors; robust to
  rank deficiency, and cheaper to compile than QR on CPU)."""
  return jnp.linalg.svd(y, full_matrices=False)[0]


def _gaussian(shape, seed: int):
  """Standard normal test vectors drawn on the host (jax.random in float64 is slow to compile)."""
  return np.random.default_rng(seed).standard_normal(shape)


@functools.partial(jax.jit, static_argnames=("k",))
def _randomized(a, omega, k, max_iters, tol):
  a = a.astype(F64)
  n_batch, m, n = a.shape
  q = _orth(_mm("nmc,ncb->nmb", a, omega))

  def body(state):
    it, q, _, _, _, done, iters = state
    w = _orth(_mm("nmc,nmb->ncb", a, q))            # right basis, A^T q = w r
    y = _mm("nmc,ncb->nmb", a, w)                    # A w
    ub, s, vbt = jnp.linalg.svd(_mm("nmb,nmc->nbc", q, y), full_matrices=False)
    u = _mm("nmb,nbk->nmk", q, ub[:, :, :k])
    v = _mm("ncb,nkb->nck", w, vbt[:, :k])
    s = s[:, :k]
    # Ritz residuals ||A v_i - s_i u_i|| (A^T u_i = s_i v_i holds exactly).
    res = jnp.linalg.norm(_mm("nmb,nkb->nmk", y, vbt[:, :k]) - u * s[:, None, :], axis=1)
    now = jnp.max(res, axis=-1) <= tol * s[:, 0]
    iters = jnp.where(done, iters, it + 1)
    return it + 1, _orth(_after(y, s)), u, s, v, done | now, iters

  def cond(state):
    it, *_, done, _ = state
    return (it < max_iters) & ~jnp.all(done)

  init = (jnp.int32(0), q, jnp.zeros((n_batch, m, k), F64), jnp.zeros((n_batch, k), F64),
          jnp.zeros((n_batch, n, k), F64), jnp.zeros((n_batch,), bool),
          jnp.zeros((n_batch,), jnp.int32))
  _, _, u, s, v, done, iters = lax.while_loop(cond, body, init)
  return u, s, v, done, iters


@functools.partial(jax.jit, static_argnames=("k",))
def _exact(a, k):
  a = a.astype(F64)
  m, n = a.shape[-2:]
  if m <= n:
    lam, u = _descending_eigh(_mm("nic,njc->nij", a, a))
    s = jnp.sqrt(jnp.maximum(lam[:, :k], 0.0))
    u = u[:, :, :k]
    v = _mm("nic,nik->nck", a, u) * jnp.where(s > 0, 1.0 / s, 0.0)[:, None, :]
  else:
    lam, v = _descending_eigh(_mm("nci,ncj->nij", a, a))
    s = jnp.sqrt(jnp.maximum(lam[:, :k], 0.0))
    v = v[:, :, :k]
    u = _mm("nic,nck->nik", a, v) * jnp.where(s > 0, 1.0 / s, 0.0)[:, None, :]
  return u, s, v


def top_k_exact(a_NxMxN, k: int):
  """(u, s, v): exact top-k singular triples of a batch in float64 (Gram + eigh)."""
  _require_x64("top_k_exact")
  return _exact(a_NxMxN, k)


def top_k_svd(a_NxMxN, k: int, *, oversample: int = 16, max_iters: int = 40,
              tol: float = 1e-10, seed: int = 0) -> TopK:
  """Top-k singular triples of a batch of matrices, float64 (see the module docstring for the
  stated accuracy); members that do not converge within `max_iters` fall back to `top_k_exact`.
  """
  _require_x64("top_k_svd")
  n_batch, m, n = a_NxMxN.shape
  if not 0 < k <= min(m, n):
    raise ValueError(f"top_k_svd: k={k} not in [1, {min(m, n)}]")
  block = min(k + oversample, m, n)
  if block >= min(m, n) or max_iters <= 0:
    u, s, v = top_k_exact(a_NxMxN, k)
    return TopK(u, s, v, np.zeros(n_batch, bool), np.zeros(n_batch, np.int32))
  omega = jnp.asarray(_gaussian((n_batch, n, block), seed), F64)
  u, s, v, done, it = _randomized(a_NxMxN, omega, k, jnp.int32(max_iters), jnp.asarray(tol, F64))
  done = np.asarray(done)
  if not done.all():
    idx = np.flatnonzero(~done)
    ue, se, ve = top_k_exact(a_NxMxN[idx], k)
    u, s, v = u.at[idx].set(ue), s.at[idx].set(se), v.at[idx].set(ve)
  return TopK(u, s, v, done, np.asarray(it))


@jax.jit
def _power(a, x, iters, tol):
  a = a.astype(F64)
  x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  def body(state):
    it, x, s_prev, _ = state
    y = _mm("nmc,nc->nm", a, x)
    z = _mm("nmc,nm->nc", a, y)
    norm = jnp.linalg.norm(z, axis=-1, keepdims=True)
    s = jnp.sqrt(norm[:, 0])
    x = jnp.where(norm > 0, z / jnp.where(norm > 0, norm, 1.0), x)
    delta = jnp.max(jnp.abs(s - s_prev) / jnp.where(s > 0, s, 1.0))
    return it + 1, x, s, delta

  def cond(state):
    it, _, _, delta = state
    return (it < iters) & (delta > tol)

  init = (jnp.int32(0), x, jnp.zeros(a.shape[:1], F64), jnp.array(jnp.inf, F64))
  it, _, s, _ = lax.while_loop(cond, body, init)
  return s, it


def spectral_norm(a_NxMxN, *, iters: int = 500, tol: float = 1e-12, seed: int = 0):
  """Largest singular value of each matrix of a batch by power iteration on A^T A (float64),
  stopped when the estimate changes by less than `tol` (relative) or after `iters` steps.
  Returns (s [N], iterations)."""
  _require_x64("spectral_norm")
  x = jnp.asarray(_gaussian(a_NxMxN.shape[:1] + a_NxMxN.shape[2:], seed), F64)
  s, it = _power(a_NxMxN, x, jnp.int32(iters), jnp.asarray(tol, F64))
  return s, int(it)


def hill_estimate(sigma_K) -> jax.Array:
  """Hill tail index from the top-k singular values (descending, [..., k]):
  [ (1/(k-1)) sum_{i<k} log(s_i / s_k) ]^-1 (NaN when s_k == 0 or all equal)."""
  k = sigma_K.shape[-1]
  if k < 2:
    raise ValueError("hill_estimate needs at least 2 singular values")
  logs = jnp.log(sigma_K[..., :-1] / sigma_K[..., -1:])
  mean = jnp.sum(logs, axis=-1) / (k - 1)
  return jnp.where((mean > 0) & jnp.isfinite(mean), 1.0 / mean, jnp.nan)


def subspace_similarity(v0_MxK, v1_MxK) -> jax.Array:
  """Sim_K = (1/K) ||V0^T V1||_F^2 for orthonormal bases [..., m, K]."""
  k = v0_MxK.shape[-1]
  t = _mm("...ik,...il->...kl", v0_MxK, v1_MxK)
  return jnp.sum(t * t, axis=(-1, -2)) / k

"""Live geometry: what the update since the origin looks like, computed inside the training loop.

Every `every` steps the loop calls one jitted function on the parameters as they are on the
devices (sharded like the model; nothing is copied to the host):

  geometry/density               bf16-visible density of W_t - W_0 over every parameter (the
                                 paper's update density: changed bf16 codes / all entries)
  geometry/density/<type>        the same per module type (q, k, v, o, gate, up, down, embed, ...)
  geometry/frobenius/<type>      ||dW_t||_F, mean over the layers, attention matrices (q, k, v, o)
  geometry/stable_rank/<type>    ||dW_t||_F^2 / ||dW_t||_2^2, mean over the layers
  geometry/sim_k/<type>          Sim_K = (1/K) ||V_K(prev)^T V_K(t)||_F^2, mean over the layers:
                                 how much of the input-side top-K subspace of dW survives since the
                                 previous monitor point (absent at the first point of a process)

`V_K` is the input side's top-K singular subspace (a Flax kernel is (in, out), so these are the
kernel's LEFT singular vectors: the paper's right ones of W). Spectral quantities are randomized
and fixed-cost, so the monitor compiles once and costs the same at every point: `subspace_iters`
subspace iterations on K + oversample columns followed by a Rayleigh-Ritz step give V_K and, as
the largest Ritz value, the spectral norm (a separate power iteration cost as much again). They are estimates (the after-the-fact `trajectory`
diagnostics compute them to convergence in float64); the tests check them against numpy's SVD on
matrices with the spectral decay real updates have.

The previous point's bases (`LiveBases`) are carried by the loop on the devices; a resumed run
starts without them (its first point reports no Sim_K).

One matrix per LAPACK call. The subspace iteration's orthonormalisations and the Rayleigh-Ritz
step are SVDs, run member by member (`lax.map`), never as one batched call. jaxlib 0.10's CPU
LAPACK kernels split a batch into chunks on XLA's intra-op thread pool and block their own pool
thread until the chunks finish; when every pool thread is inside such a call, no thread is left to
run the chunks and the program never finishes. The pool has max(cores, local devices) threads and
every local device runs the monitor's program on it at once, entering its SVDs together after the
program's collectives: with 8 fake devices, all 8 pool threads were seen waiting in
`lapack_sgesdd_ffi` -> `jax::ParallelBatchMap` -> `BlockingCounter::Wait`; with one device per
process on 2 cores, the independent groups (q, k, v, o) put several batched SVDs in flight on a
pool of 2. A call on a single matrix runs inline (`ParallelBatchMap` schedules nothing when one
chunk covers the batch), so it never waits on the pool; the LAPACK work is the same.
(jax 0.11 compiles the parallel path out of its CPU kernels.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.geometry import linalg
from opd_jax.geometry import matrices
from opd_jax.models import sharding

# float32 products at full precision: TPUs otherwise multiply float32 in bfloat16 passes.
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class LiveGeometryConfig:
  """every: steps between monitor points (0 = off). k: Sim_K's K (clipped to the smaller side of
  each matrix). subspace_iters / oversample: the randomized estimator's cost."""

  every: int = 0
  k: int = 16
  subspace_iters: int = 4
  oversample: int = 8
  seed: int = 0

  def __post_init__(self):
    for f in ("every", "k", "subspace_iters", "oversample"):
      if getattr(self, f) < (0 if f in ("every", "oversample") else 1):
        raise ValueError(f"LiveGeometryConfig.{f}={getattr(self, f)!r}: must be "
                         f"{'>= 0' if f in ('every', 'oversample') else '>= 1'}")

  @property
  def enabled(self) -> bool:
    return self.every > 0


class LiveBases(NamedTuple):
  """The previous point's V_K per attention group ('/'-joined param path -> [N, in, K]) and
  whether they hold a real point yet (a scalar bool)."""

  bases: Mapping[str, jax.Array]
  valid: jax.Array


def _attention_groups(params):
  return [g for g in matrices.matrix_groups(params) if g.module_type in matrices.ATTENTION_TYPES]


def _k(shape, k: int) -> int:
  return max(1, min(k, *shape))


def init_bases(params, cfg: LiveGeometryConfig) -> LiveBases:
  """Empty bases (valid=False) shaped for `params` (arrays or ShapeDtypeStructs)."""
  bases = {}
  for g in _attention_groups(params):
    n_in = g.shape[0]
    bases["/".join(g.path)] = jnp.zeros((g.count, n_in, _k(g.shape, cfg.k)), jnp.float32)
  return LiveBases(bases, jnp.zeros((), bool))


def _svd_each(x_NxMxB):
  """(left singular vectors [N, m, r], singular values [N, r]), r = min(m, b), descending, one
  LAPACK call per member.

  A single matrix per call keeps jaxlib's CPU kernels off the intra-op pool (see the module
  docstring: a batched call can wait forever for pool threads that are all busy)."""
  def one(x):
    u, s, _ = jnp.linalg.svd(x, full_matrices=False)
    return u, s
  return jax.lax.map(one, x_NxMxB)


def _input_subspace(d_NxIxO, k: int, iters: int, oversample: int, seed: int):
  """(top-k left singular vectors [N, in, k], largest singular value [N]) of each member, by
  subspace iteration and a Rayleigh-Ritz step."""
  n_in, n_out = d_NxIxO.shape[1:]
  b = min(k + oversample, n_in, n_out)
  omega = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((n_out, b)), jnp.float32)
  q = _svd_each(jnp.einsum("nio,ob->nib", d_NxIxO, omega, precision=_HI))[0]

  def body(_, q):
    return _svd_each(jnp.einsum("nio,njo,njb->nib", d_NxIxO, d_NxIxO, q, precision=_HI))[0]

  q = jax.lax.fori_loop(0, iters, body, q)
  small_NxBxO = jnp.einsum("nib,nio->nbo", q, d_NxIxO, precision=_HI)
  u_small, s_small = _svd_each(small_NxBxO)   # [N, b, b], [N, b], descending
  return jnp.einsum("nib,nbk->nik", q, u_small[:, :, :k], precision=_HI), s_small[:, 0]


def _changed_count(changed) -> jax.Array:
  """Number of True entries as float32: exact int32 counts per matrix (each under 2^31 entries),
  summed over the stacked layers in float32, so a group of more than 2^31 entries cannot wrap."""
  per_matrix = jnp.sum(changed, axis=tuple(range(max(changed.ndim - 2, 0), changed.ndim)),
                       dtype=jnp.int32)
  return jnp.sum(per_matrix.astype(jnp.float32))


def _live(origin, params, prev: LiveBases, *, cfg: LiveGeometryConfig):
  metrics: dict[str, jax.Array] = {}
  changed_by_type: dict[str, jax.Array] = {}
  total_by_type: dict[str, int] = {}
  groups0 = {g.path: g for g in matrices.matrix_groups(origin, include_1d=True)}
  for g in matrices.matrix_groups(params, include_1d=True):
    g0 = groups0[g.path]
    n = _changed_count(linalg.bf16_changed(g0.leaf, g.leaf))
    changed_by_type[g.module_type] = changed_by_type.get(g.module_type, 0.0) + n
    total_by_type[g.module_type] = total_by_type.get(g.module_type, 0) + int(np.prod(g.leaf.shape))
  # Totals are Python ints (a paper-size model has more than 2^31 entries, beyond int32 at trace
  # time): divide by them as floats.
  total = sum(total_by_type.values())
  metrics["geometry/density"] = sum(changed_by_type.values()) / float(total)
  for t, n in changed_by_type.items():
    metrics[f"geometry/density/{t}"] = n / float(total_by_type[t])

  new_bases = {}
  per_type: dict[str, dict[str, list]] = {}
  for g in _attention_groups(params):
    key = "/".join(g.path)
    d = (g.leaf.astype(jnp.float32) - groups0[g.path].leaf.astype(jnp.float32)).reshape(
        (g.count,) + g.shape)
    # In a multi-process CPU run the delta is whole on every device, so the subspace
    # iteration's and the SVD's loops hold no collective that could race another.
    d = sharding.whole(d)
    frob = jnp.sqrt(jnp.sum(d * d, axis=(1, 2)))
    v, s1 = _input_subspace(d, _k(g.shape, cfg.k), cfg.subspace_iters, cfg.oversample,
                            cfg.seed)
    stable = jnp.where(s1 > 0, frob**2 / jnp.maximum(s1, 1e-30)**2, jnp.nan)
    sim = linalg.subspace_similarity(prev.bases[key], v)
    new_bases[key] = v
    acc = per_type.setdefault(g.module_type, {"frobenius": [], "stable_rank": [], "sim_k": []})
    acc["frobenius"].append(frob)
    acc["stable_rank"].append(stable)
    acc["sim_k"].append(sim)
  for t, acc in per_type.items():
    for name, parts in acc.items():
      value = jnp.mean(jnp.concatenate(parts))
      if name == "sim_k":
        value = jnp.where(prev.valid, value, jnp.nan)
      metrics[f"geometry/{name}/{t}"] = value
  return metrics, LiveBases(new_bases, jnp.ones((), bool))


@functools.lru_cache(maxsize=16)
def make_monitor(cfg: LiveGeometryConfig, *, replicated=None):
  """The jitted monitor `(origin, params, prev) -> (metrics, bases)`.

  origin and params stay where the model keeps them (the computation follows their shardings);
  with `replicated` (the loop's), the metrics and bases come back replicated. `prev` is donated.
  One jitted function per (cfg, replicated), kept for the process: a second run with the same
  settings and shapes (a notebook's next cell) reuses the compiled program.
  """
  fn = functools.partial(_live, cfg=cfg)
  if replicated is None:
    return jax.jit(fn, donate_argnums=(2,))
  return jax.jit(fn, out_shardings=replicated, donate_argnums=(2,))


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Fetched metrics as floats, dropping the NaN Sim_K of a first point."""
  out = {}
  for k, v in metrics.items():
    f = float(v)
    if not (k.startswith("geometry/sim_k/") and np.isnan(f)):
      out[k] = f
  return out

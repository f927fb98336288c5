"""Endpoint diagnostics of an update W_0 -> W_1 (paper_facts.md section 1), per matrix and
aggregated.

    out = endpoint_metrics(params_0, params_1, EndpointConfig())
    out['overall']['sparsity'], out['by_type']['q']['nss'], out['matrices']['layers.3.attn.q_proj']

Per matrix (see `matrices.py` for names and the (in, out) orientation):
  sparsity / density   bf16-visible changes (bitwise codes, +0 == -0), `changed / n`.
  max_angle_{in,out}_deg  the largest principal angle between the top-k singular subspaces of
                       W_0 and W_1 on the input / output side (k = min(cfg.k, rank)), float64;
                       `max_angle_deg` is the larger of the two.
  nss                  ||s(W_1) - s(W_0)||_2 / ||s(W_0)||_2 over all singular values.
  overlap_principal    |M_princ & M_upd| / |M_upd|, M_princ = entries whose |rank-r
                       reconstruction of W_0| is >= its round(alpha n)-th largest value.
  overlap_low          |M_low & M_upd| / |M_upd|, M_low = entries whose |W_0| is <= its
                       round(alpha n)-th smallest value.
  frac_principal / frac_low  the realised mask fractions |M| / n: the random baselines. They
                       equal alpha except when values tie at the threshold (bf16 checkpoints):
                       ties are all included rather than broken by position. Overlaps are NaN
                       for a matrix with no visible change.
1-D parameters (norm scales, biases) enter sparsity only.

Aggregates ('overall' and 'by_type'): sparsity / density weighted by parameter count; every other
metric the unweighted mean over matrices (NaNs skipped); `max_angle_deg_max` the largest
per-matrix angle. 'representative' holds the full angle curves (both sides) and singular values
of one matrix (default: the query projection of the middle layer).

Choices where the paper is silent: ranks, masks and angles are per matrix as stored (per layer of
the stacked kernels); r = 64, alpha = 0.5 (its appendix; the main text quotes a 30% baseline);
the principal-mask ranking uses the reconstruction rounded to float32 (its singular vectors are
float64).

Cost: each matrix is read a bounded number of times in column chunks of its long side (memory
O(max_batch_bytes) beyond the two checkpoints; mask thresholds by radix select), one
`eigh` per matrix for everything spectral (see `linalg.py`). The spectra (LAPACK, one core) of
one batch run in a worker thread while the main thread computes the Grams of the next batch and
the masks of the previous one (matmuls on XLA's thread pool).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.geometry import linalg, matrices
from opd_jax.geometry.matrices import MatrixGroup


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
  """Knobs of `endpoint_metrics`.

  Attributes:
    k: top-k of the principal angles (the paper: 512; capped at the matrix rank).
    mask_rank: r of the principal mask's rank-r reconstruction of W_0 (paper appendix: 64).
    alpha: mask fraction (paper appendix: 0.5; its main text quotes 0.3).
    include_1d: count norm scales and biases in sparsity.
    types: analyse only these module types (default: all).
    angles: report NSS and the principal angles (with masks=True the eigendecompositions are
      computed anyway, for the rank-r basis of the principal mask).
    masks: compute the update-mask overlaps.
    representative: matrix whose full angle curves are reported (default: the middle layer's
      query projection, else the first matrix); '' disables the curves.
    max_batch_bytes: float64 working memory per kernel call; sets how many layers are batched
      and the chunking of long matrices (e.g. the embedding).
    progress: show a tqdm bar over matrices.
  """

  k: int = 512
  mask_rank: int = 64
  alpha: float = 0.5
  include_1d: bool = True
  types: tuple[str, ...] | None = None
  angles: bool = True
  masks: bool = True
  representative: str | None = None
  max_batch_bytes: int = 1 << 27
  progress: bool = True

  def __post_init__(self):
    def bad(field, why):
      raise ValueError(f"EndpointConfig.{field}={getattr(self, field)!r}: {why}")

    if self.k < 1:
      bad("k", "must be >= 1")
    if self.mask_rank < 1:
      bad("mask_rank", "must be >= 1")
    if not 0.0 < self.alpha < 1.0:
      bad("alpha", "must be in (0, 1)")
    if self.max_batch_bytes < 1 << 16:
      bad("max_batch_bytes", "must be >= 64 KiB")


# -- chunking -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Plan:
  short: str          # 'input' / 'output'
  long_axis: int      # -1 (out) or -2 (in) of an [N, in, out] batch
  long: int           # length of the long side
  batch: int          # members per call (divides the group size)
  chunk: int          # long-side chunk length (== long when unchunked)

  @property
  def n_chunks(self) -> int:
    return -(-self.long // self.chunk)


def _plan(group: MatrixGroup, budget: int) -> _Plan:
  shape = group.shape
  short = matrices.short_side(shape)
  s, long = min(shape), max(shape)
  per_member = 24 * s * long  # float64 a0, d and the float32 inputs, roughly
  batch = 1
  for n in range(group.count, 0, -1):
    if group.count % n == 0 and n * per_member <= budget:
      batch = n
      break
  chunk = long if per_member <= budget else max(256, budget // (24 * s))
  return _Plan(short, -1 if short == "input" else -2, long, batch, min(chunk, long))


def _chunk(batch_arr, plan: _Plan, c: int):
  """Chunk c of the long side, zero-padded to plan.chunk; returns (array, valid length)."""
  lo, hi = c * plan.chunk, min((c + 1) * plan.chunk, plan.long)
  idx = [slice(None)] * 3
  idx[plan.long_axis] = slice(lo, hi)
  part = jnp.asarray(batch_arr[tuple(idx)])
  if hi - lo < plan.chunk:
    pad = [(0, 0)] * 3
    pad[plan.long_axis] = (0, plan.chunk - (hi - lo))
    part = jnp.pad(part, pad)
  return part, hi - lo


# -- jitted chunk kernels -----------------------------------------------------------------------
def _keys_impl(a0, q_r, short):
  """|rank-r reconstruction of A0| and |A0| (float32) of an [N, in, out] chunk."""
  x = a0.astype(jnp.float32)
  q = q_r.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST   # TPUs otherwise multiply float32 in bfloat16 passes
  if short == "input":   # rows are the short side: recon = Q Q^T A
    recon = jnp.einsum("nir,nro->nio", q, jnp.einsum("nir,nio->nro", q, x, precision=hi),
                       precision=hi)
  else:                  # columns are the short side: recon = A Q Q^T
    recon = jnp.einsum("nir,nor->nio", jnp.einsum("nio,nor->nir", x, q, precision=hi), q,
                       precision=hi)
  return jnp.abs(recon), jnp.abs(x)


_keys = jax.jit(_keys_impl, static_argnames=("short",))


@functools.partial(jax.jit, static_argnames=("short", "long_axis"))
def _counts(a0, a1, q_r, t_p, t_l, valid, short, long_axis):
  """Per member: [changed, changed & princ, changed & low, princ, low] over the valid part of a
  chunk (keys recomputed by the same code as `_keys`)."""
  keys_p, keys_l = _keys_impl(a0, q_r, short)
  pos = jax.lax.broadcasted_iota(jnp.int32, a0.shape, a0.ndim + long_axis)
  valid_mask = pos < valid
  changed = linalg.bf16_changed(a0, a1) & valid_mask
  princ = (keys_p >= t_p[:, None, None]) & valid_mask
  low = (keys_l <= t_l[:, None, None]) & valid_mask
  count = lambda m: jnp.sum(m, axis=(1, 2), dtype=jnp.int64)  # noqa: E731
  return jnp.stack([count(changed), count(changed & princ), count(changed & low), count(princ),
                    count(low)], axis=1)


@jax.jit
def _changed_count(a0, a1):
  return jnp.sum(linalg.bf16_changed(a0, a1), axis=tuple(range(1, a0.ndim)), dtype=jnp.int64)


# -- per group ----------------------------------------------------------------------------------
def _abbr(side: str) -> str:
  return "in" if side == "input" else "out"


def _spectra(grams, k, r):
  """pair_spectra, with k reduced for members whose numerical rank is below k."""
  out = linalg.pair_spectra(*grams, k=k, r=r)
  ks = np.minimum(np.minimum(np.asarray(out.rank0), np.asarray(out.rank1)), k)
  short = np.array(out.max_angle_short, np.float64)
  long = np.array(out.max_angle_long, np.float64)
  for i in np.flatnonzero(ks < k):
    if ks[i] == 0:
      short[i] = long[i] = np.nan
      continue
    one = linalg.pair_spectra(*(g[i:i + 1] for g in grams), k=int(ks[i]), r=r)
    short[i], long[i] = float(one.max_angle_short[0]), float(one.max_angle_long[0])
  return out, ks, short, long


_BITS = 16  # radix of the two-pass selection: 2^16 bins on the high, then the low half-word


def _select(hist, c, largest: bool):
  """Per row of `hist` [N, bins]: the bin holding the c-th largest (smallest) entry (c a scalar
  or one rank per row), the number of entries in bins strictly beyond it, and the rank the entry
  has inside its bin."""
  need = np.broadcast_to(np.asarray(c, np.int64), hist.shape[:1])
  counts = hist[:, ::-1] if largest else hist
  cum = np.cumsum(counts, axis=1)
  pos = np.argmax(cum >= need[:, None], axis=1)
  rows = np.arange(len(pos))
  beyond = cum[rows, pos] - counts[rows, pos]
  bins = hist.shape[1] - 1 - pos if largest else pos
  return bins, beyond, need - beyond


def _radix_thresholds(batch, basis_r, plan: _Plan, c: int):
  """Exact c-th largest principal key and c-th smallest magnitude key of each member with the
  mask sizes (ties included), by a two-pass radix select over the chunks: keys are non-negative
  float32, whose bit patterns order like their values, so histograms of the high then the low
  16 bits pin the c-th value down exactly without holding the n keys (a 151,936 x 896
  embedding's keys alone are 0.5 GiB)."""
  nb, bins = plan.batch, 1 << _BITS
  rows = np.arange(nb)

  def key_bits():
    for a0, _, valid in batch:
      idx = [slice(None)] * 3
      idx[plan.long_axis] = slice(0, valid)
      for keys in _keys(a0, basis_r, plan.short):
        yield np.ascontiguousarray(np.asarray(keys[tuple(idx)])).reshape(nb, -1).view(np.uint32)

  hist = np.zeros((2, nb, bins), np.int64)
  for j, bits in enumerate(key_bits()):
    for i in rows:
      hist[j % 2, i] += np.bincount(bits[i] >> _BITS, minlength=bins)
  high = [_select(hist[w], c, largest=(w == 0)) for w in (0, 1)]
  hist[:] = 0
  for j, bits in enumerate(key_bits()):
    w = j % 2
    for i in rows:
      sel = bits[i][(bits[i] >> _BITS) == high[w][0][i]]
      hist[w, i] += np.bincount(sel & (bins - 1), minlength=bins)
  thresholds, sizes = [], []
  for w in (0, 1):
    b_low, beyond_low, _ = _select(hist[w], high[w][2], largest=(w == 0))
    bits = (high[w][0].astype(np.uint32) << _BITS) | b_low.astype(np.uint32)
    thresholds.append(bits.view(np.float32))
    # entries strictly beyond the high bin, plus those of the bin up to and including the value
    sizes.append(high[w][1] + beyond_low + hist[w][rows, b_low])
  return thresholds, sizes


class _Batch:
  """One batch of a group: its chunks, cached on device when the matrix fits in one chunk."""

  def __init__(self, b0, b1, plan: _Plan):
    self.b0, self.b1, self.plan = b0, b1, plan
    self.cache = None
    if plan.n_chunks == 1:
      self.cache = [self._load(0)]

  def _load(self, c):
    (a0, valid), (a1, _) = _chunk(self.b0, self.plan, c), _chunk(self.b1, self.plan, c)
    return a0, a1, valid

  def __iter__(self):
    if self.cache is not None:
      return iter(self.cache)
    return (self._load(c) for c in range(self.plan.n_chunks))


def _mask_counts(batch: _Batch, basis_r, plan: _Plan, n: int, alpha: float, where: str):
  """[N, 5] counts (changed, changed & princ, changed & low, princ, low) over all chunks.

  The thresholds come from a radix select over the chunks (`_radix_thresholds`); the counting
  pass recomputes the keys with the same jitted kernel and checks that the mask sizes agree."""
  c = min(max(int(round(alpha * n)), 1), n)
  thresholds, sizes = _radix_thresholds(batch, basis_r, plan, c)
  thresholds = [jnp.asarray(t) for t in thresholds]
  totals = np.zeros((plan.batch, 5), np.int64)
  for a0, a1, valid in batch:
    totals += np.asarray(_counts(a0, a1, basis_r, thresholds[0], thresholds[1], valid,
                                 plan.short, plan.long_axis))
  if not (np.array_equal(totals[:, 3], sizes[0]) and np.array_equal(totals[:, 4], sizes[1])):
    warnings.warn(f"{where}: mask sizes differ between the selection and the counting pass "
                  "(non-deterministic reconstruction); overlaps may be off by a few entries")
  return totals


@dataclasses.dataclass
class _Work:
  """One batch of a matrix group on its way through the pipeline of `endpoint_metrics`."""

  g0: MatrixGroup
  start: int
  plan: _Plan
  k: int
  r: int
  batch: _Batch
  spectra: Any = None  # a Future of `_spectra`'s result (None without angles and masks)


def _batches(g0: MatrixGroup, g1: MatrixGroup, cfg: EndpointConfig):
  """The batches of one group: Grams accumulated over the chunks (`_Work`, Grams)."""
  plan = _plan(g0, cfg.max_batch_bytes)
  s = min(g0.shape)
  k, r = min(cfg.k, s), min(cfg.mask_rank, s)
  for start in range(0, g0.count, plan.batch):
    batch = _Batch(g0.batch(start, start + plan.batch), g1.batch(start, start + plan.batch), plan)
    grams = None
    if cfg.angles or cfg.masks:
      for a0, a1, _ in batch:
        g = linalg.pair_grams(a0, a1, plan.short)
        grams = g if grams is None else tuple(x + y for x, y in zip(grams, g))
    yield _Work(g0, start, plan, k, r, batch), grams


def _spectra_job(grams, k, r):
  """`_spectra` in the pipeline's worker thread (float64 is enabled per thread)."""
  with linalg.float64():
    return _spectra(grams, k, r)


def _finish(work: _Work, cfg: EndpointConfig, keep_sigma: str | None):
  """Per-matrix dicts of one batch, and the singular values of `keep_sigma` if in it."""
  g0, plan, batch = work.g0, work.plan, work.batch
  shape = g0.shape
  n = shape[0] * shape[1]
  short, long = _abbr(plan.short), _abbr("output" if plan.short == "input" else "input")
  names = g0.names[work.start:work.start + plan.batch]
  if work.spectra is not None:
    spec, ks, short_deg, long_deg = work.spectra.result()
  if cfg.masks:
    totals = _mask_counts(batch, spec.basis0_r, plan, n, cfg.alpha, names[0])
    changed = totals[:, 0]
  else:
    changed = np.zeros(plan.batch, np.int64)
    for a0, a1, _ in batch:
      changed += np.asarray(_changed_count(a0, a1))
  results, kept = {}, None
  for i, name in enumerate(names):
    d = dict(type=g0.module_type, layer=g0.member_layer(work.start + i),
             shape=[int(shape[0]), int(shape[1])], n=int(n), changed=int(changed[i]),
             sparsity=1.0 - float(changed[i]) / n, density=float(changed[i]) / n)
    if cfg.angles:
      both = [short_deg[i], long_deg[i]]
      d.update({"k": int(ks[i]), f"max_angle_{short}_deg": float(short_deg[i]),
                f"max_angle_{long}_deg": float(long_deg[i]),
                "max_angle_deg": math.nan if np.isnan(both).all() else float(np.nanmax(both)),
                "nss": float(spec.nss[i])})
    if cfg.masks:
      upd = int(totals[i, 0])
      d.update(overlap_principal=float(totals[i, 1] / upd) if upd else math.nan,
               overlap_low=float(totals[i, 2] / upd) if upd else math.nan,
               frac_principal=float(totals[i, 3] / n), frac_low=float(totals[i, 4] / n))
    results[name] = d
    if cfg.angles and name == keep_sigma:
      kept = (np.asarray(spec.sigma0[i]), np.asarray(spec.sigma1[i]))
  return results, kept


def _vector_group(g0: MatrixGroup, g1: MatrixGroup, bar) -> dict:
  a0 = jnp.asarray(g0.leaf if g0.stacked else g0.leaf[None])
  a1 = jnp.asarray(g1.leaf if g1.stacked else g1.leaf[None])
  changed = np.asarray(_changed_count(a0, a1))
  n = int(a0.shape[-1])
  out = {}
  for i, name in enumerate(g0.names):
    out[name] = dict(type=g0.module_type, layer=i if g0.stacked else None, shape=[n], n=n,
                     changed=int(changed[i]), sparsity=1.0 - float(changed[i]) / n,
                     density=float(changed[i]) / n)
  bar.update(len(g0.names))
  return out


# -- representative curves ----------------------------------------------------------------------
def default_representative(names: Sequence[str], types: dict[str, str]) -> str | None:
  """The middle layer's query projection if present, else the first matrix."""
  queries = [n for n in names if types[n] == "q"]
  if queries:
    return queries[len(queries) // 2]
  mats = [n for n in names if types[n] in matrices.MATRIX_TYPES]
  return mats[0] if mats else None


def representative_curves(w0, w1, k: int) -> dict:
  """Full principal-angle curves (degrees, ascending) on both sides between the top-k singular
  subspaces of two (in, out) matrices, float64 (explicit bases, sine/cosine formulas)."""
  with linalg.float64():
    w0 = jnp.asarray(w0)
    w1 = jnp.asarray(w1)
    k = min(k, *w0.shape)
    s0 = linalg.top_subspaces(w0, k)
    s1 = linalg.top_subspaces(w1, k)
    return {"k": int(k),
            "angles_in_deg": np.asarray(linalg.principal_angles(s0.input, s1.input)).tolist(),
            "angles_out_deg": np.asarray(linalg.principal_angles(s0.output, s1.output)).tolist()}


# -- aggregation --------------------------------------------------------------------------------
MEAN_FIELDS = ("max_angle_deg", "max_angle_in_deg", "max_angle_out_deg", "nss",
               "overlap_principal", "overlap_low", "frac_principal", "frac_low")


def _nanmean(values):
  vals = [v for v in values if v is not None and not math.isnan(v)]
  return float(np.mean(vals)) if vals else math.nan


def aggregate(per_matrix: dict[str, dict]) -> dict:
  """{'n_params', 'n_changed', 'sparsity', 'density', 'n_matrices', <mean of MEAN_FIELDS>,
  'max_angle_deg_max'} over the given per-matrix dicts."""
  n = sum(d["n"] for d in per_matrix.values())
  changed = sum(d["changed"] for d in per_matrix.values())
  mats = [d for d in per_matrix.values() if d["type"] in matrices.MATRIX_TYPES]
  out = {"n_params": int(n), "n_changed": int(changed),
         "sparsity": 1.0 - changed / n if n else math.nan,
         "density": changed / n if n else math.nan, "n_matrices": len(mats)}
  for f in MEAN_FIELDS:
    if any(f in d for d in mats):
      out[f] = _nanmean([d.get(f) for d in mats])
  angles = [d["max_angle_deg"] for d in mats if "max_angle_deg" in d
            and not math.isnan(d["max_angle_deg"])]
  if angles:
    out["max_angle_deg_max"] = float(max(angles))
  return out


def aggregates(per_matrix: dict[str, dict]) -> tuple[dict, dict]:
  """(overall, by_type) aggregates."""
  by_type = {}
  for t in matrices.MATRIX_TYPES + matrices.VECTOR_TYPES:
    sub = {n: d for n, d in per_matrix.items() if d["type"] == t}
    if sub:
      by_type[t] = aggregate(sub)
  return aggregate(per_matrix), by_type


# -- entry point --------------------------------------------------------------------------------
def _paired_groups(p0, p1, cfg: EndpointConfig):
  g0 = matrices.matrix_groups(p0, include_1d=cfg.include_1d, types=cfg.types)
  g1 = matrices.matrix_groups(p1, include_1d=cfg.include_1d, types=cfg.types)
  by1 = {g.path: g for g in g1}
  missing = [("/".join(g.path)) for g in g0 if g.path not in by1]
  extra = [("/".join(g.path)) for g in g1 if g.path not in {x.path for x in g0}]
  if missing or extra:
    raise ValueError(f"params_0 and params_1 differ in structure: only in params_0 {missing}, "
                     f"only in params_1 {extra}")
  pairs = []
  for a in g0:
    b = by1[a.path]
    if tuple(a.leaf.shape) != tuple(b.leaf.shape):
      raise ValueError(f"{'/'.join(a.path)}: shape {tuple(a.leaf.shape)} in params_0 vs "
                       f"{tuple(b.leaf.shape)} in params_1")
    pairs.append((a, b))
  return pairs


def endpoint_metrics(params_0, params_1, cfg: EndpointConfig = EndpointConfig()) -> dict:
  """Endpoint diagnostics of W_0 -> W_1 (see the module docstring).

  Args:
    params_0, params_1: params dicts (our layout) or checkpoint paths (`matrices.resolve_params`).
    cfg: `EndpointConfig`.

  Returns:
    {'config': {...}, 'matrices': {name: {...}}, 'overall': {...}, 'by_type': {type: {...}},
     'representative': {'name', 'k', 'angles_in_deg', 'angles_out_deg', 'sigma0', 'sigma1'}
     (absent when disabled or cfg.angles is False)}.
  """
  from tqdm.auto import tqdm

  p0 = matrices.resolve_params(params_0)
  p1 = matrices.resolve_params(params_1)
  pairs = _paired_groups(p0, p1, cfg)
  names = [n for a, _ in pairs for n in a.names]
  types = {n: a.module_type for a, _ in pairs for n in a.names}
  rep = cfg.representative
  if rep is None:
    rep = default_representative(names, types)
  elif rep and (rep not in types or types[rep] not in matrices.MATRIX_TYPES):
    raise ValueError(f"EndpointConfig.representative={rep!r}: no such matrix; e.g. "
                     f"{[n for n in names if types[n] in matrices.MATRIX_TYPES][:4]}")
  per_matrix, sigma = {}, None

  def finish(work):
    nonlocal sigma
    res, kept = _finish(work, cfg, rep if cfg.angles else None)
    per_matrix.update(res)
    sigma = kept if kept is not None else sigma
    bar.update(len(res))

  # A two-stage pipeline: the spectra of one batch (LAPACK, one core) run in a worker thread
  # while this thread computes the next batch's Grams and the previous batch's masks (matmuls
  # on XLA's thread pool). One worker: at most one computation with LAPACK calls in flight
  # (see linalg's note on LAPACK and the thread pool).
  with linalg.float64(), tqdm(total=len(names), desc="endpoint", unit="matrix",
                              disable=not cfg.progress) as bar, \
      concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spectra") as pool:
    pending = None
    for a, b in pairs:
      if a.module_type in matrices.VECTOR_TYPES:
        per_matrix.update(_vector_group(a, b, bar))
        continue
      for work, grams in _batches(a, b, cfg):
        if grams is not None:
          work.spectra = pool.submit(_spectra_job, grams, work.k, work.r)
        del grams
        if pending is not None:
          finish(pending)
        pending = work
    if pending is not None:
      finish(pending)
  per_matrix = {n: per_matrix[n] for n in names}
  overall, by_type = aggregates(per_matrix)
  out = {"config": dataclasses.asdict(cfg), "matrices": per_matrix, "overall": overall,
         "by_type": by_type}
  if cfg.angles and rep and per_matrix[rep]["k"] > 0:
    m0 = next(m for g, _ in pairs for m in g.members() if m.name == rep)
    m1 = next(m for _, g in pairs for m in g.members() if m.name == rep)
    k_rep = per_matrix[rep]["k"]  # capped at the numerical rank
    curves = representative_curves(np.asarray(m0.array), np.asarray(m1.array), k_rep)
    out["representative"] = {"name": rep, **curves,
                             "sigma0": sigma[0].tolist(), "sigma1": sigma[1].tolist()}
  return out

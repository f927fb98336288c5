"""OPD, direct route: per-state divergences between teacher and student distributions.

Every divergence takes logits `[..., V]` (and a temperature that divides them before the
log-softmax), computes in float32 and returns one value per state `[...]`. Gradients flow only
through the student; `divergence_loss` stops the teacher's gradient explicitly.

Conventions (paper_facts section 2):
  * forward KL  KL(pT || pS) = sum_v pT (log pT - log pS)
  * reverse KL  KL(pS || pT) = sum_v pS (log pS - log pT)
  * generalized JSD(beta) = beta KL(pT || M) + (1 - beta) KL(pS || M), M = beta pT + (1 - beta) pS,
    with beta = 0 -> forward KL and beta = 1 -> reverse KL *by definition at the endpoints* (the
    mixture formula itself tends to 0 there; like TRL's GKD loss, the endpoints are special-cased).
    `beta` must therefore be a static Python float.
  * skew KL  KL(pT || a pT + (1 - a) pS); skew reverse KL  KL(pS || (1 - a) pT + a pS); a = 0.1.
  * TVD  1/2 sum_v |pT - pS|.
  * teacher top-k forward KL with a tail bucket: the teacher is given by its top-k ids and
    log-probs; the KL is exact over k + 1 categories (the k ids, and the tail holding the rest of the
    mass: pT_tail = 1 - sum_k pT, pS_tail = student mass outside the k ids).
  * student top-k reverse KL with a tail bucket: the k ids are the student's own top-k (selected
    without gradient); the KL is exact over those k ids plus the tail bucket. It needs the teacher's
    log-probs at the student's ids, so it takes full teacher logits (or the `(logits_fn, h)` pair).

Terms with zero probability under the first argument of a KL contribute exactly 0 (0 log 0 = 0),
so teacher logits may contain -inf (e.g. masked vocabulary entries); student logits must be finite.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp

from opd_jax.objectives import reduce


class TopK(NamedTuple):
  """A teacher given by its top-k: `ids_BxTxK` (int32) and aligned `logp_BxTxK` (log-probs at the
  temperature the loss uses; as returned by `scoring.topk_logprobs`)."""
  ids_BxTxK: jax.Array
  logp_BxTxK: jax.Array


Teacher = Union[jax.Array, TopK, tuple[Callable[[jax.Array], jax.Array], jax.Array]]


def log_probs(logits_xV: jax.Array, temperature: float = 1.0) -> jax.Array:
  """float32 log-softmax of logits / temperature over the last axis."""
  return jax.nn.log_softmax(logits_xV.astype(jnp.float32) / temperature, axis=-1)


def _kl(logp_p: jax.Array, logp_q: jax.Array, axis: int = -1) -> jax.Array:
  """KL(p || q) from log-probs, with 0 log 0 = 0 (NaN-free values and gradients where p = 0)."""
  p = jnp.exp(logp_p)
  live = p > 0
  diff = jnp.where(live, logp_p - jnp.where(live, logp_q, 0.0), 0.0)
  return jnp.sum(jnp.where(live, p * diff, 0.0), axis=axis)


def _mix(logp_a: jax.Array, logp_b: jax.Array, weight_a: float) -> jax.Array:
  """log(weight_a * a + (1 - weight_a) * b) for 0 < weight_a < 1."""
  return jnp.logaddexp(jnp.log(weight_a) + logp_a, jnp.log1p(-weight_a) + logp_b)


def forward_kl(student_logits_xV, teacher_logits_xV, temperature: float = 1.0) -> jax.Array:
  """KL(pT || pS) per state."""
  return _kl(log_probs(teacher_logits_xV, temperature), log_probs(student_logits_xV, temperature))


def reverse_kl(student_logits_xV, teacher_logits_xV, temperature: float = 1.0) -> jax.Array:
  """KL(pS || pT) per state."""
  return _kl(log_probs(student_logits_xV, temperature), log_probs(teacher_logits_xV, temperature))


def jsd(student_logits_xV, teacher_logits_xV, beta: float = 0.5,
        temperature: float = 1.0) -> jax.Array:
  """Generalized JSD(beta); beta = 0 is forward KL and beta = 1 reverse KL exactly (static beta)."""
  beta = float(beta)
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
  if beta == 0.0:
    return forward_kl(student_logits_xV, teacher_logits_xV, temperature)
  if beta == 1.0:
    return reverse_kl(student_logits_xV, teacher_logits_xV, temperature)
  logp_s = log_probs(student_logits_xV, temperature)
  logp_t = log_probs(teacher_logits_xV, temperature)
  logp_m = _mix(logp_t, logp_s, beta)
  return beta * _kl(logp_t, logp_m) + (1.0 - beta) * _kl(logp_s, logp_m)


def skew_kl(student_logits_xV, teacher_logits_xV, alpha: float = 0.1,
            temperature: float = 1.0) -> jax.Array:
  """KL(pT || alpha pT + (1 - alpha) pS); alpha = 0 is forward KL."""
  logp_s = log_probs(student_logits_xV, temperature)
  logp_t = log_probs(teacher_logits_xV, temperature)
  if float(alpha) == 0.0:
    return _kl(logp_t, logp_s)
  return _kl(logp_t, _mix(logp_t, logp_s, alpha))


def skew_reverse_kl(student_logits_xV, teacher_logits_xV, alpha: float = 0.1,
                    temperature: float = 1.0) -> jax.Array:
  """KL(pS || (1 - alpha) pT + alpha pS); alpha = 0 is reverse KL."""
  logp_s = log_probs(student_logits_xV, temperature)
  logp_t = log_probs(teacher_logits_xV, temperature)
  if float(alpha) == 0.0:
    return _kl(logp_s, logp_t)
  return _kl(logp_s, _mix(logp_s, logp_t, alpha))


def tvd(student_logits_xV, teacher_logits_xV, temperature: float = 1.0) -> jax.Array:
  """Total variation distance 1/2 sum_v |pT - pS| per state."""
  p_s = jnp.exp(log_probs(student_logits_xV, temperature))
  p_t = jnp.exp(log_probs(teacher_logits_xV, temperature))
  return 0.5 * jnp.sum(jnp.abs(p_t - p_s), axis=-1)


def ids_member_mask(ids_xK: jax.Array, vocab: int) -> jax.Array:
  """Boolean [..., V] membership mask of the ids `ids_xK` [..., K] (no [..., K, V] one-hot)."""
  lead = ids_xK.shape[:-1]
  flat_ids = ids_xK.reshape(-1, ids_xK.shape[-1])
  rows = jnp.arange(flat_ids.shape[0])[:, None]
  member = jnp.zeros((flat_ids.shape[0], vocab), bool).at[rows, flat_ids].set(True)
  return member.reshape(*lead, vocab)


def _tail_logp(logp_xV: jax.Array, member_xV: jax.Array) -> jax.Array:
  """log of the probability mass outside `member_xV`."""
  return jax.nn.logsumexp(jnp.where(member_xV, -jnp.inf, logp_xV), axis=-1)


def _bucket_kl(logp_p_xK, logp_q_xK, logp_p_tail, logp_q_tail) -> jax.Array:
  """KL(p || q) over k categories plus one tail bucket."""
  head = _kl(logp_p_xK, logp_q_xK)
  tail = _kl(logp_p_tail[..., None], logp_q_tail[..., None])
  return head + tail


def topk_forward_kl(student_logits_xV, teacher_ids_xK, teacher_logp_xK,
                    temperature: float = 1.0) -> jax.Array:
  """Forward KL over the teacher's top-k ids plus a tail bucket (exact over k + 1 categories).

  pT_tail = max(1 - sum_k exp(teacher_logp), 0) (given top-k log-probs may sum to slightly more than
  1 in float32); pS_tail is the student's mass outside the ids, computed as a log-sum-exp (no
  cancellation). `teacher_logp_xK` is used as given (it should already be at `temperature`).
  """
  vocab = student_logits_xV.shape[-1]
  k = teacher_ids_xK.shape[-1]
  ids = jnp.clip(teacher_ids_xK.astype(jnp.int32), 0, vocab - 1)
  logp_s = log_probs(student_logits_xV, temperature)
  logp_s_k = jnp.take_along_axis(logp_s, ids, axis=-1)
  logp_t_k = teacher_logp_xK.astype(jnp.float32)
  if k >= vocab:
    return _kl(logp_t_k, logp_s_k)
  p_t_tail = jnp.clip(1.0 - jnp.exp(logp_t_k).sum(-1), 0.0, 1.0)
  logp_t_tail = jnp.log(jnp.where(p_t_tail > 0, p_t_tail, 1.0))
  logp_t_tail = jnp.where(p_t_tail > 0, logp_t_tail, -jnp.inf)
  logp_s_tail = _tail_logp(logp_s, ids_member_mask(ids, vocab))
  return _bucket_kl(logp_t_k, logp_s_k, logp_t_tail, logp_s_tail)


def student_topk_reverse_kl(student_logits_xV, teacher_logits_xV, k: int,
                            temperature: float = 1.0) -> jax.Array:
  """Reverse KL over the student's top-k ids plus a tail bucket (exact over k + 1 categories).

  The ids are chosen from the student's logits without gradient; the tail masses of both models
  are their probability outside those ids. With k >= V this is the full reverse KL.
  """
  vocab = student_logits_xV.shape[-1]
  if k >= vocab:
    return reverse_kl(student_logits_xV, teacher_logits_xV, temperature)
  logp_s = log_probs(student_logits_xV, temperature)
  logp_t = log_probs(teacher_logits_xV, temperature)
  _, ids = jax.lax.top_k(jax.lax.stop_gradient(logp_s), k)
  member = ids_member_mask(ids, vocab)
  return _bucket_kl(jnp.take_along_axis(logp_s, ids, axis=-1),
                    jnp.take_along_axis(logp_t, ids, axis=-1),
                    _tail_logp(logp_s, member), _tail_logp(logp_t, member))


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Direct-route loss.

  Attributes:
    kind: one of `DIVERGENCES`.
    temperature: divides student and teacher logits before the log-softmax (a TopK teacher's
      log-probs are used as given).
    beta: JSD mixture weight (static; 0 -> forward KL, 1 -> reverse KL).
    alpha: skew weight for skew KL / skew reverse KL (0.1 as in the survey).
    top_k: k of `student_topk_reverse_kl`, and of `topk_forward_kl` when the teacher is given as
      full logits (its top-k is then taken here); a TopK teacher brings its own k.
    chunk_size: sequence positions per chunk (memory ~ B * chunk_size * V floats per model).
    mode: aggregation mode of the per-token divergence (`reduce.AGGREGATION_MODES`).
  """
  kind: str = "reverse_kl"
  temperature: float = 1.0
  beta: float = 0.5
  alpha: float = 0.1
  top_k: int = 64
  chunk_size: int = 128
  mode: str = "token_mean"

  def __post_init__(self):
    if self.kind not in DIVERGENCES:
      raise ValueError(f"DistillConfig.kind {self.kind!r} is not one of {DIVERGENCES}")
    if not self.temperature > 0:
      raise ValueError(f"DistillConfig.temperature must be > 0, got {self.temperature}")
    if not 0.0 <= self.beta <= 1.0:
      raise ValueError(f"DistillConfig.beta must be in [0, 1], got {self.beta}")
    if not 0.0 <= self.alpha < 1.0:
      raise ValueError(f"DistillConfig.alpha must be in [0, 1), got {self.alpha}")
    if self.top_k < 1 or self.chunk_size < 1:
      raise ValueError(f"DistillConfig.top_k and chunk_size must be >= 1, got {self.top_k}, "
                       f"{self.chunk_size}")
    reduce.check_mode(self.mode)


def _full(teacher, kind: str) -> jax.Array:
  if isinstance(teacher, TopK):
    raise ValueError(f"divergence {kind!r} needs full teacher logits (or a (logits_fn, h) pair); got "
                     "a TopK teacher (use kind='topk_forward_kl')")
  return teacher


def _topk_forward(s, t, c: DistillConfig):
  if not isinstance(t, TopK):
    logp_t = log_probs(t, c.temperature)
    logp_k, ids = jax.lax.top_k(logp_t, min(c.top_k, t.shape[-1]))
    t = TopK(ids, logp_k)
  return topk_forward_kl(s, t.ids_BxTxK, t.logp_BxTxK, c.temperature)


# The single registry of direct-route divergences: kind -> f(student_logits, teacher, cfg).
_DIVERGENCE_FNS: dict[str, Callable[[jax.Array, Any, DistillConfig], jax.Array]] = {
    "forward_kl": lambda s, t, c: forward_kl(s, _full(t, "forward_kl"), c.temperature),
    "reverse_kl": lambda s, t, c: reverse_kl(s, _full(t, "reverse_kl"), c.temperature),
    "jsd": lambda s, t, c: jsd(s, _full(t, "jsd"), c.beta, c.temperature),
    "skew_kl": lambda s, t, c: skew_kl(s, _full(t, "skew_kl"), c.alpha, c.temperature),
    "skew_reverse_kl": lambda s, t, c: skew_reverse_kl(s, _full(t, "skew_reverse_kl"), c.alpha,
                                                       c.temperature),
    "tvd": lambda s, t, c: tvd(s, _full(t, "tvd"), c.temperature),
    "topk_forward_kl": _topk_forward,
    "student_topk_reverse_kl": lambda s, t, c: student_topk_reverse_kl(
        s, _full(t, "student_topk_reverse_kl"), c.top_k, c.temperature),
}
DIVERGENCES = tuple(_DIVERGENCE_FNS)


def token_divergence(student_logits_xV: jax.Array, teacher, cfg: DistillConfig) -> jax.Array:
  """Per-state divergence `cfg.kind`; `teacher` is logits `[..., V]` or a `TopK` of `[..., K]`."""
  return _DIVERGENCE_FNS[cfg.kind](student_logits_xV, teacher, cfg)


def _to_chunks(x_BxTx: jax.Array, n_chunks: int, chunk: int) -> jax.Array:
  """[B, T, ...] -> [n_chunks, B, chunk, ...], edge-padding T (padded positions are masked out)."""
  pad = n_chunks * chunk - x_BxTx.shape[1]
  if pad:
    widths = [(0, 0)] * x_BxTx.ndim
    widths[1] = (0, pad)
    x_BxTx = jnp.pad(x_BxTx, widths, mode="edge")
  b = x_BxTx.shape[0]
  x = x_BxTx.reshape(b, n_chunks, chunk, *x_BxTx.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def chunked_token_map(fn: Callable[..., jax.Array], student_logits_fn, student_h_BxTxD: jax.Array,
                      teacher: Teacher, mask_BxT: jax.Array, chunk_size: int,
                      extras: tuple[jax.Array, ...] = ()) -> jax.Array:
  """Applies `fn(student_logits_BxCxV, teacher_chunk, *extra_chunks)` chunk by chunk over T.

  `fn` returns a [B, C] array (or a pytree of them). Chunks run under `lax.scan` with
  `jax.checkpoint` per chunk, so neither the forward nor the backward pass holds more than one chunk
  of logits. The teacher (full logits, `(logits_fn, h)` pair, or `TopK`) is under `stop_gradient`.
  `extras` are further [B, T, ...] arrays chunked alongside. Returns the per-token values [B, T]
  (same pytree structure), zero where `mask_BxT` is False.
  """
  mask_BxT = mask_BxT.astype(bool)
  b, t = mask_BxT.shape
  if student_h_BxTxD.shape[:2] != (b, t):
    raise ValueError(f"student_h_BxTxD {student_h_BxTxD.shape} does not match mask_BxT {(b, t)}")
  chunk = min(chunk_size, t)
  n_chunks = -(-t // chunk)
  if isinstance(teacher, TopK):
    teacher_fn = None
    teacher_arrays = TopK(*teacher)
  elif isinstance(teacher, tuple):
    if len(teacher) != 2 or not callable(teacher[0]):
      raise ValueError("teacher must be logits [B,T,V], TopK(ids, logp), or (logits_fn, h_BxTxD)")
    teacher_fn, teacher_arrays = teacher
  else:
    teacher_fn, teacher_arrays = None, teacher
  for leaf in jax.tree.leaves(teacher_arrays):
    if leaf.shape[:2] != (b, t):
      raise ValueError(f"teacher array {leaf.shape} does not match mask_BxT {(b, t)}")
  teacher_arrays = jax.lax.stop_gradient(teacher_arrays)
  chunks = jax.tree.map(lambda x: _to_chunks(x, n_chunks, chunk),
                        (student_h_BxTxD, teacher_arrays, mask_BxT, tuple(extras)))

  @jax.checkpoint
  def body(carry, xs):
    h_c, teacher_c, mask_c, extras_c = xs
    if teacher_fn is not None:
      teacher_c = jax.lax.stop_gradient(teacher_fn(teacher_c))
    values = fn(student_logits_fn(h_c), teacher_c, *extras_c)
    return carry, jax.tree.map(lambda v: jnp.where(mask_c, v, jnp.zeros_like(v)), values)

  _, values_NxBxC = jax.lax.scan(body, None, chunks)
  unchunk = lambda v: jnp.moveaxis(v, 0, 1).reshape(b, n_chunks * chunk)[:, :t]  # noqa: E731
  return jax.tree.map(unchunk, values_NxBxC)


def divergence_loss(student_logits_fn: Callable[[jax.Array], jax.Array], student_h_BxTxD: jax.Array,
                    teacher: Teacher, mask_BxT: jax.Array, cfg: DistillConfig, *,
                    group_B: jax.Array | None = None, group_names: Sequence[str] = ()
                    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Direct-route loss over the masked (response) positions, chunked over the sequence.

  Args:
    student_logits_fn: h_BxCxD -> logits_BxCxV (e.g. `scoring.unembed_fn(graphdef, params)`).
    student_h_BxTxD: aligned student hidden states (`scoring.shifted_hidden`).
    teacher: full teacher logits [B, T, V]; a `(teacher_logits_fn, teacher_h_BxTxD)` pair; or
      `TopK(ids_BxTxK, logp_BxTxK)`. All aligned with the tokens; no gradient reaches the teacher.
    mask_BxT: positions that count (the loss mask).
    cfg: `DistillConfig`.

    group_B / group_names: optional int32 [B] row groups (e.g. each row's teacher) and their
      names: adds `teacher/<name>/<kind>`, the token-mean divergence of each group's rows.

  Returns:
    (loss_sum, denominator, metrics): metrics `distill/<kind>` (token-mean divergence) and
    `distill/tokens`.
  """
  fn = lambda s, t: token_divergence(s, t, cfg)  # noqa: E731
  div_BxT = chunked_token_map(fn, student_logits_fn, student_h_BxTxD, teacher, mask_BxT,
                              cfg.chunk_size)
  total, denom = reduce.aggregate(div_BxT, mask_BxT, cfg.mode)
  tok_sum, n_tokens = reduce.aggregate(div_BxT, mask_BxT, "token_mean")
  metrics = {f"distill/{cfg.kind}": reduce.safe_ratio(jax.lax.stop_gradient(tok_sum), n_tokens),
             "distill/tokens": n_tokens}
  div_sg_BxT = jax.lax.stop_gradient(div_BxT)
  for i, name in enumerate(group_names):
    in_group = mask_BxT.astype(bool) & (group_B == i)[:, None]
    metrics[f"teacher/{name}/{cfg.kind}"] = reduce.masked_mean(div_sg_BxT, in_group)
  return total, denom, metrics

"""Several teachers in one run (multi-teacher OPD): routing prompts, scoring, per-teacher metrics.

    cfg.teachers = TeachersConfig(models=(TeacherSpec('math', ...), TeacherSpec('code', ...)))

Routing happens on the host, once: `route_table(examples, cfg.teachers)` gives every training
example its teacher's index (by the example's domain, or by a fixed rule on its index), and each
batch's `teacher_id_B` is looked up from its rows' `example_idx_B` before the batch goes to the
devices (`teacher_ids`). On the devices a routed teacher is a tuple of graphdefs with a tuple of
params (`is_routed`); every function that takes a teacher accepts either form:

  rollout scoring   each teacher scores the batch in turn (`select_rows` keeps each row's own
                    teacher's log-probs / KL_t): the teachers' scoring calls run one after another,
                    so the activation memory is that of the largest teacher; compute is one scoring
                    pass per teacher (rows of other teachers are scored and discarded).
  direct route      `routed_teacher` gives `distill.divergence_loss` a (logits_fn, arrays) pair
                    whose logits are, row by row, those of the row's teacher, one sequence chunk at
                    a time.

All teachers' weights stay resident on the devices (`plan` reports their sum apart from the
scoring peak). Per-teacher metrics: `teacher/<name>/rows` and `/tokens` (counted over every
process's rows, in jit), and for OPD `teacher_gap`, `reverse_kl` and `return` (`metrics`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import errors
from opd_jax.objectives import reduce


class RoutingError(errors.UserError, ValueError):
  """A training example that no teacher takes (names the example and its domain)."""


def is_routed(teacher_graphdef) -> bool:
  """Whether a teacher argument is several routed teachers (a tuple of graphdefs)."""
  return isinstance(teacher_graphdef, tuple)


def route_table(examples: Sequence[Any], teachers_cfg) -> np.ndarray:
  """int32 [N]: the index (in `teachers_cfg.models`) of every example's teacher.

  route='index': example i -> i mod K. route='domain': the teacher whose `domains` holds
  `example.domain`, else the teacher without domains; an example no teacher takes is refused in
  one line naming its index and domain."""
  k = len(teachers_cfg.models)
  n = len(examples)
  if teachers_cfg.route == "index":
    return (np.arange(n) % k).astype(np.int32)
  by_domain = {d: i for i, t in enumerate(teachers_cfg.models) for d in t.domains}
  catch_all = next((i for i, t in enumerate(teachers_cfg.models) if not t.domains), None)
  out = np.empty(n, np.int32)
  for j, e in enumerate(examples):
    i = by_domain.get(e.domain, catch_all)
    if i is None:
      named = ", ".join(f"{t.name}: {list(t.domains)}" for t in teachers_cfg.models)
      raise RoutingError(f"training example {j} has domain {e.domain!r}, which no teacher takes "
                         f"(teachers.models domains: {named}); add it to a teacher's domains or "
                         "give one teacher no domains")
    out[j] = i
  return out


def teacher_ids(table: np.ndarray, example_idx_B: np.ndarray) -> np.ndarray:
  """int32 [B]: the teacher of each row of a host batch (by its example index)."""
  return table[np.asarray(example_idx_B, np.int64)].astype(np.int32)


def counts(table: np.ndarray, names: Sequence[str]) -> dict[str, int]:
  """{teacher name: number of training examples routed to it}."""
  return {name: int(np.sum(table == i)) for i, name in enumerate(names)}


@jax.jit
def select_rows(teacher_id_B: jax.Array, *per_teacher_BxT: jax.Array) -> jax.Array:
  """Row b of the result is row b of `per_teacher_BxT[teacher_id_B[b]]`."""
  out = per_teacher_BxT[0]
  for i, x in enumerate(per_teacher_BxT[1:], start=1):
    out = jnp.where((teacher_id_B == i)[:, None], x, out)
  return out


def score_routed(score: Callable[[Any, Any], jax.Array], teacher_graphdef, teacher_params,
                 teacher_id_B) -> jax.Array:
  """`score(graphdef, params) -> [B, T]` of one teacher, or of each routed teacher in turn with
  every row taken from its own teacher."""
  if not is_routed(teacher_graphdef):
    return score(teacher_graphdef, teacher_params)
  if teacher_id_B is None:
    raise ValueError("several teachers need the batch's teacher_id_B")
  parts = [score(gd, p) for gd, p in zip(teacher_graphdef, teacher_params)]
  return select_rows(teacher_id_B, *parts)


def routed_teacher(teacher_graphdef, teacher_params, hidden_fn, unembed_fn, teacher_id_B,
                   shape_BxT):
  """A `(logits_fn, arrays)` teacher for `distill.chunked_token_map` over several teachers.

  arrays = (h of teacher 0, ..., h of teacher K-1, teacher_id_BxT); logits_fn computes each
  teacher's logits on a chunk and keeps, row by row, those of the row's teacher.
  `hidden_fn(graphdef, params) -> h_BxTxD` and `unembed_fn(graphdef, params) -> (h -> logits)`
  are the step's (stop-gradient applied by the caller)."""
  hs = tuple(hidden_fn(gd, p) for gd, p in zip(teacher_graphdef, teacher_params))
  fns = tuple(unembed_fn(gd, p) for gd, p in zip(teacher_graphdef, teacher_params))
  id_BxT = jnp.broadcast_to(teacher_id_B.astype(jnp.int32)[:, None], shape_BxT)

  def logits_fn(arrays):
    *h_chunks, id_BxC = arrays
    out = fns[0](h_chunks[0])
    for i in range(1, len(fns)):
      out = jnp.where((id_BxC == i)[..., None], fns[i](h_chunks[i]), out)
    return out

  return logits_fn, (*hs, id_BxT)


def metrics(names: Sequence[str], teacher_id_B, valid_B, loss_mask_BxT, *,
            reward_BxT=None, kl_BxT=None) -> dict[str, jax.Array]:
  """Per-teacher metrics (in jit): `teacher/<name>/rows` (real rows routed to it), `/tokens`
  (their loss-mask tokens) and, with OPD rewards r_t = log pT - log pS: `/teacher_gap` (token
  mean of -r_t), `/reverse_kl` (token mean of the exact KL_t when given, else the same estimate
  as the gap) and `/return` (the row mean of sum_t r_t)."""
  out = {}
  valid_B = valid_B.astype(bool)
  for i, name in enumerate(names):
    rows_B = valid_B & (teacher_id_B == i)
    mask = loss_mask_BxT.astype(bool) & rows_B[:, None]
    n_rows = jnp.sum(rows_B).astype(jnp.float32)
    out[f"teacher/{name}/rows"] = n_rows
    out[f"teacher/{name}/tokens"] = jnp.sum(mask).astype(jnp.float32)
    if reward_BxT is not None:
      gap = reduce.masked_mean(-reward_BxT, mask)
      out[f"teacher/{name}/teacher_gap"] = gap
      out[f"teacher/{name}/reverse_kl"] = (gap if kl_BxT is None else
                                          reduce.masked_mean(kl_BxT, mask))
      ret_B = jnp.sum(jnp.where(mask, reward_BxT, 0.0), axis=1)
      out[f"teacher/{name}/return"] = reduce.safe_ratio(jnp.sum(ret_B), n_rows)
  return out

"""Pure train steps: `sft_step`, `pg_step` (OPD / RLVR / mixed), `distill_step` (direct route).

Each step is a module-level pure function `step(state, batch, [teacher_params,] *, knobs...) ->
(new_state, metrics)`. Knobs (graphdef, optax transform, step config) are bound with
`functools.partial` by `jit_step`, which jits the step ONCE with explicit in/out shardings and the
state donated (the pjit contract): calling it again with same-shaped inputs never re-traces.

Losses are `(loss_sum, denominator)` pairs (see `objectives.reduce`). Micro-batch gradient
accumulation scans over micro-batches summing loss sums, denominators and gradients of the sums,
and divides once, so it equals the full-batch gradient exactly (up to float summation order).
Micro-batch i takes rows i, i + n, i + 2n, ... (strided), so every micro-batch stays spread over
all the data-parallel devices.

`pg_step` runs `epochs` x `minibatches` optimizer updates on one rollout batch (PPO style); each
epoch reshuffles the rows with the step's RNG (`fold_in(state.rng, state.step)`). `state.step`
counts train-step calls (one per rollout batch); the optimizer counts its own updates.

Metrics (flat, slash-named scalars, computed in jit): `train/loss` (loss of the update: sum /
denominator), `train/grad_norm` (global norm of the gradient before clipping), `train/update_norm`,
`train/lr`, `train/loss_finite` (1.0 iff every update's loss and gradient norm are finite; the
loop stops on 0), `train/updates`, plus the objective's metrics. With several micro-batches or
updates, objective metrics are averaged over them (train/loss and train/grad_norm are exact per
update, then averaged over the updates of a pg_step).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import optax
from orbax.checkpoint import multihost as ocp_multihost

from opd_jax.models import scoring
from opd_jax.models import sharding
from opd_jax.models import transformer
from opd_jax.objectives import distill
from opd_jax.objectives import reduce
from opd_jax.objectives import rlvr
from opd_jax.objectives import sft
from opd_jax.objectives import surrogate
from opd_jax.optim import factory
from opd_jax.train import mesh as mesh_lib
from opd_jax.train.state import TrainState, step_rng

_BARRIER_TIMEOUT_MS = 30 * 60 * 1000  # a slow first compile on some process is fine

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

SFT_FIELDS = ("tokens_BxT", "mask_BxT", "loss_mask_BxT")
PG_FIELDS = SFT_FIELDS + ("old_logp_BxT", "adv_BxT")


@dataclasses.dataclass(frozen=True)
class SFTStepConfig:
  """Knobs of `sft_step`.

  Attributes:
    micro_batches: gradient-accumulation micro-batches per step (must divide the batch).
    mode: loss aggregation mode (`objectives.reduce.AGGREGATION_MODES`).
    chunk_size: sequence positions per log-softmax chunk (`scoring.logprobs_from_hidden`).
  """

  micro_batches: int = 1
  mode: str = "token_mean"
  chunk_size: int = scoring.DEFAULT_CHUNK

  def __post_init__(self):
    _check_positive(self, "micro_batches", "chunk_size")
    reduce.check_mode(self.mode)


@dataclasses.dataclass(frozen=True)
class PGStepConfig:
  """Knobs of `pg_step`.

  Attributes:
    pg: the surrogate (`objectives.surrogate.PGConfig`: kind, clip eps, aggregation mode).
    epochs: passes over the rollout batch per step.
    minibatches: optimizer updates per epoch (must divide the batch, after micro-batching too).
    micro_batches: gradient-accumulation micro-batches per update.
    temperature: the sampling temperature; pi_theta is evaluated at it so that the ratio is exactly
      1 on the first update.
    chunk_size: sequence positions per log-softmax chunk.
    kl_coef: weight of the KL-to-reference penalty (needs `ref_logp_BxT` in the batch; 0: off).
    kl_kind: 'k1' or 'k3' (`objectives.rlvr.kl_penalty`).
  """

  pg: surrogate.PGConfig = dataclasses.field(default_factory=surrogate.PGConfig)
  epochs: int = 1
  minibatches: int = 1
  micro_batches: int = 1
  temperature: float = 1.0
  chunk_size: int = scoring.DEFAULT_CHUNK
  kl_coef: float = 0.0
  kl_kind: str = "k3"

  def __post_init__(self):
    _check_positive(self, "epochs", "minibatches", "micro_batches", "chunk_size")
    if not self.temperature > 0:
      raise ValueError(f"PGStepConfig.temperature={self.temperature}: must be > 0")
    if self.kl_coef < 0:
      raise ValueError(f"PGStepConfig.kl_coef={self.kl_coef}: must be >= 0")
    if self.kl_kind not in rlvr.KL_KINDS:
      raise ValueError(f"PGStepConfig.kl_kind={self.kl_kind!r}; expected one of "
                       f"{rlvr.KL_KINDS}")


@dataclasses.dataclass(frozen=True)
class DistillStepConfig:
  """Knobs of `distill_step`: the divergence (`objectives.distill.DistillConfig`, which also holds
  the chunk size, temperature and aggregation mode) and the micro-batch count."""

  distill: distill.DistillConfig = dataclasses.field(default_factory=distill.DistillConfig)
  micro_batches: int = 1

  def __post_init__(self):
    _check_positive(self, "micro_batches")


def _check_positive(cfg, *names):
  for name in names:
    if getattr(cfg, name) < 1:
      raise ValueError(f"{type(cfg).__name__}.{name}={getattr(cfg, name)}: must be >= 1")


# -- helpers --------------------------------------------------------------------------------------
def _check_batch(batch: Batch, fields: Sequence[str], step: str) -> int:
  missing = [f for f in fields if f not in batch]
  if missing:
    raise ValueError(f"{step}: batch is missing {missing}; it has {sorted(batch)}")
  shape = batch["tokens_BxT"].shape
  for name in fields:
    if name.endswith("_BxT") and batch[name].shape != shape:
      raise ValueError(f"{step}: batch[{name!r}] has shape {batch[name].shape}, expected "
                       f"{shape} like tokens_BxT")
  return shape[0]


def _split(batch: Batch, n: int, what: str) -> Batch:
  """[B, ...] -> [n, B/n, ...], part i = rows i, i+n, ... (keeps each part spread over the
  data-parallel devices)."""
  b = jax.tree.leaves(batch)[0].shape[0]
  if b % n:
    raise ValueError(f"batch size {b} is not divisible by {what}={n}")

  def one(x):
    x = x.reshape((b // n, n) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(one, batch)


def _batch_constrain(batch: Batch) -> Batch:
  return jax.tree.map(lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1)), batch)


@functools.lru_cache(maxsize=None)
def _logical_axes(model_cfg):
  """`transformer.logical_axes` outside the context mesh (nnx.eval_shape would try to attach it
  to the abstract parameters and fail on the logical names)."""
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    return transformer.logical_axes(model_cfg)


def _param_constrain(tree, graphdef):
  """Constrains a params-shaped tree (e.g. the gradient accumulator) to the parameters' logical
  layout; identity without rules or a mesh in context."""
  rules = sharding.current_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh is None or mesh.empty:
    return tree
  logical = _logical_axes(transformer.merge(graphdef, tree).cfg)

  def one(x, names):
    spec = mesh_lib.fit_spec(x.shape, sharding.logical_to_spec(names, rules, mesh.axis_names),
                             mesh)
    return jax.lax.with_sharding_constraint(x, spec)

  return jax.tree.map(one, tree, logical)


def _accumulate(loss_fn: Callable, params, batch: Batch, n_micro: int, graphdef):
  """Sum of gradients of loss sums over micro-batches.

  `loss_fn(params, micro_batch) -> (loss_sum, (denominator, metrics))`. Returns
  (grad_sum, loss_sum, denominator, metrics averaged over micro-batches).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if n_micro == 1:
    (loss_sum, (denom, metrics)), grads = grad_fn(params, _batch_constrain(batch))
    return grads, loss_sum, denom, metrics

  def body(carry, micro):
    g_acc, s_acc, d_acc = carry
    (s, (d, m)), g = grad_fn(params, _batch_constrain(micro))
    g_acc = _param_constrain(jax.tree.map(lambda a, x: a + x.astype(a.dtype), g_acc, g),
                             graphdef)
    return (g_acc, s_acc + s, d_acc + d), m

  zeros = _param_constrain(jax.tree.map(
      lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params), graphdef)
  init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  (grads, loss_sum, denom), metrics = jax.lax.scan(body, init, _split(batch, n_micro,
                                                                       "micro_batches"))
  return grads, loss_sum, denom, jax.tree.map(jnp.mean, metrics)


def _apply(params, opt_state, tx: optax.GradientTransformation, loss_fn: Callable, batch: Batch,
           n_micro: int, graphdef):
  """One optimizer update from (possibly micro-batched) gradients; returns metrics too."""
  grads, loss_sum, denom, metrics = _accumulate(loss_fn, params, batch, n_micro, graphdef)
  scale = jnp.where(denom > 0, 1.0 / jnp.maximum(denom, 1e-30), 0.0)
  grads = _param_constrain(
      jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params), graphdef)
  loss = loss_sum * scale
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  lr = factory.current_lr(opt_state)
  out = dict(metrics)
  out.update({
      "train/loss": loss,
      "train/grad_norm": grad_norm,
      "train/update_norm": optax.tree.norm(updates),
      "train/loss_finite": (jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(jnp.float32),
      "train/denominator": denom,
  })
  if lr is not None:
    out["train/lr"] = jnp.asarray(lr, jnp.float32)
  return params, opt_state, out


def _student_logp(graphdef, params, mb: Batch, temperature: float, chunk_size: int) -> jax.Array:
  h = scoring.shifted_hidden(graphdef, params, mb["tokens_BxT"], mb["mask_BxT"])
  return scoring.logprobs_from_hidden(h, scoring.unembed_fn(graphdef, params), mb["tokens_BxT"],
                                      temperature=temperature, chunk_size=chunk_size)


def _finish(state: TrainState, params, opt_state, metrics: Metrics, updates: int
            ) -> tuple[TrainState, Metrics]:
  metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
  metrics["train/updates"] = jnp.asarray(updates, jnp.float32)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


# -- steps ----------------------------------------------------------------------------------------
def sft_step(state: TrainState, batch: Batch, *, graphdef, tx: optax.GradientTransformation,
             cfg: SFTStepConfig = SFTStepConfig(), model_cfg=None) -> tuple[TrainState, Metrics]:
  """One SFT update: token NLL on `loss_mask_BxT` (batch: tokens_BxT, mask_BxT, loss_mask_BxT).

  `model_cfg` is accepted for symmetry with the loop's call sites and is not needed (the graphdef
  carries the model config).
  """
  del model_cfg
  _check_batch(batch, SFT_FIELDS, "sft_step")

  def loss_fn(params, mb):
    logp = _student_logp(graphdef, params, mb, 1.0, cfg.chunk_size)
    s, d, m = sft.sft_loss(logp, mb["loss_mask_BxT"], cfg.mode)
    return s, (d, m)

  fields = {k: batch[k] for k in SFT_FIELDS}
  params, opt_state, metrics = _apply(state.params, state.opt_state, tx, loss_fn, fields,
                                      cfg.micro_batches, graphdef)
  return _finish(state, params, opt_state, metrics, 1)


def pg_step(state: TrainState, batch: Batch, *, graphdef, tx: optax.GradientTransformation,
            cfg: PGStepConfig = PGStepConfig()) -> tuple[TrainState, Metrics]:
  """`epochs` x `minibatches` policy-gradient updates on one rollout batch.

  Batch: tokens_BxT, mask_BxT, loss_mask_BxT, old_logp_BxT (behaviour log-probs at
  `cfg.temperature`), adv_BxT (per-token advantages, already stop-gradient: OPD's
  teacher - student log-ratio, RLVR's group advantages, or a mix), optional ref_logp_BxT (for the
  KL-to-reference penalty). The ratio is pi_theta / pi_old.
  """
  b = _check_batch(batch, PG_FIELDS, "pg_step")
  fields = list(PG_FIELDS)
  if cfg.kl_coef > 0:
    if "ref_logp_BxT" not in batch:
      raise ValueError("pg_step: PGStepConfig.kl_coef > 0 needs 'ref_logp_BxT' in the batch")
    fields.append("ref_logp_BxT")
  data = {k: batch[k] for k in fields}
  n_mb = cfg.minibatches
  if b % (n_mb * cfg.micro_batches):
    raise ValueError(f"pg_step: batch size {b} is not divisible by minibatches={n_mb} x "
                     f"micro_batches={cfg.micro_batches}")
  rng = step_rng(state)

  def loss_fn(params, mb):
    logp = _student_logp(graphdef, params, mb, cfg.temperature, cfg.chunk_size)
    s, d, m = surrogate.pg_loss(logp, mb["old_logp_BxT"], mb["adv_BxT"], mb["loss_mask_BxT"],
                                cfg.pg)
    m = dict(m)
    if cfg.kl_coef > 0:
      kl_BxT = rlvr.kl_penalty(logp, mb["ref_logp_BxT"], cfg.kl_kind)
      kl_sum, _ = reduce.aggregate(kl_BxT, mb["loss_mask_BxT"], cfg.pg.mode)
      s = s + cfg.kl_coef * kl_sum
      m["pg/kl_ref"] = reduce.masked_mean(jax.lax.stop_gradient(kl_BxT), mb["loss_mask_BxT"])
    return s, (d, m)

  def update(carry, mb):
    params, opt_state = carry
    params, opt_state, metrics = _apply(params, opt_state, tx, loss_fn, mb, cfg.micro_batches,
                                       graphdef)
    return (params, opt_state), metrics

  def epoch(carry, e):
    shuffled = data
    if cfg.epochs * n_mb > 1:
      perm = jax.random.permutation(jax.random.fold_in(rng, e), b)
      shuffled = jax.tree.map(lambda x: jnp.take(x, perm, axis=0), data)
    if n_mb == 1:
      carry, metrics = update(carry, shuffled)
      return carry, jax.tree.map(lambda x: x[None], metrics)
    return jax.lax.scan(update, carry, _split(shuffled, n_mb, "minibatches"))

  carry = (state.params, state.opt_state)
  if cfg.epochs == 1:
    carry, metrics = epoch(carry, 0)
    metrics = jax.tree.map(lambda x: x[None], metrics)
  else:
    carry, metrics = jax.lax.scan(epoch, carry, jnp.arange(cfg.epochs))
  finite = jnp.min(metrics.pop("train/loss_finite"))
  metrics = jax.tree.map(jnp.mean, metrics)
  metrics["train/loss_finite"] = finite
  return _finish(state, *carry, metrics, cfg.epochs * n_mb)


def distill_step(state: TrainState, batch: Batch, teacher_params, *, graphdef, teacher_graphdef,
                 tx: optax.GradientTransformation, cfg: DistillStepConfig = DistillStepConfig()
                 ) -> tuple[TrainState, Metrics]:
  """One direct-route update: a divergence between full (or top-k) teacher and student
  distributions on the rollout's response positions (`objectives.distill.divergence_loss`).

  Batch: tokens_BxT, mask_BxT, loss_mask_BxT; the teacher is computed here from
  `teacher_params` (any model sharing the tokenizer), unless the batch carries precomputed
  `teacher_ids_BxTxK` / `teacher_logp_BxTxK` (`scoring.topk_logprobs`; then `teacher_params` is
  unused and may be None).
  """
  _check_batch(batch, SFT_FIELDS, "distill_step")
  topk = "teacher_ids_BxTxK" in batch
  fields = SFT_FIELDS + (("teacher_ids_BxTxK", "teacher_logp_BxTxK") if topk else ())
  data = {k: batch[k] for k in fields}
  dcfg = cfg.distill

  def loss_fn(params, mb):
    h = scoring.shifted_hidden(graphdef, params, mb["tokens_BxT"], mb["mask_BxT"])
    student_fn = scoring.unembed_fn(graphdef, params)
    if topk:
      teacher = distill.TopK(mb["teacher_ids_BxTxK"], mb["teacher_logp_BxTxK"])
    else:
      tp = jax.lax.stop_gradient(teacher_params)
      th = scoring.shifted_hidden(teacher_graphdef, tp, mb["tokens_BxT"], mb["mask_BxT"])
      teacher = (scoring.unembed_fn(teacher_graphdef, tp), jax.lax.stop_gradient(th))
    s, d, m = distill.divergence_loss(student_fn, h, teacher, mb["loss_mask_BxT"], dcfg)
    return s, (d, m)

  params, opt_state, metrics = _apply(state.params, state.opt_state, tx, loss_fn, data,
                                      cfg.micro_batches, graphdef)
  return _finish(state, params, opt_state, metrics, 1)


# -- jitting --------------------------------------------------------------------------------------
class JittedStep:
  """A step jitted once with explicit shardings; calls run under the mesh and axis rules.

  `__call__(state, batch, *extra)` -> (new_state, metrics); the state argument is donated.
  `lower(...)` lowers with the same context (for `plan`), `trace_count` is the number of times the
  Python step function has been traced (1 after any number of same-shaped calls).

  Multi-process: the first call compiles ahead of time and then waits at a coordination-service
  barrier, so that every process starts the step's collectives together (CPU/gloo collectives
  give up after 30 s if one process is still compiling).
  """

  _created = 0  # per process; every process creates its steps in the same order

  def __init__(self, fn: Callable, mesh: jax.sharding.Mesh, rules, in_shardings, out_shardings):
    self.mesh = mesh
    self.rules = sharding.validate_rules(rules) if rules is not None else None
    self.trace_count = 0
    self._id = JittedStep._created
    JittedStep._created += 1
    self._synced = False

    def counted(*args):
      self.trace_count += 1
      with sharding.axis_rules(self.rules):
        return fn(*args)

    self.jitted = jax.jit(counted, in_shardings=in_shardings, out_shardings=out_shardings,
                          donate_argnums=(0,))

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      if not self._synced and jax.process_count() > 1:
        self.jitted.lower(*args).compile()
        barrier = ocp_multihost.get_barrier_sync_fn()
        barrier(key=f"opd_jax_jit_step_{self._id}_compiled", timeout_ms=_BARRIER_TIMEOUT_MS)
      self._synced = True
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


def jit_step(step_fn: Callable, mesh: jax.sharding.Mesh, state_shardings: TrainState,
             batch_shardings, *, extra_shardings: tuple = (),
             rules: Iterable[Sequence] | None = sharding.DEFAULT_RULES, **knobs) -> JittedStep:
  """`jax.jit(partial(step_fn, **knobs))` with in/out shardings and the state donated.

  Args:
    step_fn: `sft_step`, `pg_step` or `distill_step` (or any function with their signature).
    mesh: the device mesh (see `train.mesh.make_mesh`).
    state_shardings: a TrainState of shardings (`train.mesh.state_shardings`).
    batch_shardings: shardings of the batch dict (`train.mesh.batch_shardings`), or one sharding
      for every field.
    extra_shardings: shardings of further positional arguments (distill_step's teacher params:
      `train.mesh.param_shardings(teacher_cfg, mesh, rules)`).
    rules: logical-axis rules installed while tracing (activation sharding constraints).
    **knobs: keyword arguments bound to `step_fn` (graphdef, tx, cfg, ...).
  """
  metrics_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = functools.partial(step_fn, **knobs)
  return JittedStep(fn, mesh, rules,
                    in_shardings=(state_shardings, batch_shardings, *extra_shardings),
                    out_shardings=(state_shardings, metrics_sharding))

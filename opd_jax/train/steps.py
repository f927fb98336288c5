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
update, then averaged over the updates of a pg_step). `train/loss` is the whole differentiated
loss (with pg_step's options: + KL-to-reference + CR-OPD + value_coef * value loss);
`train/grad_norm` is the policy's.

A mixture-of-experts student with `router_aux_loss_coef > 0` (`models.config`) adds that coef
times `transformer.load_balancing_loss` (router logits of the real tokens, `mask_BxT`) to every
step's loss: each micro-batch adds coef x aux x its denominator to its loss sum, so the update's
loss gains coef x aux (the denominator-weighted mean over micro-batches); `loss/router_aux`
reports aux the same way. A dense student or coef 0 leaves the steps exactly as they were.

`pg_step` options (see `PGStepConfig`): a learned value head (GAE-OPD; `state.value` holds its
params and Adam state, `init_value` / `make_value_tx` create them; metrics `value/loss` (exact
sum / denominator per update), `value/mse`, `value/mean`, `value/grad_norm`) and the CR-OPD
routing term (`CRTermConfig`; teacher params as an extra positional argument; metrics `cr/loss`,
`cr/active_frac`, `cr/set_size`). `PGStepConfig.needs_teacher` / `needs_reference` /
`needs_returns` / `batch_fields` say what a configuration needs.

Adapters (LoRA / PiSSA, `models.lora`): when `state.frozen` holds the base parameters,
`state.params` holds only the adapters; every step then differentiates the adapters through
`lora.merge(state.frozen, adapters, lora_scale)` (the knob `lora_scale` = alpha / r), updates
only them (the optimizer state was created for them alone), and returns `state.frozen` as it
came in. Every metric keeps its meaning (`train/grad_norm` is the adapters' gradient norm).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import optax
from orbax.checkpoint import multihost as ocp_multihost

from opd_jax import trace_cache
from opd_jax.models import lora
from opd_jax.models import scoring
from opd_jax.models import sharding
from opd_jax.models import transformer
from opd_jax.objectives import distill
from opd_jax.objectives import log_ratio
from opd_jax.objectives import reduce
from opd_jax.objectives import rlvr
from opd_jax.objectives import sft
from opd_jax.objectives import surrogate
from opd_jax.optim import factory
from opd_jax.train import teachers as teachers_lib
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
class CRTermConfig:
  """The CR-OPD routing term of `pg_step` (experimental; `objectives.log_ratio.cr_opd_token_loss`
  documents the exact form). Only the routing knobs live here: the temperature, chunk size and
  aggregation mode are the PG step's own (`PGStepConfig.cr_opd_config` builds the objective's
  config from them).

  Attributes:
    coef: lambda, the term's weight; 0.0 (the default) turns CR-OPD off, and then `pg_step` needs
      no teacher. 1.0 routes the mass freed from a negatively rewarded token exactly.
    teacher_min_prob: tau: v is teacher-supported if pT(v) >= tau ... (> 1 disables).
    teacher_top_k: ... or v is in the teacher's top-k (0: criterion off).
    student_top_k: v is student-reachable if it is in the student's top-k ... (0: off).
    student_min_prob: ... or pS(v) >= eps (> 1 disables).
  """

  coef: float = 0.0
  teacher_min_prob: float = 0.05
  teacher_top_k: int = 0
  student_top_k: int = 20
  student_min_prob: float = 1e-3

  def __post_init__(self):
    if not self.coef >= 0:
      raise ValueError(f"CRTermConfig.coef={self.coef}: must be >= 0 (0 = off)")
    self.objective()  # the objective's own validation of the set criteria

  @property
  def enabled(self) -> bool:
    return self.coef > 0

  def objective(self, temperature: float = 1.0, chunk_size: int = scoring.DEFAULT_CHUNK,
                mode: str = "token_mean") -> log_ratio.CROPDConfig:
    """`log_ratio.CROPDConfig` with these routing knobs and the given shared ones."""
    return log_ratio.CROPDConfig(
        coef=self.coef, teacher_min_prob=self.teacher_min_prob, teacher_top_k=self.teacher_top_k,
        student_top_k=self.student_top_k, student_min_prob=self.student_min_prob,
        temperature=temperature, chunk_size=chunk_size, mode=mode)


@dataclasses.dataclass(frozen=True)
class PGStepConfig:
  """Knobs of `pg_step`.

  Attributes:
    pg: the surrogate (`objectives.surrogate.PGConfig`: kind, clip eps, aggregation mode).
    epochs: passes over the rollout batch per step.
    minibatches: optimizer updates per epoch (must divide the batch, after micro-batching too).
    micro_batches: gradient-accumulation micro-batches per update.
    temperature: the sampling temperature; pi_theta is evaluated at it so that the ratio is exactly
      1 on the first update (CR-OPD's distributions use it too).
    chunk_size: sequence positions per log-softmax chunk (and per CR-OPD chunk).
    kl_coef: weight of the KL-to-reference penalty (needs `ref_logp_BxT` in the batch; 0: off).
    kl_kind: 'k1' or 'k3' (`objectives.rlvr.kl_penalty`).
    value_head: train a learned value head (GAE-OPD with value='learned'): the state carries
      `value` (`init_value`) and the batch `returns_BxT` (value targets A + V_old, zero where
      masked). The head reads the student's hidden states under stop-gradient, so the policy's
      gradient is unchanged.
    value_coef: weight of the value loss (same mask and aggregation mode as the surrogate).
    value_lr: the value head's Adam learning rate (`make_value_tx`).
    cr: the CR-OPD routing term (`CRTermConfig`; coef 0 = off). When on, `pg_step` takes the
      teacher params as an extra positional argument.
  """

  pg: surrogate.PGConfig = dataclasses.field(default_factory=surrogate.PGConfig)
  epochs: int = 1
  minibatches: int = 1
  micro_batches: int = 1
  # Derived knobs (not config keys: the recipe fills them from sampler.temperature and from
  # credit.kind='gae' + credit.value='learned').
  temperature: float = dataclasses.field(default=1.0,
                                         metadata={"derived": "sampler.temperature"})
  chunk_size: int = scoring.DEFAULT_CHUNK
  kl_coef: float = 0.0
  kl_kind: str = "k3"
  value_head: bool = dataclasses.field(default=False, metadata={"derived": "credit.value"})
  value_coef: float = 0.5
  value_lr: float = 1e-3
  cr: CRTermConfig = dataclasses.field(default_factory=CRTermConfig)

  def __post_init__(self):
    _check_positive(self, "epochs", "minibatches", "micro_batches", "chunk_size")
    if not self.temperature > 0:
      raise ValueError(f"PGStepConfig.temperature={self.temperature}: must be > 0")
    if self.kl_coef < 0:
      raise ValueError(f"PGStepConfig.kl_coef={self.kl_coef}: must be >= 0")
    if self.kl_kind not in rlvr.KL_KINDS:
      raise ValueError(f"PGStepConfig.kl_kind={self.kl_kind!r}; expected one of "
                       f"{rlvr.KL_KINDS}")
    if not self.value_coef >= 0:
      raise ValueError(f"PGStepConfig.value_coef={self.value_coef}: must be >= 0")
    if not self.value_lr > 0:
      raise ValueError(f"PGStepConfig.value_lr={self.value_lr}: must be > 0")
    if not isinstance(self.cr, CRTermConfig):
      raise TypeError(f"PGStepConfig.cr must be a CRTermConfig, got {type(self.cr).__name__}")

  @property
  def needs_teacher(self) -> bool:
    """True iff `pg_step` takes teacher params (CR-OPD on: `cr.coef > 0`)."""
    return self.cr.enabled

  @property
  def needs_reference(self) -> bool:
    """True iff the batch must carry `ref_logp_BxT` (KL-to-reference: `kl_coef > 0`)."""
    return self.kl_coef > 0

  @property
  def needs_returns(self) -> bool:
    """True iff the batch must carry `returns_BxT` and the state `value` (`value_head`)."""
    return self.value_head

  @property
  def batch_fields(self) -> tuple[str, ...]:
    """The batch fields `pg_step` reads, all [B, T]."""
    return (PG_FIELDS + (("ref_logp_BxT",) if self.needs_reference else ())
            + (("returns_BxT",) if self.needs_returns else ()))

  @property
  def cr_opd_config(self) -> log_ratio.CROPDConfig:
    """The CR-OPD objective's config: `cr`'s routing knobs with this step's temperature, chunk
    size and aggregation mode (one copy of each)."""
    return self.cr.objective(self.temperature, self.chunk_size, self.pg.mode)


def make_value_tx(cfg: PGStepConfig) -> optax.GradientTransformation:
  """The value head's optimizer: Adam at `cfg.value_lr` (optax defaults otherwise)."""
  return optax.adam(cfg.value_lr)


def init_value(cfg: PGStepConfig, d_model: int) -> dict[str, Any]:
  """`TrainState.value` for a learned value head: {'params': zero-initialised head
  (`log_ratio.init_value_head`), 'opt_state': `make_value_tx(cfg).init(params)`}."""
  params = log_ratio.init_value_head(d_model)
  return {"params": params, "opt_state": make_value_tx(cfg).init(params)}


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


def _param_constrain(tree, graphdef):
  """Constrains a params-shaped tree (e.g. the gradient accumulator) to the parameters' logical
  layout; identity without rules or a mesh in context."""
  mesh = jax.sharding.get_abstract_mesh()
  if sharding.current_rules() is None or mesh is None or mesh.empty:
    return tree
  return sharding.constrain_params(
      tree, transformer.logical_axes(transformer.merge(graphdef, tree).cfg))


class _Adapters:
  """Adapters -> full params with a frozen base (`lora.merge`), and the gradient layout."""

  def __init__(self, base, scale: float):
    self.base, self.scale = base, scale

  def __call__(self, adapters):
    return lora.merge(self.base, adapters, self.scale)

  def constrain(self, tree, graphdef):
    """Constrains an adapter-shaped tree to the adapters' logical layout (`lora.logical_axes`:
    the adapted kernel's axes, rank unsharded); identity without rules or a mesh in context."""
    mesh = jax.sharding.get_abstract_mesh()
    if sharding.current_rules() is None or mesh is None or mesh.empty:
      return tree
    kernels = transformer.logical_axes(transformer.merge(graphdef, self.base).cfg)
    out: dict = {}
    for path, module in lora.adapter_modules(tree):
      axes = lora.adapter_logical_axes(lora.get_in(kernels, path + ("kernel",)))
      lora.set_in(out, path, sharding.constrain_params(module, {k: axes[k] for k in module}))
    return out


def _adapters(state: TrainState, lora_scale: float | None) -> "_Adapters | None":
  """The merge of an adapter state (`state.frozen` set), else None."""
  if state.frozen is None:
    if lora_scale is not None:  # e.g. a state built without `frozen` for an adapter config
      raise ValueError(f"the step was given lora_scale={lora_scale} (adapters) but the state "
                       "holds no frozen base (state.frozen is None): build it with "
                       "create_state(adapters, tx, seed, frozen=base)")
    return None
  if lora_scale is None:
    raise ValueError("the state holds adapters (state.frozen is set) but the step was given no "
                     "lora_scale (alpha / r)")
  return _Adapters(state.frozen, lora_scale)


def _accumulate(loss_fn: Callable, wrt, batch: Batch, n_micro: int, constrain: Callable):
  """Sum of gradients of loss sums over micro-batches.

  `loss_fn(wrt, micro_batch) -> (loss_sum, (denominator, parts, metrics))`, `parts` a dict of
  named partial loss sums (divided by the update's denominator later, like the loss).
  `constrain` lays out a gradient-shaped tree. Returns (grad_sum, loss_sum, denominator,
  part sums, metrics averaged over micro-batches).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if n_micro == 1:
    (loss_sum, (denom, parts, metrics)), grads = grad_fn(wrt, _batch_constrain(batch))
    return grads, loss_sum, denom, parts, metrics

  def body(carry, micro):
    g_acc, s_acc, d_acc, p_acc = carry
    (s, (d, p, m)), g = grad_fn(wrt, _batch_constrain(micro))
    g_acc = constrain(jax.tree.map(lambda a, x: a + x.astype(a.dtype), g_acc, g))
    p_acc = jax.tree.map(lambda a, x: a + x, p_acc, p)
    return (g_acc, s_acc + s, d_acc + d, p_acc), m

  split = _split(batch, n_micro, "micro_batches")
  parts_shape = jax.eval_shape(lambda w, mb: loss_fn(w, mb)[1][1], wrt,
                               jax.tree.map(lambda x: x[0], split))
  zeros = constrain(jax.tree.map(
      lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), wrt))
  init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
          jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), parts_shape))
  (grads, loss_sum, denom, parts), metrics = jax.lax.scan(body, init, split)
  return grads, loss_sum, denom, parts, jax.tree.map(jnp.mean, metrics)


def _apply(params, opt_state, tx: optax.GradientTransformation, loss_fn: Callable, batch: Batch,
           n_micro: int, graphdef, value=None, value_tx: optax.GradientTransformation | None = None,
           adapters: _Adapters | None = None):
  """One optimizer update from (possibly micro-batched) gradients; returns metrics too.

  Without a value head (`value` None) `loss_fn` takes the policy params. With one (`value` =
  {'params', 'opt_state'}) it takes the pair (policy params, value params); both gradients come
  from the one loss (sum / denominator), the policy's go through `tx`, the value head's through
  `value_tx`. With `adapters`, `params` are the adapters and `loss_fn` still receives full
  params (the merge is inside the differentiated function). Returns (params, opt_state, value,
  metrics).
  """
  param_constrain = lambda g: _param_constrain(g, graphdef)  # noqa: E731
  if adapters is not None:
    param_constrain = lambda g: adapters.constrain(g, graphdef)  # noqa: E731
    inner = loss_fn
    if value is None:
      loss_fn = lambda w, mb: inner(adapters(w), mb)  # noqa: E731
    else:
      loss_fn = lambda w, mb: inner((adapters(w[0]), w[1]), mb)  # noqa: E731
  if value is None:
    wrt = params
    constrain = param_constrain
  else:
    wrt = (params, value["params"])
    constrain = lambda g: (param_constrain(g[0]), g[1])  # noqa: E731
  grads, loss_sum, denom, parts, metrics = _accumulate(loss_fn, wrt, batch, n_micro, constrain)
  scale = jnp.where(denom > 0, 1.0 / jnp.maximum(denom, 1e-30), 0.0)
  grads = constrain(jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, wrt))
  if value is not None:
    grads, value_grads = grads
  loss = loss_sum * scale
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  lr = factory.current_lr(opt_state)
  out = dict(metrics)
  out.update({k: v * scale for k, v in parts.items()})
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if value is not None:
    value_grad_norm = optax.tree.norm(value_grads)
    value_updates, value_opt = value_tx.update(value_grads, value["opt_state"], value["params"])
    value = {"params": optax.apply_updates(value["params"], value_updates),
             "opt_state": value_opt}
    out["value/grad_norm"] = value_grad_norm
    finite = finite & jnp.isfinite(value_grad_norm)
  out.update({
      "train/loss": loss,
      "train/grad_norm": grad_norm,
      "train/update_norm": optax.tree.norm(updates),
      "train/loss_finite": finite.astype(jnp.float32),
      "train/denominator": denom,
  })
  if lr is not None:
    out["train/lr"] = jnp.asarray(lr, jnp.float32)
  return params, opt_state, value, out


def _embedding_after(dependency, params):
  """`params` with the token-embedding table ordered after `dependency` (`sharding.after`)."""
  def one(path, x):
    keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
    return sharding.after(dependency, x) if keys[:2] == ("embed", "embedding") else x
  return jax.tree_util.tree_map_with_path(one, params)


def _student_hidden(graphdef, params, mb: Batch):
  """(shifted hidden states, load-balancing loss or None) of the student on a micro-batch.

  The loss (`transformer.load_balancing_loss` over the real tokens, `mask_BxT`) is computed only
  for a mixture-of-experts student with `router_aux_loss_coef > 0`; otherwise it is None and the
  forward pass is the plain one.
  """
  cfg = transformer.merge(graphdef, params).cfg
  # The objectives count the loss mask (an all-reduce across the batch's devices); the forward
  # pass reads the embedding table only after that count, so the all-reduce precedes the layer
  # scans of both passes instead of racing them (`train.collective_order`). XLA computes the
  # objectives' identical counts once.
  params = _embedding_after(jnp.sum(mb["loss_mask_BxT"]), params)
  args = (graphdef, params, mb["tokens_BxT"], mb["mask_BxT"], mb.get("segment_ids_BxT"))
  if not (cfg.is_moe and cfg.router_aux_loss_coef > 0):
    return scoring.shifted_hidden(*args), None
  h, router_logits = scoring.shifted_hidden(*args, return_router_logits=True)
  return h, transformer.load_balancing_loss(router_logits, cfg.experts_per_token, mb["mask_BxT"])


def _add_router_aux(graphdef, params, loss_sum, denom, parts: dict, aux):
  """loss_sum + coef * aux * denom (so the update's loss, sum / denominator, gains coef * aux;
  with micro-batches, the denominator-weighted mean of their aux); `parts['loss/router_aux']`
  reports aux the same way. Identity when `aux` is None."""
  if aux is None:
    return loss_sum
  coef = transformer.merge(graphdef, params).cfg.router_aux_loss_coef
  parts["loss/router_aux"] = aux * denom
  return loss_sum + coef * aux * denom


def _student_logp(graphdef, params, mb: Batch, temperature: float, chunk_size: int):
  """(aligned log-probs [B, T], load-balancing loss or None; see `_student_hidden`)."""
  h, aux = _student_hidden(graphdef, params, mb)
  return scoring.logprobs_from_hidden(h, scoring.unembed_fn(graphdef, params, after=h),
                                      mb["tokens_BxT"],
                                      temperature=temperature, chunk_size=chunk_size), aux


def _finish(state: TrainState, params, opt_state, metrics: Metrics, updates: int, value=None
            ) -> tuple[TrainState, Metrics]:
  metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
  metrics["train/updates"] = jnp.asarray(updates, jnp.float32)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  if value is not None:
    new_state = new_state.replace(value=value)
  return new_state, metrics


def _teacher(teacher_graphdef, teacher_params, mb: Batch, after):
  """The teacher as a `(logits_fn, h)` pair on the batch's tokens, under stop-gradient; several
  routed teachers (tuples, `train.teachers`) give each row its own teacher's logits by the
  batch's `teacher_id_BxT` (each row's teacher index, repeated along T).

  `after`: the student's hidden states. Where programs order their collectives (multi-process
  CPU, `sharding.orders_collectives`), the teacher's weights are gathered whole over the batch once
  and only after the student's forward pass, so neither pass's collectives race the other's
  layer scan (`train.collective_order`)."""
  tp = jax.lax.stop_gradient(teacher_params)
  if teachers_lib.is_routed(teacher_graphdef):
    tp = tuple(transformer.gathered(gd, p, after) for gd, p in zip(teacher_graphdef, tp))
  else:
    tp = transformer.gathered(teacher_graphdef, tp, after)
  tokens, mask = mb["tokens_BxT"], mb["mask_BxT"]

  def hidden(gd, p):
    return jax.lax.stop_gradient(scoring.shifted_hidden(gd, p, tokens, mask))

  if teachers_lib.is_routed(teacher_graphdef):
    return teachers_lib.routed_teacher(teacher_graphdef, tp, hidden, scoring.unembed_fn,
                                       mb["teacher_id_BxT"][:, 0], tokens.shape)
  return scoring.unembed_fn(teacher_graphdef, tp), hidden(teacher_graphdef, tp)


# -- steps ----------------------------------------------------------------------------------------
def sft_step(state: TrainState, batch: Batch, *, graphdef, tx: optax.GradientTransformation,
             cfg: SFTStepConfig = SFTStepConfig(), model_cfg=None,
             lora_scale: float | None = None) -> tuple[TrainState, Metrics]:
  """One SFT update: token NLL on `loss_mask_BxT` (batch: tokens_BxT, mask_BxT, loss_mask_BxT,
  and `segment_ids_BxT` for packed rows: attention within each example, positions restarting,
  sequence-level modes per example; see `objectives.sft`).

  `model_cfg` is accepted for symmetry with the loop's call sites and is not needed (the graphdef
  carries the model config).
  """
  del model_cfg
  fields = SFT_FIELDS + (("segment_ids_BxT",) if "segment_ids_BxT" in batch else ())
  _check_batch(batch, fields, "sft_step")

  def loss_fn(params, mb):
    logp, aux = _student_logp(graphdef, params, mb, 1.0, cfg.chunk_size)
    s, d, m = sft.sft_loss(logp, mb["loss_mask_BxT"], cfg.mode, mb.get("segment_ids_BxT"))
    parts = {}
    s = _add_router_aux(graphdef, params, s, d, parts, aux)
    return s, (d, parts, m)

  fields = {k: batch[k] for k in fields}
  params, opt_state, _, metrics = _apply(state.params, state.opt_state, tx, loss_fn, fields,
                                         cfg.micro_batches, graphdef,
                                         adapters=_adapters(state, lora_scale))
  return _finish(state, params, opt_state, metrics, 1)


def pg_step(state: TrainState, batch: Batch, teacher_params=None, *, graphdef,
            tx: optax.GradientTransformation, cfg: PGStepConfig = PGStepConfig(),
            teacher_graphdef=None, value_tx: optax.GradientTransformation | None = None,
            lora_scale: float | None = None) -> tuple[TrainState, Metrics]:
  """`epochs` x `minibatches` policy-gradient updates on one rollout batch.

  Batch (`cfg.batch_fields`): tokens_BxT, mask_BxT, loss_mask_BxT, old_logp_BxT (behaviour
  log-probs at `cfg.temperature`), adv_BxT (per-token advantages, already stop-gradient: OPD's
  teacher - student log-ratio, RLVR's group advantages, or a mix); ref_logp_BxT when
  `cfg.needs_reference` (KL-to-reference penalty); returns_BxT when `cfg.needs_returns` (the
  learned value head's targets A + V_old, zero where masked). The ratio is pi_theta / pi_old.

  Loss of an update: surrogate sum (+ kl_coef * KL-to-reference sum) (+ CR-OPD sum, when
  `cfg.cr.coef > 0`) (+ value_coef * value-loss sum, with a value head), all with the surrogate's
  mask and aggregation mode, divided by its denominator.

  Args:
    teacher_params: the teacher (sharing the tokenizer) for CR-OPD; required iff
      `cfg.needs_teacher` (else ignored, may be None). Under stop-gradient.
    teacher_graphdef: the teacher's graphdef (with `teacher_params`).
    value_tx: the value head's optimizer (default `make_value_tx(cfg)`; its state must be the
      one in `state.value`, see `init_value`).
  """
  b = _check_batch(batch, PG_FIELDS, "pg_step")
  if cfg.needs_reference and "ref_logp_BxT" not in batch:
    raise ValueError("pg_step: PGStepConfig.kl_coef > 0 needs 'ref_logp_BxT' in the batch")
  if cfg.needs_returns:
    if "returns_BxT" not in batch:
      raise ValueError("pg_step: PGStepConfig.value_head needs 'returns_BxT' (value targets) in "
                       "the batch")
    if state.value is None:
      raise ValueError("pg_step: PGStepConfig.value_head needs state.value (steps.init_value)")
  elif state.value is not None:
    raise ValueError("pg_step: state.value is set but PGStepConfig.value_head is False (the "
                     "value head would not be trained)")
  if cfg.needs_teacher and (teacher_params is None or teacher_graphdef is None):
    raise ValueError("pg_step: CR-OPD (PGStepConfig.cr.coef > 0) needs teacher_params and "
                     "teacher_graphdef")
  _check_batch(batch, cfg.batch_fields, "pg_step")
  data = {k: batch[k] for k in cfg.batch_fields}
  n_mb = cfg.minibatches
  if b % (n_mb * cfg.micro_batches):
    raise ValueError(f"pg_step: batch size {b} is not divisible by minibatches={n_mb} x "
                     f"micro_batches={cfg.micro_batches}")
  if cfg.needs_returns and value_tx is None:
    value_tx = make_value_tx(cfg)
  cr_cfg = cfg.cr_opd_config if cfg.needs_teacher else None
  rng = step_rng(state)
  adapters = _adapters(state, lora_scale)

  def loss_fn(wrt, mb):
    params, value_params = wrt if cfg.needs_returns else (wrt, None)
    tokens, loss_mask = mb["tokens_BxT"], mb["loss_mask_BxT"]
    h, aux = _student_hidden(graphdef, params, mb)
    student_fn = scoring.unembed_fn(graphdef, params, after=h)
    logp = scoring.logprobs_from_hidden(h, student_fn, tokens, temperature=cfg.temperature,
                                        chunk_size=cfg.chunk_size)
    s, d, m = surrogate.pg_loss(logp, mb["old_logp_BxT"], mb["adv_BxT"], loss_mask, cfg.pg)
    m, parts = dict(m), {}
    if cfg.needs_reference:
      kl_BxT = rlvr.kl_penalty(logp, mb["ref_logp_BxT"], cfg.kl_kind)
      kl_sum, _ = reduce.aggregate(kl_BxT, loss_mask, cfg.pg.mode)
      s = s + cfg.kl_coef * kl_sum
      m["pg/kl_ref"] = reduce.masked_mean(jax.lax.stop_gradient(kl_BxT), loss_mask)
    if cr_cfg is not None:
      teacher = _teacher(teacher_graphdef, teacher_params, mb, after=h)
      cr_sum, _, cr_m = log_ratio.cr_opd_loss(student_fn, h, teacher, tokens, mb["adv_BxT"],
                                              loss_mask, cr_cfg)
      s = s + cr_sum
      m.update(cr_m)
    if value_params is not None:
      values = log_ratio.value_head(value_params, h, stop_trunk_gradient=True)
      v_sum, _, v_m = log_ratio.value_loss(values, mb["returns_BxT"], loss_mask, cfg.pg.mode)
      s = s + cfg.value_coef * v_sum
      parts["value/loss"] = v_sum
      m.update(v_m)
    s = _add_router_aux(graphdef, params, s, d, parts, aux)
    return s, (d, parts, m)

  def update(carry, mb):
    params, opt_state, value = carry
    params, opt_state, value, metrics = _apply(params, opt_state, tx, loss_fn, mb,
                                               cfg.micro_batches, graphdef, value, value_tx,
                                               adapters)
    return (params, opt_state, value), metrics

  def epoch(carry, e):
    shuffled = data
    if cfg.epochs * n_mb > 1:
      perm = jax.random.permutation(jax.random.fold_in(rng, e), b)
      shuffled = jax.tree.map(lambda x: jnp.take(x, perm, axis=0), data)
    if n_mb == 1:
      carry, metrics = update(carry, shuffled)
      return carry, jax.tree.map(lambda x: x[None], metrics)
    return jax.lax.scan(update, carry, _split(shuffled, n_mb, "minibatches"))

  carry = (state.params, state.opt_state, state.value)
  if cfg.epochs == 1:
    carry, metrics = epoch(carry, 0)
    metrics = jax.tree.map(lambda x: x[None], metrics)
  else:
    carry, metrics = jax.lax.scan(epoch, carry, jnp.arange(cfg.epochs))
  finite = jnp.min(metrics.pop("train/loss_finite"))
  metrics = jax.tree.map(jnp.mean, metrics)
  metrics["train/loss_finite"] = finite
  params, opt_state, value = carry
  return _finish(state, params, opt_state, metrics, cfg.epochs * n_mb, value)


def distill_step(state: TrainState, batch: Batch, teacher_params, *, graphdef, teacher_graphdef,
                 tx: optax.GradientTransformation, cfg: DistillStepConfig = DistillStepConfig(),
                 lora_scale: float | None = None, teacher_names: tuple[str, ...] = ()
                 ) -> tuple[TrainState, Metrics]:
  """One direct-route update: a divergence between full (or top-k) teacher and student
  distributions on the rollout's response positions (`objectives.distill.divergence_loss`).

  Batch: tokens_BxT, mask_BxT, loss_mask_BxT; the teacher is computed here from
  `teacher_params` (any model sharing the tokenizer), unless the batch carries precomputed
  `teacher_ids_BxTxK` / `teacher_logp_BxTxK` (`scoring.topk_logprobs`; then `teacher_params` is
  unused and may be None). Several routed teachers (`teacher_graphdef` / `teacher_params` tuples,
  `train.teachers`, names `teacher_names`) read the batch's `teacher_id_BxT` and add the metric
  `teacher/<name>/<kind>` (that teacher's token-mean divergence).
  """
  _check_batch(batch, SFT_FIELDS, "distill_step")
  topk = "teacher_ids_BxTxK" in batch
  routed = teachers_lib.is_routed(teacher_graphdef) and not topk
  if routed and len(teacher_names) != len(teacher_graphdef):
    raise ValueError(f"distill_step: {len(teacher_graphdef)} routed teachers need as many "
                     f"teacher_names, got {teacher_names!r}")
  fields = SFT_FIELDS + (("teacher_ids_BxTxK", "teacher_logp_BxTxK") if topk else ()) + (
      ("teacher_id_BxT",) if routed else ())
  data = {k: batch[k] for k in fields}
  dcfg = cfg.distill

  def loss_fn(params, mb):
    h, aux = _student_hidden(graphdef, params, mb)
    student_fn = scoring.unembed_fn(graphdef, params, after=h)
    if topk:
      teacher = distill.TopK(mb["teacher_ids_BxTxK"], mb["teacher_logp_BxTxK"])
    else:
      teacher = _teacher(teacher_graphdef, teacher_params, mb, after=h)
    groups = (dict(group_B=mb["teacher_id_BxT"][:, 0], group_names=teacher_names) if routed
              else {})
    s, d, m = distill.divergence_loss(student_fn, h, teacher, mb["loss_mask_BxT"], dcfg, **groups)
    parts = {}
    s = _add_router_aux(graphdef, params, s, d, parts, aux)
    return s, (d, parts, m)

  params, opt_state, _, metrics = _apply(state.params, state.opt_state, tx, loss_fn, data,
                                         cfg.micro_batches, graphdef,
                                         adapters=_adapters(state, lora_scale))
  return _finish(state, params, opt_state, metrics, 1)


# -- jitting --------------------------------------------------------------------------------------
class JittedStep:
  """A step jitted once with explicit shardings; calls run under the mesh and axis rules.

  `__call__(state, batch, *extra)` -> (new_state, metrics); the state argument is donated.
  `lower(...)` lowers with the same context (for `plan`), `trace_count` is the number of times the
  step's program was prepared: the Python step function traced, or its trace read from the trace
  cache (`opd_jax.trace_cache`: a warm start skips tracing); 1 after any number of same-shaped
  calls.

  Multi-process: the first call compiles ahead of time and then waits at a coordination-service
  barrier, so that every process starts the step's collectives together (CPU/gloo collectives
  give up after 30 s if one process is still compiling).
  """

  _created = 0  # per process; every process creates its steps in the same order

  def __init__(self, fn: Callable, mesh: jax.sharding.Mesh, rules, in_shardings, out_shardings):
    self.mesh = mesh
    self.rules = sharding.validate_rules(rules) if rules is not None else None
    self._traces = 0
    self._id = JittedStep._created
    JittedStep._created += 1
    self._synced = False

    def counted(*args):
      self._traces += 1
      with sharding.axis_rules(self.rules):
        return fn(*args)

    self.jitted = trace_cache.CachedJit(
        counted, name="train_step", key=(fn, self.rules), in_shardings=in_shardings,
        out_shardings=out_shardings, donate_argnums=(0,))

  @property
  def trace_count(self) -> int:
    """Programs prepared: traced here, or read from the trace cache (`opd_jax.trace_cache`)."""
    return self._traces + self.jitted.loads

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      if not self._synced and jax.process_count() > 1:
        self.jitted.compile(*args)
        barrier = ocp_multihost.get_barrier_sync_fn()
        barrier(key=f"opd_jax_jit_step_{self._id}_compiled", timeout_ms=_BARRIER_TIMEOUT_MS)
      self._synced = True
      return self.jitted(*args)

  def compile(self, *args):
    """Traces (or reads from the trace cache) and compiles for these arguments, without running;
    `jax.ShapeDtypeStruct`s stand in for arrays (the loop compiles its step ahead this way)."""
    with jax.set_mesh(self.mesh):
      return self.jitted.compile(*args)

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
    extra_shardings: shardings of further positional arguments (the teacher params of
      distill_step and of pg_step with CR-OPD: `train.mesh.param_shardings(teacher_cfg, mesh,
      rules)`).
    rules: logical-axis rules installed while tracing (activation sharding constraints).
    **knobs: keyword arguments bound to `step_fn` (graphdef, tx, cfg, ...).
  """
  metrics_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = functools.partial(step_fn, **knobs)
  return JittedStep(fn, mesh, rules,
                    in_shardings=(state_shardings, batch_shardings, *extra_shardings),
                    out_shardings=(state_shardings, metrics_sharding))

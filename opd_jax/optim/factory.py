"""The optimizer factory: `OptimConfig` -> one explicit `optax.chain`.

The chain, in order (every piece visible in `make_optimizer`)::

    clip_by_global_norm(grad_clip_norm)            # skipped when grad_clip_norm <= 0
    <'pre' ablation transforms>                    # act on the (clipped) gradient, e.g. the paper's
                                                   # subspace gradient projection
    scale_by_adam(b1, b2, eps, eps_root=0)
    add_decayed_weights(weight_decay, mask)        # decoupled (AdamW); skipped when 0
    scale_by_learning_rate(schedule)               # the negative step
    <'post' ablation transforms>                   # act on the final update (e.g. project the
                                                   # update itself into a subspace)

wrapped in `optax.inject_hyperparams`, so the learning rate of every update is in the optimizer
state (`current_lr(opt_state)`, reported as `train/lr`).

Defaults we chose where the papers are silent: weight decay applies only to matrices (kernels and
embeddings; never to norm scales or biases, which are stacked per layer so they are 2-D here);
global-norm clipping at 1.0; warmup is linear from 0; the schedule counts optimizer updates (a
`pg_step` with E epochs x M minibatches makes E*M updates).

Ablation transforms are resolved by name in ONE table, `TRANSFORMS`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine")
WD_MASKS = ("matrices", "all")
POSITIONS = ("pre", "post")


# -- ablation transforms: ONE table, name -> builder(params, context, **kwargs) -------------------
def _subspace_projection(params, context, **kwargs):
  """Projects each masked leaf onto stored input-side bases (`optim.subspace`); the bases come
  from `make_optimizer(..., subspace_bases=...)`."""
  del params
  if context.get("subspace_bases") is None:
    raise ValueError("transform 'subspace_projection' needs the bases: call "
                     "make_optimizer(cfg, params, subspace_bases=...) (see optim.subspace."
                     "capture_bases)")
  from opd_jax.optim import subspace  # written in parallel; imported only when used
  return subspace.project_onto_subspace(context["subspace_bases"], **kwargs)


def _path_names(params) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p), params)


def _freeze(params, context, patterns=()):
  """Zeroes the updates of parameters whose path ('layers/attn/q_proj/kernel') matches any of
  the regular expressions `patterns` (re.search)."""
  del context
  if isinstance(patterns, str):
    patterns = (patterns,)
  compiled = [re.compile(p) for p in patterns]
  mask = jax.tree.map(lambda name: any(c.search(name) for c in compiled), _path_names(params))
  return optax.masked(optax.set_to_zero(), mask)


def _add_noise(params, context, eta=0.01, gamma=0.55, seed=0):
  del params, context
  return optax.add_noise(eta, gamma, seed)


def _clip_by_value(params, context, max_delta=1.0):
  del params, context
  return optax.clip(max_delta)


def _scale(params, context, step_size=1.0):
  del params, context
  return optax.scale(step_size)


def _no_args(make):
  def build(params, context):
    del params, context
    return make()
  build.__doc__ = make.__doc__
  return build


TRANSFORMS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "subspace_projection": _subspace_projection,
    "freeze": _freeze,
    "add_noise": _add_noise,
    "clip_by_value": _clip_by_value,
    "scale": _scale,
    "sign": _no_args(optax.scale_by_sign),
    "centralize": _no_args(optax.centralize),
    "zero_nans": _no_args(optax.zero_nans),
}


def _unknown_transform(name) -> ValueError:
  return ValueError(f"unknown optimizer transform {name!r}; valid names: {sorted(TRANSFORMS)}")


@dataclasses.dataclass(frozen=True)
class TransformSpec:
  """One ablation slot: a transform from `TRANSFORMS`, where it goes, and its keyword args."""

  name: str
  position: str = "pre"
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.name not in TRANSFORMS:
      raise _unknown_transform(self.name)
    if self.position not in POSITIONS:
      raise ValueError(f"transform {self.name!r}: position={self.position!r}; expected one of "
                       f"{POSITIONS}")
    object.__setattr__(self, "kwargs", dict(self.kwargs))

  @classmethod
  def parse(cls, spec) -> "TransformSpec":
    """Accepts a TransformSpec, a name, (name, kwargs), (name, position, kwargs), or a mapping
    with keys name / position / kwargs."""
    if isinstance(spec, cls):
      return spec
    if isinstance(spec, str):
      return cls(spec)
    if isinstance(spec, Mapping):
      unknown = set(spec) - {"name", "position", "kwargs"}
      if unknown:
        raise ValueError(f"transform spec {dict(spec)!r}: unknown keys {sorted(unknown)}")
      return cls(**spec)
    spec = tuple(spec)
    if len(spec) == 2 and isinstance(spec[1], Mapping):
      return cls(spec[0], "pre", spec[1])
    if len(spec) == 2:
      return cls(spec[0], spec[1])
    if len(spec) == 3:
      return cls(*spec)
    raise ValueError(f"transform spec {spec!r}: expected name, (name, kwargs) or "
                     "(name, position, kwargs)")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Adam(W) with clipping, a schedule, a weight-decay mask and ablation slots.

  Attributes:
    lr: peak learning rate.
    schedule: 'constant' or 'cosine' (cosine decay from `lr` to `final_lr` over the updates after
      warmup; needs `total_steps`).
    warmup_frac: fraction of `total_steps` with linear warmup from 0 (0: none).
    final_lr: end value of the cosine schedule.
    b1, b2, eps: Adam moments and epsilon (eps_root is 0, as in PyTorch).
    weight_decay: decoupled (AdamW) weight decay, multiplied by the learning rate.
    wd_mask: 'matrices' (kernels and embeddings only: no decay on norm scales or biases) or 'all'.
    grad_clip_norm: global-norm clipping threshold; <= 0 disables it.
    mu_dtype: dtype of Adam's first moment (None: that of the params).
    transforms: ablation slots (`TransformSpec`, or anything `TransformSpec.parse` accepts).
  """

  lr: float = 1e-6
  schedule: str = "constant"
  warmup_frac: float = 0.0
  final_lr: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  wd_mask: str = "matrices"
  grad_clip_norm: float = 1.0
  mu_dtype: str | None = None
  transforms: tuple = ()

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"OptimConfig.schedule={self.schedule!r}; expected one of {SCHEDULES}")
    if self.wd_mask not in WD_MASKS:
      raise ValueError(f"OptimConfig.wd_mask={self.wd_mask!r}; expected one of {WD_MASKS}")
    if not 0.0 <= self.warmup_frac < 1.0:
      raise ValueError(f"OptimConfig.warmup_frac={self.warmup_frac}: must be in [0, 1)")
    if self.lr < 0 or self.weight_decay < 0:
      raise ValueError(f"OptimConfig: lr={self.lr} and weight_decay={self.weight_decay} must be "
                       ">= 0")
    object.__setattr__(self, "transforms",
                       tuple(TransformSpec.parse(t) for t in (self.transforms or ())))

  @property
  def spans_the_run(self) -> bool:
    """Whether the schedule is laid out over the run's updates (a cosine decay or a warmup): it
    needs their number, and another number changes every learning rate."""
    return schedule_spans_the_run(self.schedule, self.warmup_frac)


def schedule_spans_the_run(schedule: str, warmup_frac: float) -> bool:
  """`OptimConfig.spans_the_run` of these two settings."""
  return schedule != "constant" or warmup_frac > 0


def make_schedule(cfg: OptimConfig, total_steps: int | None = None) -> optax.Schedule:
  """The learning-rate schedule over optimizer updates."""
  if cfg.spans_the_run and not total_steps:
    raise ValueError(f"OptimConfig(schedule={cfg.schedule!r}, warmup_frac={cfg.warmup_frac}) "
                     "needs total_steps (number of optimizer updates): make_optimizer(cfg, "
                     "params, total_steps=...)")
  warmup = int(round(cfg.warmup_frac * total_steps)) if total_steps else 0
  if cfg.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(cfg.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup),
                                 optax.constant_schedule(cfg.lr)], [warmup])
  decay = max(total_steps - warmup, 1)
  cosine = optax.cosine_decay_schedule(cfg.lr, decay, alpha=cfg.final_lr / cfg.lr if cfg.lr else 0)
  if warmup == 0:
    return cosine
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), cosine], [warmup])


def weight_decay_mask(params, mode: str = "matrices"):
  """True where weight decay applies: 'matrices' = leaves with >= 2 dims not named scale/bias."""
  if mode not in WD_MASKS:
    raise ValueError(f"wd_mask={mode!r}; expected one of {WD_MASKS}")

  def one(path, x):
    if mode == "all":
      return True
    name = str(getattr(path[-1], "key", path[-1])) if path else ""
    return len(x.shape) >= 2 and name not in ("scale", "bias")

  return jax.tree_util.tree_map_with_path(one, params)


def _build(spec: TransformSpec, params, context) -> optax.GradientTransformation:
  builder = TRANSFORMS.get(spec.name)
  if builder is None:
    raise _unknown_transform(spec.name)
  try:
    return builder(params, context, **spec.kwargs)
  except TypeError as e:
    raise ValueError(f"transform {spec.name!r} with kwargs {spec.kwargs}: {e}") from e


def make_optimizer(cfg: OptimConfig, params, *, total_steps: int | None = None, **context
                   ) -> optax.GradientTransformation:
  """The explicit optax chain of `cfg` (see the module docstring for the order).

  Args:
    cfg: the optimizer config.
    params: the parameter tree (arrays or ShapeDtypeStructs): used for the weight-decay mask and
      by ablation transforms that need parameter names or shapes.
    total_steps: number of optimizer updates (needed by cosine / warmup schedules).
    **context: extra inputs for ablation transforms (e.g. `subspace_bases=`).
  """
  schedule = make_schedule(cfg, total_steps)
  pre = [_build(t, params, context) for t in cfg.transforms if t.position == "pre"]
  post = [_build(t, params, context) for t in cfg.transforms if t.position == "post"]
  wd_mask = weight_decay_mask(params, cfg.wd_mask)

  def chain(learning_rate):
    parts = []
    if cfg.grad_clip_norm > 0:
      parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts += pre
    parts.append(optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps, eps_root=0.0,
                                     mu_dtype=cfg.mu_dtype))
    if cfg.weight_decay > 0:
      parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=wd_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    parts += post
    return optax.chain(*parts)

  # float32 whatever the params' dtype: optax would otherwise cast a constant learning rate to
  # bfloat16 params' dtype (1e-6 -> 9.98e-7) while schedules stay float32.
  return optax.inject_hyperparams(chain, hyperparam_dtype=jnp.float32)(learning_rate=schedule)


def chain_labels(cfg: OptimConfig) -> tuple[str, ...]:
  """One label per part of `make_optimizer(cfg)`'s chain, in its order: what a part is and how it
  is set, so two configs' chains can be matched part by part (`graft_opt_state`)."""
  def ablation(t: TransformSpec) -> str:
    return f"{t.position}:{t.name}{json.dumps(t.kwargs, sort_keys=True, default=str)}"

  labels = ["clip_by_global_norm"] if cfg.grad_clip_norm > 0 else []
  labels += [ablation(t) for t in cfg.transforms if t.position == "pre"]
  labels.append(f"scale_by_adam(b1={cfg.b1}, b2={cfg.b2}, eps={cfg.eps}, mu_dtype={cfg.mu_dtype})")
  if cfg.weight_decay > 0:
    labels.append(f"add_decayed_weights({cfg.wd_mask})")
  labels.append("scale_by_learning_rate")
  labels += [ablation(t) for t in cfg.transforms if t.position == "post"]
  return tuple(labels)


class GraftError(ValueError):
  """A branch's optimizer cannot take over its source's optimizer state (one line)."""


def graft_opt_state(cfg: OptimConfig, fresh_state, source_cfg: OptimConfig, source_state):
  """`make_optimizer(cfg)`'s state carrying on from `source_state` of `make_optimizer(source_cfg)`.

  A branch (`loop.branch_from`) continues another run under an optimizer that adds ablation
  transforms (the paper's rank-K projection from a mid-run checkpoint): the update count, the
  injected hyperparameters and the state of every chain part the two share (Adam's moments
  above all) come from `source_state`; the parts only `cfg` has keep `fresh_state`'s (their
  init). Parts are matched by `chain_labels`; the source's parts must appear in the branch's
  chain in the same order, else `GraftError` names the first one that does not.
  """
  new, old = chain_labels(cfg), chain_labels(source_cfg)
  where, j = [], 0
  for label in old:
    while j < len(new) and new[j] != label:
      j += 1
    if j == len(new):
      raise GraftError(f"optimizer part {label!r} of the source run is not in this run's chain "
                       f"{list(new)} (a branch may only add transforms)")
    where.append(j)
    j += 1
  inner = list(fresh_state.inner_state)
  if len(inner) != len(new) or len(source_state.inner_state) != len(old):
    raise GraftError(f"optimizer states do not match their configs: {len(inner)} parts for "
                     f"{len(new)} labels, {len(source_state.inner_state)} for {len(old)}")
  for i, part in zip(where, source_state.inner_state):
    inner[i] = part
  return fresh_state._replace(count=source_state.count, hyperparams=source_state.hyperparams,
                              hyperparams_states=source_state.hyperparams_states,
                              inner_state=tuple(inner))


def current_lr(opt_state) -> jax.Array | None:
  """The learning rate of the last update (from `inject_hyperparams` state), or None."""
  found = []

  def visit(node):
    hyper = getattr(node, "hyperparams", None)
    if isinstance(hyper, Mapping) and "learning_rate" in hyper:
      found.append(hyper["learning_rate"])
      return True
    return False

  jax.tree.leaves(opt_state, is_leaf=visit)
  return found[0] if found else None

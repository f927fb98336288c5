"""Logical axis names -> mesh axes.

Model code names every parameter axis and the main activation axes with *logical* names
(`LOGICAL_AXES`). Which mesh axis each logical name maps to is a *rule* that lives in config
(`configs/*.py`, `mesh.rules`), installed for a region of code with `axis_rules(rules)`.
Outside such a region, or without a mesh in context, `constrain` is the identity, so the same
model code runs on one device and on a pod.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# Parameter axes. `expert` is the stacked-experts axis of mixture-of-experts weights ([E, ...]
# expert kernels, the router's output axis).
PARAM_AXES = ("layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm",
              "expert")
# Activation axes (kept distinct from parameter axes so that e.g. `embed` can be FSDP-sharded in
# parameters while activations keep their embedding dimension whole).
ACTIVATION_AXES = ("batch", "length", "act_embed", "act_heads", "act_kv_heads", "act_mlp",
                   "act_vocab", "cache_length")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

Rules = tuple[tuple[str, "str | tuple[str, ...] | None"], ...]

# A sensible default for ('data', 'fsdp', 'tensor') meshes: batch over data x fsdp, parameters
# FSDP-sharded on their embed axis and tensor-parallel on heads / mlp / vocab.
# `expert` maps to nothing by default: expert kernels [E, D, F] are then sharded exactly like dense
# MLP kernels (embed over fsdp, mlp over tensor), each expert whole on no device. Expert
# parallelism is the rule ("expert", "fsdp"): experts are spread over the fsdp axis, and since a
# mesh axis is used once per array, their embed axis is then replicated (see `logical_to_spec`).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("expert", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("opd_jax_axis_rules",
                                                                     default=None)


def validate_rules(rules: Iterable[Sequence]) -> Rules:
  """Checks and normalises rules; an unknown logical name is an error that names it."""
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise ValueError(f"axis rule #{i} {rule!r}: expected (logical_name, mesh_axes)")
    name, axes = rule
    if name not in LOGICAL_AXES:
      raise ValueError(f"axis rule #{i}: unknown logical axis {name!r}; valid: {LOGICAL_AXES}")
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


@contextlib.contextmanager
def axis_rules(rules: Iterable[Sequence] | None):
  """Installs logical -> mesh rules for the code inside the block (trace time)."""
  token = _RULES.set(None if rules is None else validate_rules(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def current_rules() -> Rules | None:
  return _RULES.get()


def logical_to_spec(names: Sequence[str | None] | P, rules: Iterable[Sequence] | None = None,
                    mesh_axes: Sequence[str] | None = None) -> P:
  """Maps a tuple of logical names to a PartitionSpec of mesh axes.

  A name without a rule, or whose mesh axes are absent from `mesh_axes` (when given) or already
  used by an earlier dimension, is replicated.
  """
  rules = dict(validate_rules(rules if rules is not None else (current_rules() or ())))
  used: set[str] = set()
  out = []
  for name in tuple(names):
    axes = rules.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    axes_t = tuple(a for a in axes_t
                   if a not in used and (mesh_axes is None or a in mesh_axes))
    used.update(axes_t)
    out.append(None if not axes_t else axes_t[0] if len(axes_t) == 1 else axes_t)
  return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; identity without rules or a mesh in context."""
  rules = current_rules()
  if rules is None:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = logical_to_spec(names, rules, mesh.axis_names)
  return jax.lax.with_sharding_constraint(x, spec)


def fit_spec(shape: Sequence[int], spec: P, mesh: jax.sharding.Mesh) -> P:
  """Replicates every dimension whose size is not divisible by its mesh axes' product."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    out.append(axes if dim % math.prod(mesh.shape[a] for a in axes_t) == 0 else None)
  return P(*out)


def constrain_params(tree, logical_tree, *, whole_over_batch: bool = False):
  """Constrains a params-shaped `tree` to its logical layout (`logical_tree`: tuples of logical
  names). `whole_over_batch`: without the mesh axes of the `batch` rule, i.e. what a layer needs
  whole when every batch device runs it (FSDP-sharded weights gathered). Identity without rules
  or a mesh in context."""
  rules = current_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh is None or mesh.empty:
    return tree
  if whole_over_batch:
    batch_axes = dict(rules).get("batch") or ()
    batch_axes = {batch_axes} if isinstance(batch_axes, str) else set(batch_axes)

    def drop(axes):
      axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
      return tuple(a for a in axes_t if a not in batch_axes) or None

    rules = tuple((name, axes if name in ACTIVATION_AXES else drop(axes))
                  for name, axes in rules)

  def one(x, names):
    spec = fit_spec(x.shape, logical_to_spec(names, rules, mesh.axis_names), mesh)
    return jax.lax.with_sharding_constraint(x, spec)

  return jax.tree.map(one, tree, logical_tree)


def gathered_after(dependency, tree, logical_tree):
  """`tree` gathered whole over the batch's devices (`constrain_params(whole_over_batch=True)`),
  made to depend on `dependency` first (`after`; None: no dependency), where
  `orders_collectives()`; elsewhere `tree` as it is. The dependency is added in the tree's own
  layout, before the gather (else the partitioner gathers first and adds after)."""
  if not orders_collectives():
    return tree
  if dependency is not None:
    tree = constrain_params(after(dependency, constrain_params(tree, logical_tree)),
                            logical_tree)
  return constrain_params(tree, logical_tree, whole_over_batch=True)


# `ordered_collectives(on)`: forces the choice of `orders_collectives` (part of jit's cache key).
_ORDER_OVERRIDE = jax.make_user_context(default_value=None)


@contextlib.contextmanager
def ordered_collectives(on: bool = True):
  """Traces the code inside the block as a multi-process CPU run would (`on`), or as written
  (`on=False`), whatever the process count: e.g. to audit the ordered programs in one process
  (`train.collective_order`)."""
  with _ORDER_OVERRIDE(bool(on)):
    yield


def orders_collectives() -> bool:
  """True where programs order their collectives explicitly (`after`, `transformer.gathered`):
  a multi-process run on the CPU backend, whose collectives pair up across processes in launch
  order (`train.collective_order`), under a mesh of several devices; `ordered_collectives`
  overrides the process count. TPU and GPU programs, single-process programs (whose in-process
  collectives meet by device, and which `plan` compiles as a TPU proxy) and programs without
  collectives are left exactly as written."""
  if jax.default_backend() != "cpu":
    return False
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return False
  forced = _ORDER_OVERRIDE.value
  return jax.process_count() > 1 if forced is None else forced


def after(dependency, tree):
  """`tree` (floating-point leaves), made to depend on `dependency`: every use of the result,
  collectives XLA inserts for it included, runs once `dependency` is computed.

  XLA:CPU pairs the collectives of processes in launch order and may launch a loop that holds
  collectives and an independent collective in either order on each process
  (`train.collective_order`); a data dependency orders them. `optimization_barrier` does not:
  XLA drops it before the runtime builds its dependency graph. So each leaf gains `0 * s`, `s` the
  sum of `dependency`'s first leaf (XLA does not fold a float `0 * s`, since `s` may be NaN): the
  values are unchanged unless that sum is not finite (then the leaves are NaN, as what is
  computed from a non-finite `dependency` is), and gradients pass through unchanged (plus a
  zero to `dependency`). Costs one elementwise pass over `tree`; the identity where
  `orders_collectives()` is False."""
  leaves = jax.tree.leaves(tree)
  if not leaves or not orders_collectives():
    return tree
  bad = [x.dtype for x in leaves if not jnp.issubdtype(x.dtype, jnp.floating)]
  if bad:
    raise TypeError(f"sharding.after orders floating-point leaves only, got {bad}")
  # A sum (not one element: slicing a sharded dimension is refused under explicit sharding).
  zero = jnp.sum(jax.tree.leaves(dependency)[0].astype(jnp.float32)) * 0.0
  return jax.tree.map(lambda x: x + zero.astype(x.dtype), tree)


def whole(x: jax.Array) -> jax.Array:
  """`x` held whole by every device where programs order their collectives
  (`orders_collectives`): reading it by row, or looping over it, then needs no collective that
  could race a loop's collectives (`train.collective_order`). Elsewhere `x` as it is."""
  if not orders_collectives():
    return x
  return jax.lax.with_sharding_constraint(x, P())

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
from typing import Iterable, Sequence

import jax
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

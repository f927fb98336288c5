"""Subspace-constrained training (paper_facts.md section 3): orthonormal bases from a cumulative
update, and an optax transform that keeps each masked leaf inside its basis.

    delta = jax.tree.map(lambda a, b: a - b, params_at_20pct, params_0)
    bases = capture_bases(delta, k=16)                          # input side, kernels only
    tx = optax.chain(project_onto_subspace(bases), optax.adam(lr))          # project the gradient
    tx = optax.chain(optax.adam(lr), project_onto_subspace(bases))          # project the update

Where it goes in the chain is the choice the paper leaves open:
  * before the optimizer (the paper's "every gradient projected g <- V V^T g"): Adam then sees
    projected gradients, but its elementwise normalisation (and weight decay) generally take the
    final update out of span(V);
  * after the optimizer (after `scale_by_learning_rate` / weight decay): the update itself, hence
    W_t - W_at for every later step, stays in span(V) exactly.
In `optim.factory` these are the transform positions 'pre' and 'post'.

Orientation. Leaves are read with their last two axes as (in, out), our Flax kernel layout (see
`geometry.matrices.oriented`); leading axes (stacked layers) are batch axes, so a stacked kernel
[L, in, out] gets bases [L, in, k], one per layer. Input side: g <- V (V^T g), V [.., in, k] (the
paper's g V V^T for a PyTorch (out, in) gradient); output side: g <- (g W) W^T, W [.., out, k].
The embedding table [V, D] would be read as (in=V, out=D); the default mask leaves it out.

Default mask: every leaf whose path ends in 'kernel' (attention and MLP projections, an untied
lm_head); never the embedding, norm scales or biases (stacked per layer, they are 2-D here).

Sharding: a basis gets the sharding of its parameter on the batch and projected axes and is
replicated along k (`basis_sharding`), both from `capture_bases` (from the delta's shardings) and
in `init` (from the params'). Unmasked leaves pass through untouched (the same array).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from opd_jax.geometry.matrices import SIDES, oriented

_HI = jax.lax.Precision.HIGHEST


class SubspaceProjectionState(NamedTuple):
  """The bases (a params-like tree: [..., dim, k] float32 for projected leaves, None elsewhere)."""

  bases: Any


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def default_mask(params) -> Any:
  """True for leaves whose path ends in 'kernel', False elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: bool(p) and _path_name(p).split("/")[-1] == "kernel", params)


def _resolve_mask(mask, params):
  if mask is None:
    return default_mask(params)
  if callable(mask):
    return mask(params)
  return mask


def _side_axis(side: str) -> int:
  if side not in SIDES:
    raise ValueError(f"side={side!r}: expected one of {SIDES}")
  return -2 if side == "input" else -1


def _sharding_of(x):
  """The sharding of a concrete array or ShapeDtypeStruct; None for tracers and numpy arrays."""
  if isinstance(x, jax.core.Tracer):
    return None
  return getattr(x, "sharding", None) if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) else None


def basis_sharding(param_sharding, ndim: int, side: str):
  """The sharding of a basis [..., dim, k] of a parameter with `param_sharding` (ndim axes):
  the parameter's spec on the leading axes and on the projected axis, k replicated (written
  without trailing Nones, as jit returns it, so a state fed back does not recompile). None when
  the parameter has no NamedSharding."""
  if not isinstance(param_sharding, NamedSharding):
    return None
  spec = tuple(param_sharding.spec) + (None,) * (ndim - len(param_sharding.spec))
  out = list(spec[:-2]) + [spec[ndim + _side_axis(side)]]
  while out and out[-1] is None:  # jit returns specs without trailing Nones: keep them equal
    out.pop()
  return NamedSharding(param_sharding.mesh, P(*out))


@functools.partial(jax.jit, static_argnames=("k", "side"))
def _top_k_basis(delta, k, side):
  """Orthonormal top-k `side` singular vectors of each [.., in, out] matrix, float32."""
  a = oriented(delta.astype(jnp.float32), side)           # [..., dim, other]
  dim, other = a.shape[-2:]
  if dim <= other:
    gram = jnp.einsum("...ic,...jc->...ij", a, a, precision=_HI)
    _, vecs = jnp.linalg.eigh(gram)
    u = vecs[..., ::-1][..., :k]
  else:
    gram = jnp.einsum("...ci,...cj->...ij", a, a, precision=_HI)
    _, vecs = jnp.linalg.eigh(gram)
    v = vecs[..., ::-1][..., :k]
    u = jnp.einsum("...ic,...ck->...ik", a, v, precision=_HI)
  u, _ = jnp.linalg.qr(u)                                   # orthonormal to float32 round-off
  return u


def capture_bases(delta_params, k: int, side: str = "input", mask=None) -> Any:
  """Per masked leaf, the orthonormal top-k `side` singular vectors of the cumulative update.

  Args:
    delta_params: W_at - W_origin, a params-like pytree.
    k: rank of the subspace (the paper: 16); must not exceed either matrix dimension.
    side: 'input' (the paper) or 'output'.
    mask: pytree of bools like `delta_params`, or a callable of it; default `default_mask`.

  Returns:
    A tree like `delta_params` with float32 bases [..., dim, k] (dim = in or out) for masked
    leaves and None elsewhere, each sharded by `basis_sharding` when its delta leaf is a
    NamedSharding-ed array. Computed from the Gram matrix on the smaller side in float32, then
    re-orthonormalised (QR): the bases are exact to float32 round-off; the subspace itself is as
    accurate as float32 allows for the gap after the k-th singular value.
  """
  _side_axis(side)
  mask_tree = _resolve_mask(mask, delta_params)

  def one(path, leaf, selected):
    if not selected:
      return None
    where = _path_name(path)
    if leaf.ndim < 2:
      raise ValueError(f"capture_bases: leaf {where!r} has shape {tuple(leaf.shape)}; only "
                       "leaves with >= 2 axes (..., in, out) can be projected")
    dims = leaf.shape[-2:]
    if not 0 < k <= min(dims):
      raise ValueError(f"capture_bases: k={k} for leaf {where!r} of shape {tuple(leaf.shape)} "
                       f"(needs 1 <= k <= {min(dims)})")
    basis = _top_k_basis(leaf, k, side)
    sharding = basis_sharding(_sharding_of(leaf), leaf.ndim, side)
    return basis if sharding is None else jax.device_put(basis, sharding)

  flat_mask = jax.tree.map(bool, mask_tree)
  out = jax.tree_util.tree_map_with_path(one, delta_params, flat_mask)
  if all(b is None for b in jax.tree.leaves(out, is_leaf=lambda x: x is None)):
    raise ValueError("capture_bases: the mask selects no leaf (the default selects leaves whose "
                     "path ends in 'kernel'); pass mask=")
  return out


def _check_and_place(bases, params, side: str):
  axis = _side_axis(side)

  def one(path, basis, param):
    if isinstance(param, optax.MaskedNode):   # a leaf `optax.masked` leaves out
      return param
    if basis is None:
      return None
    where = _path_name(path)
    want = tuple(param.shape[:-2]) + (param.shape[axis], basis.shape[-1])
    if tuple(basis.shape) != want:
      raise ValueError(f"project_onto_subspace: basis for {where!r} has shape "
                       f"{tuple(basis.shape)}; parameter {tuple(param.shape)} with side={side!r} "
                       f"needs {want[:-1] + ('k',)}")
    sharding = basis_sharding(_sharding_of(param), len(param.shape), side)
    if sharding is not None and not isinstance(basis, jax.core.Tracer):
      return jax.device_put(basis, sharding)
    return basis

  return jax.tree_util.tree_map_with_path(one, bases, params, is_leaf=lambda x: x is None)


def project_onto_subspace(bases, mask=None, side: str = "input"
                          ) -> optax.GradientTransformation:
  """Projects every leaf that has a basis onto it; other leaves pass through unchanged.

  Args:
    bases: from `capture_bases` (None for leaves not to project).
    mask: optional pytree of bools (or callable of the params) restricting the projected leaves
      further; selecting a leaf without a basis is an error.
    side: 'input' (g <- V V^T g on the in axis) or 'output' (g <- g W W^T); must match the side
      the bases were captured on.

  The bases live in the state (`SubspaceProjectionState`), so they are jit arguments sharded like
  their parameters, saved with the optimizer state, and the transform works under
  `optax.inject_hyperparams` and inside any `optax.chain`.
  """
  _side_axis(side)

  def effective(params_like):
    if mask is None:
      return bases
    m = _resolve_mask(mask, params_like)

    def pick(path, basis, selected):
      if selected and basis is None:
        raise ValueError(f"project_onto_subspace: mask selects {_path_name(path)!r}, which has "
                         "no basis")
      return basis if selected else None

    return jax.tree_util.tree_map_with_path(pick, bases, m, is_leaf=lambda x: x is None)

  def init_fn(params):
    return SubspaceProjectionState(_check_and_place(effective(params), params, side))

  def project(g, basis):
    if basis is None or g is None:
      return g
    gs = oriented(g.astype(jnp.float32), side)
    coeff = jnp.einsum("...dk,...do->...ko", basis, gs, precision=_HI)
    proj = jnp.einsum("...dk,...ko->...do", basis, coeff, precision=_HI)
    return oriented(proj, side).astype(g.dtype)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(project, updates, state.bases, is_leaf=lambda x: x is None), state

  return optax.GradientTransformation(init_fn, update_fn)


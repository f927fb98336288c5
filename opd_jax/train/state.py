"""The training state: one pytree carrying everything a step reads and writes.

`TrainState` holds the step count (the ONE step count of a run: the loop, the checkpoints, the
snapshots and the per-step RNG all read `state.step`), the parameters (a plain nested dict, see
`opd_jax.models.transformer`), the optax state, a typed PRNG key, and what a recipe adds: the
learned value head of GAE-OPD (`value`: its parameters and their own optax state) and the state of
the token transforms (`token_state`), and with LoRA / PiSSA adapters (`models.lora`) the frozen
base parameters (`frozen`; `params` then holds only the adapters, so the optimizer state holds
moments for the adapters only, and the steps differentiate the adapters through
`lora.merge(frozen, params, scale)`). Fields a run does not use are None (an empty pytree node),
so orbax saves exactly what the run evolves. The key is never split and
carried; a step draws its randomness from `step_rng(state)` = `fold_in(state.rng, state.step)`, so a
resumed run reproduces the same random numbers without saving any extra RNG state.

Note that one `pg_step` call may apply several optimizer updates (PPO epochs x minibatches): then
the optimizer's own update count (which drives the learning-rate schedule) advances faster than
`state.step`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

Params = dict[str, Any]


@flax.struct.dataclass
class TrainState:
  """Step count, parameters, optimizer state and the run's base PRNG key.

  Attributes:
    step: int32 scalar, the number of completed train steps.
    params: nested dict of arrays (the model layout of `transformer.split`).
    opt_state: the optax state of the transformation the state was created with.
    rng: a typed PRNG key (`jax.random.key`); per-step keys come from `step_rng`.
    value: the learned value head, {'params': {...}, 'opt_state': ...} (GAE-OPD with
      value='learned'), else None. Trained by `pg_step`, exported apart from the policy.
    token_state: the token transforms' optax state (`rollout.token_transforms`), else None.
    frozen: with adapters (`lora.rank > 0`), the frozen base params (the PiSSA residual for
      init='pissa'); never updated by a step. None without adapters.
  """

  step: jax.Array
  params: Params
  opt_state: optax.OptState
  rng: jax.Array
  value: Any = None
  token_state: Any = None
  frozen: Any = None

  def __repr__(self) -> str:  # arrays summarised, not printed
    return summarize(self)

  __str__ = __repr__


def _leaf_summary(x) -> str:
  if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
    return f"key<{jax.random.key_impl(x)}>{tuple(x.shape)}"
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"
  return repr(x)


def summarize(state: TrainState) -> str:
  """A short human-readable description: step, parameter count and every leaf's shape."""
  leaves = jax.tree.leaves(state.params)
  n_params = sum(int(getattr(x, "size", 0)) for x in leaves)
  n_opt = sum(int(getattr(x, "size", 0)) for x in jax.tree.leaves(state.opt_state))
  try:
    step = int(state.step)
  except (TypeError, jax.errors.ConcretizationTypeError):  # abstract or traced
    step = _leaf_summary(state.step)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: f"  {jax.tree_util.keystr(p)}: {_leaf_summary(x)}", state.params)
  extra = "".join(
      f", {name}={sum(int(getattr(x, 'size', 0)) for x in jax.tree.leaves(tree)):,} values"
      for name, tree in (("value", state.value), ("token_state", state.token_state),
                         ("frozen", state.frozen))
      if tree is not None)
  lines = [f"TrainState(step={step}, params={n_params:,} values, opt_state={n_opt:,} values, "
           f"rng={_leaf_summary(state.rng)}{extra})"]
  lines += jax.tree.leaves(params)
  return "\n".join(lines)


def create_state(params: Params, tx: optax.GradientTransformation, seed: int | jax.Array, *,
                 value: Any = None, token_state: Any = None, frozen: Any = None) -> TrainState:
  """A fresh state at step 0: `tx.init(params)` and the key `jax.random.key(seed)`, plus the
  recipe's extra fields (`value`, `token_state`) and the frozen base of adapters (`frozen`) as
  given.

  `seed` may also be a typed key. Works under `jax.jit` (use `mesh.state_shardings` as
  `out_shardings` to create the optimizer state directly sharded) and under `jax.eval_shape`.
  """
  if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
    rng = seed
  else:
    rng = jax.random.key(seed)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=rng, value=value, token_state=token_state, frozen=frozen)


def step_rng(state: TrainState) -> jax.Array:
  """The PRNG key of the current step: `fold_in(state.rng, state.step)`."""
  return jax.random.fold_in(state.rng, state.step)

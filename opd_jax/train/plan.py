"""`plan`: will this train step fit? Lower and compile it for an N-device mesh from abstract shapes.

Nothing is allocated: parameters, optimizer state and batch are `jax.ShapeDtypeStruct`s carrying
their shardings, the step is jitted exactly as in training (`steps.jit_step`), lowered and compiled,
and XLA's `memory_analysis()` gives the per-device bytes of arguments, outputs, temporaries and
generated code. The total reported is arguments + outputs + temporaries + code - aliased (the
donated state is reused for the new state).

N devices must exist: on CPU, fake them with `XLA_FLAGS=--xla_force_host_platform_device_count=N`
set before jax is imported (the CLI re-executes itself with the flag). CPU numbers are a proxy for
TPU: same sharding, same shapes, but a different compiler backend (fusion and layout choices, and
thus temporaries, differ; arguments and outputs are exact).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp

from opd_jax.models import transformer
from opd_jax.models.config import ModelConfig
from opd_jax.models.sharding import DEFAULT_RULES, Rules, validate_rules
from opd_jax.optim.factory import OptimConfig, make_optimizer
from opd_jax.train import mesh as mesh_lib
from opd_jax.train import steps

STEP_KINDS = ("sft", "pg", "distill")
_GIB = float(1 << 30)


@dataclasses.dataclass(frozen=True)
class PlanSpec:
  """What to plan: the model, optimizer, step kind and global batch shape.

  Attributes:
    model: the trained model.
    optim: the optimizer config.
    step: 'sft', 'pg' or 'distill'.
    batch_size: global rows per train step (must divide over the mesh's batch axes).
    seq_len: tokens per row (prompt + response).
    step_cfg: the step's config (`SFTStepConfig` / `PGStepConfig` / `DistillStepConfig`; None:
      defaults).
    teacher: the teacher model (distill only; default: the student's config).
    rules: logical -> mesh axis rules.
    total_steps: optimizer updates (for schedules that need it).
  """

  model: ModelConfig
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  step: str = "pg"
  batch_size: int = 8
  seq_len: int = 512
  step_cfg: Any = None
  teacher: ModelConfig | None = None
  rules: Rules = DEFAULT_RULES
  total_steps: int = 1000

  def __post_init__(self):
    if self.step not in STEP_KINDS:
      raise ValueError(f"PlanSpec.step={self.step!r}; expected one of {STEP_KINDS}")
    object.__setattr__(self, "rules", validate_rules(self.rules))


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _abstract_batch(spec: PlanSpec, mesh, teacher: ModelConfig | None) -> dict:
  b, t = spec.batch_size, spec.seq_len
  fields = {"tokens_BxT": jnp.int32, "mask_BxT": jnp.bool_, "loss_mask_BxT": jnp.bool_}
  if spec.step == "pg":
    fields.update(old_logp_BxT=jnp.float32, adv_BxT=jnp.float32)
    if spec.step_cfg is not None and spec.step_cfg.kl_coef > 0:
      fields["ref_logp_BxT"] = jnp.float32
  return {k: jax.ShapeDtypeStruct((b, t), dt, sharding=mesh_lib.batch_sharding(mesh, 2, spec.rules))
          for k, dt in fields.items()}


def _step_fn_and_knobs(spec: PlanSpec, tx) -> tuple[Callable, dict]:
  graphdef = transformer.graphdef_for(spec.model)
  if spec.step == "sft":
    return steps.sft_step, dict(graphdef=graphdef, tx=tx,
                                cfg=spec.step_cfg or steps.SFTStepConfig())
  if spec.step == "pg":
    return steps.pg_step, dict(graphdef=graphdef, tx=tx, cfg=spec.step_cfg or steps.PGStepConfig())
  teacher = spec.teacher or spec.model
  return steps.distill_step, dict(graphdef=graphdef, teacher_graphdef=transformer.graphdef_for(
      teacher), tx=tx, cfg=spec.step_cfg or steps.DistillStepConfig())


def plan(spec: PlanSpec, n_devices: int | None = None, mesh_shape: Sequence[int] | None = None,
         *, axes: Sequence[str] = mesh_lib.AXES, print_fn: Callable[[str], None] | None = print
         ) -> dict:
  """Compiles the train step of `spec` for an `n_devices` mesh of `mesh_shape` (abstractly) and
  reports per-device memory.

  Args:
    spec: the model / optimizer / step / batch to plan.
    n_devices: number of devices (default: all); must not exceed `jax.device_count()`.
    mesh_shape: devices per mesh axis (one entry may be -1); default (1, n_devices, 1) (FSDP).
    axes: mesh axis names.
    print_fn: where the human-readable summary goes (None: silent).

  Returns:
    dict with the mesh, parameter count, compile seconds and per-device bytes: argument_bytes,
    output_bytes, temp_bytes, generated_code_bytes, alias_bytes, total_bytes (and *_gib).
  """
  available = jax.device_count()
  n = available if n_devices is None else int(n_devices)
  if n > available:
    raise RuntimeError(
        f"plan: {n} devices requested but this process has {available}. On CPU, fake them by "
        f"setting XLA_FLAGS=--xla_force_host_platform_device_count={n} in the environment BEFORE "
        "jax is imported (e.g. re-run the command with that variable; `opd-jax plan` does this "
        "itself).")
  shape = tuple(mesh_shape) if mesh_shape is not None else (1, n, 1)
  mesh_cfg = mesh_lib.MeshConfig(shape=shape, axes=tuple(axes), rules=spec.rules)
  mesh = mesh_lib.make_mesh(mesh_cfg, jax.devices()[:n])
  t0 = time.perf_counter()

  abstract_params = transformer.abstract_params(spec.model)
  p_shard = mesh_lib.param_shardings(spec.model, mesh, spec.rules)
  tx = make_optimizer(spec.optim, abstract_params, total_steps=spec.total_steps)
  s_shard = mesh_lib.state_shardings(tx, p_shard, abstract_params)
  abstract_state = mesh_lib.abstract_state(tx, abstract_params, s_shard)
  batch = _abstract_batch(spec, mesh, spec.teacher)
  fn, knobs = _step_fn_and_knobs(spec, tx)
  extra, extra_shardings = (), ()
  if spec.step == "distill":
    teacher = spec.teacher or spec.model
    t_shard = mesh_lib.param_shardings(teacher, mesh, spec.rules)
    extra = (_with_shardings(transformer.abstract_params(teacher), t_shard),)
    extra_shardings = (t_shard,)
  jitted = steps.jit_step(fn, mesh, s_shard, jax.tree.map(lambda x: x.sharding, batch),
                          extra_shardings=extra_shardings, rules=spec.rules, **knobs)
  lowered = jitted.lower(abstract_state, batch, *extra)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  out = {
      "step": spec.step,
      "n_devices": n,
      "mesh_shape": dict(zip(mesh.axis_names, mesh.devices.shape)),
      "num_params": spec.model.num_params,
      "batch_size": spec.batch_size,
      "seq_len": spec.seq_len,
      "lower_seconds": round(t1 - t0, 2),
      "compile_seconds": round(t2 - t1, 2),
  }
  names = ("argument", "output", "temp", "generated_code", "alias")
  for name in names:
    out[f"{name}_bytes"] = int(getattr(mem, f"{name}_size_in_bytes", 0) or 0) if mem else 0
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                        + out["generated_code_bytes"] - out["alias_bytes"])
  for name in names + ("total",):
    out[f"{name}_gib"] = out[f"{name}_bytes"] / _GIB
  if print_fn is not None:
    print_fn(format_plan(out))
  return out


def _human(n: int) -> str:
  for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if abs(n) >= size:
      return f"{n / size:10.2f} {unit} ({n:,} bytes)"
  return f"{n:10d} B"


def format_plan(result: dict) -> str:
  mesh = " x ".join(f"{k}={v}" for k, v in result["mesh_shape"].items())
  lines = [f"plan: {result['step']} step, {result['num_params']:,} params, global batch "
           f"{result['batch_size']} x {result['seq_len']} tokens, {result['n_devices']} devices "
           f"({mesh}); compiled in {result['compile_seconds']:.1f} s",
           "per-device memory (XLA memory analysis):"]
  for name in ("argument", "output", "temp", "generated_code", "alias"):
    lines.append(f"  {name:<15} {_human(result[f'{name}_bytes'])}")
  lines.append(f"  {'total':<15} {_human(result['total_bytes'])}  (argument + output + temp + "
               "code - alias)")
  return "\n".join(lines)

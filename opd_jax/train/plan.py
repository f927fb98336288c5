"""`plan`: will one training iteration fit? Compile each of its phases for an N-device mesh from
abstract shapes and add up the per-device memory.

    result = plan_run(run_plan.resolve(cfg, shapes_only=True), n_devices=64)

Nothing is allocated: every weight, optimizer moment, prompt and rollout array is a
`jax.ShapeDtypeStruct` carrying its sharding; each phase is the very jitted function the loop calls
(the same recipe, the same knobs), lowered and compiled, and XLA's `memory_analysis()` gives its
per-device bytes. One iteration of a rollout recipe (`rollout.generate`, then the step) is:

  resident   held for the whole run: the student's TrainState (params in their dtype, optimizer
             state, the recipe's extra fields: value head, token-transform state, step, rng), the
             teacher's params in their dtype (when the recipe needs a teacher), the frozen
             reference params (KL-to-reference). With adapters (`lora.rank > 0`) the state's
             params and optimizer are the adapters', the frozen base is its own component, and
             so is the merged policy the rollout phases read (base + adapters: counted as held
             for the whole iteration, an upper bound). With the live geometry monitor
             (`geometry.every > 0`) the initial student's weights and the monitor's bases, and a
             `live geometry monitor` phase. Counted exactly from the shardings.
  phases     run one after another, each with its own transient memory:
               sampler            `sampler._sample` of the behaviour policy (prefill + decode loop;
                                  its KV cache rows x (prompt + max_new - 1) is reported beside it,
                                  computed analytically)
               student re-scoring `scoring._token_logprobs` with the student (teacher-sampled
                                  rollouts, or `rollout.recompute_old_logp`)
               teacher scoring    `scoring._token_logprobs` with the teacher (OPD rewards)
               KL_t               `rollout._reverse_kl` (credit estimators that need it)
               reference scoring  `scoring._token_logprobs` with the frozen reference
               value head         `rollout._values` (GAE with a learned value head)
               train step         `recipe.jit_step` (state donated)
             A phase's transient bytes = XLA's arguments + outputs + temporaries + generated code -
             aliased (donated) bytes, minus the resident weights it takes as arguments: its
             temporaries, its outputs and its non-weight inputs (prompts, rollout arrays).
  total      resident + the largest phase's transient bytes (phases never overlap).

Beside each phase, analytic: `kv_cache_bytes` (sampler and scorers) and `attention_scores_bytes`,
the float32 scores one layer holds at once (`attention_score_shape`): one block x block pair of
the blocked attention when the train sequence is longer than the model's `attention_block`
(never [rows, H, T, T]), the prompt against its cache bucket for the sampler's prefill, the last
chunk against the bucketed cache for a scorer. Both are included in the XLA numbers, not added.

SFT plans only the train step. Not planned: the advantage computation (a few [rows, T] float32
arrays), eval sampling, host-side data.

N devices must exist: on CPU, fake them with `XLA_FLAGS=--xla_force_host_platform_device_count=N`
set before jax is imported (the CLI re-executes itself with the flag). CPU numbers are a proxy for
TPU: same sharding, same shapes, but a different compiler backend (fusion, layout and buffer
reuse choices, and thus temporaries, differ; arguments, outputs and the resident bytes are exact).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from opd_jax.models import attention as attention_lib
from opd_jax.models import sampler as sampler_lib
from opd_jax.models import scoring
from opd_jax.models import sharding as sharding_lib
from opd_jax.models import transformer
from opd_jax.models.config import ModelConfig
from opd_jax.optim.factory import make_optimizer
from opd_jax.train import collective_order
from opd_jax.train import mesh as mesh_lib
from opd_jax.train import run_plan as run_plan_lib

_GIB = float(1 << 30)
XLA_FIELDS = ("argument", "output", "temp", "generated_code", "alias")

# Display names, in the order they are printed.
RESIDENT_LABELS = {
    "student_params": "student params (or adapters)",
    "frozen_base": "frozen base params",
    "merged_policy": "merged policy (base + adapters)",
    "optimizer_state": "optimizer state",
    "state_extras": "state extras (step, rng, value head, token state)",
    "teacher_params": "teacher params",
    "reference_params": "reference params (frozen initial student)",
    "geometry_origin": "live geometry origin (initial student)",
    "geometry_bases": "live geometry bases (Sim_K)",
}
PHASE_LABELS = {
    "sampler": "sampler",
    "student_scoring": "student re-scoring",
    "teacher_scoring": "teacher scoring",
    "kl": "KL_t (student vs teacher)",
    "reference_scoring": "reference scoring",
    "value_head": "value head",
    "live_geometry": "live geometry monitor",
    "train_step": "train step",
}


# -- bytes ----------------------------------------------------------------------------------------
def device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of sharded `ShapeDtypeStruct`s / arrays (its shard of
  every leaf; the largest shard when they differ)."""
  total = 0
  for x in jax.tree.leaves(tree):
    s = getattr(x, "sharding", None)
    shape = s.shard_shape(x.shape) if s is not None else x.shape
    total += math.prod(shape) * x.dtype.itemsize  # typed PRNG keys report their key bytes
  return int(total)


def cache_bytes(model: ModelConfig, rows: int, length: int, mesh, rules) -> int:
  """Per-device bytes of a KV cache (`transformer.init_cache`: k and v of layers x rows x length
  x kv_heads x head_dim each, in the compute dtype), sharded by `transformer.CACHE_AXES` under
  `rules` as the sampler / scorer constrain it."""
  total = 0
  for name, shape in transformer.cache_shapes(model, rows, length).items():
    spec = sharding_lib.logical_to_spec(transformer.CACHE_AXES[name], rules, mesh.axis_names)
    total += math.prod(NamedSharding(mesh, spec).shard_shape(shape))
  return total * jnp.dtype(model.dtype).itemsize


def _sampler_cache_bytes(model: ModelConfig, rows: int, prompt_len: int, cfg, mesh, rules) -> int:
  """Per-device bytes of the KV caches one sampler call holds (`sampler.cache_shapes`: the decode
  cache of the batch or, for mode='continuous', of its decode slots, plus a shared prefill's)."""
  with jax.set_mesh(mesh), sharding_lib.axis_rules(rules):
    shards = sampler_lib._batch_shards()
  return sum(cache_bytes(model, r, length, mesh, rules)
             for r, length in sampler_lib.cache_shapes(rows, prompt_len, cfg, model, shards))


def attention_score_shape(model: ModelConfig, q_len: int, k_len: int, *, cache_len: int = 0,
                          q_start: int = 0) -> tuple[int, int]:
  """(queries, keys) of the largest attention-score block one layer holds at once.

  Without a cache (`cache_len` 0: training, `shifted_hidden`) a sequence longer than
  `model.attention_block` runs blocked (`attention.flash_attention`): one block x block pair at a
  time; otherwise the one-shot q_len x k_len scores. Through a cache of `cache_len` slots,
  `q_len` queries starting at slot `q_start` attend over the smallest cache bucket that covers
  slot q_start + q_len - 1 (`attention.cached_attention`)."""
  if not cache_len:
    block = attention_lib.flash_block(q_len, model.attention_block)
    return (block, block) if block < q_len else (q_len, k_len)
  need = q_start + q_len
  if model.cache_block <= 0 or cache_len <= model.cache_block:
    return q_len, cache_len
  lengths = attention_lib.bucket_lengths(cache_len, model.cache_block)
  return q_len, next((n for n in lengths if n >= need), cache_len)


def attention_score_bytes(model: ModelConfig, rows: int, q_len: int, k_len: int, mesh,
                          rules) -> int:
  """Per-device bytes of one float32 score block [rows, n_heads, q_len, k_len], sharded on the
  batch and heads axes as the attention activations are."""
  shape = (rows, model.n_heads, q_len, k_len)
  spec = sharding_lib.logical_to_spec(("batch", "act_heads", None, None), rules, mesh.axis_names)
  return 4 * math.prod(NamedSharding(mesh, spec).shard_shape(shape))


def _human(n: int) -> str:
  for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if abs(n) >= size:
      return f"{n / size:9.2f} {unit}"
  return f"{n:9d} B  "


# -- abstract inputs ------------------------------------------------------------------------------
def _sharded(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _abstract_params(model: ModelConfig, mesh, rules):
  return _sharded(transformer.abstract_params(model), mesh_lib.param_shardings(model, mesh, rules))


def _batch(shape, dtype, mesh, rules):
  return jax.ShapeDtypeStruct(shape, dtype,
                              sharding=mesh_lib.batch_sharding(mesh, len(shape), rules))


@dataclasses.dataclass
class _Phase:
  """One compiled phase: its XLA numbers and which resident trees it takes as arguments."""

  name: str
  model: str
  lower: Callable[[], Any]
  resident_args: tuple[str, ...]
  kv_cache_bytes: int = 0
  attention_scores_bytes: int = 0


def _compile(phase: _Phase, resident: dict[str, int]) -> dict:
  t0 = time.perf_counter()
  lowered = phase.lower()
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  out = {f"{k}_bytes": int(getattr(mem, f"{k}_size_in_bytes", 0) or 0) if mem else 0
         for k in XLA_FIELDS}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                        + out["generated_code_bytes"] - out["alias_bytes"])
  weights = sum(resident[k] for k in phase.resident_args)
  out["resident_args_bytes"] = weights
  out["transient_bytes"] = out["total_bytes"] - weights
  out["model"] = phase.model
  if phase.kv_cache_bytes:
    out["kv_cache_bytes"] = phase.kv_cache_bytes
  if phase.attention_scores_bytes:
    out["attention_scores_bytes"] = phase.attention_scores_bytes
  # Collective pairs whose launch order can differ between processes (`collective_order`; 0
  # for every phase where the programs order their collectives, see `plan_run`).
  out["unordered_collectives"] = len(
      collective_order.unordered_loop_collectives(compiled.as_text()))
  out["lower_seconds"] = round(t1 - t0, 2)
  out["compile_seconds"] = round(t2 - t1, 2)
  return out


def _make_mesh(n_devices, mesh_shape, axes, rules):
  available = jax.device_count()
  n = available if n_devices is None else int(n_devices)
  if n > available:
    raise RuntimeError(
        f"plan: {n} devices requested but this process has {available}. On CPU, fake them by "
        f"setting XLA_FLAGS=--xla_force_host_platform_device_count={n} in the environment BEFORE "
        "jax is imported (e.g. re-run the command with that variable; `opd-jax plan` does this "
        "itself).")
  shape = tuple(mesh_shape) if mesh_shape is not None else (1, n, 1)
  cfg = mesh_lib.MeshConfig(shape=shape, axes=tuple(axes), rules=rules)
  return mesh_lib.make_mesh(cfg, jax.devices()[:n])


def _step_extra_args(run_plan, teacher_params) -> tuple:
  """Further positional arguments of the recipe's jitted step: the teacher's params for the
  direct route and for CR-OPD (as `recipe.make_batch` passes them)."""
  if teacher_params is not None and run_plan.recipe.step_takes_teacher(run_plan):
    return (teacher_params,)
  return ()


# -- the plan -------------------------------------------------------------------------------------
def plan_run(run_plan, n_devices: int | None = None, mesh_shape: Sequence[int] | None = None, *,
             axes: Sequence[str] = mesh_lib.AXES,
             print_fn: Callable[[str], None] | None = print) -> dict:
  """Compiles every phase of one iteration of `run_plan` for an `n_devices` mesh and reports the
  per-device memory of each component (module docstring).

  Args:
    run_plan: a `run_plan.RunPlan` (`run_plan.resolve(cfg, shapes_only=True)`).
    n_devices: number of devices (default: all); must not exceed `jax.device_count()`.
    mesh_shape: devices per mesh axis (one entry may be -1); default (1, n_devices, 1) (FSDP).
    axes: mesh axis names.
    print_fn: where the human-readable breakdown goes (None: silent).

  Returns:
    dict: method, n_devices, mesh_shape, num_params (student), teacher_num_params, rows,
    prompt_len, max_new_tokens, seq_len; `resident` {component: bytes}; `phases` {phase: XLA
    numbers (argument/output/temp/generated_code/alias/total_bytes), resident_args_bytes,
    transient_bytes, kv_cache_bytes (sampler and scorers), unordered_collectives
    (`collective_order`; 0 for every phase when `collectives_ordered`), model,
    lower/compile_seconds}; collectives_ordered (the programs were compiled as a multi-process
    CPU run orders them: `sharding.ordered_collectives`);
    `components` (resident components and each phase's transient bytes, flat); resident_bytes,
    peak_phase, peak_phase_bytes, total_bytes (= resident_bytes + peak_phase_bytes), *_gib and
    compile_seconds (all phases).
  """
  from opd_jax.train import recipes as recipes_lib
  from opd_jax.train import rollout as rollout_lib

  cfg = run_plan.cfg
  recipe = run_plan.recipe
  rules = sharding_lib.validate_rules(cfg.mesh.rules)
  mesh = _make_mesh(n_devices, mesh_shape, axes, rules)
  run_plan_lib.check_divisible(run_plan, mesh, rules)
  t_start = time.perf_counter()

  # The student's TrainState, built as the loop builds it.
  student = run_plan.student
  graphdef = transformer.graphdef_for(student)
  abstract_params = transformer.abstract_params(student)
  p_shard = mesh_lib.param_shardings(student, mesh, rules)
  # Adapters (lora.rank > 0), as the loop builds them: the state's params and the optimizer are
  # the adapters'; the base is frozen in `state.frozen`; the rollout reads the merged policy.
  lora_cfg, frozen, merge = cfg.lora, {}, None
  if lora_cfg.enabled:
    from opd_jax.models import lora as lora_lib  # noqa: PLC0415
    frozen = {"abstract": abstract_params, "shardings": p_shard}
    abstract_params = lora_lib.abstract_adapters(student, lora_cfg)
    p_shard = mesh_lib.adapter_shardings(student, lora_cfg, mesh, rules)
    merge = mesh_lib.jit_merge(lora_cfg, frozen["shardings"])
  tx = make_optimizer(cfg.optim, abstract_params, total_steps=run_plan.total_updates)
  teacher_graphdef = teacher_params = None
  # Several routed teachers (`teachers.models`): tuples, one entry per teacher, each resident
  # and each scoring phase reported on its own (the scoring phases run one after another).
  routed = isinstance(run_plan.teacher, tuple)
  teacher_names = cfg.teachers.names if routed else ()
  if routed:
    teacher_graphdef = tuple(transformer.graphdef_for(t) for t in run_plan.teacher)
    teacher_params = tuple(_abstract_params(t, mesh, rules) for t in run_plan.teacher)
  elif run_plan.teacher is not None:
    teacher_graphdef = transformer.graphdef_for(run_plan.teacher)
    teacher_params = _abstract_params(run_plan.teacher, mesh, rules)
  token_tx = None
  if recipe.uses_rollouts and cfg.rollout.token_transforms:
    token_tx = rollout_lib.make_token_transform(cfg.rollout.token_transforms)
  knobs = recipe.rollout_knobs(run_plan)
  ctx = recipes_lib.RunContext(plan=run_plan, mesh=mesh, rules=rules, graphdef=graphdef, tx=tx,
                               teacher_graphdef=teacher_graphdef, token_tx=token_tx, knobs=knobs,
                               merge=merge)
  extras = jax.eval_shape(lambda: recipe.init_extras(ctx))
  s_shard = mesh_lib.state_shardings(tx, p_shard, abstract_params, **extras,
                                     frozen_shardings=frozen.get("shardings"))
  state = mesh_lib.abstract_state(tx, abstract_params, s_shard, **extras,
                                  frozen=frozen.get("abstract"))
  reference_params = (_abstract_params(run_plan.reference, mesh, rules)
                      if run_plan.reference is not None else None)

  resident = {"student_params": device_bytes(state.params),
              "optimizer_state": device_bytes(state.opt_state),
              "state_extras": device_bytes((state.step, state.rng, state.value,
                                            state.token_state))}
  # The student's full weights as the rollout reads them: the parameters, or with adapters the
  # merged base + adapters (`recipes.policy_params`), held from the merge through the rollout.
  # `policy_arg`: the resident component holding them (None: a transient merged copy).
  policy_params, policy_arg = state.params, "student_params"
  if frozen:
    resident["frozen_base"] = device_bytes(state.frozen)
    policy_params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                 frozen["abstract"], frozen["shardings"])
    policy_arg = None
  if frozen and recipe.uses_rollouts:
    resident["merged_policy"] = device_bytes(policy_params)
    policy_arg = "merged_policy"
  if routed:
    for name, tp in zip(teacher_names, teacher_params):
      resident[f"teacher_params/{name}"] = device_bytes(tp)
  elif teacher_params is not None:
    resident["teacher_params"] = device_bytes(teacher_params)
  teacher_args = tuple(k for k in resident if k.startswith("teacher_params"))
  if reference_params is not None:
    resident["reference_params"] = device_bytes(reference_params)
  state_args = ("student_params", "optimizer_state", "state_extras") + (
      ("frozen_base",) if frozen else ())

  phases: list[_Phase] = []
  rows = run_plan.rows

  def scores(model_cfg, q_len, k_len, **kw):
    return attention_score_bytes(model_cfg, rows, *attention_score_shape(model_cfg, q_len, k_len,
                                                                         **kw), mesh, rules)

  if recipe.uses_rollouts:
    p_len, n_new = run_plan.prompt_buckets[-1], run_plan.max_new_tokens
    t_len = p_len + n_new
    by_teacher = knobs.policy == "teacher"
    policy_cfg = run_plan.teacher if by_teacher else student
    policy = ((teacher_graphdef, teacher_params, "teacher_params") if by_teacher else
              (graphdef, policy_params, policy_arg))
    prompt = _batch((rows, p_len), jnp.int32, mesh, rules)
    prompt_mask = _batch((rows, p_len), jnp.bool_, mesh, rules)
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=mesh_lib.replicated(mesh))
    tokens = _batch((rows, t_len), jnp.int32, mesh, rules)
    mask = _batch((rows, t_len), jnp.bool_, mesh, rules)
    temp, static_temp = scoring._temperature_args(run_plan.sampler.temperature)
    chunk = knobs.chunk_size
    # The scorer's cache covers the sequence padded to whole chunks.
    c = min(chunk, t_len)
    score_len = -(-t_len // c) * c

    def under_mesh(fn):
      def lower():
        with jax.set_mesh(mesh):
          return fn()
      return lower

    phases.append(_Phase(
        "sampler", "teacher" if by_teacher else "student",
        under_mesh(lambda: sampler_lib._sample.lower(
            policy[0], policy[1], prompt, prompt_mask, rng, cfg=run_plan.sampler, rules=rules)),
        (policy[2],), _sampler_cache_bytes(policy_cfg, rows, p_len, run_plan.sampler, mesh,
                                           rules),
        # The prefill's scores: the prompt against the cache bucket that covers it.
        scores(policy_cfg, p_len, p_len,
               cache_len=sampler_lib.cache_length(p_len, n_new, policy_cfg))))

    def scorer(name, model_name, gd, params, model_cfg, arg):
      # The last chunk's scores: c queries against the whole (bucketed) cache.
      return _Phase(name, model_name, under_mesh(lambda: scoring._token_logprobs.lower(
          gd, params, tokens, mask, temp, static_temperature=static_temp, chunk_size=chunk,
          rules=rules)), (arg,), cache_bytes(model_cfg, rows, score_len, mesh, rules),
          scores(model_cfg, c, score_len, cache_len=score_len, q_start=score_len - c))

    if knobs.score_student and (by_teacher or knobs.recompute_old_logp):
      phases.append(scorer("student_scoring", "student", graphdef, policy_params, student,
                           policy_arg))
    each_teacher = (tuple(zip(teacher_names, teacher_graphdef, teacher_params,
                              run_plan.teacher)) if routed else
                    (("", teacher_graphdef, teacher_params, run_plan.teacher),))
    for name, t_gd, t_params, t_cfg in each_teacher:
      sfx, arg = (f"/{name}", f"teacher_params/{name}") if name else ("", "teacher_params")
      if knobs.uses_teacher_logp and not by_teacher:
        phases.append(scorer(f"teacher_scoring{sfx}", f"teacher{' ' + name if name else ''}",
                             t_gd, t_params, t_cfg, arg))
      if knobs.needs_kl:
        phases.append(_Phase(f"kl{sfx}", "student + teacher", under_mesh(
            lambda t_gd=t_gd, t_params=t_params: rollout_lib._reverse_kl.lower(
                graphdef, policy_params, t_gd, t_params, tokens, mask, mask,
                temperature=run_plan.sampler.temperature, chunk_size=chunk,
                rules=rules)), (policy_arg, arg)))
    if knobs.reference:
      phases.append(scorer("reference_scoring", "reference", graphdef, reference_params,
                           run_plan.reference, "reference_params"))
    if knobs.value_head:
      phases.append(_Phase("value_head", "student", under_mesh(
          lambda: rollout_lib._values.lower(graphdef, policy_params, state.value["params"],
                                            tokens, mask, rules=rules)),
          (policy_arg,)))

  if cfg.geometry.enabled:
    phases.append(_monitor_phase(cfg.geometry, mesh, resident, policy_params, policy_arg))

  batch = {k: _batch(v.shape, v.dtype, mesh, rules)
           for k, v in recipe.abstract_batch(run_plan).items()}
  extra = _step_extra_args(run_plan, teacher_params)
  step_fn = recipe.jit_step(ctx, s_shard)
  phases.append(_Phase("train_step", "student", lambda: step_fn.lower(state, batch, *extra),
                       state_args + (teacher_args if extra else ()),
                       attention_scores_bytes=scores(student, run_plan.seq_len, run_plan.seq_len)))

  # Student re-scoring and reference scoring run the same function on the same shapes: compile
  # once.
  # Single-process plans compile the programs as written (as a TPU runs them); under
  # `sharding.ordered_collectives()` as a multi-process CPU run does.
  with jax.set_mesh(mesh):
    collectives_ordered = sharding_lib.orders_collectives()
  results: dict[str, dict] = {}
  for ph in phases:
    if ph.name == "reference_scoring" and "student_scoring" in results:
      r = dict(results["student_scoring"])
      r["resident_args_bytes"] = resident["reference_params"]
      r["transient_bytes"] = r["total_bytes"] - r["resident_args_bytes"]
      r["model"], r["lower_seconds"], r["compile_seconds"] = ph.model, 0.0, 0.0
      results[ph.name] = r
    else:
      results[ph.name] = _compile(ph, resident)

  resident_bytes = sum(resident.values())
  peak = max(results, key=lambda k: results[k]["transient_bytes"])
  out = {
      "method": cfg.method,
      "n_devices": mesh.devices.size,
      "mesh_shape": dict(zip(mesh.axis_names, mesh.devices.shape)),
      "num_params": student.num_params,
      "param_dtype": student.param_dtype,
      "dtype": student.dtype,
      "teacher_num_params": (sum(t.num_params for t in run_plan.teacher) if routed else
                             run_plan.teacher.num_params if run_plan.teacher else None),
      "teacher_param_dtype": (run_plan.teacher[0].param_dtype if routed else
                              run_plan.teacher.param_dtype if run_plan.teacher else None),
      "rows": rows,
      "seq_len": run_plan.seq_len,
      "prompt_len": run_plan.prompt_buckets[-1] if recipe.uses_rollouts else None,
      "max_new_tokens": run_plan.max_new_tokens if recipe.uses_rollouts else None,
      "resident": resident,
      "phases": results,
      "components": {**resident, **{k: v["transient_bytes"] for k, v in results.items()}},
      "resident_bytes": resident_bytes,
      "peak_phase": peak,
      "peak_phase_bytes": results[peak]["transient_bytes"],
      "total_bytes": resident_bytes + results[peak]["transient_bytes"],
      "compile_seconds": round(sum(r["compile_seconds"] for r in results.values()), 2),
      "collectives_ordered": collectives_ordered,
      "wall_seconds": round(time.perf_counter() - t_start, 2),
  }
  if routed:
    # The teachers score one after another: the scoring peak is the largest teacher's, not the
    # sum (their weights are all resident).
    scoring_phases = [k for k in results if k.startswith(("teacher_scoring/", "kl/"))]
    out["teachers"] = {name: {"num_params": t.num_params, "param_dtype": t.param_dtype}
                       for name, t in zip(teacher_names, run_plan.teacher)}
    if scoring_phases:  # (the direct route computes the teachers inside the train step)
      out["teacher_scoring_bound_bytes"] = max(results[k]["transient_bytes"]
                                               for k in scoring_phases)
  for k in ("resident", "peak_phase", "total"):
    out[f"{k}_gib"] = out[f"{k}_bytes"] / _GIB
  if print_fn is not None:
    print_fn(format_plan(out))
  return out


def _monitor_phase(geo, mesh, resident: dict, full, full_arg: str | None) -> _Phase:
  """The live geometry monitor (`geometry.every`, `geometry/live.py`): it keeps the initial
  student's full weights and the previous point's bases resident (added to `resident`) and
  reads the student's full weights `full` at every point (`full_arg`: their resident component;
  None for an adapter run without a rollout, whose merged copy is the phase's own)."""
  from opd_jax.geometry import live as live_lib  # noqa: PLC0415
  replicated = mesh_lib.replicated(mesh)
  bases = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                       jax.eval_shape(lambda: live_lib.init_bases(full, geo)))
  resident["geometry_origin"] = device_bytes(full)
  resident["geometry_bases"] = device_bytes(bases)
  monitor = live_lib.make_monitor(geo, replicated=replicated)

  def lower():
    with jax.set_mesh(mesh):
      return monitor.lower(full, full, bases)

  return _Phase("live_geometry", "student", lower, ("geometry_origin", "geometry_bases") +
                ((full_arg,) if full_arg else ()))


def _params_str(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def format_plan(result: dict) -> str:
  """The human-readable breakdown of a `plan_run` result."""
  mesh = " x ".join(f"{k}={v}" for k, v in result["mesh_shape"].items())
  shape = (f"{result['rows']} rows x ({result['prompt_len']} prompt + {result['max_new_tokens']} "
           f"new) tokens" if result["prompt_len"] is not None else
           f"{result['rows']} rows x {result['seq_len']} tokens")
  models = (f"student {_params_str(result['num_params'])} params ({result['param_dtype']} "
            f"weights, {result['dtype']} compute)")
  if result.get("teachers"):
    models += ", teachers " + ", ".join(
        f"{name} {_params_str(t['num_params'])} ({t['param_dtype']} weights)"
        for name, t in result["teachers"].items())
  elif result["teacher_num_params"]:
    models += (f", teacher {_params_str(result['teacher_num_params'])} "
               f"({result['teacher_param_dtype']} weights)")
  lines = [f"plan: one {result['method']} iteration, {models}; {shape}; {result['n_devices']} "
           f"devices ({mesh}); {len(result['phases'])} phase"
           f"{'s' if len(result['phases']) > 1 else ''} compiled in "
           f"{result['compile_seconds']:.1f} s",
           "per-device memory:",
           "  resident (held across the iteration; exact, from the shardings)"]
  for k, label in RESIDENT_LABELS.items():
    if k in result["resident"]:
      lines.append(f"    {label:<48} {_human(result['resident'][k])}")
    elif k == "teacher_params":  # several teachers, one line each
      for name in result.get("teachers", {}):
        lines.append(f"    {'teacher params (' + name + ')':<48} "
                     f"{_human(result['resident'][f'teacher_params/{name}'])}")
  lines.append(f"    {'= resident':<48} {_human(result['resident_bytes'])}")
  lines.append("  phases (run one after another; XLA memory analysis: temporaries + outputs + "
               "non-weight inputs)")
  for k, r in result["phases"].items():
    base = k.split("/")[0]
    label = f"{PHASE_LABELS.get(base, base)} ({r['model']})"
    lines.append(f"    {label:<48} {_human(r['transient_bytes'])}   temp "
                 f"{_human(r['temp_bytes']).strip()}, compiled in {r['compile_seconds']:.1f} s")
    if result.get("collectives_ordered") and r.get("unordered_collectives"):
      lines.append(f"      {r['unordered_collectives']} loop(s) holding collectives unordered with "
                   "another collective: may hang on multi-process CPU (train/collective_order.py)")
    if r.get("kv_cache_bytes"):
      lines.append(f"      {'of which KV cache (analytic)':<46} {_human(r['kv_cache_bytes'])}")
    if r.get("attention_scores_bytes"):
      lines.append(f"      {'one layer attention-score block (analytic)':<46} "
                   f"{_human(r['attention_scores_bytes'])}")
  if "teacher_scoring_bound_bytes" in result:
    lines.append(f"  teacher scoring bound (the largest teacher's scoring; the teachers score one "
                 f"after another) {_human(result['teacher_scoring_bound_bytes']).strip()}")
  peak = result["peak_phase"]
  lines.append(f"  total = resident + the largest phase ({PHASE_LABELS.get(peak, peak)}) = "
               f"{_human(result['resident_bytes']).strip()} + "
               f"{_human(result['peak_phase_bytes']).strip()} = "
               f"{_human(result['total_bytes']).strip()} per device "
               f"({result['total_bytes']:,} bytes)")
  return "\n".join(lines)

"""One typed recipe per training method: what it needs, how a host batch becomes step inputs, and
its pure step.

    RECIPES = {'sft': SFT, 'opd': PG(teacher reward), 'rlvr': PG(verifier reward),
               'mixed': PG(both), 'distill': Distill}

`get(cfg)` is the only place a method name is looked up. Everything else asks the recipe:

  needs(cfg)              teacher weights, verifier, frozen reference policy, learned value head
  validate(cfg)           the method's config rules; settings the method would never read are
                          refused with a message naming the field (no silently ignored knob)
  uses_rollouts           prompts -> responses (PG, distill) or demonstrations (SFT)
  rows / updates_per_step global rows of one step; optimizer updates per step
  step_config(cfg)        the step's config with derived knobs filled in (one copy of each knob)
  rollout_knobs(plan)     the static settings of the rollout phases (`train.rollout`)
  abstract_batch(plan)    ShapeDtypeStructs of the step's batch (for `plan`)
  step_takes_teacher(plan)  whether the jitted step takes the teacher's params after the batch
  init_extras(ctx)        the recipe's TrainState fields (value head, token-transform state)
  jit_step(ctx, shardings)  the pure step jitted once with explicit shardings
  make_batch(ctx, state, host) -> (state, step_args, metrics)
                          host numpy batch -> device step inputs (the rollout for PG / distill)

Every recipe runs with LoRA / PiSSA adapters (`lora.rank > 0`, `models.lora`): the state's params
are then the adapters and `state.frozen` the base; the steps take `lora_scale` (`_lora_knobs`),
and the rollout, eval and snapshots read the merged policy (`policy_params`).

Off-policy training is a rollout policy of the PG recipes (`rollout.policy='teacher'`), not a
method. Adding a method means adding one entry to `RECIPES`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.train import steps as steps_lib
from opd_jax.train import timing


def _config_error(msg: str):
  from opd_jax.train.config import ConfigError  # config imports this module lazily
  return ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class Needs:
  """What a configured recipe needs besides the student.

  Attributes:
    teacher: teacher weights on the devices (log-ratio rewards, direct-route divergences, CR-OPD,
      or a teacher-sampled rollout).
    verifier: verifier rewards on the training rollouts.
    reference: the frozen initial student (KL-to-reference log-probs in the rollout).
    value_head: a learned value head in the train state (GAE-OPD with value='learned').
  """

  teacher: bool = False
  verifier: bool = False
  reference: bool = False
  value_head: bool = False


@dataclasses.dataclass
class RunContext:
  """What the loop built once per run, handed to the recipe's `make_batch` / `jit_step`.

  Attributes:
    plan: the `run_plan.RunPlan`.
    mesh / rules: the device mesh and logical-axis rules.
    graphdef: the student's graphdef.
    tx: the policy optimizer.
    teacher_graphdef / teacher_params: None when the recipe needs no teacher; tuples (one entry
      per teacher) with several routed teachers (`train.teachers`).
    teacher_route: with several teachers, int32 [N] the teacher index of every training example
      (`teachers.route_table`); None otherwise.
    reference_params: the frozen initial student (None unless needs.reference).
    verifier: training-reward verifier (None unless needs.verifier).
    tokenizer: decodes responses for the verifier.
    token_tx: token transforms over the OPD rewards (None without).
    knobs: the recipe's rollout knobs (`rollout_knobs(plan)`; None for SFT).
    clock: the loop's `timing.PhaseClock` (told when each phase is dispatched).
    to_device: host numpy batch (this process's rows) -> global device arrays.
    merge: with adapters, (base, adapters) -> merged full params (`mesh.jit_merge`), else None.
  """

  plan: Any
  mesh: Any
  rules: Any
  graphdef: Any
  tx: Any
  teacher_graphdef: Any = None
  teacher_params: Any = None
  teacher_route: np.ndarray | None = None
  reference_params: Any = None
  verifier: Any = None
  tokenizer: Any = None
  token_tx: Any = None
  knobs: Any = None
  clock: Any = dataclasses.field(default_factory=timing.NullClock)
  to_device: Callable[[Mapping[str, np.ndarray]], dict] | None = None
  merge: Callable | None = None


def policy_params(ctx: RunContext, state):
  """The student's full parameters: `state.params`, or with adapters the merged base + adapters
  (what the sampler, eval and snapshots read)."""
  if state.frozen is None:
    return state.params
  return ctx.merge(state.frozen, state.params)


def _lora_knobs(ctx: RunContext) -> dict:
  """The steps' adapter knob ({'lora_scale': alpha / r} with adapters, else none)."""
  lora_cfg = ctx.plan.cfg.lora
  return {"lora_scale": lora_cfg.scale} if lora_cfg.enabled else {}


# Optimizer transforms that read parameter names or full-matrix shapes: not meaningful on the
# adapter tree (`optim.factory.TRANSFORMS`).
_FULL_MATRIX_TRANSFORMS = ("subspace_projection", "freeze")


def _validate_lora(cfg) -> None:
  """Adapter settings: refused when unread (rank 0) or combined with full-matrix options."""
  from opd_jax.models import lora
  if not cfg.lora.enabled:
    default = lora.LoraConfig()
    for f in dataclasses.fields(lora.LoraConfig):
      if f.name != "rank" and getattr(cfg.lora, f.name) != getattr(default, f.name):
        raise _config_error(f"config.lora.{f.name}={getattr(cfg.lora, f.name)!r} has no effect "
                            "with lora.rank=0 (no adapters); set lora.rank or remove the override")
    return
  why = (f"with lora.rank={cfg.lora.rank} the optimizer updates the adapters, not the full "
         "matrices it constrains; remove it or set lora.rank=0")
  for t in cfg.optim.transforms:
    if t.name in _FULL_MATRIX_TRANSFORMS:
      raise _config_error(f"config.optim.transforms has {t.name!r}: {why}")
  for name in ("origin", "at"):
    if getattr(cfg.subspace, name):
      raise _config_error(f"config.subspace.{name}={getattr(cfg.subspace, name)!r}: {why}")


# -- config rules shared by the recipes -----------------------------------------------------------
def _path_get(obj, path: str):
  for part in path.split("."):
    obj = getattr(obj, part)
  return obj


def _defaults():
  from opd_jax.train.config import TrainConfig
  return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _refuse_set(cfg, unread, when: str) -> None:
  """Refuses a non-default value at any of the dotted `unread` paths (sections or fields): one
  line 'config.<path>=<value> has no effect with <when>; ...' that says the value may come from
  the preset (a one-flag change to a preset can turn a setting of the preset off)."""
  defaults = _defaults()
  for path in unread:
    head, _, rest = path.partition(".")
    default = defaults[head] if not rest else _path_get(defaults[head], rest)
    value = _path_get(cfg, path)
    if value != default:
      while dataclasses.is_dataclass(value):  # name the first differing leaf of a section
        field = next(f.name for f in dataclasses.fields(value)
                     if getattr(value, f.name) != getattr(default, f.name))
        path, value, default = f"{path}.{field}", getattr(value, field), getattr(default, field)
      raise _config_error(f"config.{path}={value!r} has no effect with {when}; remove the "
                          f"override, or set {path}={default!r} if the preset sets it")


def _refuse_unread(cfg, name: str, unread, why: str) -> None:
  """Refuses a non-default value at any of the dotted `unread` paths (sections or fields) that
  method `name` never reads."""
  _refuse_set(cfg, unread, f"method={name!r} ({why})")


def _validate_switches(cfg) -> None:
  """Knobs of a feature that its switch turns off (every method): set while off, refused."""
  if cfg.optim.schedule == "constant":
    _refuse_set(cfg, ("optim.final_lr",), "optim.schedule='constant' (only 'cosine' decays to "
                "final_lr)")
  if not cfg.geometry.enabled:
    _refuse_set(cfg, ("geometry",), "geometry.every=0 (the live geometry monitor is off)")
  if not cfg.subspace.at:
    _refuse_set(cfg, ("subspace.k",), "subspace.at='' (no subspace bases are captured)")
  if cfg.loop.eval_greedy:
    _refuse_set(cfg, ("loop.eval_k", "loop.eval_temperature"),
                "loop.eval_greedy=True (greedy eval takes one argmax sample per prompt)")
  if cfg.sampler.mode != "continuous":
    _refuse_set(cfg, ("sampler.slots",), f"sampler.mode={cfg.sampler.mode!r} (only "
                "'continuous' decodes in slots)")
  if cfg.sampler.mode == "static":
    _refuse_set(cfg, ("sampler.min_bucket",), "sampler.mode='static' (one decode batch, no "
                "smaller buckets)")


def _batch_fields(rows: int, seq: int, fields: Mapping[str, Any]) -> dict:
  return {k: jax.ShapeDtypeStruct((rows, seq), dt) for k, dt in fields.items()}


_SFT_BATCH = {"tokens_BxT": jnp.int32, "mask_BxT": jnp.bool_, "loss_mask_BxT": jnp.bool_}


# -- recipes --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Recipe:
  """Base of the recipes (module docstring lists the interface)."""

  name: str
  uses_rollouts: ClassVar[bool] = True

  def needs(self, cfg) -> Needs:
    raise NotImplementedError

  def validate(self, cfg) -> None:
    _validate_lora(cfg)
    _validate_switches(cfg)
    needs = self.needs(cfg)
    several = bool(cfg.teachers.models)
    if needs.teacher and cfg.teacher.source == "none" and not several:
      raise _config_error(
          f"method={self.name!r} (rollout.policy={cfg.rollout.policy!r}) needs a teacher: set "
          "teacher.source to 'random', 'hf' or 'checkpoint' (or pass teacher_params to loop.run)")
    if not needs.teacher:
      _refuse_unread(cfg, self.name, ("teacher", "teachers"), "it uses no teacher")
    if several:
      if cfg.teacher.source != "none":
        raise _config_error(f"config.teacher.source={cfg.teacher.source!r} and config.teachers."
                            "models are both set: a run has one teacher or routed teachers; set "
                            "teacher.source='none'")
      if cfg.rollout.policy != "student":
        raise _config_error("config.rollout.policy='teacher' samples with one teacher; with "
                            "several teachers (teachers.models) the student samples")
      if getattr(cfg.pg, "needs_teacher", False):
        raise _config_error(f"config.pg.cr.coef={cfg.pg.cr.coef!r}: CR-OPD's teacher-support "
                            "term reads one teacher; it is not available with teachers.models")
    if self.uses_rollouts:
      _refuse_unread(cfg, self.name, ("data.pack",), "only method='sft' packs examples; "
                     "rollout prompts are not packed")

  def rows(self, cfg) -> int:
    return cfg.loop.batch_size * (cfg.rollout.group_size if self.uses_rollouts else 1)

  def updates_per_step(self, cfg) -> int:
    return 1

  def step_config(self, cfg):
    raise NotImplementedError

  def rollout_knobs(self, plan):
    return None

  def abstract_batch(self, plan) -> dict:
    return _batch_fields(plan.rows, plan.seq_len, _SFT_BATCH)

  def step_takes_teacher(self, plan) -> bool:
    return False

  def init_extras(self, ctx) -> dict:
    """The recipe's TrainState fields ({'value': ..., 'token_state': ...}; None when unused)."""
    return {"value": None, "token_state": None}

  def jit_step(self, ctx, state_shardings):
    raise NotImplementedError

  def make_batch(self, ctx, state, host: Mapping[str, np.ndarray]):
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SFT(Recipe):
  """Token NLL on demonstrations (`sft_step`)."""

  uses_rollouts: ClassVar[bool] = False

  def needs(self, cfg) -> Needs:
    return Needs()

  def validate(self, cfg) -> None:
    from opd_jax.data import chat
    super().validate(cfg)
    is_chat = cfg.data.source == "file" and cfg.data.layout in chat.LAYOUTS
    if cfg.data.source == "file" and cfg.data.layout != "math" and not is_chat:
      raise _config_error(f"method='sft' needs worked solutions; data.layout="
                          f"{cfg.data.layout!r} has none (use source='task', the 'math' layout or "
                          f"a chat layout {sorted(chat.LAYOUTS)})")
    if is_chat:
      _refuse_unread(cfg, self.name, ("data.max_prompt_tokens",),
                     "chat rows are limited by the largest data.sft_buckets")
      if cfg.data.eval_path:
        raise _config_error(f"config.data.eval_path={cfg.data.eval_path!r}: chat layout "
                            f"{cfg.data.layout!r} rows carry no answers to verify; remove it")
    unread = ("rollout", "pg", "distill", "credit", "grpo")
    if not cfg.loop.eval_every:
      unread += ("sampler",)
    _refuse_unread(cfg, self.name, unread, "SFT reads the sft section and trains on "
                   "demonstrations")
    # With eval on, the sampler section serves eval alone: it samples at loop.eval_temperature,
    # and greedy eval applies no top-k / top-p truncation.
    sampling = ("sampler.temperature",) + (("sampler.top_k", "sampler.top_p")
                                           if cfg.loop.eval_greedy else ())
    _refuse_unread(cfg, self.name, sampling, "SFT samples no rollouts; its eval samples at "
                   "loop.eval_temperature" + (", greedily" if cfg.loop.eval_greedy else ""))

  def step_config(self, cfg):
    return cfg.sft

  def abstract_batch(self, plan) -> dict:
    fields = dict(_SFT_BATCH)
    if plan.cfg.data.pack:
      fields["segment_ids_BxT"] = jnp.int32
    return _batch_fields(plan.rows, plan.seq_len, fields)

  def jit_step(self, ctx, state_shardings):
    from opd_jax.train import mesh as mesh_lib
    return steps_lib.jit_step(
        steps_lib.sft_step, ctx.mesh, state_shardings, mesh_lib.batch_sharding(ctx.mesh, 2,
                                                                              ctx.rules),
        rules=ctx.rules, graphdef=ctx.graphdef, tx=ctx.tx, cfg=ctx.plan.step_cfg,
        **_lora_knobs(ctx))

  def make_batch(self, ctx, state, host):
    from opd_jax.models import scoring
    scoring.check_tokens_host(host["tokens_BxT"], ctx.plan.student.vocab_size, host["mask_BxT"])
    fields = steps_lib.SFT_FIELDS + (("segment_ids_BxT",) if ctx.plan.cfg.data.pack else ())
    return state, (ctx.to_device({k: host[k] for k in fields}),), {}


def verifier_reasons(cfg) -> tuple[str, ...]:
  """The reason set of the config's verifier (static: it names the per-reason metrics)."""
  from opd_jax.data import verifiers
  return {"exact_match": verifiers.MATCH_REASONS, "math": verifiers.MathVerifier.REASONS,
          "code": verifiers.CodeVerifier.REASONS,
          "task": verifiers.TaskVerifier.REASONS}[cfg.data.verifier]


def _prompts(ctx, host):
  """Validates this process's prompt rows on the host, then places them as global arrays."""
  from opd_jax.models import sampler as sampler_lib
  sampler_lib.check_prompts_host(host["prompt_tokens_BxP"], host["prompt_mask_BxP"],
                                 ctx.plan.student.vocab_size)
  rows = {k: host[k] for k in ("prompt_tokens_BxP", "prompt_mask_BxP", "valid_B")}
  if ctx.teacher_route is not None:  # several teachers: each row's, from its example index
    from opd_jax.train import teachers as teachers_lib
    rows["teacher_id_B"] = teachers_lib.teacher_ids(ctx.teacher_route, host["example_idx_B"])
  return ctx.to_device(rows)


def _teacher_shardings(ctx):
  """Shardings of the teacher params (a tuple of them with several teachers)."""
  from opd_jax.train import mesh as mesh_lib
  if isinstance(ctx.plan.teacher, tuple):
    return tuple(mesh_lib.param_shardings(t, ctx.mesh, ctx.rules) for t in ctx.plan.teacher)
  return mesh_lib.param_shardings(ctx.plan.teacher, ctx.mesh, ctx.rules)


@dataclasses.dataclass(frozen=True)
class PG(Recipe):
  """Policy-gradient route (`pg_step`): the rollout's per-token advantages come from the teacher's
  log-ratio (OPD), the verifier (RLVR, GRPO groups), or both (mixed: alpha A_OPD + (1 - alpha)
  A_RLVR)."""

  teacher_reward: bool = True
  verifier_reward: bool = False

  def needs(self, cfg) -> Needs:
    learned = (self.teacher_reward and cfg.credit.kind == "gae" and cfg.credit.value == "learned")
    return Needs(
        teacher=(self.teacher_reward or cfg.rollout.policy == "teacher"
                 or cfg.pg.needs_teacher),
        verifier=self.verifier_reward, reference=cfg.pg.kl_coef > 0, value_head=learned)

  def validate(self, cfg) -> None:
    super().validate(cfg)
    unread = ["sft", "distill"]
    if not self.teacher_reward:
      unread += ["credit", "rollout.token_transforms"]
    else:
      c = cfg.credit
      if c.kind != "gae":
        unread += ["credit.value", "credit.lam"]
      if c.kind not in ("gae", "discounted"):
        unread += ["credit.gamma"]
    if not self.verifier_reward:
      unread += ["grpo"]
    if not (self.teacher_reward and self.verifier_reward):
      unread += ["rollout.mix_alpha"]
    if cfg.pg.kl_coef == 0:
      unread += ["pg.kl_kind"]
    # (rollout.recompute_old_logp with policy='teacher' is consistent, not refused: the student
    # always re-scores the teacher's samples.)
    if not self.needs(cfg).value_head:
      unread += ["pg.value_coef", "pg.value_lr"]
    _refuse_unread(cfg, self.name, tuple(unread), self._why())
    if cfg.pg.pg.kind != "ppo_clip":
      _refuse_set(cfg, ("pg.pg.eps_low", "pg.pg.eps_high"),
                  f"pg.pg.kind={cfg.pg.pg.kind!r} (only 'ppo_clip' clips the ratio)")
    if not cfg.pg.cr.enabled:
      _refuse_set(cfg, ("pg.cr",), "pg.cr.coef=0 (CR-OPD off)")
    if self.verifier_reward and cfg.rollout.group_size < 2:
      raise _config_error(f"method={self.name!r} needs rollout.group_size >= 2 (GRPO groups)")
    if cfg.pg.needs_teacher and not self.teacher_reward:
      raise _config_error(f"config.pg.cr.coef={cfg.pg.cr.coef}: CR-OPD routes the mass of "
                          f"negatively rewarded tokens by the teacher; method={self.name!r} has "
                          "no teacher reward")

  def _why(self) -> str:
    parts = ([] if not self.teacher_reward else ["teacher log-ratio rewards"]) + (
        [] if not self.verifier_reward else ["verifier rewards"])
    return "it trains on " + " and ".join(parts)

  def updates_per_step(self, cfg) -> int:
    return cfg.pg.epochs * cfg.pg.minibatches

  def step_config(self, cfg):
    return dataclasses.replace(cfg.pg, temperature=cfg.sampler.temperature,
                               value_head=self.needs(cfg).value_head)

  def rollout_knobs(self, plan):
    from opd_jax.train import rollout as rollout_lib
    cfg = plan.cfg
    needs = self.needs(cfg)
    return rollout_lib.RolloutKnobs(
        teacher_reward=self.teacher_reward, verifier_reward=self.verifier_reward,
        policy=cfg.rollout.policy, sampler=plan.sampler, credit=cfg.credit,
        group_size=cfg.rollout.group_size, normalize_std=cfg.grpo.normalize_std,
        grpo_eps=cfg.grpo.eps, ddof=cfg.grpo.ddof,
        mix_alpha=cfg.rollout.mix_alpha if self.teacher_reward and self.verifier_reward else None,
        chunk_size=cfg.rollout.chunk_size, recompute_old_logp=cfg.rollout.recompute_old_logp,
        reference=needs.reference, value_head=needs.value_head,
        verifier_reasons=verifier_reasons(cfg) if self.verifier_reward else (),
        teacher_names=cfg.teachers.names if self.teacher_reward else ())

  def abstract_batch(self, plan) -> dict:
    fields = dict(_SFT_BATCH, old_logp_BxT=jnp.float32, adv_BxT=jnp.float32)
    needs = self.needs(plan.cfg)
    if needs.reference:
      fields["ref_logp_BxT"] = jnp.float32
    if needs.value_head:
      fields["returns_BxT"] = jnp.float32
    return _batch_fields(plan.rows, plan.seq_len, fields)

  def step_takes_teacher(self, plan) -> bool:
    return plan.step_cfg.needs_teacher  # CR-OPD

  def init_extras(self, ctx) -> dict:
    cfg = ctx.plan.cfg
    value = None
    if self.needs(cfg).value_head:
      value = steps_lib.init_value(ctx.plan.step_cfg, ctx.plan.student.d_model)
    token_state = None
    if ctx.token_tx is not None:
      token_state = ctx.token_tx.init(jnp.zeros((1, 1), jnp.float32))
    return {"value": value, "token_state": token_state}

  def jit_step(self, ctx, state_shardings):
    from opd_jax.train import mesh as mesh_lib
    step_cfg = ctx.plan.step_cfg
    knobs = dict(graphdef=ctx.graphdef, tx=ctx.tx, cfg=step_cfg, **_lora_knobs(ctx))
    extra = ()
    if self.needs(ctx.plan.cfg).value_head:
      knobs["value_tx"] = steps_lib.make_value_tx(step_cfg)
    if self.step_takes_teacher(ctx.plan):
      knobs["teacher_graphdef"] = ctx.teacher_graphdef
      extra = (mesh_lib.param_shardings(ctx.plan.teacher, ctx.mesh, ctx.rules),)
    return steps_lib.jit_step(steps_lib.pg_step, ctx.mesh, state_shardings,
                              mesh_lib.batch_sharding(ctx.mesh, 2, ctx.rules),
                              extra_shardings=extra, rules=ctx.rules, **knobs)

  def make_batch(self, ctx, state, host):
    from opd_jax.train import rollout as rollout_lib
    knobs = ctx.knobs
    prompts = _prompts(ctx, host)
    value_params = state.value["params"] if state.value is not None else None
    ro = rollout_lib.generate(ctx.graphdef, policy_params(ctx, state), ctx.teacher_graphdef,
                              ctx.teacher_params, prompts["prompt_tokens_BxP"],
                              prompts["prompt_mask_BxP"],
                              rollout_lib.rollout_rng(state.rng, state.step), knobs,
                              reference_params=ctx.reference_params, value_params=value_params,
                              clock=ctx.clock, teacher_id_B=prompts.get("teacher_id_B"))
    seq_rewards = None
    if self.verifier_reward:
      t0 = time.perf_counter()
      # The documented host round trip of RLVR: responses are decoded and verified on the host
      # (each process its own rows), then the scores go back as a global array.
      scores, reason_ids = rollout_lib.verify(ctx.tokenizer, ctx.verifier, ro, host["answer_B"])
      dev = ctx.to_device({"rewards_B": scores, "reason_ids_B": reason_ids})
      seq_rewards, reason_ids = dev["rewards_B"], dev["reason_ids_B"]
      ctx.clock.host("verify", t0)
    else:
      reason_ids = None
    batch, token_state, metrics = rollout_lib.advantages(
        ro, prompts["valid_B"], seq_rewards, state.token_state, knobs, ctx.token_tx,
        reason_ids_B=reason_ids)
    ctx.clock.device("advantages", batch)
    state = state.replace(token_state=token_state)
    args = (batch, ctx.teacher_params) if self.step_takes_teacher(ctx.plan) else (batch,)
    return state, args, metrics


@dataclasses.dataclass(frozen=True)
class Distill(Recipe):
  """Direct route (`distill_step`): a divergence between teacher and student distributions on the
  student's rollouts."""

  def needs(self, cfg) -> Needs:
    return Needs(teacher=True)

  def validate(self, cfg) -> None:
    super().validate(cfg)
    _refuse_unread(cfg, self.name, ("sft", "pg", "credit", "grpo", "rollout.mix_alpha",
                                    "rollout.token_transforms", "rollout.recompute_old_logp"),
                   "the direct route reads the distill section")

  def step_config(self, cfg):
    return cfg.distill

  def step_takes_teacher(self, plan) -> bool:
    return True

  def abstract_batch(self, plan) -> dict:
    fields = dict(_SFT_BATCH)
    if plan.cfg.teachers.models:
      fields["teacher_id_BxT"] = jnp.int32
    return _batch_fields(plan.rows, plan.seq_len, fields)

  def rollout_knobs(self, plan):
    from opd_jax.train import rollout as rollout_lib
    cfg = plan.cfg
    return rollout_lib.RolloutKnobs(
        teacher_reward=False, verifier_reward=False, policy=cfg.rollout.policy,
        sampler=plan.sampler, group_size=cfg.rollout.group_size,
        chunk_size=cfg.rollout.chunk_size, score_student=False,
        teacher_names=cfg.teachers.names)

  def jit_step(self, ctx, state_shardings):
    from opd_jax.train import mesh as mesh_lib
    names = {"teacher_names": ctx.knobs.teacher_names} if ctx.knobs.teacher_names else {}
    return steps_lib.jit_step(
        steps_lib.distill_step, ctx.mesh, state_shardings,
        mesh_lib.batch_sharding(ctx.mesh, 2, ctx.rules), rules=ctx.rules,
        extra_shardings=(_teacher_shardings(ctx),),
        graphdef=ctx.graphdef, teacher_graphdef=ctx.teacher_graphdef, tx=ctx.tx,
        cfg=ctx.plan.step_cfg, **_lora_knobs(ctx), **names)

  def make_batch(self, ctx, state, host):
    from opd_jax.train import rollout as rollout_lib
    prompts = _prompts(ctx, host)
    ro = rollout_lib.generate(ctx.graphdef, policy_params(ctx, state), ctx.teacher_graphdef,
                              ctx.teacher_params, prompts["prompt_tokens_BxP"],
                              prompts["prompt_mask_BxP"],
                              rollout_lib.rollout_rng(state.rng, state.step), ctx.knobs,
                              clock=ctx.clock, teacher_id_B=prompts.get("teacher_id_B"))
    batch, metrics = rollout_lib.distill_batch(ro, prompts["valid_B"],
                                               teacher_names=ctx.knobs.teacher_names)
    return state, (batch, ctx.teacher_params), metrics


RECIPES: dict[str, Recipe] = {
    "sft": SFT("sft"),
    "opd": PG("opd", teacher_reward=True, verifier_reward=False),
    "rlvr": PG("rlvr", teacher_reward=False, verifier_reward=True),
    "mixed": PG("mixed", teacher_reward=True, verifier_reward=True),
    "distill": Distill("distill"),
}
METHODS = tuple(RECIPES)


def get(cfg_or_method) -> Recipe:
  """The recipe of a TrainConfig (or of a method name)."""
  method = cfg_or_method if isinstance(cfg_or_method, str) else cfg_or_method.method
  if method not in RECIPES:
    raise _config_error(f"config.method={method!r}: expected one of {METHODS}")
  return RECIPES[method]

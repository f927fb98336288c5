"""The training loop: `run(config, workdir) -> summary`, for the CLI, Colab and the study.

One loop serves every method (`TrainConfig.method`):

    data (grain) --> SFT batch -----------------------------------------> sft_step
                 +-> prompts -> rollout.generate -> [verify, host] -> rollout.advantages -> pg_step
                                                 +-> (direct route) --------------------> distill_step

then metrics (computed in jit, fetched one step late), periodic eval (verifier accuracy, avg@k),
parameter snapshots at `loop.snapshot_steps` (kept apart from the rolling checkpoints, for trajectory
diagnostics), rolling checkpoints every `loop.checkpoint_every` steps and at the end.

Exact resume: a checkpoint holds the TrainState (params, opt_state, the base RNG key and the step:
all per-step randomness is `fold_in(key, step)`), the data-iterator state and the token-transform
state (in the checkpoint's JSON meta). `run(..., resume=True)` continues from the latest checkpoint;
the parameters after N steps are bit-identical to a straight run (CPU).

Non-finite guard: every step reports `train/loss_finite`. Metrics are fetched one step late, so
before a checkpoint or snapshot is written the loop fetches the current step's metrics first: a
non-finite step is never saved. The run stops with `NonFiniteLossError` naming the step; the last
checkpoint on disk is from an earlier, finite step.

Layout of `workdir`: `config.json`, `metrics.jsonl` (+ `tb/` TensorBoard), `checkpoints/<step>/`,
`snapshots/<step>/`, `summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.data import datasets as datasets_lib
from opd_jax.data import pipeline as pipeline_lib
from opd_jax.data import tasks as tasks_lib
from opd_jax.data import tokenizer as tokenizer_lib
from opd_jax.data import verifiers
from opd_jax.models import hf
from opd_jax.models import sampler as sampler_lib
from opd_jax.models import sharding
from opd_jax.models import transformer
from opd_jax.models.config import ModelConfig
from opd_jax.optim import factory
from opd_jax.train import checkpoint as ckpt_lib
from opd_jax.train import config as config_lib
from opd_jax.train import mesh as mesh_lib
from opd_jax.train import metrics as metrics_lib
from opd_jax.train import rollout as rollout_lib
from opd_jax.train import steps as steps_lib
from opd_jax.train.config import ModelSpec, TrainConfig
from opd_jax.train.state import TrainState

NUMERIC_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat")


class NonFiniteLossError(RuntimeError):
  """The loss (or gradient norm) of a step was not finite; the run stopped there."""

  def __init__(self, step: int, metrics: Mapping[str, float], last_checkpoint: int | None,
               checkpoint_dir: str):
    self.step = step
    self.metrics = dict(metrics)
    self.last_checkpoint = last_checkpoint
    where = (f"the last good checkpoint is step {last_checkpoint} in {checkpoint_dir}"
             if last_checkpoint is not None else "no checkpoint was written yet")
    super().__init__(
        f"non-finite loss at step {step} (train/loss={metrics.get('train/loss')}, "
        f"train/grad_norm={metrics.get('train/grad_norm')}); stopping. Nothing from step {step} "
        f"was saved; {where} (resume from it with resume=True / --resume after fixing the cause).")


# -- set-up helpers -------------------------------------------------------------------------------
def load_model(spec: ModelSpec, mesh, rules, *, params=None, what: str = "student"
               ) -> tuple[ModelConfig, Any, dict]:
  """(cfg, graphdef, params) of a model spec, params placed with the mesh's param shardings.

  `params` (in memory) replace the spec's source; their shapes must match the spec's model (for
  'hf' / 'checkpoint' sources, the architecture recorded there).
  """
  numerics = {f: getattr(spec.model, f) for f in NUMERIC_FIELDS}
  if spec.source == "random" or (params is not None and spec.source in ("random", "none")):
    cfg = spec.model
  elif spec.source == "hf":
    cfg = hf.config_from_hf(spec.path, **numerics)
  elif spec.source == "checkpoint":
    meta_cfg = _checkpoint_model_config(ckpt_lib.resolve_step_dir(spec.path))
    cfg = (meta_cfg if meta_cfg is not None else spec.model).replace(**numerics)
  else:
    raise ValueError(f"{what}: source 'none' has no model")
  shardings = mesh_lib.param_shardings(cfg, mesh, rules)
  graphdef = transformer.graphdef_for(cfg)
  if params is not None:
    _check_shapes(cfg, params, f"{what} params passed in memory")
    params = mesh_lib.reshard(_cast(params, cfg), shardings)
  elif spec.source == "random":
    _, params = mesh_lib.init_sharded_params(cfg, mesh, rules, spec.seed)
  elif spec.source == "hf":
    _, params = hf.load(spec.path, cfg=cfg, mesh=mesh, rules=rules)
    params = mesh_lib.reshard(params, shardings)
  else:
    params = ckpt_lib.load_params(spec.path, shardings=shardings)
    _check_shapes(cfg, params, f"{what} checkpoint {spec.path}")
    params = mesh_lib.reshard(_cast(params, cfg), shardings)
  return cfg, graphdef, params


def _checkpoint_model_config(step_dir) -> ModelConfig | None:
  meta_dir = pathlib.Path(step_dir) / ckpt_lib.META
  if not meta_dir.is_dir():
    return None
  for f in sorted(meta_dir.iterdir()):
    if f.is_file() and not f.name.startswith("."):
      try:
        meta = json.loads(f.read_text())
      except (ValueError, UnicodeDecodeError):
        continue
      if "model_config" in meta:
        return ckpt_lib.model_config_from_dict(meta["model_config"])
  return None


def _cast(params, cfg: ModelConfig):
  dtype = jnp.dtype(cfg.param_dtype)
  return jax.tree.map(lambda x: x if x.dtype == dtype else x.astype(dtype), params)


def _check_shapes(cfg: ModelConfig, params, what: str) -> None:
  want = transformer.abstract_params(cfg)
  want_paths = {jax.tree_util.keystr(p): x.shape
                for p, x in jax.tree_util.tree_leaves_with_path(want)}
  got_paths = {jax.tree_util.keystr(p): tuple(np.shape(x))
               for p, x in jax.tree_util.tree_leaves_with_path(params)}
  problems = [f"{k}: missing" for k in want_paths if k not in got_paths]
  problems += [f"{k}: unexpected" for k in got_paths if k not in want_paths]
  problems += [f"{k}: shape {got_paths[k]} != expected {v}" for k, v in want_paths.items()
               if k in got_paths and tuple(got_paths[k]) != tuple(v)]
  if problems:
    raise ValueError(f"{what} do not match the model config: " + "; ".join(problems[:8]))


def load_tokenizer(cfg: TrainConfig):
  if cfg.data.tokenizer:
    return tokenizer_lib.load_tokenizer(cfg.data.tokenizer)
  return tokenizer_lib.build_task_tokenizer()


def load_examples(cfg: TrainConfig, tokenizer) -> tuple[list, list]:
  """(train examples, eval examples) of the data config."""
  d = cfg.data
  if d.source == "task":
    train = tasks_lib.generate(d.task, "train", d.train_examples, seed=d.data_seed)
    evals = tasks_lib.generate(d.task, "eval", d.eval_examples, seed=d.data_seed)
    return train, evals
  kw = dict(layout=d.layout, on_error=d.on_error, tokenizer=tokenizer,
            max_prompt_tokens=d.max_prompt_tokens or None)
  train, _ = datasets_lib.load_prompt_set(d.path, limit=d.train_examples or None, **kw)
  evals = []
  if d.eval_path:
    evals, _ = datasets_lib.load_prompt_set(d.eval_path, limit=d.eval_examples or None, **kw)
  return train, evals


def _auto_buckets(lengths, given: tuple[int, ...]) -> tuple[int, ...]:
  if given:
    return given
  longest = max(lengths)
  return (int(math.ceil(longest / 8) * 8),)


def make_verifier(cfg: TrainConfig) -> verifiers.Verifier:
  if cfg.data.verifier == "math":
    return verifiers.MathVerifier()
  return verifiers.exact_match


def sampler_config(cfg: TrainConfig, tokenizer, *, max_new_tokens: int, greedy: bool = False,
                   temperature: float | None = None) -> sampler_lib.SamplerConfig:
  s = cfg.sampler
  eos = (tokenizer.eos_token_id,) + tuple(e for e in s.eos_ids if e != tokenizer.eos_token_id)
  return sampler_lib.SamplerConfig(
      max_new_tokens=max_new_tokens, temperature=s.temperature if temperature is None else
      temperature, top_k=s.top_k, top_p=s.top_p, greedy=greedy,
      eos_id=eos if len(eos) > 1 else eos[0], pad_id=tokenizer.pad_token_id)


def _max_new_tokens(cfg: TrainConfig, tokenizer) -> int:
  if cfg.sampler.max_new_tokens:
    return cfg.sampler.max_new_tokens
  if cfg.data.source != "task":
    raise config_lib.ConfigError("sampler.max_new_tokens=0 (automatic) only works for "
                                 "data.source='task'; set it for prompt-set files")
  _, solution_chars = tasks_lib.max_lengths(cfg.data.task)
  return solution_chars + 1  # char-level task tokenizer: one token per character, plus EOS


def rollout_knobs(cfg: TrainConfig, sampler_cfg) -> rollout_lib.RolloutKnobs:
  return rollout_lib.RolloutKnobs(
      method=cfg.method, policy=cfg.rollout.policy, sampler=sampler_cfg, credit=cfg.credit,
      group_size=cfg.rollout.group_size, normalize_std=cfg.grpo.normalize_std,
      grpo_eps=cfg.grpo.eps, ddof=cfg.grpo.ddof, mix_alpha=cfg.rollout.mix_alpha,
      chunk_size=cfg.rollout.chunk_size, recompute_old_logp=cfg.rollout.recompute_old_logp)


def updates_per_step(cfg: TrainConfig) -> int:
  if cfg.method in config_lib.PG_METHODS:
    return cfg.pg.epochs * cfg.pg.minibatches
  return 1


def subspace_bases_from_config(cfg: TrainConfig):
  """Bases V_k of W_at - W_origin (`optim.subspace.capture_bases`), or None when disabled."""
  if not cfg.subspace.at:
    return None
  from opd_jax.optim import subspace  # imported only when used
  origin = ckpt_lib.load_params(cfg.subspace.origin)
  at = ckpt_lib.load_params(cfg.subspace.at)
  delta = jax.tree.map(lambda a, b: jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32),
                       at, origin)
  return subspace.capture_bases(delta, cfg.subspace.k)


def _poison(params):
  """debug_nan_at_step: multiplies the final-norm scale by NaN (the loss becomes NaN)."""
  params = dict(params)
  params["final_norm"] = jax.tree.map(lambda x: x * jnp.nan, params["final_norm"])
  return params


def _token_state_to_json(state) -> list | None:
  if state is None:
    return None
  leaves = jax.tree.leaves(jax.device_get(state))
  return [{"dtype": str(np.asarray(x).dtype), "value": np.asarray(x).tolist()} for x in leaves]


def _token_state_from_json(template, saved):
  if template is None or saved is None:
    return template
  leaves, treedef = jax.tree.flatten(template)
  if len(saved) != len(leaves):
    raise ValueError(f"checkpoint token-transform state has {len(saved)} leaves, the configured "
                     f"transforms {len(leaves)} (rollout.token_transforms changed?)")
  return treedef.unflatten([jnp.asarray(np.asarray(s["value"], dtype=s["dtype"]))
                            for s in saved])


def _snapshots_on_disk(snap_dir: pathlib.Path, written: Mapping[int, str]) -> dict[int, str]:
  """{step: path} of every parameter snapshot of the run (also those of earlier invocations)."""
  found = dict(written)
  if snap_dir.is_dir():
    for p in snap_dir.iterdir():
      if p.name.isdigit() and (p / ckpt_lib.PARAMS).is_dir():
        found.setdefault(int(p.name), str(p))
  return dict(sorted(found.items()))


def _truncate_metrics(path: pathlib.Path, last_step: int) -> None:
  """On resume, drop metric rows of steps after the restored checkpoint (they will be redone)."""
  if not path.is_file():
    return
  keep = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        if json.loads(line).get("step", 0) <= last_step:
          keep.append(line)
      except ValueError:
        continue
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(keep), encoding="utf-8")
  os.replace(tmp, path)


def _spec_model_config(spec: ModelSpec) -> ModelConfig:
  """The architecture of a model spec without loading weights (hf: config.json when present)."""
  numerics = {f: getattr(spec.model, f) for f in NUMERIC_FIELDS}
  if spec.source == "hf" and (pathlib.Path(spec.path) / "config.json").is_file():
    return hf.config_from_hf(spec.path, **numerics)
  if spec.source == "checkpoint" and pathlib.Path(spec.path).exists():
    meta_cfg = _checkpoint_model_config(ckpt_lib.resolve_step_dir(spec.path))
    if meta_cfg is not None:
      return meta_cfg.replace(**numerics)
  return spec.model


def sequence_lengths(cfg: TrainConfig) -> tuple[int, int]:
  """(longest prompt bucket, response budget) for PG methods / (longest SFT bucket, 0) for SFT,
  from the config alone (the task bounds for source='task' with automatic buckets)."""
  d = cfg.data
  if cfg.method == "sft":
    if d.sft_buckets:
      return d.sft_buckets[-1], 0
    if d.source != "task":
      raise config_lib.ConfigError("data.sft_buckets=() (automatic) needs the data to size; set "
                                   "data.sft_buckets for prompt-set files")
    p, s = tasks_lib.max_lengths(d.task)
    return int(math.ceil((p + 3 + s + 1) / 8) * 8), 0  # chat specials, EOS
  if d.prompt_buckets:
    prompt = d.prompt_buckets[-1]
  elif d.source == "task":
    prompt = int(math.ceil((tasks_lib.max_lengths(d.task)[0] + 3) / 8) * 8)
  else:
    raise config_lib.ConfigError("data.prompt_buckets=() (automatic) needs the data to size; set "
                                 "data.prompt_buckets for prompt-set files")
  if cfg.sampler.max_new_tokens:
    return prompt, cfg.sampler.max_new_tokens
  if d.source != "task":
    raise config_lib.ConfigError("sampler.max_new_tokens=0 (automatic) only works for "
                                 "data.source='task'")
  return prompt, tasks_lib.max_lengths(d.task)[1] + 1


def plan_spec(cfg: TrainConfig):
  """The `train.plan.PlanSpec` of a run config: its student, optimizer, step kind and the
  largest global batch shape the run will feed the step (no weights are read)."""
  from opd_jax.train import plan as plan_lib
  prompt, response = sequence_lengths(cfg)
  if cfg.method == "sft":
    step, rows, step_cfg = "sft", cfg.loop.batch_size, cfg.sft
  elif cfg.method == "distill":
    step, rows, step_cfg = "distill", cfg.loop.batch_size * cfg.rollout.group_size, cfg.distill
  else:
    step, rows, step_cfg = "pg", cfg.loop.batch_size * cfg.rollout.group_size, cfg.pg
  teacher = _spec_model_config(cfg.teacher) if step == "distill" else None
  return plan_lib.PlanSpec(model=_spec_model_config(cfg.student), optim=cfg.optim, step=step,
                           batch_size=rows, seq_len=prompt + response, step_cfg=step_cfg,
                           teacher=teacher, rules=cfg.mesh.rules,
                           total_steps=cfg.loop.steps * updates_per_step(cfg))


# -- the loop -------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
  """Everything built once per run (kept together for the step / eval helpers)."""

  cfg: TrainConfig
  mesh: Any
  rules: Any
  tokenizer: Any
  student_cfg: ModelConfig
  graphdef: Any
  teacher_graphdef: Any
  teacher_params: Any
  verifier: Any
  knobs: rollout_lib.RolloutKnobs | None
  token_tx: Any
  eval_sampler: sampler_lib.SamplerConfig | None
  eval_pipeline: Any


def run(config: TrainConfig, workdir, *, resume: bool = False, init_params=None,
        teacher_params=None, subspace_bases=None, tokenizer=None,
        stop_after: int | None = None) -> dict:
  """Trains `config.method` for `config.loop.steps` steps in `workdir`; returns a summary dict.

  Args:
    config: the typed run config (`train.config.from_config_dict` of a config file).
    workdir: run directory (created); see the module docstring for its layout.
    resume: continue from the latest checkpoint in `workdir` (a fresh start when there is none).
      Without it, a workdir that already holds checkpoints is an error.
    init_params: in-memory student params (override `config.student.source`).
    teacher_params: in-memory teacher params (override `config.teacher.source`).
    subspace_bases: in-memory bases for the 'subspace_projection' optimizer transform (override
      `config.subspace`).
    tokenizer: a tokenizer object (overrides `config.data.tokenizer`).
    stop_after: return after this step (with a checkpoint), as if the job had been stopped there
      (time-boxed jobs, preemption tests); `resume=True` continues to `loop.steps`.

  Returns:
    {'step', 'metrics' (last step's), 'eval' (list of eval results with their step), 'workdir',
     'checkpoint_dir', 'snapshots' ({step: path} of every snapshot on disk, also from earlier
     invocations of a resumed run), 'wall_s', 'steps_per_s', 'resumed_from'}.
  """
  if not isinstance(config, TrainConfig):
    raise TypeError(f"run() needs a TrainConfig (train.config.from_config_dict), got "
                    f"{type(config).__name__}")
  t_start = time.time()
  cfg = config
  loop_cfg = cfg.loop
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt_dir = workdir / "checkpoints"
  snap_dir = workdir / "snapshots"
  primary = jax.process_index() == 0
  existing = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if (
      ckpt_dir.is_dir()) else []
  if existing and not resume:
    raise ValueError(f"{ckpt_dir} already holds checkpoints (latest step {existing[-1]}); pass "
                     "resume=True (--resume) to continue or use a fresh workdir")
  if primary:
    (workdir / "config.json").write_text(json.dumps(config_lib.dataclass_to_dict(cfg), indent=1,
                                                    default=str))

  mesh = mesh_lib.make_mesh(cfg.mesh)
  rules = cfg.mesh.rules
  tok = tokenizer if tokenizer is not None else load_tokenizer(cfg)

  # Models. A resumed run takes the student from its checkpoint: only the architecture is needed.
  if resume and existing:
    student_cfg = (cfg.student.model if init_params is not None and
                   cfg.student.source in ("random", "none") else _spec_model_config(cfg.student))
    graphdef, params = transformer.graphdef_for(student_cfg), None
  else:
    student_cfg, graphdef, params = load_model(cfg.student, mesh, rules, params=init_params)
  hf.check_tokenizer(student_cfg, tok)
  uses_teacher = (cfg.method in ("opd", "mixed", "distill") or cfg.rollout.policy == "teacher")
  teacher_graphdef = t_params = None
  if uses_teacher:
    if cfg.teacher.source == "none" and teacher_params is None:
      raise config_lib.ConfigError(f"method={cfg.method!r} needs a teacher")
    t_cfg, teacher_graphdef, t_params = load_model(cfg.teacher, mesh, rules,
                                                   params=teacher_params, what="teacher")
    hf.check_tokenizer(t_cfg, tok)
    if t_cfg.vocab_size != student_cfg.vocab_size:
      raise ValueError(f"teacher vocab_size {t_cfg.vocab_size} != student vocab_size "
                       f"{student_cfg.vocab_size} (one shared tokenizer is required)")

  # Data.
  train_ex, eval_ex = load_examples(cfg, tok)
  if not train_ex:
    raise ValueError("no training examples (data.train_examples / data.path)")
  is_sft = cfg.method == "sft"
  if is_sft:
    pairs = [tokenizer_lib.encode_example(tok, e.prompt, e.solution) for e in train_ex]
    buckets = _auto_buckets([len(p[0]) for p in pairs], cfg.data.sft_buckets)
    train_pipe = pipeline_lib.sft_pipeline_from_ids(
        [p[0] for p in pairs], [p[1] for p in pairs], pipeline_lib.PipelineConfig(
            global_batch_size=loop_cfg.batch_size, bucket_lengths=buckets, seed=loop_cfg.seed,
            shuffle=cfg.data.shuffle), pad_id=tok.pad_token_id)
  prompt_ids = tokenizer_lib.encode_prompts(tok, [e.prompt for e in train_ex + eval_ex])
  prompt_buckets = _auto_buckets([len(p) for p in prompt_ids], cfg.data.prompt_buckets)
  if not is_sft:
    train_pipe = pipeline_lib.rollout_pipeline_from_ids(
        prompt_ids[:len(train_ex)], [e.answer for e in train_ex], pipeline_lib.PipelineConfig(
            global_batch_size=loop_cfg.batch_size, bucket_lengths=prompt_buckets,
            group_size=cfg.rollout.group_size, seed=loop_cfg.seed, shuffle=cfg.data.shuffle),
        pad_id=tok.pad_token_id)
  max_new = _max_new_tokens(cfg, tok) if (not is_sft or eval_ex) else 0
  eval_pipe = eval_sampler = None
  eval_k = 1 if loop_cfg.eval_greedy else loop_cfg.eval_k
  if eval_ex and loop_cfg.eval_every:
    eval_pipe = pipeline_lib.rollout_pipeline_from_ids(
        prompt_ids[len(train_ex):], [e.answer for e in eval_ex], pipeline_lib.PipelineConfig(
            global_batch_size=min(loop_cfg.eval_batch_size, len(eval_ex)),
            bucket_lengths=prompt_buckets, group_size=eval_k, shuffle=False, num_epochs=1),
        pad_id=tok.pad_token_id)
    eval_sampler = sampler_config(cfg, tok, max_new_tokens=max_new,
                                  greedy=loop_cfg.eval_greedy,
                                  temperature=loop_cfg.eval_temperature)
  verifier = make_verifier(cfg) if (cfg.method in ("rlvr", "mixed") or eval_pipe) else None

  # Optimizer and state.
  p_shardings = mesh_lib.param_shardings(student_cfg, mesh, rules)
  abstract_params = transformer.abstract_params(student_cfg)
  if subspace_bases is None:
    subspace_bases = subspace_bases_from_config(cfg)
  context = {} if subspace_bases is None else {"subspace_bases": subspace_bases}
  tx = factory.make_optimizer(cfg.optim, abstract_params,
                              total_steps=loop_cfg.steps * updates_per_step(cfg), **context)
  s_shardings = mesh_lib.state_shardings(tx, p_shardings, abstract_params)
  b_sharding = mesh_lib.batch_sharding(mesh, 2, rules)
  if is_sft:
    step_fn = steps_lib.jit_step(
        steps_lib.sft_step, mesh, s_shardings, b_sharding, rules=rules, graphdef=graphdef,
        tx=tx, cfg=cfg.sft)
  elif cfg.method == "distill":
    step_fn = steps_lib.jit_step(
        steps_lib.distill_step, mesh, s_shardings, b_sharding, rules=rules,
        extra_shardings=(mesh_lib.param_shardings(t_cfg, mesh, rules),), graphdef=graphdef,
        teacher_graphdef=teacher_graphdef, tx=tx, cfg=cfg.distill)
  else:
    step_fn = steps_lib.jit_step(steps_lib.pg_step, mesh, s_shardings, b_sharding,
                                 rules=rules, graphdef=graphdef, tx=tx, cfg=cfg.pg)

  knobs = token_tx = token_state = None
  if not is_sft:
    knobs = rollout_knobs(cfg, sampler_config(cfg, tok, max_new_tokens=max_new))
    if cfg.rollout.token_transforms:
      token_tx = rollout_lib.make_token_transform(cfg.rollout.token_transforms)
      token_state = token_tx.init(jnp.zeros((1, 1), jnp.float32))

  ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=loop_cfg.checkpoint_keep, model_cfg=student_cfg)
  iterator = train_pipe.iterator()
  resumed_from = None
  try:
    restored = None
    if resume:
      restored = ckpt.restore_latest(mesh_lib.abstract_state(tx, abstract_params, s_shardings))
    if restored is None and params is None:
      raise RuntimeError(f"{ckpt_dir}: checkpoints were listed but none could be restored")
    if restored is not None:
      state, meta = restored
      iterator.set_state(meta["data"])
      token_state = _token_state_from_json(token_state, meta.get("token_state"))
      resumed_from = int(state.step)
      if primary:
        _truncate_metrics(workdir / "metrics.jsonl", resumed_from)
    else:
      state = mesh_lib.init_sharded_state(params, tx, loop_cfg.seed, s_shardings)
    del params

    r = _Run(cfg=cfg, mesh=mesh, rules=rules, tokenizer=tok, student_cfg=student_cfg,
             graphdef=graphdef, teacher_graphdef=teacher_graphdef, teacher_params=t_params,
             verifier=verifier, knobs=knobs, token_tx=token_tx, eval_sampler=eval_sampler,
             eval_pipeline=eval_pipe)
    # Everything that runs on the devices from here on sees the mesh and the axis rules (set-up
    # above stays outside: nnx's abstract evaluation must not pick up the context mesh).
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
      return _loop(r, state, iterator, token_state, step_fn, ckpt, workdir, snap_dir,
                   resumed_from, t_start, stop_after)
  finally:
    ckpt.close()
    if isinstance(verifier, verifiers.MathVerifier):
      verifier.close()


def _loop(r: _Run, state: TrainState, iterator, token_state, step_fn, ckpt, workdir: pathlib.Path,
          snap_dir: pathlib.Path, resumed_from: int | None, t_start: float,
          stop_after: int | None) -> dict:
  cfg, loop_cfg = r.cfg, r.cfg.loop
  is_sft, is_distill = cfg.method == "sft", cfg.method == "distill"
  writer = metrics_lib.MetricsWriter(str(workdir), tensorboard=loop_cfg.tensorboard)
  fetcher = metrics_lib.LateFetcher()
  start = int(state.step)
  progress = metrics_lib.Progress(loop_cfg.steps, initial=start, enabled=loop_cfg.progress,
                                  show=("train/loss", "opd/teacher_gap", "rlvr/reward_mean"))
  to_device = lambda b: mesh_lib.global_batch(b, r.mesh, r.rules)  # noqa: E731
  eval_rng = jax.random.fold_in(jax.random.key(loop_cfg.seed), 0xE7A1)
  eval_k = 1 if loop_cfg.eval_greedy else loop_cfg.eval_k
  poison = jax.jit(_poison)
  evals: list[dict] = []
  snapshots: dict[int, str] = {}
  last: dict[str, float] = {}
  last_ckpt = ckpt.latest_step()

  def handle(ready):
    nonlocal last
    if ready is None:
      return
    s, m = ready
    if m.get("train/loss_finite", 1.0) < 1.0:
      raise NonFiniteLossError(s, m, last_ckpt, str(ckpt.directory))
    last = m
    if s % loop_cfg.log_every == 0 or s == loop_cfg.steps:
      writer.write(s, m)

  def do_eval(s: int, params):
    result = rollout_lib.evaluate(r.graphdef, params, r.eval_pipeline.iterator(), r.tokenizer,
                                  r.verifier, r.eval_sampler, jax.random.fold_in(eval_rng, s),
                                  eval_k, to_device)
    evals.append({"step": s, **result})
    writer.write(s, result)

  def snapshot(s: int, params):
    snapshots[s] = str(ckpt_lib.save_snapshot(snap_dir, s, params, r.student_cfg))

  do_evals = r.eval_pipeline is not None and loop_cfg.eval_every > 0
  if resumed_from is None:
    if 0 in loop_cfg.snapshot_steps:
      snapshot(0, state.params)
    if do_evals:
      do_eval(0, state.params)

  step = start
  end = loop_cfg.steps if stop_after is None else min(loop_cfg.steps, stop_after)
  t_loop = time.time()
  try:
    while step < end:
      host = next(iterator)
      rollout_metrics: dict = {}
      extra = ()
      if is_sft:
        batch = to_device({k: host[k] for k in steps_lib.SFT_FIELDS})
      else:
        prompts = to_device({"prompt_tokens_BxP": host["prompt_tokens_BxP"],
                             "prompt_mask_BxP": host["prompt_mask_BxP"],
                             "valid_B": host["valid_B"]})
        ro = rollout_lib.generate(r.graphdef, state.params, r.teacher_graphdef, r.teacher_params,
                                  prompts["prompt_tokens_BxP"], prompts["prompt_mask_BxP"],
                                  rollout_lib.rollout_rng(state.rng, state.step), r.knobs)
        if is_distill:
          batch = {"tokens_BxT": ro.tokens_BxT, "mask_BxT": ro.mask_BxT,
                   "loss_mask_BxT": ro.loss_mask_BxT & prompts["valid_B"][:, None]}
          extra = (r.teacher_params,)
          rollout_metrics = {"rollout/response_len": jnp.mean(ro.lengths_B.astype(jnp.float32))}
        else:
          seq_rewards = None
          if r.knobs.uses_verifier:
            local = rollout_lib.verify(r.tokenizer, r.verifier, ro, host["answer_B"])
            seq_rewards = to_device({"rewards_B": local})["rewards_B"]
          batch, token_state, rollout_metrics = rollout_lib.advantages(
              ro, prompts["valid_B"], seq_rewards, token_state, r.knobs, r.token_tx)
      if loop_cfg.debug_nan_at_step == step + 1:
        state = state.replace(params=poison(state.params))
      state, step_metrics = step_fn(state, batch, *extra)
      step += 1
      handle(fetcher.push(step, {**step_metrics, **rollout_metrics}))
      progress.update(1, last)

      want_snapshot = step in loop_cfg.snapshot_steps
      want_ckpt = ((loop_cfg.checkpoint_every and step % loop_cfg.checkpoint_every == 0)
                   or step == end)
      want_eval = do_evals and (step % loop_cfg.eval_every == 0 or step == loop_cfg.steps)
      if want_snapshot or want_ckpt or want_eval:
        handle(fetcher.flush())  # this step must be finite before anything of it is saved
      if want_snapshot:
        snapshot(step, state.params)
      if want_ckpt:
        ckpt.save(step, state, {"data": iterator.get_state(),
                                "token_state": _token_state_to_json(token_state)})
        last_ckpt = step
      if want_eval:
        do_eval(step, state.params)
    handle(fetcher.flush())
  finally:
    writer.close()
    progress.close()
  ckpt.wait_until_finished()
  loop_s = time.time() - t_loop
  summary = {
      "step": step, "metrics": last, "eval": evals, "workdir": str(workdir),
      "checkpoint_dir": str(ckpt.directory), "snapshots": _snapshots_on_disk(snap_dir, snapshots),
      "wall_s": time.time() - t_start,
      "steps_per_s": (step - start) / loop_s if loop_s > 0 and step > start else None,
      "resumed_from": resumed_from,
  }
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
  return summary

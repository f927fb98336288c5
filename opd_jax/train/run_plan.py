"""The run plan: a TrainConfig resolved ONCE into everything the loop, `plan` and the study consume.

`resolve(cfg)` reads what the config points at (architectures from config.json / checkpoint
metadata, the tokenizer) but no weights, and returns a frozen `RunPlan`: the recipe, the student /
teacher model configs, the padded sequence lengths, the rollout and eval sampler settings, the step
config with its derived knobs filled in, and the optimizer update count. Nothing downstream
re-derives a setting; `loop.run`, `plan.spec_from_plan` and the study's evaluation all read the
plan.

The loaders (`load_model`, `load_tokenizer`, `load_examples`, `make_verifier`) live here too: they
are the one place a config is turned into objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from opd_jax import errors
from opd_jax import trace_cache
from opd_jax.data import chat as chat_lib
from opd_jax.data import datasets as datasets_lib
from opd_jax.data import pipeline as pipeline_lib
from opd_jax.data import tasks as tasks_lib
from opd_jax.data import tokenizer as tokenizer_lib
from opd_jax.data import verifiers
from opd_jax.models import hf
from opd_jax.models import sampler as sampler_lib
from opd_jax.models import transformer
from opd_jax.models.config import ModelConfig
from opd_jax.train import checkpoint as ckpt_lib
from opd_jax.train import config as config_lib
from opd_jax.train import mesh as mesh_lib
from opd_jax.train import recipes as recipes_lib
from opd_jax.train.config import ModelSpec, TrainConfig

NUMERIC_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat")

# Chat-template tokens around a task prompt with the char-level task tokenizer (`tokenizer.py`).
_CHAT_SPECIALS = 3


# -- models ---------------------------------------------------------------------------------------
def _numerics(spec: ModelSpec) -> dict:
  return {f: getattr(spec.model, f) for f in NUMERIC_FIELDS}


def checkpoint_model_config(step_dir) -> ModelConfig | None:
  """The ModelConfig recorded in a checkpoint / snapshot's metadata, or None."""
  meta_dir = epath.Path(step_dir) / ckpt_lib.META
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


def spec_model_config(spec: ModelSpec) -> ModelConfig:
  """The architecture of a model spec without loading weights (hf: config.json when present;
  checkpoint: its metadata when present; else the spec's own `model`)."""
  if spec.source == "hf" and (epath.Path(spec.path) / "config.json").is_file():
    return hf.config_from_hf(spec.path, **_numerics(spec))
  if spec.source == "checkpoint" and epath.Path(spec.path).exists():
    meta_cfg = checkpoint_model_config(ckpt_lib.resolve_step_dir(spec.path))
    if meta_cfg is not None:
      return meta_cfg.replace(**_numerics(spec))
  return spec.model


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


@functools.lru_cache(maxsize=16)
def _random_init_fn(cfg: ModelConfig, mesh, rules):
  """The jitted random init of `cfg` on `mesh`, the seed an argument: a student and a teacher of
  one architecture (or a second run in the process) share one traced, lowered and compiled
  program."""
  shardings = mesh_lib.param_shardings(cfg, mesh, rules)
  return trace_cache.CachedJit(lambda seed: transformer.init(cfg, jax.random.key(seed))[1],
                               name="random_init", out_shardings=shardings)


def _random_params(cfg: ModelConfig, mesh, rules, seed: int):
  """`mesh.init_sharded_params(cfg, mesh, rules, seed)`'s params, bit for bit (the same key,
  `jax.random.key(seed)`), from the shared program of `_random_init_fn`."""
  try:
    hash((cfg, mesh, rules))
    shared = 0 <= seed < 2**31  # else the seed stays the Python int it is
  except TypeError:  # rules given as lists: no program cache by them
    shared = False
  if not shared:
    return mesh_lib.init_sharded_params(cfg, mesh, rules, seed)[1]
  seed_arr = jax.device_put(np.int32(seed), mesh_lib.replicated(mesh))
  return _random_init_fn(cfg, mesh, rules)(seed_arr)


def load_model(spec: ModelSpec, mesh, rules, *, params=None, what: str = "student"
               ) -> tuple[ModelConfig, Any, dict]:
  """(cfg, graphdef, params) of a model spec, params placed with the mesh's param shardings.

  `params` (in memory) replace the spec's source; their shapes must match the spec's model (for
  'hf' / 'checkpoint' sources, the architecture recorded there).
  """
  if spec.source == "none" and params is None:
    raise errors.UserError(f"{what}: source 'none' has no model")
  if params is None and spec.source in ("hf", "checkpoint") and not epath.Path(spec.path).exists():
    hint = (" (the tiny presets read checkpoints made by other runs: `opd-jax train --config "
            "configs/sft.py:tiny --workdir runs/sft_tiny` makes runs/sft_tiny/checkpoints)"
            if spec.source == "checkpoint" and str(spec.path).startswith("runs/sft_tiny") else "")
    raise errors.UserError(f"{what}: no {'Hugging Face checkpoint' if spec.source == 'hf' else 'checkpoint'} "
                           f"at {spec.path!r} ({what}.source={spec.source!r}){hint}")
  cfg = spec.model if spec.source in ("random", "none") else spec_model_config(spec)
  shardings = mesh_lib.param_shardings(cfg, mesh, rules)
  graphdef = transformer.graphdef_for(cfg)
  if params is not None:
    _check_shapes(cfg, params, f"{what} params passed in memory")
    params = mesh_lib.reshard(_cast(params, cfg), shardings)
  elif spec.source == "random":
    params = _random_params(cfg, mesh, rules, spec.seed)
  elif spec.source == "hf":
    _, params = hf.load(spec.path, cfg=cfg, mesh=mesh, rules=rules)
    params = mesh_lib.reshard(params, shardings)
  else:
    params = ckpt_lib.load_params(spec.path, shardings=shardings)
    _check_shapes(cfg, params, f"{what} checkpoint {spec.path}")
    params = mesh_lib.reshard(_cast(params, cfg), shardings)
  return cfg, graphdef, params


# -- data -----------------------------------------------------------------------------------------
def load_tokenizer(cfg: TrainConfig):
  if cfg.data.tokenizer:
    try:
      return tokenizer_lib.load_tokenizer(cfg.data.tokenizer)
    except (OSError, ValueError) as e:   # no such directory, no tokenizer in it, unreadable
      why = " ".join(str(e).split())[:240] or type(e).__name__   # one line
      raise errors.UserError(f"data.tokenizer={cfg.data.tokenizer!r}: {why}") from None
  return tokenizer_lib.build_task_tokenizer()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def teacher_tokenizer_dir(cfg: TrainConfig, spec=None) -> str | None:
  """The teacher's own tokenizer directory (a Hugging Face teacher whose directory holds tokenizer
  files), or None (a checkpoint / random teacher uses the run's tokenizer). `spec`: one teacher's
  `ModelSpec` (default `cfg.teacher`)."""
  t = cfg.teacher if spec is None else spec
  if t.source != "hf" or not t.path:
    return None
  d = epath.Path(t.path)
  return t.path if any((d / f).is_file() for f in _TOKENIZER_FILES) else None


def check_teacher_tokenizer(cfg: TrainConfig, tokenizer, spec=None) -> None:
  """Refuses (`tokenizer.TokenizerMismatchError`, one line naming the first differing token and
  its ids) a teacher whose own tokenizer differs from the run's (`data.tokenizer`) in vocabulary
  or special / chat-template control tokens."""
  path = teacher_tokenizer_dir(cfg, spec)
  if path is None or tokenizer is None or (cfg.data.tokenizer and
                                           epath.Path(cfg.data.tokenizer) == epath.Path(path)):
    return
  student_src = cfg.data.tokenizer or "the task's char-level tokenizer (data.tokenizer='')"
  tokenizer_lib.check_same_tokenizer(tokenizer_lib.load_tokenizer(path), tokenizer,
                                     where=f"teacher.path={path} vs data.tokenizer={student_src}")


def load_examples_with_reports(cfg: TrainConfig, tokenizer) -> tuple[list, list, dict]:
  """(train examples, eval examples, {'train': LoadReport, 'eval': LoadReport}) of the data
  config; the reports are empty for generated tasks."""
  d = cfg.data
  if d.source == "task":
    train = tasks_lib.generate(d.task, "train", d.train_examples, seed=d.data_seed)
    evals = tasks_lib.generate(d.task, "eval", d.eval_examples, seed=d.data_seed)
    return train, evals, {}
  if d.layout in chat_lib.LAYOUTS and not recipes_lib.get(cfg).uses_rollouts:  # chat-format SFT
    _, sft_b, _ = sequence_lengths(cfg)
    train, report = chat_lib.load_chat_set(
        d.path, d.layout, on_error=d.on_error, tokenizer=tokenizer, max_tokens=sft_b[-1],
        limit=d.train_examples or None, dedup=d.dedup)
    return train, [], {"train": report}
  kw = dict(layout=d.layout, on_error=d.on_error, tokenizer=tokenizer,
            max_prompt_tokens=d.max_prompt_tokens or None, dedup=d.dedup)
  # Several teachers routed by domain: the training rows name their domain in teachers.field.
  routed = cfg.teachers.models and cfg.teachers.route == "domain"
  train, report = datasets_lib.load_prompt_set(
      d.path, limit=d.train_examples or None,
      domain_field=cfg.teachers.field if routed else "", **kw)
  reports = {"train": report}
  evals = []
  if d.eval_path:
    evals, reports["eval"] = datasets_lib.load_prompt_set(d.eval_path,
                                                          limit=d.eval_examples or None, **kw)
  return train, evals, reports


def load_eval_sets(cfg: TrainConfig, tokenizer) -> list[tuple[str, list, Any]]:
  """[(name, examples, LoadReport)] of `data.eval_sets`, in config order: each file read like
  `data.eval_path` (its own layout, or `data.layout` for ''; dedup, on_error, max_prompt_tokens
  and the `data.eval_examples` cap of the data config)."""
  d = cfg.data
  out = []
  for name, path, layout in d.eval_sets:
    examples, report = datasets_lib.load_prompt_set(
        path, layout=layout or d.layout, on_error=d.on_error, tokenizer=tokenizer,
        max_prompt_tokens=d.max_prompt_tokens or None, dedup=d.dedup,
        limit=d.eval_examples or None)
    out.append((name, examples, report))
  return out


def load_examples(cfg: TrainConfig, tokenizer) -> tuple[list, list]:
  """(train examples, eval examples) of the data config."""
  train, evals, _ = load_examples_with_reports(cfg, tokenizer)
  return train, evals


def sft_train_pipeline(plan: "RunPlan", tokenizer, examples) -> pipeline_lib.Pipeline:
  """The SFT training pipeline of the plan (this process's rows): demonstrations
  (`tasks.Example`: chat prompt + solution + EOS) or conversations (`chat.ChatExample`: every
  assistant turn), in the plan's sft buckets, packed when `data.pack`."""
  cfg = plan.cfg
  pairs = []
  for i, e in enumerate(examples):
    try:
      if isinstance(e, chat_lib.ChatExample):
        pairs.append(chat_lib.encode_chat(tokenizer, e))
      else:
        pairs.append(tokenizer_lib.encode_example(tokenizer, e.prompt, e.solution))
    except ValueError as err:
      raise errors.UserError(f"SFT example {i}: {err}") from None
  with buckets_field("data.sft_buckets", plan.sft_buckets):
    return pipeline_lib.sft_pipeline_from_ids(
        [p[0] for p in pairs], [p[1] for p in pairs], pipeline_lib.PipelineConfig(
            global_batch_size=cfg.loop.batch_size, bucket_lengths=plan.sft_buckets,
            seed=cfg.loop.seed, shuffle=cfg.data.shuffle, pack=cfg.data.pack),
        pad_id=plan.pad_id)


@contextlib.contextmanager
def buckets_field(field: str, buckets):
  """An example longer than the largest of `buckets` is a `ConfigError` naming `field`."""
  try:
    yield
  except pipeline_lib.ExampleTooLongError as e:
    raise config_lib.ConfigError(f"{field}={tuple(buckets)}: {e.detail}; raise the largest "
                                 "bucket or filter the data (nothing is truncated)") from None


def make_verifier(cfg: TrainConfig) -> verifiers.Verifier:
  """The data config's verifier (release it with `verifiers.close_verifier`)."""
  d = cfg.data
  if d.verifier == "math":
    return verifiers.build("math", timeout_s=d.verifier_timeout_s)
  if d.verifier in ("code", "task"):
    from opd_jax.data import code_exec
    return verifiers.build(d.verifier, limits=code_exec.Limits(timeout_s=d.verifier_timeout_s))
  return verifiers.build(d.verifier)


def _round8(n: int) -> int:
  return int(math.ceil(n / 8) * 8)


def sequence_lengths(cfg: TrainConfig) -> tuple[tuple[int, ...], tuple[int, ...], int]:
  """(prompt buckets, SFT buckets, response budget), from the config alone: the buckets given,
  else for source='task' one bucket fitting the task's longest prompt / prompt + solution (chat
  specials and EOS included, rounded up to a multiple of 8). Files need explicit buckets and
  `sampler.max_new_tokens`: a `ConfigError` names the field otherwise."""
  d = cfg.data
  bounds = tasks_lib.max_lengths(d.task) if d.source == "task" else None

  def need(field: str):
    raise config_lib.ConfigError(f"{field}=() / 0 (automatic) needs data.source='task' to size "
                                 f"it; set {field} for prompt-set files")

  if d.prompt_buckets:
    prompt = tuple(d.prompt_buckets)
  elif bounds is not None:
    prompt = (_round8(bounds[0] + _CHAT_SPECIALS),)
  else:
    prompt = None
  if d.sft_buckets:
    sft_b = tuple(d.sft_buckets)
  elif bounds is not None:
    sft_b = (_round8(bounds[0] + _CHAT_SPECIALS + bounds[1] + 1),)
  else:
    sft_b = None
  if cfg.sampler.max_new_tokens:
    new = cfg.sampler.max_new_tokens
  elif bounds is not None:
    new = bounds[1] + 1  # char-level task tokenizer: one token per character, plus EOS
  else:
    new = None
  recipe = recipes_lib.get(cfg)
  if recipe.uses_rollouts or (cfg.loop.eval_every and (cfg.data.eval_examples or cfg.data.eval_path
                                                       or cfg.data.eval_sets)):
    if prompt is None:
      need("data.prompt_buckets")
    if new is None:
      need("sampler.max_new_tokens")
  if not recipe.uses_rollouts and sft_b is None:
    need("data.sft_buckets")
  return prompt or (), sft_b or (), new or 0


def sampler_config(cfg: TrainConfig, eos_id: int, pad_id: int, *, max_new_tokens: int,
                   greedy: bool = False, temperature: float | None = None, group_size: int = 1
                   ) -> sampler_lib.SamplerConfig:
  """`group_size`: rows per prompt of the batches it samples (the G samples of a prompt share
  its prefill)."""
  s = cfg.sampler
  eos = (eos_id,) + tuple(e for e in s.eos_ids if e != eos_id)
  return sampler_lib.SamplerConfig(
      max_new_tokens=max_new_tokens, temperature=s.temperature if temperature is None else
      temperature, top_k=s.top_k, top_p=s.top_p, greedy=greedy,
      eos_id=eos if len(eos) > 1 else eos[0], pad_id=pad_id, group_size=group_size,
      mode=s.mode, slots=s.slots, min_bucket=s.min_bucket)


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


# -- the plan -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunPlan:
  """A run, resolved (module docstring). Frozen: one copy of every setting.

  Attributes:
    cfg: the typed config it was resolved from (for provenance; read settings from here only
      when the plan has no resolved field for them).
    recipe: the method's `recipes.Recipe`.
    student / teacher / reference: model configs (teacher None when the recipe needs none, a
      tuple of them with several routed teachers (`teachers.models`, in order); reference: the
      frozen initial student for KL-to-reference, else None).
    prompt_buckets / sft_buckets: padded lengths of rollout prompts / SFT sequences.
    max_new_tokens: the response budget.
    rows: global rows of one train step (prompts x group size for rollouts).
    sampler: the rollout sampler settings (None without rollouts).
    eval_sampler: the eval sampler settings (None without eval).
    eval_k: samples per eval prompt.
    step_cfg: the recipe's step config with derived knobs filled in (pg temperature = the
      sampling temperature, ...).
    total_updates: optimizer updates over the run (schedules).
    eos_id / pad_id: the tokenizer's ids.
  """

  cfg: TrainConfig
  recipe: Any
  student: ModelConfig
  teacher: ModelConfig | tuple[ModelConfig, ...] | None
  reference: ModelConfig | None
  prompt_buckets: tuple[int, ...]
  sft_buckets: tuple[int, ...]
  max_new_tokens: int
  rows: int
  sampler: sampler_lib.SamplerConfig | None
  eval_sampler: sampler_lib.SamplerConfig | None
  eval_k: int
  step_cfg: Any
  total_updates: int
  eos_id: int
  pad_id: int

  @property
  def seq_len(self) -> int:
    """Tokens per train row (the longest bucket)."""
    if self.recipe.uses_rollouts:
      return self.prompt_buckets[-1] + self.max_new_tokens
    return self.sft_buckets[-1]

  @property
  def has_eval(self) -> bool:
    return self.eval_sampler is not None


def resolve(cfg: TrainConfig, *, tokenizer=None, student: ModelConfig | None = None,
            teacher: ModelConfig | tuple[ModelConfig, ...] | None = None,
            shapes_only: bool = False) -> RunPlan:
  """The `RunPlan` of a config (no weights are read).

  Args:
    cfg: the typed config.
    tokenizer: overrides `cfg.data.tokenizer` (its EOS / pad ids go into the sampler settings).
    student / teacher: architectures known by the caller (in-memory params), else from the specs.
    shapes_only: for `plan`: no tokenizer is loaded (EOS / pad ids are 0); only shapes matter.
  """
  recipe = recipes_lib.get(cfg)
  recipe.validate(cfg)
  needs = recipe.needs(cfg)
  if tokenizer is None and not shapes_only:
    tokenizer = load_tokenizer(cfg)
  eos_id = tokenizer.eos_token_id if tokenizer is not None else 0
  pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
  prompt_b, sft_b, max_new = sequence_lengths(cfg)
  student_cfg = student if student is not None else spec_model_config(cfg.student)
  teacher_cfg = None
  if needs.teacher and cfg.teachers.models:
    specs = [t.model for t in cfg.teachers.models]
    teacher_cfg = teacher if teacher is not None else tuple(spec_model_config(m) for m in specs)
    if not shapes_only:
      for m in specs:
        check_teacher_tokenizer(cfg, tokenizer, m)
  elif needs.teacher:
    teacher_cfg = teacher if teacher is not None else spec_model_config(cfg.teacher)
    if not shapes_only:
      check_teacher_tokenizer(cfg, tokenizer)
  sampler = None
  if recipe.uses_rollouts:
    sampler = sampler_config(cfg, eos_id, pad_id, max_new_tokens=max_new,
                             group_size=cfg.rollout.group_size)
  loop = cfg.loop
  has_eval = bool(loop.eval_every) and bool(
      (cfg.data.eval_examples if cfg.data.source == "task" else cfg.data.eval_path)
      or cfg.data.eval_sets)
  eval_sampler = None
  eval_k = 1 if loop.eval_greedy else loop.eval_k
  if has_eval:
    eval_sampler = sampler_config(cfg, eos_id, pad_id, max_new_tokens=max_new,
                                  greedy=loop.eval_greedy, temperature=loop.eval_temperature,
                                  group_size=eval_k)
  step_cfg = recipe.step_config(cfg)
  return RunPlan(
      cfg=cfg, recipe=recipe, student=student_cfg, teacher=teacher_cfg,
      reference=student_cfg if needs.reference else None, prompt_buckets=prompt_b,
      sft_buckets=sft_b, max_new_tokens=max_new, rows=recipe.rows(cfg), sampler=sampler,
      eval_sampler=eval_sampler, eval_k=eval_k,
      step_cfg=step_cfg, total_updates=loop.steps * recipe.updates_per_step(cfg),
      eos_id=eos_id, pad_id=pad_id)


def eval_batch_prompts(batch_size: int, examples: int, k: int, mesh, rules) -> int:
  """Prompts per eval batch of k samples each: `batch_size`, or all of a smaller eval set,
  rounded up so that each process loads whole prompts and the prompts x k rows split over the
  batch shards (the pipeline pads with rows marked invalid; `batch_size` itself is checked by
  `check_divisible`)."""
  shards = mesh_lib.batch_shards(mesh, rules)
  # Several processes: whole prompts per shard too, as a process's shards need not be adjacent
  # (`mesh.process_rows_mismatch`).
  per_shard = shards if jax.process_count() > 1 else shards // math.gcd(shards, k)
  unit = math.lcm(jax.process_count(), per_shard)
  return -(-min(batch_size, examples) // unit) * unit


def check_divisible(plan: RunPlan, mesh, rules) -> None:
  """Refuses, naming the config fields and the mesh, a batch that the mesh's batch axes (and the
  processes, and the step's minibatches x micro-batches) cannot split evenly. Runs before any
  model is loaded (`loop.run`) and in `plan`."""
  axes = mesh_lib.batch_axes(mesh, rules)
  shards = mesh_lib.batch_shards(mesh, rules)
  cfg = plan.cfg
  what = ("loop.batch_size x rollout.group_size" if plan.recipe.uses_rollouts
          else "loop.batch_size")
  mesh_desc = " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
  if plan.rows % shards:
    raise config_lib.ConfigError(
        f"{what} = {plan.rows} rows per step do not split over the {shards} batch shards of the "
        f"mesh ({mesh_desc}; batch axes {axes}): make it a multiple of {shards}")
  if plan.rows % jax.process_count():
    raise config_lib.ConfigError(f"{what} = {plan.rows} rows per step do not split over "
                                 f"{jax.process_count()} processes")
  group = cfg.rollout.group_size if plan.recipe.uses_rollouts else 1
  mismatch = mesh_lib.process_rows_mismatch(mesh, plan.rows, rules, group)
  if mismatch:
    raise config_lib.ConfigError(
        f"mesh.shape={cfg.mesh.shape} / mesh.axes={cfg.mesh.axes} with {what} = {plan.rows} "
        f"rows: {mismatch}; split the batch axes {axes} over the processes (e.g. "
        "mesh.shape=(1,-1,1)) into blocks of whole groups")
  split = getattr(plan.step_cfg, "minibatches", 1) * getattr(plan.step_cfg, "micro_batches", 1)
  section = "pg" if plan.recipe.uses_rollouts and hasattr(plan.step_cfg, "minibatches") else (
      "sft" if not plan.recipe.uses_rollouts else "distill")
  if plan.rows % split:
    raise config_lib.ConfigError(
        f"{what} = {plan.rows} rows per step do not split into {section}.minibatches x "
        f"{section}.micro_batches = {split} equal parts")
  if plan.has_eval:
    eval_rows = min(cfg.loop.eval_batch_size,
                    cfg.data.eval_examples or cfg.loop.eval_batch_size) * plan.eval_k
    if eval_rows % shards:
      raise config_lib.ConfigError(
          f"eval batches of loop.eval_batch_size x eval k = {eval_rows} rows do not split over "
          f"the {shards} batch shards of the mesh ({mesh_desc})")


"""The training loop: `run(config, workdir) -> summary`, for the CLI, Colab and the study.

One loop serves every method: the config is resolved once into a `run_plan.RunPlan`, whose
recipe (`train.recipes`) turns each host batch into the inputs of its jitted step:

    data (grain, this process's rows) -> recipe.make_batch(ctx, state, host) -> step(state, *args)
      sft:      demonstrations -------------------------------------------------------> sft_step
      opd/rlvr/mixed: prompts -> rollout.generate -> [verify, host] -> advantages ----> pg_step
      distill:  prompts -> rollout.generate ---------------------------------------> distill_step

then metrics (computed in jit, fetched one step late), periodic eval (verifier accuracy, avg@k),
parameter snapshots at `loop.snapshot_steps` (kept apart from the rolling checkpoints, for trajectory
diagnostics), rolling checkpoints every `loop.checkpoint_every` steps and at the end.

Exact resume: a checkpoint holds the TrainState (params, opt_state, the base RNG key and the step:
all per-step randomness is `fold_in(key, step)`; the value head and token-transform state when the
recipe has them) and the data-iterator state (in the checkpoint's JSON meta).
`run(..., resume=True)` continues from the latest checkpoint; the parameters after N steps are
bit-identical to a straight run (CPU).

Host <-> device traffic: the step loop runs under `jax.transfer_guard(loop.transfer_guard)`
('disallow' in the tests); its only transfers are explicit (see `_loop`).

Time to the first step: random models of one architecture share one init program (the seed an
argument, `run_plan.load_model`); the train step is traced and compiled in a background thread
while the first batch is made (`_StepAhead`); nothing waits for the devices before the first step
(the start step is known on the host); the MFU peak is measured after the first step; with the
persistent compilation cache (`compile_cache`, on by default) a second run reads every program.

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
import signal
import sys
import threading
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from opd_jax import compile_cache
from opd_jax import errors
from opd_jax.data import pipeline as pipeline_lib
from opd_jax.data import tokenizer as tokenizer_lib
from opd_jax.data import verifiers
from opd_jax.geometry import live as live_lib
from opd_jax.models import hf
from opd_jax.models import lora as lora_lib
from opd_jax.models import sharding
from opd_jax.models import transformer
from opd_jax.optim import factory
from opd_jax.train import checkpoint as ckpt_lib
from opd_jax.train import config as config_lib
from opd_jax.train import mesh as mesh_lib
from opd_jax.train import metrics as metrics_lib
from opd_jax.train import recipes as recipes_lib
from opd_jax.train import rollout as rollout_lib
from opd_jax.train import run_plan
from opd_jax.train import timing
from opd_jax.train import teachers as teachers_lib
from opd_jax.train.config import TrainConfig
from opd_jax.train.run_plan import RunPlan
from opd_jax.train.state import TrainState


class NonFiniteLossError(errors.UserError, RuntimeError):
  """The loss, gradient norm, or the state about to be saved was not finite; the run stopped.
  A user error for the CLI (one line, exit 2): its message names the step and the checkpoint to
  resume from, and the usual cause is a setting (learning rate, data)."""

  def __init__(self, step: int, metrics: Mapping[str, float], last_checkpoint: int | None,
               checkpoint_dir: str, what: str = "loss"):
    self.step = step
    self.metrics = dict(metrics)
    self.last_checkpoint = last_checkpoint
    where = (f"the last good checkpoint is step {last_checkpoint} in {checkpoint_dir}"
             if last_checkpoint is not None else "no checkpoint was written yet")
    detail = (f" (train/loss={metrics.get('train/loss')}, train/grad_norm="
              f"{metrics.get('train/grad_norm')})" if what == "loss" else "")
    super().__init__(
        f"non-finite {what} at step {step}{detail}; stopping. Nothing from step {step} was "
        f"saved; {where} (resume from it with resume=True / --resume after fixing the cause).")


# -- workdir and resume helpers -------------------------------------------------------------------
def workdir_path(workdir) -> epath.Path:
  """The run directory as an `epath.Path`: a path with a scheme (gs://...) is kept as given (it
  reaches orbax and the writers unchanged); a local one is made absolute."""
  return ckpt_lib.as_path(workdir)


def _poison(params):
  """debug_nan_at_step: multiplies the final-norm scale (with adapters: every adapter) by NaN
  (the loss becomes NaN)."""
  params = dict(params)
  key = "final_norm" if "final_norm" in params else next(iter(params))
  params[key] = jax.tree.map(lambda x: x * jnp.nan, params[key])
  return params


@jax.jit
def _fold_in(key, data):
  return jax.random.fold_in(key, data)


@jax.jit
def _all_finite(tree) -> jax.Array:
  """True iff every floating-point leaf of `tree` is finite (one fused reduction)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


# Config fields a resume may change freely: they decide what is logged, kept or evaluated, how
# long the run goes, or how the same computation is laid out on the devices (a checkpoint restores
# onto another mesh, e.g. 2 processes -> 1), not what the steps compute. How long the run goes is
# the exception where the learning-rate schedule spans it (`OptimConfig.spans_the_run`).
RESUMABLE_CHANGES = (
    "mesh.shape", "mesh.axes", "mesh.rules",
    "loop.steps", "loop.progress", "loop.tensorboard", "loop.log_every", "loop.checkpoint_every",
    "loop.checkpoint_keep", "loop.eval_every", "loop.eval_batch_size", "loop.snapshot_steps",
    "loop.transfer_guard", "loop.debug_nan_at_step", "data.eval_sets", "loop.snapshot_format",
)


def _flatten(d, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = json.loads(json.dumps(v, default=str))  # tuples and lists compare alike
  return out


def config_changes(saved: Mapping[str, Any], current: TrainConfig) -> list[str]:
  """Dotted config fields whose values differ between a checkpoint's saved config and `current`,
  less `RESUMABLE_CHANGES` (with 'loop.steps' only under a constant schedule without warmup), as
  'key: saved -> current'."""
  # A cosine decay or a warmup is laid out over `loop.steps`: another length changes the learning
  # rate of the steps still to come.
  free = set(RESUMABLE_CHANGES) - ({"loop.steps"} if current.optim.spans_the_run else set())
  old = _flatten(saved)
  new = _flatten(config_lib.dataclass_to_dict(current))
  # A field the saved config lacks (added to the code since) counts as its default value.
  defaults = _flatten({f.name: config_lib.dataclass_to_dict(f.default)
                       for f in dataclasses.fields(TrainConfig)})
  old.update({k: defaults[k] for k in new if k not in old and k in defaults})
  keys = sorted(set(old) | set(new))
  return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys
          if old.get(k) != new.get(k) and k not in free]


def _check_provenance(ckpt: ckpt_lib.Checkpointer, cfg: TrainConfig,
                      allow_changes: Sequence[str]) -> None:
  meta = ckpt.latest_readable_meta()
  saved = (meta or {}).get("config")
  if saved is None:
    return  # a checkpoint from before configs were recorded: nothing to compare
  changes = config_changes(saved, cfg)
  refused = [c for c in changes if c.split(":")[0] not in set(allow_changes)]
  if refused:
    raise errors.ResumeConfigError(
        f"--resume with a config that changes the saved run in {ckpt.directory}: "
        + "; ".join(refused) + ". Pass allow_changes / --allow-changes "
        + ",".join(c.split(":")[0] for c in refused) + " if you mean it, or use a fresh workdir")


class _StopRequest:
  """SIGTERM / SIGINT during a run: noted here, acted on at the next step boundary (checkpoint,
  then return). A second signal restores the previous handler's behaviour."""

  def __init__(self):
    self.signal: int | None = None
    self._previous: dict[int, Any] = {}
    self._calls = 0   # of `agreed` (multi-process)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signal is not None:  # asked twice: stop now
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      signal.raise_signal(signum)
      return
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self) -> bool:
    """Whether to stop now; multi-process, every process stops at the same step if any was
    signalled (a tiny all-gather of the flags, an explicit documented transfer), or if JAX's
    preemption notifier caught a SIGTERM before this handler was installed (it is installed by
    `jax.distributed.initialize`; `multihost_utils.reached_preemption_sync_point`, counted in
    calls of this method, 1, 2, ..., the same on every process: the notifier's sync point counts
    from its first call, whatever step a resumed run starts at).

    The all-gather queues behind the step just dispatched, so the host waits for that step every
    step. A host-only agreement (a coordination-service barrier) was tried instead. 2-process
    RLVR smokes on a quiet machine then hung in XLA's CPU collectives in 5 runs of 8, against 4
    of 12 with this all-gather (see `mesh._bound_cpu_collective_waits`). Both rates are
    noisy, so the all-gather stays."""
    flag = self.signal is not None
    if jax.process_count() == 1:
      return flag
    from jax.experimental import multihost_utils
    with jax.transfer_guard("allow"):
      flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
    if bool(np.asarray(flags).any()):
      return True
    self._calls += 1
    try:
      return bool(multihost_utils.reached_preemption_sync_point(self._calls))
    except RuntimeError:   # no preemption sync manager in this runtime
      return False


def _load_teachers(cfg, mesh, rules, teacher_params):
  """(model config, graphdef, params) of the teacher, or tuples of them, one entry per teacher,
  with several routed teachers (`teachers.models`; in-memory `teacher_params` then a sequence
  with one params tree, or None, per teacher)."""
  if not cfg.teachers.models:
    return run_plan.load_model(cfg.teacher, mesh, rules, params=teacher_params, what="teacher")
  specs = cfg.teachers.models
  given = (None,) * len(specs) if teacher_params is None else tuple(teacher_params)
  if len(given) != len(specs):
    raise errors.UserError(f"teacher_params holds {len(given)} teachers; teachers.models names "
                           f"{len(specs)}")
  loaded = [run_plan.load_model(t.model, mesh, rules, params=p, what=f"teacher {t.name!r}")
            for t, p in zip(specs, given)]
  return tuple(tuple(x[i] for x in loaded) for i in range(3))


def _teacher_route(cfg, train_ex, primary: bool):
  """Several teachers: the teacher index of every training example (printed as counts)."""
  if not cfg.teachers.models:
    return None
  table = teachers_lib.route_table(train_ex, cfg.teachers)
  if primary:
    routed = ", ".join(f"{k}: {v}" for k, v in
                       teachers_lib.counts(table, cfg.teachers.names).items())
    print(f"teachers: training examples per teacher ({cfg.teachers.route} route): {routed}",
          file=sys.stderr, flush=True)
  return table


def _snapshots_on_disk(snap_dir: epath.Path, written: Mapping[int, str]) -> dict[int, str]:
  """{step: path} of every parameter snapshot of the run (also those of earlier invocations)."""
  found = dict(written)
  if snap_dir.is_dir():
    for p in snap_dir.iterdir():
      if p.name.isdigit() and ckpt_lib.is_snapshot_dir(p):
        found.setdefault(int(p.name), str(p))
  return dict(sorted(found.items()))


def _truncate_metrics(path: epath.Path, last_step: int) -> None:
  """On resume, drop metric rows of steps after the restored checkpoint (they will be redone)."""
  if not path.is_file():
    return
  keep = []
  for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
    try:
      if json.loads(line).get("step", 0) <= last_step:
        keep.append(line)
    except ValueError:
      continue
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text("".join(keep), encoding="utf-8")
  tmp.replace(path)


# -- the loop -------------------------------------------------------------------------------------
def _build_pipelines(plan: RunPlan, tok, train_ex, eval_ex, mesh, rules):
  """(train pipeline, eval pipeline or None) of the plan's buckets (host numpy batches, this
  process's rows)."""
  cfg, loop_cfg = plan.cfg, plan.cfg.loop
  if plan.recipe.uses_rollouts:
    prompt_ids = tokenizer_lib.encode_prompts(tok, [e.prompt for e in train_ex])
    with run_plan.buckets_field("data.prompt_buckets", plan.prompt_buckets):
      train = pipeline_lib.rollout_pipeline_from_ids(
          prompt_ids, [e.answer for e in train_ex], pipeline_lib.PipelineConfig(
              global_batch_size=loop_cfg.batch_size, bucket_lengths=plan.prompt_buckets,
              group_size=cfg.rollout.group_size, seed=loop_cfg.seed, shuffle=cfg.data.shuffle),
          pad_id=plan.pad_id)
  else:
    train = run_plan.sft_train_pipeline(plan, tok, train_ex)
  evals = _eval_pipeline(plan, tok, eval_ex, mesh, rules) if plan.has_eval and eval_ex else None
  return train, evals


def _eval_pipeline(plan: RunPlan, tok, eval_ex, mesh, rules):
  """One pass over an eval set: each prompt repeated eval_k times in consecutive rows."""
  with run_plan.buckets_field("data.prompt_buckets", plan.prompt_buckets):
    return pipeline_lib.rollout_pipeline_from_ids(
        tokenizer_lib.encode_prompts(tok, [e.prompt for e in eval_ex]),
        [e.answer for e in eval_ex], pipeline_lib.PipelineConfig(
            global_batch_size=run_plan.eval_batch_prompts(
                plan.cfg.loop.eval_batch_size, len(eval_ex), plan.eval_k, mesh, rules),
            bucket_lengths=plan.prompt_buckets, group_size=plan.eval_k, shuffle=False,
            num_epochs=1), pad_id=plan.pad_id)


def run(config: TrainConfig, workdir, *, resume: bool = False, init_params=None,
        teacher_params=None, subspace_bases=None, tokenizer=None,
        stop_after: int | None = None, allow_changes: Sequence[str] = ()) -> dict:
  """Trains `config.method` for `config.loop.steps` steps in `workdir`; returns a summary dict.

  Args:
    config: the typed run config (`train.config.from_config_dict` of a config file).
    workdir: run directory (created); a path with a scheme (gs://bucket/run) is used as given.
      See the module docstring for its layout.
    resume: continue from the latest checkpoint in `workdir` (a fresh start when there is none).
      Without it, a workdir that already holds checkpoints is an error.
    init_params: in-memory student params (override `config.student.source`).
    teacher_params: in-memory teacher params (override `config.teacher.source`).
    subspace_bases: in-memory bases for the 'subspace_projection' optimizer transform (override
      `config.subspace`).
    tokenizer: a tokenizer object (overrides `config.data.tokenizer`).
    stop_after: return after this step (with a checkpoint), as if the job had been stopped there
      (time-boxed jobs, preemption tests); `resume=True` continues to `loop.steps`.
    allow_changes: dotted config fields a resume may change although they change the
      computation (anything else that differs from the checkpoint's saved config is refused,
      naming each field; `RESUMABLE_CHANGES` may always change).

  SIGTERM / SIGINT (preemption, Ctrl-C) stop the run at the next step boundary with a checkpoint;
  the summary then has 'preempted': the signal's name.

  Returns:
    {'step', 'metrics' (last step's), 'eval' (list of eval results with their step), 'workdir',
     'checkpoint_dir', 'snapshots' ({step: path} of every snapshot on disk, also from earlier
     invocations of a resumed run), 'wall_s', 'steps_per_s', 'resumed_from', 'preempted'}.
  """
  if not isinstance(config, TrainConfig):
    raise TypeError(f"run() needs a TrainConfig (train.config.from_config_dict), got "
                    f"{type(config).__name__}")
  t_start = time.time()
  compile_cache.enable()
  cfg = config
  workdir = workdir_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt_dir, snap_dir = workdir / "checkpoints", workdir / "snapshots"
  primary = jax.process_index() == 0
  existing = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if (
      ckpt_dir.is_dir()) else []
  if existing and not resume:
    raise errors.UserError(f"{ckpt_dir} already holds checkpoints (latest step {existing[-1]}); "
                           "pass resume=True (--resume) to continue or use a fresh workdir")
  fresh = not (resume and existing)
  # A branch (`loop.branch_from`) starts from another run's checkpoint; once it has checkpoints
  # of its own, a resume continues from those.
  branch = _Branch.open(cfg) if fresh and cfg.loop.branch_from else None
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=cfg.loop.checkpoint_keep)
  try:
    if not fresh:
      _check_provenance(ckpt, cfg, allow_changes)
    if primary:
      # Every segment's config is kept: the first as config.json, each resume beside it.
      name = "config.json" if fresh else f"config.resume-{existing[-1]}.json"
      (workdir / name).write_text(json.dumps(config_lib.dataclass_to_dict(cfg), indent=1,
                                             default=str))
      if fresh:
        _truncate_metrics(workdir / "metrics.jsonl", -1)  # rows of an earlier, unsaved start
    # SIGTERM / SIGINT are noted from here on (loading, compiling and restoring take minutes on
    # a pod, and a preemption then must stop the run too): acted on at the first step boundary.
    with _StopRequest() as stop:
      return _run(cfg, workdir, ckpt, fresh, init_params, teacher_params, subspace_bases,
                  tokenizer, stop_after, t_start, branch, stop)
  finally:
    ckpt.close()
    if branch is not None:
      branch.ckpt.close()


# Config fields a branch may change beyond `RESUMABLE_CHANGES` (prefixes of dotted names).
BRANCH_CHANGES = ("optim.transforms", "subspace.", "loop.branch_from")


@dataclasses.dataclass
class _Branch:
  """The checkpoint a branch run starts from (`LoopConfig.branch_from`) and its run's config."""

  ckpt: ckpt_lib.Checkpointer
  step: int
  cfg: TrainConfig
  path: str

  @classmethod
  def open(cls, cfg: TrainConfig) -> "_Branch":
    where = f"loop.branch_from={cfg.loop.branch_from!r}"
    try:
      step_dir = ckpt_lib.resolve_step_dir(cfg.loop.branch_from)
    except (FileNotFoundError, ckpt_lib.CheckpointError) as e:
      raise errors.UserError(f"{where}: {e}") from None
    if ckpt_lib.is_snapshot_dir(step_dir):
      raise errors.UserError(f"{where}: {step_dir} is a parameter snapshot, not a checkpoint "
                             "(a branch needs the optimizer state and data position too)")
    # Read-only: the source run may still be training (its unfinished writes are its own).
    ckpt = ckpt_lib.Checkpointer(step_dir.parent, keep=None, read_only=True)
    try:
      step = int(step_dir.name)
      saved = (ckpt.restore_meta(step) or {}).get("config")
      if saved is None:
        raise errors.UserError(f"{where}: checkpoint {step_dir} records no config")
      refused = [c for c in config_changes(saved, cfg)
                 if not c.split(":")[0].startswith(BRANCH_CHANGES)]
      if refused:
        raise errors.ResumeConfigError(
            f"{where}: this run differs from the checkpoint's run in " + "; ".join(refused)
            + " (a branch may change only optim.transforms, subspace and what a resume may "
            "change)")
      return cls(ckpt, step, config_lib.from_config_dict(saved), str(step_dir))
    except BaseException:
      ckpt.close()
      raise

  def restore(self, optim_cfg, tx, abstract_params, shardings: TrainState, extras: dict,
              frozen: dict, context: dict, total_updates: int) -> tuple[TrainState, dict]:
    """(this run's state continuing the checkpoint's, the checkpoint's meta): everything from
    the checkpoint, its optimizer state grafted onto `tx`'s (`factory.graft_opt_state`).

    The checkpoint is read under its own run's optimizer (built with this run's `context`,
    parameter tree and update count: only its structure matters), onto this run's shardings.
    """
    source_tx = factory.make_optimizer(self.cfg.optim, abstract_params,
                                       total_steps=total_updates, **context)
    source_shardings = mesh_lib.state_shardings(source_tx, shardings.params, abstract_params,
                                                **extras, frozen_shardings=frozen.get("shardings"))
    abstract = mesh_lib.abstract_state(source_tx, abstract_params, source_shardings, **extras,
                                       frozen=frozen.get("abstract"))
    source, meta = self.ckpt.restore(self.step, abstract)
    fresh_opt = jax.jit(tx.init, out_shardings=shardings.opt_state)(source.params)
    try:
      opt_state = factory.graft_opt_state(optim_cfg, fresh_opt, self.cfg.optim, source.opt_state)
    except factory.GraftError as e:
      raise errors.UserError(f"loop.branch_from={self.path!r}: {e}") from None
    return source.replace(opt_state=opt_state), meta


class _StepAhead:
  """Compiles a run's jitted train step ahead of its first call, in a thread.

  The step is lowered with the state it will first receive and the recipe's abstract batch
  (`Recipe.abstract_batch`, placed as the batch is: `mesh.batch_sharding`), so the first call
  finds its trace, lowering and executable in JAX's caches. Tracing is Python (it shares the
  interpreter with the main thread); XLA compilation and persistent-cache reads run beside the
  main thread's work on the rollout programs. A failure here is dropped: the step's own first
  call raises it again, where it belongs.
  """

  def __init__(self, step_fn, state, recipe, plan: RunPlan, teacher_params, mesh, rules):
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                     sharding=mesh_lib.batch_sharding(mesh, len(v.shape), rules))
             for k, v in recipe.abstract_batch(plan).items()}
    extra = (teacher_params,) if recipe.step_takes_teacher(plan) else ()
    self.error: BaseException | None = None
    self._thread = threading.Thread(target=self._compile, args=(step_fn, (state, batch, *extra)),
                                    name="opd_jax-compile-step", daemon=True)
    self._thread.start()

  def _compile(self, step_fn, args):
    try:
      step_fn.compile(*args)
    except Exception as e:  # noqa: BLE001 - see the class docstring
      self.error = e

  def wait(self) -> None:
    self._thread.join()


def _run(cfg: TrainConfig, workdir: epath.Path, ckpt: ckpt_lib.Checkpointer, fresh: bool,
         init_params, teacher_params, subspace_bases, tokenizer, stop_after, t_start,
         branch: _Branch | None, stop: "_StopRequest") -> dict:
  """`run` after the workdir checks: build everything once, restore or init, loop."""
  primary = jax.process_index() == 0
  snap_dir = workdir / "snapshots"
  mesh = mesh_lib.make_mesh(cfg.mesh)
  rules = cfg.mesh.rules
  tok = tokenizer if tokenizer is not None else run_plan.load_tokenizer(cfg)
  recipe = recipes_lib.get(cfg)
  needs = recipe.needs(cfg)
  # Batch vs mesh before any weights are read (the architectures do not change the row count).
  run_plan.check_divisible(run_plan.resolve(cfg, tokenizer=tok), mesh, rules)

  # Models. A resumed run takes the student from its checkpoint (only the architecture is needed
  # here), unless the recipe keeps the initial student as its frozen reference.
  params = None
  if fresh or needs.reference:
    student_cfg, graphdef, params = run_plan.load_model(cfg.student, mesh, rules,
                                                        params=init_params)
  else:
    student_cfg = (cfg.student.model if init_params is not None and
                   cfg.student.source in ("random", "none") else
                   run_plan.spec_model_config(cfg.student))
    graphdef = transformer.graphdef_for(student_cfg)
  hf.check_tokenizer(student_cfg, tok)
  t_cfg = teacher_graphdef = t_params = None
  if needs.teacher:
    t_cfg, teacher_graphdef, t_params = _load_teachers(cfg, mesh, rules, teacher_params)
    for one in (t_cfg if isinstance(t_cfg, tuple) else (t_cfg,)):
      hf.check_tokenizer(one, tok)
      if one.vocab_size != student_cfg.vocab_size:
        raise errors.UserError(f"teacher vocab_size {one.vocab_size} != student vocab_size "
                               f"{student_cfg.vocab_size} (one shared tokenizer is required)")
  plan = run_plan.resolve(cfg, tokenizer=tok, student=student_cfg, teacher=t_cfg)

  # Data.
  train_ex, eval_ex, data_reports = run_plan.load_examples_with_reports(cfg, tok)
  named_evals = run_plan.load_eval_sets(cfg, tok) if plan.has_eval else []
  for name, _, report in named_evals:
    data_reports[f"eval/{name}"] = report
  for split, report in data_reports.items():
    if primary:
      print(f"data ({split}): {report.summary()}", file=sys.stderr, flush=True)
  if not train_ex:
    raise errors.UserError(f"no training examples in {cfg.data.path or 'the generated task'} "
                           "(data.train_examples / data.path)")
  train_pipe, eval_pipe = _build_pipelines(plan, tok, train_ex, eval_ex, mesh, rules)
  # ('', pipeline) is the unnamed eval split (eval/...), then data.eval_sets (eval/<name>/...).
  eval_pipes = ([("", eval_pipe)] if eval_pipe is not None else []) + [
      (name, _eval_pipeline(plan, tok, ex, mesh, rules)) for name, ex, _ in named_evals]
  verifier = run_plan.make_verifier(cfg) if (needs.verifier or eval_pipes) else None

  # Optimizer, context, state.
  p_shardings = mesh_lib.param_shardings(student_cfg, mesh, rules)
  abstract_params = transformer.abstract_params(student_cfg)
  # Adapters (lora.rank > 0): the state's params (and the optimizer) are the adapters'; the base
  # rides along frozen in `state.frozen`.
  lora_cfg, frozen = cfg.lora, {}
  if lora_cfg.enabled:
    frozen = {"abstract": abstract_params, "shardings": p_shardings}
    abstract_params = lora_lib.abstract_adapters(student_cfg, lora_cfg)
    p_shardings = mesh_lib.adapter_shardings(student_cfg, lora_cfg, mesh, rules)
  if subspace_bases is None:
    subspace_bases = run_plan.subspace_bases_from_config(cfg)
  context = {} if subspace_bases is None else {"subspace_bases": subspace_bases}
  tx = factory.make_optimizer(cfg.optim, abstract_params, total_steps=plan.total_updates,
                              **context)
  token_tx = (rollout_lib.make_token_transform(cfg.rollout.token_transforms)
              if recipe.uses_rollouts and cfg.rollout.token_transforms else None)
  ctx = recipes_lib.RunContext(
      plan=plan, mesh=mesh, rules=rules, graphdef=graphdef, tx=tx,
      teacher_graphdef=teacher_graphdef, teacher_params=t_params,
      teacher_route=_teacher_route(cfg, train_ex, primary),
      reference_params=params if needs.reference else None,
      verifier=verifier if needs.verifier else None, tokenizer=tok, token_tx=token_tx,
      knobs=recipe.rollout_knobs(plan),
      clock=timing.PhaseClock() if cfg.loop.time_phases else timing.NullClock(),
      to_device=lambda b: mesh_lib.global_batch(b, mesh, rules),
      merge=mesh_lib.jit_merge(lora_cfg, frozen["shardings"]) if frozen else None)
  extras = recipe.init_extras(ctx)
  s_shardings = mesh_lib.state_shardings(tx, p_shardings, abstract_params, **extras,
                                         frozen_shardings=frozen.get("shardings"))
  step_fn = recipe.jit_step(ctx, s_shardings)

  ckpt.model_cfg = student_cfg
  iterator = train_pipe.iterator()
  resumed_from = None
  try:
    restored = None
    if not fresh:
      abstract = mesh_lib.abstract_state(tx, abstract_params, s_shardings, **extras,
                                         frozen=frozen.get("abstract"))
      restored = ckpt.restore_latest(abstract)
      if restored is None:
        raise ckpt_lib.CheckpointError(f"{ckpt.directory}: checkpoints were listed but none "
                                       "could be restored")
      state, meta = restored
      iterator.set_state(meta["data"])
      resumed_from = int(jax.device_get(state.step))
      if primary:
        _truncate_metrics(workdir / "metrics.jsonl", resumed_from)
    elif branch is not None:
      state, meta = branch.restore(cfg.optim, tx, abstract_params, s_shardings, extras, frozen,
                                   context, plan.total_updates)
      iterator.set_state(meta["data"])
      resumed_from = branch.step
    else:
      trained, base = params, None
      if frozen:
        trained, base = mesh_lib.init_adapters(params, lora_cfg, s_shardings.params,
                                               s_shardings.frozen)
      state = mesh_lib.init_sharded_state(trained, tx, cfg.loop.seed, s_shardings, **extras,
                                          frozen=base)
      del trained, base
    # The live geometry monitor measures the update from the initial student (a resumed run
    # loads it again: the spec's weights, or the caller's init_params).
    origin = None
    if cfg.geometry.enabled:
      origin = params if params is not None else run_plan.load_model(
          cfg.student, mesh, rules, params=init_params)[2]
    if not needs.reference:
      del params
    # Everything that runs on the devices from here on sees the mesh and the axis rules (set-up
    # above stays outside: nnx's abstract evaluation must not pick up the context mesh).
    # The train step is traced, lowered and compiled (or read from the persistent cache) in a
    # background thread while the first batch is made (rollout programs, data): the
    # first step waits for it (`_loop`).
    first = resumed_from or 0
    end = cfg.loop.steps if stop_after is None else min(cfg.loop.steps, stop_after)
    ahead = _StepAhead(step_fn, state, recipe, plan, t_params, mesh, rules) if (
        first < end) else None
    try:
      with jax.set_mesh(mesh), sharding.axis_rules(rules):
        return _loop(ctx, recipe, state, iterator, step_fn, ckpt, workdir, snap_dir, eval_pipes,
                     verifier, resumed_from, t_start, stop_after, data_reports, stop, origin,
                     ahead)
    finally:
      if ahead is not None:
        ahead.wait()
  finally:
    verifiers.close_verifier(verifier)
    ctx.clock.close()


def _loop(ctx: recipes_lib.RunContext, recipe, state: TrainState, iterator, step_fn, ckpt,
          workdir: epath.Path, snap_dir: epath.Path, eval_pipes, verifier,
          resumed_from: int | None, t_start: float, stop_after: int | None,
          data_reports: Mapping[str, Any], stop: "_StopRequest", origin=None,
          ahead: _StepAhead | None = None) -> dict:
  """Dispatch (recipe batch -> jitted step), fetch metrics one step late, save.

  The step loop runs under `jax.transfer_guard(loop.transfer_guard)`: every host <-> device copy
  in it is an explicit one (`device_put` / `make_array_from_process_local_data` of host batches,
  `jax.device_get` of metrics one step late, the verifier's decode of its own rows, checkpoint
  and snapshot writes, eval scores).
  """
  plan = ctx.plan
  cfg, loop_cfg = plan.cfg, plan.cfg.loop
  writer = metrics_lib.MetricsWriter(str(workdir), tensorboard=loop_cfg.tensorboard)
  fetcher = metrics_lib.LateFetcher()
  # The step the state is at, known without waiting for the devices (a fresh state is still
  # being initialised there while the first programs are traced).
  start = resumed_from if resumed_from is not None else 0
  progress = metrics_lib.Progress(loop_cfg.steps, initial=start, enabled=loop_cfg.progress,
                                  show=("train/loss", "opd/teacher_gap", "rlvr/reward_mean",
                                        "time/step_s", "perf/mfu"))
  # Keys and the step numbers folded into them live replicated on the mesh (no implicit copies).
  replicated = mesh_lib.replicated(ctx.mesh)
  eval_rng = _fold_in(jax.device_put(jax.random.key(loop_cfg.seed), replicated),
                      jax.device_put(np.uint32(0xE7A1), replicated))
  poison = jax.jit(_poison)
  geo = cfg.geometry
  monitor = geo_bases = None
  if origin is not None:   # live geometry (`geometry.every`), on the devices, fetched one step late
    monitor = live_lib.make_monitor(geo, replicated=replicated)
    geo_bases = jax.device_put(live_lib.init_bases(origin, geo), replicated)
  evals: list[dict] = []
  snapshots: dict[int, str] = {}
  last: dict[str, float] = {}
  last_step: int | None = None   # the step `last` belongs to (metrics arrive one step late)
  last_ckpt = ckpt.latest_step()
  # The peak FLOP/s behind MFU is measured once per run, after the first step (its metrics are
  # fetched at once for it): measuring it compiles and times a matmul, which would otherwise
  # delay the first step, and it is measured with the devices idle. None: not measured yet.
  peak, peak_source = (None, "") if loop_cfg.time_phases else (0.0, "")
  step_flops = timing.iteration_flops(plan)
  first_step_s = None

  def handle(ready):
    nonlocal last, last_step, first_step_s, peak, peak_source
    if ready is None:
      return
    s, m = ready
    if first_step_s is None:
      first_step_s = time.time() - t_start
    # Sim_K has no previous point at a process's first monitor point (NaN): not a metric.
    m = {k: v for k, v in m.items() if not (k.startswith("geometry/sim_k/") and v != v)}
    if m.get("train/loss_finite", 1.0) < 1.0:
      raise NonFiniteLossError(s, m, last_ckpt, str(ckpt.directory))
    times = ctx.clock.times(s)
    if times:
      if peak is None:
        with jax.transfer_guard("allow"):  # the measurement's own inputs and timing syncs
          peak, peak_source = timing.peak_flops()
      tokens = {"processed": float(plan.rows * plan.seq_len)}
      if "rollout/response_len" in m:
        tokens["generated"] = m["rollout/response_len"] * plan.rows
      m = {**m, **times, **timing.throughput(times, tokens, step_flops, peak)}
    last, last_step = m, s
    if s % loop_cfg.log_every == 0 or s == loop_cfg.steps:
      writer.write(s, m)

  def do_eval(s: int, params):
    # Every eval set, in config order (all processes alike: `evaluate` all-gathers per set).
    result = {}
    key = _fold_in(eval_rng, jax.device_put(np.uint32(s), replicated))
    for i, (name, pipe) in enumerate(eval_pipes):
      set_key = key if i == 0 else _fold_in(key, jax.device_put(np.uint32(i), replicated))
      out = rollout_lib.evaluate(ctx.graphdef, params, pipe.iterator(), ctx.tokenizer, verifier,
                                 plan.eval_sampler, set_key, plan.eval_k, ctx.to_device)
      result.update(out if not name else
                    {f"eval/{name}/{k.removeprefix('eval/')}": v for k, v in out.items()})
    evals.append({"step": s, **result})
    writer.write(s, result)

  saved_config = config_lib.dataclass_to_dict(cfg)

  def check_finite(s: int, tree, what: str):
    # Nothing non-finite is ever saved: the guard checks what is about to be written.
    if not bool(jax.device_get(_all_finite(tree))):
      raise NonFiniteLossError(s, last, last_ckpt, str(ckpt.directory), what=what)

  def snapshot(s: int, state):
    value_head = state.value["params"] if state.value is not None else None
    params = recipes_lib.policy_params(ctx, state)  # merged full params with adapters
    check_finite(s, (params, value_head), "parameters")
    with jax.transfer_guard("allow"):  # orbax's own explicit writes
      snapshots[s] = str(ckpt_lib.save_snapshot(snap_dir, s, params, plan.student,
                                                value_head=value_head,
                                                snapshot_format=loop_cfg.snapshot_format))

  def save(s: int, state):
    check_finite(s, state, "train state (parameters / optimizer state)")
    with jax.transfer_guard("allow"):
      ckpt.save(s, state, {"data": iterator.get_state(), "config": saved_config})

  do_evals = bool(eval_pipes) and loop_cfg.eval_every > 0
  if data_reports:  # what the loaders read, kept and skipped: once, at the run's first step
    writer.write(start, {k: float(v) for split, r in data_reports.items()
                         for k, v in r.to_metrics("data" if split == "train"
                                                  else f"data/{split}").items()})
  step = start
  end = loop_cfg.steps if stop_after is None else min(loop_cfg.steps, stop_after)
  t_loop = time.time()
  preempted = None
  try:
    with jax.transfer_guard(loop_cfg.transfer_guard):
      if resumed_from is None:
        if 0 in loop_cfg.snapshot_steps:
          snapshot(0, state)
        if do_evals:
          do_eval(0, recipes_lib.policy_params(ctx, state))
      while step < end:
        ctx.clock.start(step + 1)
        t_data = time.perf_counter()
        host = next(iterator)
        ctx.clock.host("data", t_data)
        state, args, rollout_metrics = recipe.make_batch(ctx, state, host)
        if loop_cfg.debug_nan_at_step == step + 1:
          state = state.replace(params=poison(state.params))
        if ahead is not None:  # the step compiled ahead (`_StepAhead`): wait for it once
          ahead.wait()
          ahead = None
        state, step_metrics = step_fn(state, *args)
        step += 1
        if monitor is not None and step % geo.every == 0:
          geo_metrics, geo_bases = monitor(origin, recipes_lib.policy_params(ctx, state),
                                           geo_bases)
          step_metrics = {**step_metrics, **geo_metrics}
        ctx.clock.finish(step, step_metrics)
        handle(fetcher.push(step, {**step_metrics, **rollout_metrics}))
        if peak is None and step == start + 1:
          handle(fetcher.flush())  # the first step: fetched now, the peak measured (above)
        progress.update(1, last, last_step)

        want_snapshot = step in loop_cfg.snapshot_steps
        want_ckpt = ((loop_cfg.checkpoint_every and step % loop_cfg.checkpoint_every == 0)
                     or step == end)
        want_eval = do_evals and (step % loop_cfg.eval_every == 0 or step == loop_cfg.steps)
        if want_snapshot or want_ckpt or want_eval:
          handle(fetcher.flush())  # this step must be finite before anything of it is saved
        if want_snapshot:
          snapshot(step, state)
        if want_eval:   # before the checkpoint: a run killed during the eval resumes before it
          do_eval(step, recipes_lib.policy_params(ctx, state))
        if want_ckpt:
          save(step, state)
          last_ckpt = step
        if step < end and stop.agreed():
          handle(fetcher.flush())
          if not want_ckpt:
            save(step, state)
            last_ckpt = step
          preempted = signal.Signals(stop.signal).name if stop.signal else "peer process"
          break
      handle(fetcher.flush())
      progress.show_metrics(last, last_step, refresh=True)
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
      "resumed_from": resumed_from, "preempted": preempted,
      "first_step_s": first_step_s, "peak_flops": peak or 0.0, "peak_flops_source": peak_source,
      "model_flops_per_step": step_flops,
      # How the times were taken: on the CPU backend as `opd-jax` tunes it (`host_malloc`), each
      # call returns once its work is done.
      "synchronous_dispatch": timing.synchronous_dispatch(),
      "data": {split: r.to_dict() for split, r in data_reports.items()},
  }
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
  return summary

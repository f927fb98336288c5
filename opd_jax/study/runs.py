"""The study's phases: task -> teacher -> base -> anchor / SFT -> OPD / RLVR -> rank-16 -> controls
-> diagnostics -> report, each a `phases.Phase` writing under `WORKDIR/<phase>/`.

The SFT arm is the paper's: base -> SFT anchor. Each seed's `sft` run is the anchor SFT (the
`anchor` section from the base, `loop.seed` = the seed) with trajectory snapshots and a checkpoint
at its first snapshot; `sft_rank16` branches from that checkpoint (the anchor SFT resumed under
the projection). The first seed's `sft` run has the anchor's exact config, so it retraces the
anchor step for step (the anchor phase is kept on its own, without snapshots, as the start of
every OPD / RLVR / control run; the diagnostics check the two agree). OPD, RLVR, the controls and
the regime map start from the anchor; the regime map's SFT points are the `sft` section (SFT
continued from the anchor), at every budget including the study's own.

Every training phase calls `train.loop.run` (THE training loop) with a TrainConfig composed by
`study.config.compose`; models flow between phases as parameter snapshots on disk (`ModelSpec(
source='checkpoint', path=...)`), so each run's `run/config.json` says exactly what it started from.
Phase fingerprints use the composed TrainConfig with symbolic paths (`@anchor:final`), so moving
the workdir does not invalidate anything. After training, the study measures the final parameters'
accuracy itself (`evaluate`: avg@k with `study.eval`, the same protocol for every run).

Run names (also the phase directory names): teacher, base, anchor, sft, opd, rlvr, opd_rank16,
sft_rank16 (and, for every seed after the first, opd_seed<s>, ..., sft_rank16_seed<s>; see
`config` on seeds), ctrl_topkl_25 / ctrl_random_50 / ... (token sparsification, rho in percent),
ctrl_offpolicy, mix_<alpha> (e.g. mix_0.05), and with `study.adapters.enabled` the adapter arms
opd_lora / opd_pissa (beyond the paper; `config` module docstring).

A teacher (or base student) whose `ModelSpec.source` is 'hf' or 'checkpoint' is used as is and only
evaluated (the qwen3_8b preset); with source 'random' it is trained by `teacher_train` /
`base_train`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from typing import Any, Callable

import numpy as np

from opd_jax.study import config as study_config
from opd_jax.study import phases as phases_lib
from opd_jax.study.config import StudyConfig
from opd_jax.train import checkpoint as ckpt_lib

REPORT_DIR = "report"
STUDY_JSON = "study_config.json"
TRAJECTORY_RUNS = ("sft", "opd", "rlvr")
ORIGINS = {"sft": "base -> anchor", "opd": "anchor -> end", "rlvr": "anchor -> end"}
# The seeded run family whose seeds give each method's endpoint (SFT: base -> each seed's anchor
# SFT; the first seed's is the anchor itself).
ENDPOINT_FAMILY = {"sft": "sft", "opd": "opd", "rlvr": "rlvr"}
# The plain runs whose snapshots are evaluated for accuracy against progress (every seed), and
# the seeded families whose update masks are compared across seeds (mask consensus).
PROGRESS_FAMILIES = ("opd", "sft")
CONSENSUS_FAMILIES = ("opd", "rlvr")
PROGRESS_DIR = "progress"


# -- run specs -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of the study.

  Attributes:
    name: phase / run name.
    section: the study run section its TrainConfig is composed from.
    start: (phase, which) whose model the student starts from; which is 'final' or 'first' (the
      first trajectory snapshot); None = the study's own `student` / `teacher` spec.
    uses_teacher: pass the teacher to the run.
    trajectory: save `study.snapshots` evenly spaced snapshots (else only the final one).
    subspace_of: for the rank-16 runs, the trajectory run whose cumulative update (its start ->
      its first snapshot) defines the subspace and whose checkpoint at that step the arm
      continues (`loop.branch_from`, the paper's shared resume: parameters, Adam's moments,
      schedule, data position and RNG), so the plain and projected runs differ only in the
      projection.
    edit: modifies the composed config dict (controls).
    kind: 'teacher' | 'base' | 'main' | 'rank16' | 'sparsify' | 'offpolicy' | 'mixing' |
      'adapter' | 'regime'.
    alpha: the mixing weight of a mixing run.
    init: the adapter initialisation of an adapter arm ('lora' | 'pissa').
    seed: for the seeded runs (`config.SEEDED_RUNS`), the seed (the run's `loop.seed`); None keeps
      the section's `loop.seed`.
    family: the seeded run this is one seed of ('opd', 'opd_rank16', ...); None otherwise.
    budget_scale: a regime-map run's update budget relative to the paper's (`regime.map_scales`);
      None: `regime.scale`.
    rank_of: for the rank-16 runs with `rank16.derive_k`, the OPD run whose update at its first
      snapshot sets K (`projection_rank`).
  """

  name: str
  section: str
  start: tuple[str, str] | None
  uses_teacher: bool = False
  trajectory: bool = False
  subspace_of: str | None = None
  edit: Callable[[dict], None] | None = None
  kind: str = "main"
  alpha: float | None = None
  init: str | None = None
  seed: int | None = None
  family: str | None = None
  budget_scale: float | None = None
  rank_of: str | None = None

  @property
  def deps(self) -> tuple[str, ...]:
    out = [self.rank_of] if self.rank_of else []
    if self.subspace_of:
      out.append(self.subspace_of)
    if self.start is not None:
      out.append(self.start[0])
    if self.name not in ("teacher", "base") and self.start is not None:
      out.append(_budget_origin(self)[0])
    if self.uses_teacher:
      out.append("teacher")
    return tuple(dict.fromkeys(d for d in out if d != self.name))


def _pct(rho: float) -> str:
  return f"{round(100 * float(rho))}"


def run_specs(study: StudyConfig) -> list[RunSpec]:
  """Every run of the study, in a valid order."""
  c = study.controls
  seeds = study_config.seed_values(study.seeds)
  specs = [
      RunSpec("teacher", "teacher_train", None, kind="teacher"),
      RunSpec("base", "base_train", None, kind="base"),
      # The first seed's anchor SFT: every OPD / RLVR / control run starts from it.
      RunSpec("anchor", "anchor", ("base", "final"), seed=seeds[0]),
  ]
  for seed in seeds:
    def n(run, seed=seed):
      return study_config.seeded_name(run, seeds, seed)

    specs += [
        RunSpec(n("sft"), "anchor", ("base", "final"), trajectory=True, seed=seed, family="sft"),
        RunSpec(n("opd"), "opd", ("anchor", "final"), uses_teacher=True, trajectory=True,
                seed=seed, family="opd"),
        RunSpec(n("rlvr"), "rlvr", ("anchor", "final"), trajectory=True, seed=seed,
                family="rlvr"),
    ]
  if study.rank16.enabled:
    for seed in seeds:
      def n(run, seed=seed):
        return study_config.seeded_name(run, seeds, seed)

      rank_of = n("opd") if study.rank16.derive_k else None
      # Same start and config as the plain run (the branch continues its checkpoint).
      specs += [RunSpec(n("opd_rank16"), "opd", ("anchor", "final"), uses_teacher=True,
                        subspace_of=n("opd"), kind="rank16", seed=seed, family="opd_rank16",
                        rank_of=rank_of),
                RunSpec(n("sft_rank16"), "anchor", ("base", "final"), subspace_of=n("sft"),
                        kind="rank16", seed=seed, family="sft_rank16", rank_of=rank_of)]
  for kind, rho in c.sparsify:
    transform = (study_config.SPARSIFY_KINDS[kind],
                 {"rho": float(rho), **({"seed": c.sparsify_seed} if kind == "random" else {})})

    def edit(d, transform=transform):
      study_config.set_in(d, "rollout.token_transforms", (transform,))

    specs.append(RunSpec(f"ctrl_{kind.replace('_', '')}_{_pct(rho)}", "opd", ("anchor", "final"),
                         uses_teacher=True, trajectory=True, edit=edit, kind="sparsify"))
  if c.offpolicy:
    def edit_off(d):
      study_config.set_in(d, "rollout.policy", "teacher")
      study_config.set_in(d, "pg.pg.eps_low", c.offpolicy_clip)
      study_config.set_in(d, "pg.pg.eps_high", c.offpolicy_clip)

    specs.append(RunSpec("ctrl_offpolicy", "opd", ("anchor", "final"), uses_teacher=True,
                         trajectory=True, edit=edit_off, kind="offpolicy"))
  for alpha in c.mixing_alphas:
    def edit_mix(d, alpha=alpha):
      d["method"] = "mixed"
      study_config.set_in(d, "rollout.mix_alpha", float(alpha))
      d["grpo"] = dict(study.rlvr.get("grpo", {}))

    specs.append(RunSpec(f"mix_{alpha:g}", "opd", ("anchor", "final"), uses_teacher=True,
                         trajectory=True, edit=edit_mix, kind="mixing", alpha=float(alpha)))
  if study.adapters.enabled:
    for init in study.adapters.inits:
      def edit_lora(d, init=init):
        d["lora"] = study_config._merge(dict(d.get("lora", {})), study.adapters.lora_section(init))

      # One seed: the first one's loop.seed, so the arm differs from `opd` in `lora` only.
      specs.append(RunSpec(study_config.adapter_run(init), "opd", ("anchor", "final"),
                           uses_teacher=True, trajectory=True, edit=edit_lora, kind="adapter",
                           init=init, seed=seeds[0]))
  for scale in study.regime.map_scales:
    for method in MAP_METHODS:
      if method in MAP_FROM_MAIN and float(scale) == float(study.regime.scale):
        continue  # the main run (first seed) is this point of the map
      specs.append(RunSpec(map_run(method, scale), method, ("anchor", "final"),
                           uses_teacher=method == "opd", kind="regime", seed=seeds[0],
                           budget_scale=float(scale)))
  return specs


# The regime map's methods (each its own run section, from the anchor), and those whose first
# seed's main run is the map's point at the study's own budget (the SFT arm starts at the base).
MAP_METHODS = ("sft", "opd", "rlvr")
MAP_FROM_MAIN = ("opd", "rlvr")


def map_run(method: str, scale: float) -> str:
  """The run name of the regime map's `method` run at budget `scale` x the paper's."""
  return f"map_{method}_x{float(scale):g}"


# -- composing configs ------------------------------------------------------------------------------
Resolver = Callable[[str, str], str]


def _symbolic(phase: str, which: str) -> str:
  return f"@{phase}:{which}"


def produced_model(study: StudyConfig, phase: str, which: str, resolve: Resolver):
  """The ModelSpec of the model phase `phase` produced ('final' or its 'first' snapshot)."""
  from opd_jax.train.config import ModelSpec
  if phase == "teacher" and study.teacher.source != "random":
    return study.teacher
  if phase == "base" and study.student.source != "random":
    return study.student
  model = study.teacher.model if phase == "teacher" else study.student.model
  return ModelSpec(source="checkpoint", path=resolve(phase, which), model=model)


def trains(study: StudyConfig, spec: RunSpec) -> bool:
  if spec.kind == "teacher":
    return study.teacher.source == "random"
  if spec.kind == "base":
    return study.student.source == "random"
  return True


def _budget_origin(spec: RunSpec) -> tuple[str, str]:
  """The model whose median |W| sets a run's half-ulp: the anchor SFT starts from the base,
  every other budget-matched run (plain, seeds, controls, arms) from the anchor, so all runs of
  one section share one learning rate."""
  return ("base", "final") if spec.section == "anchor" else ("anchor", "final")


def budget_match(study: StudyConfig, spec: RunSpec, resolve: Resolver):
  """The `regime.BudgetMatch` setting this run's learning rate, or None (rule off, a section
  it does not cover, or paths not known yet: `build_phases` composes with symbolic paths)."""
  from opd_jax.study import regime  # noqa: PLC0415
  method = study_config.BUDGET_SECTIONS.get(spec.section)
  if not study.regime.match_budget or method is None or spec.kind in ("teacher", "base"):
    return None
  origin = produced_model(study, *_budget_origin(spec), resolve)
  if origin.path.startswith("@"):
    return None
  section = getattr(study, spec.section)
  scale = spec.budget_scale if spec.budget_scale is not None else study.regime.scale
  return regime.match_budget(method, section.get("optim", {}),
                             study_config.section_steps(study, spec.section),
                             regime.median_abs_weight(str(origin.path)), scale=scale,
                             paper_median_abs_w=study.regime.paper_median_abs_w)


def projection_rank(study: StudyConfig, opd_run: str, resolve: Resolver) -> dict | None:
  """The paper's rank rule on `opd_run` (`Rank16Config.derive_k`): {k, median_stable_rank,
  stable_ranks, run}, or None (rule off, or paths not known yet)."""
  from opd_jax.study import regime  # noqa: PLC0415
  if not study.rank16.derive_k:
    return None
  origin, at = resolve("anchor", "final"), resolve(opd_run, "first")
  if origin.startswith("@") or at.startswith("@"):
    return None
  ranks = regime.attention_stable_ranks(origin, at)
  return {"k": regime.projection_rank(ranks), "run": opd_run,
          "median_stable_rank": float(np.median(list(ranks.values()))), "stable_ranks": ranks}


@dataclasses.dataclass(frozen=True)
class Derived:
  """The settings a run takes from other runs' weights by the scale rules: its learning rate
  (`budget_match`) and its projection rank (`projection_rank`); None where no rule applies."""

  budget: Any = None
  rank: dict | None = None


def derive(study: StudyConfig, spec: RunSpec, resolve: Resolver) -> Derived:
  """Measures what the scale rules need for `spec` (reads the weights they start from)."""
  return Derived(budget_match(study, spec, resolve),
                 projection_rank(study, spec.rank_of, resolve) if spec.rank_of else None)


def compose_run(study: StudyConfig, spec: RunSpec, resolve: Resolver,
                derived: Derived | None = None):
  """The TrainConfig of a run (paths through `resolve`); `derived` (`derive`) when already
  measured."""
  if spec.kind in ("teacher", "base"):
    model = study.teacher if spec.kind == "teacher" else study.student
    # A loaded (not trained) model is only evaluated: its config comes from the RLVR section
    # (sampler and data settings of the prompt set; no teacher, no worked solutions needed).
    section = spec.section if trains(study, spec) else "rlvr"
    return study_config.compose(study, section, student=model, teacher=None)
  student = produced_model(study, spec.start[0], spec.start[1], resolve)
  teacher = produced_model(study, "teacher", "final", resolve) if spec.uses_teacher else None
  steps = study_config.section_steps(study, spec.section)
  snaps = study_config.snapshot_steps(steps, study.snapshots) if spec.trajectory else None
  edits = [spec.edit] if spec.edit else []
  if derived is None:
    derived = derive(study, spec, resolve)
  match = derived.budget
  if match is not None:
    def edit_lr(d):
      study_config.set_in(d, "optim.lr", match.lr)
      study_config.set_in(d, "optim.final_lr", match.final_lr)

    edits.insert(0, edit_lr)
  if spec.seed is not None:
    edits.append(lambda d: study_config.set_in(d, "loop.seed", int(spec.seed)))
  if study.rank16.enabled and (spec.kind == "rank16" or spec.family in ("opd", "sft")):
    # The plain runs keep a checkpoint at their first snapshot for the rank-16 arms to branch
    # from (the arms carry the same settings: checkpointing does not change the computation).
    first = study_config.snapshot_steps(steps, study.snapshots)[0]

    def edit_keep(d):
      study_config.set_in(d, "loop.checkpoint_every", first)
      study_config.set_in(d, "loop.checkpoint_keep", steps // first + 1)

    edits.append(edit_keep)
  if spec.subspace_of is not None:
    r16 = study.rank16
    k = derived.rank["k"] if derived.rank is not None else r16.k

    def edit_r16(d):
      study_config.set_in(d, "loop.branch_from", resolve(spec.subspace_of, "first_checkpoint"))
      transforms = tuple(d.get("optim", {}).get("transforms", ()))
      study_config.set_in(d, "optim.transforms", transforms + (
          {"name": "subspace_projection", "position": r16.position, "kwargs": {}},))
      d["subspace"] = {"origin": resolve(*spec.start),
                       "at": resolve(spec.subspace_of, "first"), "k": k}

    edits.append(edit_r16)

  def edit(d):
    for e in edits:
      e(d)

  return study_config.compose(study, spec.section, student=student, teacher=teacher,
                              snapshots=snaps, edit=edit)


# -- evaluation -------------------------------------------------------------------------------------
def evaluate(cfg, model_spec, ev: study_config.EvalConfig) -> dict:
  """avg@k of a model on the eval split of `cfg.data` (the study's one accuracy protocol).

  Returns {acc, pass_at_k, response_len, n, k, stderr}; `stderr` is the standard error of avg@k
  over the n distinct prompts (the sample standard deviation of the per-prompt mean scores /
  sqrt(n): problems are the unit, not samples; `metrics.eval_summary`).
  """
  import jax
  from opd_jax.data import pipeline as pipeline_lib
  from opd_jax.data import tokenizer as tokenizer_lib
  from opd_jax.models import sharding
  from opd_jax.train import mesh as mesh_lib
  from opd_jax.train import rollout as rollout_lib
  from opd_jax.train import run_plan

  mesh = mesh_lib.make_mesh(cfg.mesh)
  rules = cfg.mesh.rules
  tok = run_plan.load_tokenizer(cfg)
  # The run plan's buckets and response budget: exactly the lengths the training loop uses.
  plan = run_plan.resolve(cfg, tokenizer=tok)
  k = 1 if ev.greedy else ev.k
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    _, graphdef, params = run_plan.load_model(model_spec, mesh, rules)
    _, eval_ex = run_plan.load_examples(cfg, tok)
    if not eval_ex:
      raise ValueError("the study needs an eval split (data.eval_examples / data.eval_path)")
    prompt_ids = tokenizer_lib.encode_prompts(tok, [e.prompt for e in eval_ex])
    pipe = pipeline_lib.rollout_pipeline_from_ids(
        prompt_ids, [e.answer for e in eval_ex], pipeline_lib.PipelineConfig(
            global_batch_size=run_plan.eval_batch_prompts(ev.batch_size, len(eval_ex), k, mesh,
                                                          rules),
            bucket_lengths=plan.prompt_buckets,
            group_size=k, shuffle=False, num_epochs=1), pad_id=plan.pad_id)
    sampler_cfg = run_plan.sampler_config(cfg, plan.eos_id, plan.pad_id,
                                          max_new_tokens=plan.max_new_tokens, greedy=ev.greedy,
                                          temperature=ev.temperature)
    res = rollout_lib.evaluate(graphdef, params, pipe.iterator(), tok,
                               run_plan.make_verifier(cfg), sampler_cfg,
                               jax.random.key(ev.seed), k,
                               lambda b: mesh_lib.global_batch(b, mesh, rules))
  acc, n = float(res["eval/accuracy"]), int(res["eval/prompts"])
  return {"acc": acc, "pass_at_k": float(res["eval/pass_at_k"]),
          "response_len": float(res["eval/response_len"]), "n": n, "k": k,
          "stderr": float(res[f"eval/avg@{k}_se"])}


# -- phase functions --------------------------------------------------------------------------------
def _rel(ctx, path) -> str:
  return os.path.relpath(os.fspath(path), os.fspath(ctx.workdir))


def _snapshot_dirs(run_dir: pathlib.Path) -> dict[int, pathlib.Path]:
  root = run_dir / "snapshots"
  if not root.is_dir():
    return {}
  return {int(p.name): p for p in root.iterdir() if p.is_dir() and p.name.isdigit()}


def _resolver(ctx) -> Resolver:
  """(phase, which) -> path: which = 'final' (its final snapshot), 'first' (its first snapshot)
  or 'first_checkpoint' (its checkpoint at its first snapshot's step, `compose_run`)."""
  def resolve(phase: str, which: str) -> str:
    summary = ctx.dep_summary(phase)
    if which == "final":
      return str(ctx.workdir / summary["final"])
    first = str(min(int(s) for s in summary["snapshots"]))
    if which == "first_checkpoint":  # <phase>/run/snapshots/<steps> -> <phase>/run/checkpoints/
      return str(ctx.workdir / pathlib.Path(summary["final"]).parent.parent / "checkpoints"
                 / first)
    return str(ctx.workdir / summary["snapshots"][first])
  return resolve


def _task_phase(study: StudyConfig):
  def fn(ctx):
    from opd_jax.data import tasks as tasks_lib
    from opd_jax.train import run_plan
    cfg = study_config.compose(study, "opd", student=study.student, teacher=study.teacher)
    tok = run_plan.load_tokenizer(cfg)
    tok.save_pretrained(ctx.out_dir / "tokenizer")
    for spec in (study.student, study.teacher):
      if spec.source == "random" and spec.model.vocab_size < len(tok):
        raise ValueError(f"model vocab_size {spec.model.vocab_size} < tokenizer size {len(tok)}")
    train, evals = run_plan.load_examples(cfg, tok)
    samples = [dataclasses.asdict(e) for e in evals[:8]]
    (ctx.out_dir / "eval_samples.json").write_text(json.dumps(samples, indent=1))
    out = {"tokenizer": _rel(ctx, ctx.out_dir / "tokenizer"), "vocab": len(tok),
           "train_examples": len(train), "eval_examples": len(evals), "samples": samples[:3]}
    if cfg.data.source == "task":
      out["max_prompt_chars"], out["max_solution_chars"] = tasks_lib.max_lengths(cfg.data.task)
    return out
  return fn


def _train_phase(study: StudyConfig, spec: RunSpec, log=print):
  def fn(ctx):
    from opd_jax.train import config as train_config
    from opd_jax.train import loop
    derived = derive(study, spec, _resolver(ctx))   # measured once, composed and recorded
    cfg = compose_run(study, spec, _resolver(ctx), derived)
    out: dict[str, Any] = {"kind": spec.kind, "config": train_config.dataclass_to_dict(cfg)}
    if derived.budget is not None:
      out["budget"] = derived.budget.to_metrics()
    if spec.rank_of:
      out["projection_rank"] = derived.rank
    if not trains(study, spec):
      model = study.teacher if spec.kind == "teacher" else study.student
      out.update(final=None, snapshots={}, trained=False, model_path=model.path)
    else:
      run_dir = ctx.out_dir / "run"
      target = {"teacher": study.teacher_target, "base": study.base_target}.get(spec.kind)
      if target is not None and target.acc > 0:
        cfg, summary, checks = _train_to_target(study, spec, cfg, target, run_dir, log)
        out["target_checks"] = checks
      else:
        summary = loop.run(cfg, run_dir, resume=True)
      snaps = _snapshot_dirs(run_dir)
      final = snaps.get(cfg.loop.steps)
      if final is None:
        raise RuntimeError(f"{spec.name}: no final snapshot at step {cfg.loop.steps} in {run_dir}")
      model = produced_model(study, spec.name, "final", lambda p, w: str(final))
      if cfg.geometry.every > 0:
        out["live_geometry"] = live_series(run_dir / "metrics.jsonl")
      out.update(final=_rel(ctx, final), trained=True,
                 snapshots={str(s): _rel(ctx, p) for s, p in sorted(snaps.items())},
                 train_wall_s=summary.get("wall_s"), steps_per_s=summary.get("steps_per_s"),
                 last_metrics=summary.get("metrics", {}))
    out["config"] = train_config.dataclass_to_dict(cfg)  # after a target search: its length
    out["steps"] = cfg.loop.steps
    out["eval"] = evaluate(dataclasses.replace(cfg, data=study.data), model, study.eval)
    log(f"[study] {spec.name}: eval accuracy {out['eval']['acc']:.3f} "
        f"(avg@{out['eval']['k']}, {out['eval']['n']} prompts)")
    return out
  return fn


def live_series(metrics_path) -> dict[str, list]:
  """The live geometry monitor's points of one run (`geometry/*` rows of its metrics.jsonl):
  {"step": [...], metric: [...]} in step order; a metric a point lacks (Sim_K at a process's
  first point) is None there."""
  from opd_jax.train import metrics as metrics_lib
  rows = sorted((r for r in metrics_lib.read_jsonl(str(metrics_path))
                 if any(k.startswith("geometry/") for k in r)), key=lambda r: r["step"])
  keys = sorted({k for r in rows for k in r if k.startswith("geometry/")})
  out: dict[str, list] = {"step": [int(r["step"]) for r in rows]}
  for k in keys:
    out[k] = [r.get(k) for r in rows]
  return out


def _train_to_target(study: StudyConfig, spec: RunSpec, cfg, target, run_dir, log):
  """Trains in chunks until the quick eval reaches `target.acc` (see `config.TargetConfig`)."""
  from opd_jax.train import loop
  quick = dataclasses.replace(study.eval, k=target.check_k, greedy=False,
                              seed=study.eval.seed + 1)
  steps, checks = 0, []
  while True:
    steps = min(max(steps + target.check_every, target.min_steps), target.max_steps)
    chunk = cfg.replace(loop=dataclasses.replace(cfg.loop, steps=steps, snapshot_steps=(steps,)))
    summary = loop.run(chunk, run_dir, resume=True)
    final = _snapshot_dirs(run_dir)[steps]
    model = produced_model(study, spec.name, "final", lambda p, w: str(final))
    acc = evaluate(dataclasses.replace(chunk, data=study.data), model, quick)["acc"]
    checks.append({"step": steps, "acc": acc})
    log(f"[study] {spec.name}: step {steps}, quick eval accuracy {acc:.3f} "
        f"(target {target.acc})")
    if acc >= target.acc or steps >= target.max_steps:
      return chunk, summary, checks


def _diagnostics_phase(study: StudyConfig, specs: list[RunSpec]):
  def fn(ctx):
    from opd_jax.study import diagnostics
    summaries = {s.name: ctx.dep_summary(s.name) for s in specs if s.name in ctx_deps(specs)}

    def path(run, rel_key="final"):
      return ctx.workdir / summaries[run][rel_key]

    def model_path(run):
      s = summaries[run]
      return ctx.workdir / s["final"] if s.get("final") else s["model_path"]

    # Endpoints by run: SFT base -> end (each seed's anchor SFT), OPD and RLVR anchor -> end,
    # every seed.
    endpoint_pairs = {}
    for s in specs:
      if s.family in ENDPOINT_FAMILY.values() or s.kind == "adapter":
        endpoint_pairs[s.name] = (model_path(s.start[0]), path(s.name))
    trajectories = {s.name: {int(k): ctx.workdir / v for k, v in summaries[s.name]["snapshots"]
                             .items()} for s in specs if s.trajectory}
    # Each trajectory's dW_t is measured from the model its run started from.
    origins = {s.name: model_path(s.start[0]) for s in specs if s.trajectory}
    # The regime map: anchor -> end of each map run (its end point alone as a trajectory, for the
    # stable rank).
    for s in specs:
      if s.kind == "regime":
        endpoint_pairs[s.name] = (model_path("anchor"), path(s.name))
        trajectories[s.name] = {summaries[s.name]["steps"]: path(s.name)}
        origins[s.name] = model_path("anchor")
    dcfg, rule = study.diagnostics, projection_rank(study, "opd", _resolver(ctx))
    if rule is not None:  # Sim_K with the paper's rank rule, on the first seed's OPD
      dcfg = dataclasses.replace(dcfg, sim_k=rule["k"])
    geometry = diagnostics.compute(endpoint_pairs, origins, trajectories, dcfg, log=ctx.log)
    # The first seed's SFT run is the anchor SFT with snapshots: it must end where the anchor did.
    geometry["sft_is_anchor"] = diagnostics.same_params(model_path("sft"), model_path("anchor"))
    if rule is not None:
      geometry["projection_rank"] = rule
    arms = [s.name for s in specs if s.kind == "adapter"]
    if arms:
      # The merged update of each adapter arm and of full OPD (first seed) on the adapted matrices.
      geometry["adapter_update"] = {
          run: diagnostics.adapter_update_metrics(
              model_path("anchor"), path(run), rank=study.adapters.rank,
              targets=study.adapters.targets)
          for run in ["opd"] + arms}
    # Update-mask consensus: every pair of seeds of OPD and of RLVR (anchor -> end), and the
    # first seeds of the two against each other.
    geometry["mask_consensus"] = diagnostics.mask_consensus(
        model_path("anchor"),
        {fam: {s.name: path(s.name) for s in specs if s.family == fam and s.kind == "main"}
         for fam in CONSENSUS_FAMILIES},
        log=ctx.log)
    (ctx.out_dir / "geometry.json").write_text(json.dumps(geometry, indent=1))
    return {"endpoint_methods": sorted(geometry["endpoint"]),
            "trajectory_runs": sorted(geometry["trajectory"])}
  return fn


def _progress_specs(specs: list[RunSpec]) -> list[RunSpec]:
  return [s for s in specs if s.kind == "main" and s.family in PROGRESS_FAMILIES]


def _progress_phase(study: StudyConfig, specs: list[RunSpec]):
  """Eval accuracy at every snapshot of the plain OPD and SFT runs (the paper's Fig 6), with the
  study's protocol (`progress.evaluate_snapshots` -> `evaluate`); the start model's and the final
  snapshot's accuracies come from their phases."""
  def fn(ctx):
    from opd_jax.study import progress
    resolve = _resolver(ctx)
    curves = {}
    for spec in _progress_specs(specs):
      s = ctx.dep_summary(spec.name)
      cfg = compose_run(study, spec, resolve)
      model = produced_model(study, spec.name, "final", resolve)
      known = {int(s["steps"]): s["eval"]}
      start = ctx.dep_summary(spec.start[0]).get("eval")
      if start is not None:
        known[0] = start
      curves[spec.name] = progress.evaluate_snapshots(
          spec.name, dataclasses.replace(cfg, data=study.data), model,
          {int(k): ctx.workdir / v for k, v in s["snapshots"].items()}, study.eval,
          total_steps=int(s["steps"]), known=known, log=ctx.log).to_results()
    return {"curves": curves}
  return fn


def ctx_deps(specs: list[RunSpec]) -> tuple[str, ...]:
  """Runs the diagnostics read: base, anchor, every trajectory run and the regime map's."""
  return ("base", "anchor") + tuple(s.name for s in specs if s.trajectory or s.kind == "regime")


def _adapter_results(study: StudyConfig, specs: list[RunSpec], geometry: dict,
                     summaries: dict) -> dict | None:
  """results['adapters'] (schema: `reporting`), or None without adapter arms."""
  arms = [s for s in specs if s.kind == "adapter" and s.name in summaries]
  if not arms:
    return None
  a = study.adapters
  runs = {"full": "opd", **{s.init: s.name for s in arms}}
  geo_ep, upd = geometry.get("endpoint", {}), geometry.get("adapter_update", {})
  return {"rank": a.rank, "alpha": a.alpha, "scale": a.alpha / a.rank, "targets": a.targets,
          "tolerance": a.tolerance, "seed": study_config.seed_values(study.seeds)[0],
          "runs": runs,
          "endpoint": {r: geo_ep[r] for r in runs.values() if r in geo_ep},
          "update": {r: upd[r] for r in runs.values() if r in upd}}


def _regime_results(study: StudyConfig, specs: list[RunSpec], geometry: dict,
                    summaries: dict) -> dict | None:
  """results['regime_map'] (schema: `reporting`), or None without map scales."""
  if not study.regime.map_scales:
    return None
  geo_ep, geo_tr = geometry.get("endpoint", {}), geometry.get("trajectory", {})
  anchor = summaries.get("anchor", {}).get("eval", {})
  points = {(s.section, s.budget_scale): s.name for s in specs if s.kind == "regime"}
  rows = []
  for scale in sorted(float(x) for x in study.regime.map_scales):
    for method in MAP_METHODS:
      main = scale == float(study.regime.scale)
      run = method if main and method in MAP_FROM_MAIN else points.get((method, scale))
      if run not in summaries:
        continue
      ep = geo_ep.get(run, {})
      tr = geo_tr.get(run, {})
      ev, budget = summaries[run].get("eval", {}), summaries[run].get("budget", {})
      rows.append({"method": method, "scale": scale, "run": run,
                   "budget": budget.get("budget"), "lr": budget.get("lr"),
                   "sparsity": ep.get("sparsity"), "density": ep.get("density"),
                   "max_angle_mean_deg": ep.get("max_angle_mean_deg"), "nss": ep.get("nss"),
                   "stable_rank": (tr.get("stable_rank") or [None])[-1],
                   "acc": ev.get("acc"), "acc_se": ev.get("stderr"),
                   "acc_gain": (ev["acc"] - anchor["acc"]) if "acc" in ev and "acc" in anchor
                   else None})
  return {"scales": sorted(float(x) for x in study.regime.map_scales),
          "study_scale": float(study.regime.scale), "anchor_acc": anchor.get("acc"),
          "rows": rows}


def _rules(study: StudyConfig, specs: list[RunSpec], summaries: dict, geometry: dict) -> dict:
  """The report's scale rules: each rule with its inputs and result (`regime`); the update
  budget once per run section, from its first run at the study's scale."""
  from opd_jax.study import regime  # noqa: PLC0415
  out = {}
  for section in study_config.BUDGET_SECTIONS:
    runs = [s.name for s in specs if s.section == section and s.budget_scale in (
        None, float(study.regime.scale)) and (summaries.get(s.name) or {}).get("budget")]
    if runs:
      budget = summaries[runs[0]]["budget"]
      out[f"update budget, {section}"] = regime.describe(regime.BudgetMatch(**{
          k: budget[k] for k in (f.name for f in dataclasses.fields(regime.BudgetMatch))}))
  if not study.regime.match_budget:
    out["update budget"] = "off (regime.match_budget=False): every lr as its section sets it"
  width = study.student.model.d_model
  ranks = regime.width_ranks(width)
  d = study.diagnostics
  out["angle k, mask rank"] = (
      f"the paper's k = {regime.PAPER_ANGLE_K} and r = {regime.PAPER_MASK_RANK} at width "
      f"{regime.PAPER_WIDTH}, as fractions of width {width}: k = {ranks['angle_k']}, "
      f"r = {ranks['mask_rank']}; used: angle_k = {d.angle_k}, mask_rank = {d.mask_rank}")
  rule = geometry.get("projection_rank")
  if rule is not None:
    per_seed = {s: summaries[s]["projection_rank"]["k"] for s in summaries
                if (summaries[s].get("projection_rank") or {}).get("k") is not None}
    out["projection rank K, Sim_K"] = (
        f"the paper's rule (K slightly below OPD's effective dimension at the projection point): "
        f"K = max(1, floor(median stable rank of dW over the q, k, v, o matrices, anchor -> "
        f"{rule['run']}'s first snapshot)) = floor({rule['median_stable_rank']:.3g}) = "
        f"{rule['k']} (Sim_K's K); per rank-16 run: "
        + ", ".join(f"{r} K = {k}" for r, k in sorted(per_seed.items())))
  else:
    out["projection rank K, Sim_K"] = (
        f"set, not derived (rank16.derive_k=False): rank16.k = {study.rank16.k}, sim_k = "
        f"{d.sim_k}")
  return out


def _report_phase(study: StudyConfig, specs: list[RunSpec]):
  def fn(ctx):
    from opd_jax.study import reporting
    results = assemble(study, specs, ctx.workdir)
    out = reporting.render(results, ctx.out_dir)
    return {"failed_thresholds": out["failed_thresholds"],
            "verdicts": {v["id"]: v["verdict"] for v in out["verdicts"]}}
  return fn


def build_phases(study: StudyConfig, log=print) -> list[phases_lib.Phase]:
  """The study's DAG."""
  from opd_jax.train import config as train_config
  specs = run_specs(study)
  out = [phases_lib.Phase("task", _task_phase(study), (), {
      "data": train_config.dataclass_to_dict(study.data),
      "models": [train_config.dataclass_to_dict(study.student),
                 train_config.dataclass_to_dict(study.teacher)]})]
  for spec in specs:
    cfg = compose_run(study, spec, _symbolic)
    fp = {"train": train_config.dataclass_to_dict(cfg), "trains": trains(study, spec),
          "eval": train_config.dataclass_to_dict(study.eval)}
    if study.regime.match_budget and spec.section in study_config.BUDGET_SECTIONS:
      # The lr comes from the rule, at the study's scale or the map run's own (which other
      # scales the map runs does not change this run: a map added to a workdir reuses it).
      rule = {k: v for k, v in train_config.dataclass_to_dict(study.regime).items()
              if k != "map_scales"}
      fp["regime"] = dict(rule, run_scale=spec.budget_scale)
    if spec.rank_of:
      fp["rank_of"] = spec.rank_of   # K comes from the rank rule on this run
    target = {"teacher": study.teacher_target, "base": study.base_target}.get(spec.kind)
    if target is not None and target.acc > 0:
      fp["target"] = train_config.dataclass_to_dict(target)   # the target sets the run's length
    out.append(phases_lib.Phase(spec.name, _train_phase(study, spec, log),
                                ("task",) + spec.deps, fp))
  out.append(phases_lib.Phase("diagnostics", _diagnostics_phase(study, specs), ctx_deps(specs),
                              dict(train_config.dataclass_to_dict(study.diagnostics),
                                   derive_k=study.rank16.derive_k)))
  prog = _progress_specs(specs)
  if prog:
    out.append(phases_lib.Phase(
        PROGRESS_DIR, _progress_phase(study, specs),
        ("task",) + tuple(dict.fromkeys(d for s in prog for d in (s.name,) + s.deps)),
        {"eval": train_config.dataclass_to_dict(study.eval), "runs": [s.name for s in prog]}))
  out.append(phases_lib.Phase(REPORT_DIR, _report_phase(study, specs),
                              ("diagnostics",) + ((PROGRESS_DIR,) if prog else ()) +
                              tuple(s.name for s in specs),
                              dict(study_config.study_sections(study), version=1)))
  return out


# -- results ----------------------------------------------------------------------------------------
def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def assemble(study: StudyConfig, specs: list[RunSpec], workdir) -> dict:
  """The results dict (schema: `reporting`) from the phases' markers and geometry.json."""
  workdir = pathlib.Path(workdir)
  markers = {}
  for p in build_phase_names(specs):
    m = phases_lib.read_json(workdir / p / phases_lib.MARKER)
    if m is not None:
      markers[p] = m
  summaries = {k: m["summary"] for k, m in markers.items()}
  geometry = phases_lib.read_json(workdir / "diagnostics" / "geometry.json") or {}
  geo_ep = geometry.get("endpoint", {})
  seeds = study_config.seed_values(study.seeds)
  families: dict[str, list[str]] = {}
  for s in specs:
    if s.family is not None and s.name in summaries:
      families.setdefault(s.family, []).append(s.name)
  # The seeds with a completed run (a partial or older workdir may hold fewer than configured).
  ran = {s.seed for s in specs if s.family is not None and s.name in summaries}
  seeds = [x for x in seeds if x in ran]
  endpoint_seeds = {}
  for m, fam in ENDPOINT_FAMILY.items():
    runs = [m] if fam is None else families.get(fam, [])
    entries = [dict(geo_ep[r], origin=ORIGINS[m], run=r) for r in runs if r in geo_ep]
    if entries:
      endpoint_seeds[m] = entries
  from opd_jax.train import timing  # noqa: PLC0415
  results: dict[str, Any] = {
      "preset": study.preset,
      # Where the report was assembled (the end of a study run: the machine its phases ran on).
      "machine": {"cpu_model": timing.cpu_model(), "cpu_count": os.cpu_count()},
      "thresholds": dataclasses.asdict(study.thresholds),
      "accuracy": {s.name: summaries[s.name]["eval"] for s in specs if s.name in summaries},
      "endpoint": {m: dict(geo_ep[m], origin=ORIGINS[m]) for m in ORIGINS if m in geo_ep},
      "endpoint_seeds": endpoint_seeds,
      "seeds": {"values": list(seeds), "runs": families,
                "fixed_endpoints": [m for m, f in ENDPOINT_FAMILY.items() if f is None]},
      "trajectory": geometry.get("trajectory", {}),
      "mask_consensus": geometry.get("mask_consensus", {}),
      "sft_is_anchor": geometry.get("sft_is_anchor"),
      "progress_accuracy": summaries.get(PROGRESS_DIR, {}).get("curves", {}),
      "live_geometry": {s.name: dict(summaries[s.name]["live_geometry"],
                                     steps=summaries[s.name]["steps"])
                        for s in specs if summaries.get(s.name, {}).get("live_geometry")},
      "controls": {
          "sparsify": [s.name for s in specs if s.kind == "sparsify"],
          "offpolicy": [s.name for s in specs if s.kind == "offpolicy"],
          "mixing": {s.name: s.alpha for s in specs if s.kind == "mixing"}},
      "phases": {k: {"wall_s": m["wall_s"], "cpu_s": m.get("cpu_s"), "status": "complete"}
                 for k, m in markers.items() if k != REPORT_DIR},
  }
  if study.rank16.enabled:
    plain = {s.name: s for s in specs if s.kind == "main"}
    steps = {m: study_config.section_steps(study, plain[m].section) for m in ("opd", "sft")}
    results["rank16"] = {m: {"plain_run": m, "projected_run": f"{m}_rank16",
                             "plain_runs": families.get(m, []),
                             "projected_runs": families.get(f"{m}_rank16", []),
                             "k": (summaries.get(f"{m}_rank16", {}).get("projection_rank")
                                   or {"k": study.rank16.k})["k"],
                             "where": "gradient (before Adam)" if study.rank16.position == "pre"
                             else "update (after Adam)",
                             "resume_step": study_config.snapshot_steps(steps[m],
                                                                        study.snapshots)[0]}
                         for m in ("opd", "sft")}
  main = {}
  diffs = {}
  for s in specs:
    if s.name not in summaries:
      continue
    flat = {k: v for k, v in _flat(summaries[s.name]["config"]).items()
            if not k.startswith(("student.path", "teacher.path", "subspace.origin",
                                 "subspace.at", "data.task.", "loop.branch_from",
                                 "loop.checkpoint_"))}  # paths; checkpointing
    ref = _reference_run(study, s)
    if ref is None:
      main[s.name] = flat
    else:
      diffs[s.name] = {k: v for k, v in flat.items() if main.get(ref, {}).get(k) != v}
  adapters = _adapter_results(study, specs, geometry, summaries)
  if adapters is not None:
    results["adapters"] = adapters
  regime_map = _regime_results(study, specs, geometry, summaries)
  if regime_map is not None:
    results["regime_map"] = regime_map
  results["settings"] = {"study": _flat(dict(study_config.study_sections(study))),
                         "task": _flat({"task": dataclasses.asdict(study.data.task)}),
                         "runs": main, "derived_runs": diffs,
                         "rules": _rules(study, specs, summaries, geometry)}
  return results


def _reference_run(study: StudyConfig, spec: RunSpec) -> str | None:
  """The run whose settings the report lists in full and `spec`'s as differences from (None:
  `spec` is one of those): the first seed's plain run of its family for the other seeds and the
  rank-16 arms, the map's own point of its method at the study's budget for a regime-map run,
  the plain run of its section for the controls and adapter arms."""
  if spec.kind in ("teacher", "base") or (spec.kind == "main" and spec.family in (None, spec.name)):
    return None
  if spec.family is not None:
    return spec.family.removesuffix("_rank16")
  if spec.kind == "regime":
    own = (spec.section if spec.section in MAP_FROM_MAIN
           else map_run(spec.section, study.regime.scale))
    return None if own == spec.name else own
  return spec.section


def build_phase_names(specs: list[RunSpec]) -> list[str]:
  return (["task"] + [s.name for s in specs] + ["diagnostics"] +
          ([PROGRESS_DIR] if _progress_specs(specs) else []) + [REPORT_DIR])


# -- entry points -------------------------------------------------------------------------------------
def _as_study(config) -> StudyConfig:
  return config if isinstance(config, StudyConfig) else study_config.from_config_dict(config)


def run(config, workdir, redo=(), check=False, log=print) -> dict:
  """Runs the study (module docstring); see `opd_jax.study.run`."""
  import jax
  from opd_jax.train import config as train_config
  study = _as_study(config)
  workdir = ckpt_lib.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  writer = jax.process_index() == 0
  if writer:
    phases_lib.write_json_atomic(workdir / STUDY_JSON, train_config.dataclass_to_dict(study))
  from opd_jax import compile_cache  # noqa: PLC0415
  compile_cache.enable()   # the training loop's persistent cache, one location for every run
  dag = build_phases(study, log)
  barrier = _barrier() if jax.process_count() > 1 else (lambda: None)
  records = phases_lib.run_phases(dag, workdir, redo=redo, log=log, writer=writer,
                                  barrier=barrier)
  results = phases_lib.read_json(workdir / REPORT_DIR / "results.json") or {}
  failed = list(results.get("failed_thresholds", [])) if results else ["no results.json"]
  report = workdir / REPORT_DIR / "report.md"
  log(f"[study] report: {report}")
  if check:
    for f in failed:
      print(f"[study] CHECK FAILED: {f}", file=sys.stderr)
    if not failed:
      log("[study] check: all acceptance thresholds hold")
  return {"ok": not failed if check else True, "failed": failed, "report": str(report),
          "phases": {k: r["status"] for k, r in records.items()}}


def _barrier():
  from jax.experimental import multihost_utils
  counter = iter(range(1 << 30))
  return lambda: multihost_utils.sync_global_devices(f"opd_jax_study_{next(counter)}")


def render_report(workdir, config=None) -> pathlib.Path:
  """Re-renders `WORKDIR/report/` from the phases' outputs (config: the study config, or None to
  read `WORKDIR/study_config.json`)."""
  from opd_jax.study import reporting
  workdir = pathlib.Path(workdir)
  if config is None:
    saved = phases_lib.read_json(workdir / STUDY_JSON)
    if saved is None:
      raise FileNotFoundError(f"{workdir / STUDY_JSON} not found: pass the study config")
    config = saved
  study = _as_study(config)
  results = assemble(study, run_specs(study), workdir)
  reporting.render(results, workdir / REPORT_DIR)
  return workdir / REPORT_DIR / "report.md"

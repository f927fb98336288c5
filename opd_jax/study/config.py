"""The study's typed configuration, and the composition of each run's `TrainConfig`.

A study config file (`configs/study.py`) returns a locked ConfigDict that mirrors `StudyConfig`:

  * shared sections used by every run: `student` and `teacher` (`ModelSpec`: where the base student
    and the teacher come from), `mesh`, `data`, `eval` (how every accuracy in the report is
    measured), `snapshots` (parameter snapshots per trajectory run);
  * run sections, each holding only the method-specific parts of a `TrainConfig` (`RUN_KEYS`:
    method, optim, sampler, rollout, sft, pg, distill, credit, grpo, loop; and `data`, entries
    merged over the shared `data`, e.g. the SFT runs' file of worked solutions; the eval split is
    always the shared one): `teacher_train` (SFT of
    a randomly initialised teacher; unused when the teacher is loaded), `base_train` (SFT from
    scratch that makes the base student; unused when the student is loaded), `anchor` (SFT of the
    base: the anchor, and the SFT arm, whose geometry the paper measures base -> anchor), `opd`,
    `rlvr`, `sft` (SFT continued from the anchor: the regime map's SFT points);
  * study sections: `seeds`, `rank16`, `controls`, `adapters`, `diagnostics`, `thresholds`,
    `regime` (learning rates matched to the paper's update budgets; `regime.py`).

Adapter arms (beyond the paper; `adapters`, off by default): `opd_lora` and `opd_pissa` are the
`opd` section from the same anchor with low-rank adapters (`opd_jax.models.lora`) on the matrices
named by `adapters.targets`, rank `adapters.rank`, scale `adapters.alpha / adapters.rank`, LoRA or
PiSSA initialisation. Their configs differ from OPD's first seed only in the `lora` section (same
optimizer and learning rate: nothing is re-tuned for adapters). They run once, with the first
seed's `loop.seed` (the same data order and rollout seed as `opd`); their snapshots hold the merged
policy, so the diagnostics read them like any other run.

Seeds (the noise model): `seeds` is a tuple of seeds, or a count n meaning (0, ..., n-1). The
seeded runs (OPD, RLVR, SFT and both rank-16 arms, `SEEDED_RUNS`) run once per seed, OPD and
RLVR from the same anchor, SFT and its rank-16 arm from the base (the anchor SFT: the first
seed's is the anchor), each with `loop.seed` set to the seed (it seeds the training data order and the train-state
RNG that draws every rollout sample); the task's problems (`data.data_seed`) and the eval protocol
stay fixed. The first seed's runs keep the plain names (`opd`, ...), the others are named
`<run>_seed<s>`. The teacher, base and the controls run once and keep their sections'
`loop.seed`; the anchor takes the first seed.

`compose(...)` builds a run's TrainConfig = the run section + the shared sections + the models it
starts from, strictly (an unknown key names its dotted path, e.g. `opd.optim.lrr`). Loop fields the
study sets itself (eval and snapshots) must not appear in run sections.

Choices where the paper is silent: every accuracy is avg@k at the eval temperature on the task's
eval split, measured by the study after training (not by the loop's periodic eval), so all runs
share one protocol; snapshots are at `round(i * steps / snapshots)`, i = 1..snapshots, and the
first one (~20% of training for 5 snapshots: step 60 of 299, where the paper's checkpoints every
64 steps put it at 63) is the rank-16 resume point.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Mapping

from opd_jax.models import lora as lora_lib
from opd_jax.optim import factory
from opd_jax.train import config as train_config
from opd_jax.train.config import ConfigError, DataConfig, ModelSpec, TrainConfig
from opd_jax.train.mesh import MeshConfig

RUN_SECTIONS = ("teacher_train", "base_train", "anchor", "opd", "rlvr", "sft")
RUN_KEYS = ("method", "optim", "sampler", "rollout", "sft", "pg", "distill", "credit", "grpo",
            "loop", "data", "lora", "geometry")
STUDY_LOOP_KEYS = ("eval_every", "eval_k", "eval_greedy", "eval_temperature", "eval_batch_size",
                   "snapshot_steps")
SPARSIFY_KINDS = {"top_kl": "top_kl_retention", "random": "random_retention"}
PROJECTION_POSITIONS = ("pre", "post")
# Runs repeated once per seed (from the same anchor): the three methods and the rank-16 arms.
SEEDED_RUNS = ("opd", "rlvr", "sft", "opd_rank16", "sft_rank16")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How every accuracy of the study is measured: avg@k on the eval split.

  Attributes:
    k: samples per eval prompt (avg@k = mean over prompts of the mean score of their k samples).
    greedy: greedy decoding (then k is forced to 1).
    temperature: sampling temperature when not greedy.
    batch_size: eval prompts per sampler call.
    seed: sampling seed (the same for every run, so the anchor's accuracy is one number).
  """

  k: int = 4
  greedy: bool = False
  temperature: float = 1.0
  batch_size: int = 128
  seed: int = 0

  def __post_init__(self):
    if self.k < 1 or self.batch_size < 1:
      raise ConfigError(f"EvalConfig: k={self.k} and batch_size={self.batch_size} must be >= 1")
    if not self.temperature > 0:
      raise ConfigError(f"EvalConfig.temperature={self.temperature}: must be > 0")


@dataclasses.dataclass(frozen=True)
class Rank16Config:
  """The subspace-constrained continuation (paper section 3).

  Each arm branches from its plain run's checkpoint at the plain run's first snapshot
  (`loop.branch_from`: parameters, Adam's moments, schedule, data position and RNG continue, as
  the paper resumes the same run), so the plain and projected runs differ only in the projection.

  Attributes:
    enabled: run the two projected continuations (OPD and SFT).
    k: rank of the input-side subspace (the paper: 16); unused with `derive_k`.
    position: 'pre' projects the gradient before Adam (the paper's wording), 'post' projects the
      final update (keeps the update itself inside the subspace).
    derive_k: the paper's rule instead of `k` (Sec 4.2: K "close to, but slightly below, the
      effective dimension observed near the projection point"): K = max(1, floor(median stable
      rank of OPD's dW over the q, k, v, o matrices, anchor -> OPD's first snapshot)), measured
      per seed on that seed's OPD run and used by both rank-16 arms of the seed; the trajectories'
      Sim_K takes the first seed's K (`regime.projection_rank`).
  """

  enabled: bool = True
  k: int = 16
  position: str = "pre"
  derive_k: bool = False

  def __post_init__(self):
    if self.position not in PROJECTION_POSITIONS:
      raise ConfigError(f"Rank16Config.position={self.position!r}; expected one of "
                        f"{PROJECTION_POSITIONS}")
    if self.k < 1:
      raise ConfigError(f"Rank16Config.k={self.k}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class ControlsConfig:
  """The three controls, all run from the OPD setup (the `opd` section) and the anchor.

  Attributes:
    sparsify: ((kind, rho), ...) token sparsification runs; kind 'top_kl' (keep the tokens with the
      largest signed r_t) or 'random'; rho = kept fraction per response.
    sparsify_seed: seed of the random retention.
    offpolicy: run the off-policy control (rollouts sampled by the teacher).
    offpolicy_clip: its PPO clip eps (low and high); 1.0 = clipping effectively off (the paper).
    mixing_alphas: OPD+RLVR mixing runs, A = alpha A_OPD + (1 - alpha) A_RLVR (method 'mixed',
      GRPO settings from the `rlvr` section).
  """

  sparsify: tuple = (("top_kl", 0.25), ("top_kl", 0.5), ("random", 0.25), ("random", 0.5))
  sparsify_seed: int = 0
  offpolicy: bool = True
  offpolicy_clip: float = 1.0
  mixing_alphas: tuple[float, ...] = (0.75, 0.5, 0.25, 0.05, 0.01)

  def __post_init__(self):
    for i, spec in enumerate(self.sparsify):
      if (not isinstance(spec, (tuple, list)) or len(spec) != 2 or spec[0] not in SPARSIFY_KINDS
          or not 0 < float(spec[1]) <= 1):
        raise ConfigError(f"controls.sparsify[{i}]={spec!r}: expected (kind, rho) with kind in "
                          f"{sorted(SPARSIFY_KINDS)} and 0 < rho <= 1")
    for a in self.mixing_alphas:
      if not 0 <= a <= 1:
        raise ConfigError(f"controls.mixing_alphas: {a} is outside [0, 1]")
    if len(set(self.mixing_alphas)) != len(self.mixing_alphas):
      raise ConfigError(f"controls.mixing_alphas has duplicates: {self.mixing_alphas}")


@dataclasses.dataclass(frozen=True)
class AdaptersConfig:
  """The adapter arms (beyond the paper; module docstring).

  Attributes:
    enabled: run one OPD arm per entry of `inits`.
    inits: adapter initialisations, each one arm `opd_<init>` ('lora', 'pissa').
    rank: adapter rank r (`lora.rank`).
    alpha: scale numerator (`lora.alpha`; the merged update is (alpha / r) a @ b).
    targets: regular expression over the matrix names (`lora.targets`); the adapter diagnostics
      (`diagnostics.adapter_update_metrics`) cover exactly these matrices.
    tolerance: the by-construction rank checks pass when the energy share of dW in its top r
      (LoRA) or top 2r (PiSSA) singular values is >= 1 - tolerance (float round-off of the merge).
  """

  enabled: bool = False
  inits: tuple[str, ...] = lora_lib.INITS
  rank: int = 8
  alpha: float = 16.0
  targets: str = lora_lib.DEFAULT_TARGETS
  tolerance: float = 1e-3

  def __post_init__(self):
    bad = [i for i in self.inits if i not in lora_lib.INITS]
    if bad or len(set(self.inits)) != len(self.inits):
      raise ConfigError(f"adapters.inits={self.inits!r}: expected distinct entries of "
                        f"{lora_lib.INITS}")
    if self.rank < 1 or not self.alpha > 0:
      raise ConfigError(f"adapters: rank={self.rank} must be >= 1 and alpha={self.alpha} > 0")
    if not 0 < self.tolerance < 1:
      raise ConfigError(f"adapters.tolerance={self.tolerance}: must be in (0, 1)")

  def lora_section(self, init: str) -> dict:
    """The `lora` section of the arm with initialisation `init`."""
    return {"rank": self.rank, "alpha": float(self.alpha), "init": init, "targets": self.targets}


def adapter_run(init: str) -> str:
  """The run name of the adapter arm with initialisation `init`."""
  return f"opd_{init}"


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
  """Geometry settings (paper_facts section 1; defaults are the paper's).

  Attributes:
    angle_k: top-k of the principal angles (capped at the rank).
    mask_rank: rank r of the principal mask.
    mask_alpha: mask fraction alpha (= the random baseline).
    hill_k: singular values in the Hill estimate.
    sim_k: K of Sim_K (input-side subspaces of dW_t).
    trajectory_types: module types whose matrices enter the trajectories (the paper: attention).
  """

  angle_k: int = 512
  mask_rank: int = 64
  mask_alpha: float = 0.5
  hill_k: int = 16
  sim_k: int = 16
  trajectory_types: tuple[str, ...] = ("q", "k", "v", "o")


# Run sections whose learning rate the update-budget rule sets, and the paper run each matches.
BUDGET_SECTIONS = {"anchor": "sft", "sft": "sft", "opd": "opd", "rlvr": "rlvr"}


@dataclasses.dataclass(frozen=True)
class RegimeConfig:
  """Scale by rule (`opd_jax/study/regime.py`): the update budget of each method matched to the
  paper's.

  Attributes:
    match_budget: set the peak lr of the `anchor`, `sft`, `opd` and `rlvr` sections (and of every
      run composed from them: controls, rank-16 and adapter arms) so that each run's update
      budget in bf16 half-ulps, measured at its starting weights' median |W|, is `scale` x the
      paper's (the sections' own lr is then unused; their schedule shape and final_lr / lr ratio
      are kept). False: the sections' lr as set (the paper's own models: qwen3_8b).
    scale: the budget relative to the paper's (1.0 = matched).
    paper_median_abs_w: the assumed median |W| of the paper's student (see the module).
    map_scales: the regime map (beyond the paper): SFT, OPD and RLVR from the anchor, first seed,
      once per budget scale here (>= 4 for a map; at the main runs' `scale` OPD's and RLVR's
      first seeds are reused, not rerun; SFT continued from the anchor runs at every scale).
  """

  match_budget: bool = False
  scale: float = 1.0
  paper_median_abs_w: float = 0.02
  map_scales: tuple[float, ...] = ()

  def __post_init__(self):
    if not self.scale > 0 or not self.paper_median_abs_w > 0:
      raise ConfigError(f"regime: scale={self.scale} and paper_median_abs_w="
                        f"{self.paper_median_abs_w} must be > 0")
    bad = [x for x in self.map_scales if not float(x) > 0]
    if bad or len(set(self.map_scales)) != len(self.map_scales):
      raise ConfigError(f"regime.map_scales={self.map_scales!r}: expected distinct values > 0")
    if self.map_scales and not self.match_budget:
      raise ConfigError("regime.map_scales needs regime.match_budget=True (a map over budgets "
                        "relative to the paper's)")


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Acceptance thresholds checked by `--check` (OPD and RLVR must also beat the anchor)."""

  teacher_min: float = 0.9
  base_min: float = 0.1
  base_max: float = 0.7


@dataclasses.dataclass(frozen=True)
class TargetConfig:
  """Train a model (the teacher, or the base student) until it reaches an accuracy.

  Training runs in chunks of `check_every` steps (resuming the same run, so the result equals
  one run of the final length with a constant learning rate); after each chunk a quick eval
  (avg@`check_k` on the eval split, sampling seed `eval.seed + 1`, so the reported accuracy uses
  other samples) decides whether to stop. Disabled when `acc` <= 0 (the section's `loop.steps`
  is then the length). Grokking-like jumps make fixed step counts fragile on the synthetic tasks;
  this makes the teacher >= `acc` and the base student just past the jump, seed by seed.

  Attributes:
    acc: stop at the first check with accuracy >= acc.
    min_steps: steps before the first check.
    check_every: steps between checks.
    max_steps: stop here even if `acc` was not reached.
    check_k: samples per prompt of the quick eval.
  """

  acc: float = 0.0
  min_steps: int = 0
  check_every: int = 50
  max_steps: int = 2000
  check_k: int = 1

  def __post_init__(self):
    if self.acc > 0 and (self.check_every < 1 or self.max_steps < self.check_every
                         or self.check_k < 1):
      raise ConfigError(f"TargetConfig: need check_every >= 1, max_steps >= check_every and "
                        f"check_k >= 1, got {self}")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything the study needs (see the module docstring)."""

  preset: str = "custom"
  seeds: tuple[int, ...] | int = (0, 1, 2)
  student: ModelSpec = ModelSpec()
  teacher: ModelSpec = ModelSpec()
  mesh: MeshConfig = MeshConfig()
  data: DataConfig = DataConfig()
  eval: EvalConfig = EvalConfig()
  snapshots: int = 5
  teacher_target: TargetConfig = TargetConfig()
  base_target: TargetConfig = TargetConfig()
  teacher_train: dict = dataclasses.field(default_factory=dict)
  base_train: dict = dataclasses.field(default_factory=dict)
  anchor: dict = dataclasses.field(default_factory=dict)
  opd: dict = dataclasses.field(default_factory=dict)
  rlvr: dict = dataclasses.field(default_factory=dict)
  sft: dict = dataclasses.field(default_factory=dict)
  rank16: Rank16Config = Rank16Config()
  controls: ControlsConfig = ControlsConfig()
  adapters: AdaptersConfig = AdaptersConfig()
  diagnostics: DiagnosticsConfig = DiagnosticsConfig()
  thresholds: Thresholds = Thresholds()
  regime: RegimeConfig = RegimeConfig()

  def __post_init__(self):
    seeds = seed_values(self.seeds)
    if not seeds or len(set(seeds)) != len(seeds):
      raise ConfigError(f"StudyConfig.seeds={self.seeds!r}: expected a count >= 1 or distinct "
                        "seeds")
    if self.snapshots < 1:
      raise ConfigError(f"StudyConfig.snapshots={self.snapshots}: must be >= 1")
    if self.teacher.source == "none" or self.student.source == "none":
      raise ConfigError("the study needs a teacher and a student (source 'none' given)")
    for name in RUN_SECTIONS:
      section = getattr(self, name)
      unknown = set(section) - set(RUN_KEYS)
      if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)} in run section '{name}'; "
                          f"valid keys: {list(RUN_KEYS)} (student/teacher/mesh/data/eval are "
                          "shared sections at the top level)")
      study_keys = set(section.get("loop", {})) & set(STUDY_LOOP_KEYS)
      if study_keys:
        raise ConfigError(f"'{name}.loop' sets {sorted(study_keys)}, which the study sets itself "
                          "(use the top-level 'eval' and 'snapshots' sections)")
    if self.regime.match_budget:
      for name in BUDGET_SECTIONS:
        pg = getattr(self, name).get("pg", {})
        if pg.get("epochs", 1) * pg.get("minibatches", 1) > 1:
          raise ConfigError(f"'{name}.pg': regime.match_budget counts one optimizer update per "
                            "step; set pg.epochs = pg.minibatches = 1 or regime.match_budget="
                            "False")
    for name, target in (("teacher_train", self.teacher_target), ("base_train", self.base_target)):
      optim = getattr(self, name).get("optim", {})
      schedule, warmup = optim.get("schedule", "constant"), optim.get("warmup_frac", 0.0)
      if target.acc > 0 and factory.schedule_spans_the_run(schedule, warmup):
        raise ConfigError(f"'{name}.optim': training to an accuracy target resumes the run in "
                          "chunks of growing length, which needs a constant learning rate without "
                          f"warmup (got schedule={schedule!r}, warmup_frac={warmup})")


def seed_values(seeds: tuple[int, ...] | int) -> tuple[int, ...]:
  """The seeds of `StudyConfig.seeds`: a count n is (0, ..., n-1), a tuple is itself."""
  if isinstance(seeds, int) and not isinstance(seeds, bool):
    return tuple(range(seeds))
  return tuple(int(s) for s in seeds)


def seeded_name(run: str, seeds: tuple[int, ...], seed: int) -> str:
  """The run name of `run` under `seed`: the first seed keeps the plain name."""
  return run if seed == seeds[0] else f"{run}_seed{seed}"


def from_config_dict(cd: Any) -> StudyConfig:
  """The typed StudyConfig of a study ConfigDict (strict: unknown keys name their path)."""
  return train_config.dataclass_from_dict(StudyConfig, cd, "config")


def snapshot_steps(steps: int, n: int) -> tuple[int, ...]:
  """n evenly spaced snapshot steps ending at `steps`: round(i * steps / n), i = 1..n (deduped)."""
  return tuple(sorted({max(1, round(i * steps / n)) for i in range(1, n + 1)}))


def section_steps(study: StudyConfig, name: str) -> int:
  return int(getattr(study, name).get("loop", {}).get("steps", train_config.LoopConfig().steps))


def compose(study: StudyConfig, name: str, *, student: ModelSpec, teacher: ModelSpec | None,
            snapshots: tuple[int, ...] | None = None,
            edit: Callable[[dict], None] | None = None) -> TrainConfig:
  """The TrainConfig of run section `name` starting from `student` (with `teacher`).

  `snapshots` defaults to the final step only; `edit(dict)` may modify the merged dict (controls)
  before validation.
  """
  d: dict[str, Any] = copy.deepcopy(dict(getattr(study, name)))
  d["student"] = train_config.dataclass_to_dict(student)
  d["teacher"] = (train_config.dataclass_to_dict(teacher) if teacher is not None
                  else {"source": "none"})
  d["mesh"] = train_config.dataclass_to_dict(study.mesh)
  d["data"] = _merge(train_config.dataclass_to_dict(study.data), d.get("data", {}))
  loop = dict(d.get("loop", {}))
  steps = int(loop.get("steps", train_config.LoopConfig().steps))
  loop.update(eval_every=0, snapshot_steps=tuple(snapshots) if snapshots else (steps,))
  d["loop"] = loop
  if edit is not None:
    edit(d)
  return train_config.dataclass_from_dict(TrainConfig, d, name)


def _merge(base: dict, over: Mapping) -> dict:
  """`base` with the (nested) entries of `over` replacing its own."""
  out = dict(base)
  for k, v in over.items():
    out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
  return out


def set_in(d: dict, path: str, value) -> None:
  """Sets `d['a']['b'] = value` for path 'a.b' (creating sections)."""
  keys = path.split(".")
  for k in keys[:-1]:
    d = d.setdefault(k, {})
    if not isinstance(d, dict):
      raise ConfigError(f"cannot set {path}: {k} is not a section")
  d[keys[-1]] = value


def study_sections(study: StudyConfig) -> Mapping[str, Any]:
  """The study-level settings written into the report."""
  out = {}
  for f in ("preset", "seeds", "snapshots", "eval", "teacher_target", "base_target", "rank16",
            "controls", "adapters", "diagnostics", "thresholds", "regime"):
    out[f] = train_config.dataclass_to_dict(getattr(study, f))
  return out

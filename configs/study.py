"""The geometry study: `opd-jax study --config configs/study.py:<preset> --workdir DIR`.

Presets:
  smoke     tests (< 2 min): every phase and every report section at toy size (one sparsification
            run, the off-policy run, two mixing alphas, both adapter arms); the thresholds are not
            expected to hold.
  tiny      the README's main job (< 20 min on a 2-core CPU): a 3 x 64 teacher SFT-trained on an
            easy arithmetic task to >= 0.9, a 2 x 64 base student with partial accuracy, every
            run and control of the paper.
  small     the second scale (< 2 h on the same CPU): tiny's task with 4 x 128 / 4 x 256 student
            and teacher, 2.5 x tiny's run lengths, 512 eval problems.
  adapters  tiny + the adapter arms (beyond the paper): OPD with LoRA and with PiSSA from the same
            anchor (`adapters` section; ~2 extra OPD runs).
  regime_map tiny + the regime map (beyond the paper; 13 extra runs).
  qwen3_8b  the paper's models and hyperparameters (paper_facts section 4) for a TPU pod: base
            student Qwen3-8B-Base and teacher Qwen3-32B from local HF checkpoints (used as is and
            evaluated), SFT anchor on a local MATH-layout file with solutions, OPD / RLVR on a local
            dapo-math-17k JSONL, eval on a local MATH-500 JSONL.

Optimizers follow the paper's: cosine to 0.1 x peak with 10% warmup for SFT, constant for
OPD/RLVR; Adam betas (0.9, 0.95) for SFT and (0.9, 0.98) for OPD/RLVR, eps 1e-15 for RLVR, weight
decay 0.1. Scale by rule (`opd_jax/study/regime.py`; `regime` section): in every CPU preset the
peak lr of the anchor SFT, SFT, OPD and RLVR runs is not chosen but derived at run time, so that
each run's update budget (lr x mean schedule x steps, in bf16 half-ulps at the median |W| of its
starting weights) equals the paper's run's (at Qwen3-8B's assumed median |W| 0.02): the section's
`optim.lr` only carries the schedule's final_lr / lr ratio there. qwen3_8b uses the paper's own
values (`regime.match_budget=False`). The angle k and mask rank are the paper's fractions of the
width (k = d / 8, r = d / 64). The rank-16 arms' K and the trajectories' Sim_K follow the paper's
rank rule (`rank16.derive_k`): K = floor of OPD's median stable rank of dW at the projection
point (qwen3_8b: the paper's K = 16). The report writes every chosen value and each rule with its
inputs (its Settings section).

Regime map (`regime_map` preset, beyond the paper): tiny plus SFT, OPD and RLVR from the same
anchor at 0.25, 4, 16 and 64 x the paper's budget (`regime.map_scales`; the 1 x point is the
study's own runs): sparsity, density, angles, NSS, stable rank and accuracy gain against the
budget.

Live geometry (beyond the paper): the OPD, RLVR and SFT sections run the training loop's monitor
(`geometry.every`: smoke 2, tiny 10, small 20 steps; off in qwen3_8b), read-only; the report's
`live_geometry` figure draws its bf16 density, stable rank, ||dW||_F and Sim_K against progress.

Seeds: every preset but smoke (2) repeats OPD, RLVR, SFT and both rank-16 arms over 3 seeds
(`seeds`, e.g. `--config.seeds=(0,1,2,3,4)`); verdicts need >= 2 seeds to resolve anything
that varies with the seed (`opd_jax/study/verdicts.py`).

Adapter arms (`adapters`, beyond the paper; off in every preset but `adapters` and `smoke`):
`opd_lora` and `opd_pissa` are OPD (the `opd` section, the first seed's loop.seed, one seed only)
with adapters on every attention and MLP projection. Rank rule: r = max(2, d_model / 32), the
ratio of the best-known OPD recipe with adapters (tinker-cookbook: rank 128 on Qwen3-8B's width
4096), so r = 2 at width 64, 4 at 128, 128 on qwen3_8b; alpha = 2 r (scale 2, the ratio of
configs/opd.py:lora_tiny). The learning rate is OPD's (not re-tuned for adapters).

Sections (see `opd_jax/study/config.py`): shared `student`, `teacher`, `mesh`, `data`, `eval`,
`snapshots`; run sections `teacher_train`, `base_train`, `anchor`, `opd`, `rlvr`, `sft` (the
method-specific parts of a TrainConfig); `rank16`, `controls`, `adapters`, `diagnostics`,
`thresholds`.
Override anything: `--config.opd.optim.lr=1e-3`, `--config.data.task.mod_chain.modulus=7`.
"""

import ml_collections

from configs import models
from opd_jax.data import tasks
from opd_jax.study import config as study_config
from opd_jax.study import regime
from opd_jax.train import config as train_config
from opd_jax.train.mesh import MeshConfig

# TrainConfig sections a run section does not carry: the shared ones, the rank-16 subspace (set by
# the study), and multi-teacher routing (the study has one teacher).
_NOT_IN_SECTIONS = ("student", "teacher", "mesh", "data", "subspace", "teachers")


def _section(method: str) -> ml_collections.ConfigDict:
  """A run section: every method-specific TrainConfig field with its default."""
  c = train_config.default_config(method)
  for key in _NOT_IN_SECTIONS:
    if key in c:
      del c[key]
  for key in study_config.STUDY_LOOP_KEYS:
    del c.loop[key]
  return c


def _optim(c, *, lr, sft: bool, steps_hint=None, rlvr=False):
  """The paper's optimizer ratios (module docstring) at peak lr `lr`."""
  c.optim.lr = lr
  c.optim.weight_decay = 0.1
  c.optim.b1 = 0.9
  if sft:
    c.optim.schedule = "cosine"
    c.optim.final_lr = lr / 10
    c.optim.warmup_frac = 0.1
    c.optim.b2 = 0.95
  else:
    c.optim.schedule = "constant"
    c.optim.b2 = 0.98
    if rlvr:
      c.optim.eps = 1e-15


def _base(name: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = name
  # The noise model: OPD, RLVR, SFT and both rank-16 arms run once per seed from the same anchor.
  c.seeds = (0, 1, 2)
  c.mesh = train_config.dataclass_to_dict(MeshConfig())
  c.eval = train_config.dataclass_to_dict(study_config.EvalConfig())
  c.snapshots = 5
  c.teacher_target = train_config.dataclass_to_dict(study_config.TargetConfig())
  c.base_target = train_config.dataclass_to_dict(study_config.TargetConfig())
  for name_, method in (("teacher_train", "sft"), ("base_train", "sft"), ("anchor", "sft"),
                        ("opd", "opd"), ("rlvr", "rlvr"), ("sft", "sft")):
    c[name_] = _section(method)
  c.rank16 = train_config.dataclass_to_dict(study_config.Rank16Config())
  c.controls = train_config.dataclass_to_dict(study_config.ControlsConfig())
  c.adapters = train_config.dataclass_to_dict(study_config.AdaptersConfig())
  c.diagnostics = train_config.dataclass_to_dict(study_config.DiagnosticsConfig())
  c.thresholds = train_config.dataclass_to_dict(study_config.Thresholds())
  # Scale by rule (module docstring): on in every CPU preset.
  c.regime = train_config.dataclass_to_dict(study_config.RegimeConfig(match_budget=True))
  c.rank16.derive_k = True   # the paper's rank rule (module docstring)
  return c


def _width_rule(c, width: int):
  """The angle k and mask rank as the paper's fractions of the width (`regime.width_ranks`)."""
  ranks = regime.width_ranks(width)
  c.diagnostics.angle_k = ranks["angle_k"]
  c.diagnostics.mask_rank = ranks["mask_rank"]


def _live_geometry(c, every: int):
  """The training loop's live geometry monitor (`geometry.every`) on the anchor (the SFT runs),
  OPD, RLVR and SFT sections (and every run composed from them): read-only, drawn by the
  `live_geometry` figure."""
  for n in ("anchor", "opd", "rlvr", "sft"):
    c[n].geometry = ml_collections.ConfigDict({"every": every})


def _adapter_arms(c, width: int, enabled: bool):
  """The adapter arms' rank and alpha by the rule of the module docstring."""
  rank = max(2, width // 32)
  c.adapters.enabled = enabled
  c.adapters.rank = rank
  c.adapters.alpha = float(2 * rank)


def _quiet(c, names=("teacher_train", "base_train", "anchor", "opd", "rlvr", "sft")):
  for n in names:
    c[n].loop.progress = False
    c[n].loop.tensorboard = False
    c[n].loop.checkpoint_every = 0
    c[n].loop.checkpoint_keep = 1


def _pg_common(c, *, group, batch, steps, lr, clip_high):
  for n in ("opd", "rlvr"):
    c[n].rollout.group_size = group
    c[n].loop.batch_size = batch
    c[n].loop.steps = steps
  _optim(c.opd, lr=lr, sft=False)
  _optim(c.rlvr, lr=lr, sft=False, rlvr=True)
  c.opd.pg.pg.eps_high = 0.2          # OPD: symmetric clip (not stated by the paper)
  c.rlvr.pg.pg.eps_high = clip_high   # RLVR: clip-higher 0.28


# -- presets --------------------------------------------------------------------------------------
SMOKE_TASK = tasks.TaskConfig(families=("mod_chain",), mod_chain=tasks.ModChainConfig(
    min_ops=1, max_ops=2, modulus=5, ops="+-"))


def _smoke():
  c = _base("smoke")
  c.student = models.spec("smoke", seed=1)
  c.teacher = models.spec("smoke", seed=0)
  c.data = train_config.dataclass_to_dict(train_config.DataConfig(
      task=SMOKE_TASK, train_examples=256, eval_examples=16, prompt_buckets=(16,)))
  c.eval.k = 2
  c.eval.batch_size = 16
  c.snapshots = 2
  c.seeds = (0, 1)   # two seeds: the per-seed runs and the across-seed statistics end to end
  # Smoke checks structure, not results: runs share every setting that enters a compiled program
  # (one constant-lr SFT optimizer, one PG optimizer and clip range for OPD and RLVR), so the
  # whole study compiles few distinct steps.
  for n, steps in (("teacher_train", 8), ("base_train", 2), ("anchor", 2), ("sft", 4)):
    c[n].loop.steps = steps
    c[n].loop.batch_size = 16
    _optim(c[n], lr=3e-3, sft=True)
    c[n].optim.schedule = "constant"
    c[n].optim.final_lr = 0.0   # a constant schedule has no final lr
    c[n].optim.warmup_frac = 0.0
  _pg_common(c, group=2, batch=4, steps=4, lr=3e-4, clip_high=0.2)
  c.rlvr.optim.eps = c.opd.optim.eps
  c.controls.offpolicy_clip = 0.2     # smoke only: shares OPD's compiled step
  c.controls.sparsify = (("top_kl", 0.5),)
  c.controls.mixing_alphas = (0.75, 0.05)
  _width_rule(c, c.student.model.d_model)
  c.regime.map_scales = (1.0, 4.0)   # the regime map end to end (one extra budget: 3 runs)
  c.diagnostics.hill_k = 4
  _adapter_arms(c, 64, enabled=True)  # on: the adapter arms end to end (2 OPD runs of 4 steps)
  _live_geometry(c, 2)
  _quiet(c)
  return c


TINY_TASK = tasks.TaskConfig(families=("mod_chain",), mod_chain=tasks.ModChainConfig(
    min_ops=4, max_ops=4, modulus=7, ops="+"))
# Calibrated on this task (chance 1/7): a 2-layer, 64-wide model sits at chance for a few hundred
# SFT steps, then jumps to ~1.0 within ~100 steps (when varies with the seed); a 3-layer teacher
# likewise. See `teacher_target` / `base_target` below.
TINY_STUDENT = dict(d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=256)
TINY_TEACHER = dict(TINY_STUDENT, n_layers=3)


def _tiny():
  c = _base("tiny")
  c.student = models.spec("tiny", seed=1, **TINY_STUDENT)
  c.teacher = models.spec("tiny", seed=0, **TINY_TEACHER)
  c.data = train_config.dataclass_to_dict(train_config.DataConfig(
      task=TINY_TASK, train_examples=8192, eval_examples=256))
  c.eval.k = 4
  c.eval.batch_size = 256
  for n, steps, lr in (("teacher_train", 2000, 1e-3), ("base_train", 2000, 1e-3),
                       ("anchor", 20, 1e-3), ("sft", 40, 1e-3)):
    c[n].loop.steps = steps
    c[n].loop.batch_size = 64
    _optim(c[n], lr=lr, sft=True)
  for n in ("teacher_train", "base_train"):  # making the models is not part of the paper's recipe
    c[n].optim.schedule = "constant"
    c[n].optim.final_lr = 0.0
    c[n].optim.warmup_frac = 0.0
  # The task is learnt in a sudden jump whose step varies with the seed: train the teacher until
  # it is good and stop the base student just past its jump (partial accuracy).
  c.teacher_target = train_config.dataclass_to_dict(study_config.TargetConfig(
      acc=0.95, min_steps=400, check_every=50, max_steps=2000))
  c.base_target = train_config.dataclass_to_dict(study_config.TargetConfig(
      acc=0.3, min_steps=300, check_every=20, max_steps=2000))
  _pg_common(c, group=8, batch=16, steps=40, lr=1e-4, clip_high=0.28)
  # Widths are 64 here, not 4096: the angle and mask ranks scale with the width (k = 512 would be
  # the whole space here, where every principal angle is 0); the projection rank comes from the
  # paper's rule, measured on each seed's OPD run.
  _width_rule(c, TINY_STUDENT["d_model"])
  _adapter_arms(c, TINY_STUDENT["d_model"], enabled=False)  # off: tiny's 20-minute budget
  _live_geometry(c, 10)
  _quiet(c)
  return c


def _adapters():
  c = _tiny()
  c.preset = "adapters"
  c.adapters.enabled = True
  return c


def _regime_map():
  c = _tiny()
  c.preset = "regime_map"
  c.regime.map_scales = (0.25, 1.0, 4.0, 16.0, 64.0)
  return c


def _small():
  """tiny's task at a larger model scale: 4 x 128 student, 4 x 256 teacher, 2.5 x tiny's run
  lengths (the update budgets stay the paper's: the learning rates follow the steps), twice the
  eval problems. Sized to run in < 2 h on a 2-core CPU."""
  c = _tiny()
  c.preset = "small"
  c.student = models.spec("tiny", seed=1, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                          head_dim=32, d_ff=512)
  c.teacher = models.spec("tiny_teacher", seed=0, d_model=256, n_layers=4, n_heads=8,
                          n_kv_heads=4, head_dim=32, d_ff=1024)
  c.data.eval_examples = 512
  for n, steps in (("anchor", 50), ("sft", 100), ("opd", 100), ("rlvr", 100)):
    c[n].loop.steps = steps
  _width_rule(c, c.student.model.d_model)
  _adapter_arms(c, 128, enabled=False)
  _live_geometry(c, 20)
  return c


def _qwen3_8b():
  c = _base("qwen3_8b")
  c.student = models.spec("qwen3_8b", source="hf", path="checkpoints/Qwen3-8B-Base")
  c.teacher = models.spec("qwen3_32b", source="hf", path="checkpoints/Qwen3-32B")
  c.mesh = train_config.dataclass_to_dict(MeshConfig(shape=(1, -1, 1)))
  c.data = train_config.dataclass_to_dict(train_config.DataConfig(
      source="file", path="data/dapo-math-17k.jsonl", layout="dapo_math_17k", train_examples=0,
      eval_path="data/math500.jsonl", eval_examples=0, tokenizer="checkpoints/Qwen3-8B-Base",
      verifier="math", on_error="skip", max_prompt_tokens=1024, prompt_buckets=(256, 512, 1024)))
  c.eval.k = 8
  c.eval.batch_size = 32
  for n in ("anchor", "sft"):  # SFT needs worked solutions: a MATH-layout file
    c[n].data = ml_collections.ConfigDict({"path": "data/math_train.jsonl", "layout": "math",
                                           "sft_buckets": (1024, 2048, 4096)})
    _optim(c[n], lr=1e-5, sft=True)
    c[n].loop.batch_size = 256
    c[n].loop.steps = 147   # 5 epochs of 7,500 MATH problems at batch 256
    c[n].sft.micro_batches = 8
  for n in ("opd", "rlvr"):
    c[n].sampler.max_new_tokens = 4096
    c[n].sampler.eos_ids = (151643, 151645)
    c[n].rollout.group_size = 8
    c[n].rollout.recompute_old_logp = True
    c[n].pg.chunk_size = 256
  _optim(c.opd, lr=1e-6, sft=False)
  _optim(c.rlvr, lr=1e-6, sft=False, rlvr=True)
  c.opd.pg.pg.eps_high = 0.2
  c.opd.loop.steps, c.opd.loop.batch_size, c.opd.pg.micro_batches = 299, 64, 32
  c.rlvr.loop.steps, c.rlvr.loop.batch_size, c.rlvr.pg.micro_batches = 1023, 512, 256
  c.sft.loop.steps = 147
  for n in ("teacher_train", "base_train", "anchor", "opd", "rlvr", "sft"):
    c[n].loop.checkpoint_every = 32
  _adapter_arms(c, 4096, enabled=False)
  _width_rule(c, 4096)
  c.regime.match_budget = False   # the paper's own models, learning rates and K = 16
  c.rank16.derive_k = False
  c.thresholds.teacher_min = 0.0   # the acceptance thresholds are for the CPU presets
  c.thresholds.base_min = 0.0
  c.thresholds.base_max = 1.0
  return c


PRESETS = {"smoke": _smoke, "tiny": _tiny, "small": _small, "adapters": _adapters,
           "regime_map": _regime_map, "qwen3_8b": _qwen3_8b}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in PRESETS:
    raise ValueError(f"configs/study.py: unknown preset {arg!r}; valid presets: {sorted(PRESETS)}")
  c = PRESETS[arg]()
  c.lock()
  return c

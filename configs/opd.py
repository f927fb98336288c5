"""On-policy distillation recipes: `opd-jax train --config configs/opd.py:<preset> --workdir DIR`.

The policy-gradient route the paper ran: the student samples, reward_t = log pT(y_t) - log pS(y_t)
on each sampled token, immediate credit (gamma = 0), PPO-clip surrogate with ratio pi_theta/pi_old,
no KL-to-reference, no entropy bonus. The `distill*` presets take the direct route
(`distill.distill.kind`); `--config.credit.kind=...` picks another credit estimator. Each method
reads only its own sections: a setting it would ignore (say `pg.*` with method=distill) is refused
by name, so switch routes with a preset rather than `--config.method`.

Options of the PG route, each one override away:
  GAE-OPD with a learned value head   --config.credit.kind=gae --config.credit.value=learned
  KL to the initial student (k1 / k3) --config.pg.kl_coef=0.1 [--config.pg.kl_kind=k1]
  CR-OPD routing term                 --config.pg.cr.coef=1.0 [--config.pg.cr.student_top_k=20 ...]
  token sparsification                --config.rollout.token_transforms='(("top_kl_retention", {"rho": 0.5}),)'
  off-policy control                  the `offpolicy` preset (rollout.policy='teacher')

Presets:
  smoke     tests: tiny student (random init) and a teacher (by default another random init; the
            tests use the SFT smoke checkpoint: --config.teacher.source=checkpoint
            --config.teacher.path=RUN/checkpoints). < 1 min on CPU.
  tiny      the CPU tutorial: student = tiny random init, teacher = the checkpoint of
            `configs/sft.py:tiny` at runs/sft_tiny/checkpoints (train that first).
  distill_smoke / distill  the direct route (reverse KL on the student's rollouts) on the smoke /
            tiny shapes.
  moe_teacher_smoke  `smoke` with a tiny qwen3_moe teacher (4 experts, top-2).
  two_teacher_smoke / two_teacher_tiny  multi-teacher OPD: prompts routed to one of two teachers
            by their task family (`teachers.models`, route 'domain').
  code_smoke `smoke` on the embedded code task (sandboxed code verifier at eval).
  qwen3_8b_moe_teacher  the paper's MoE-teacher run: Qwen3-30B-A3B (local HF checkpoint) distilled
            into Qwen3-8B with the `qwen3_8b` settings.
  qwen3_8b_code  the paper's code-domain run: the `qwen3_8b` settings on DeepCoder prompts,
            evaluated on LiveCodeBench v5 (eval set 'lcb_v5': eval/lcb_v5/avg@8, pass@8 and their
            standard errors) with the sandboxed code verifier (`models.paper_code_rollouts`; set
            --config.data.path and --config.data.eval_sets to your local files).
  lora_tiny / pissa_tiny  `tiny` training rank-16 adapters (alpha 32) on every attention and MLP
            projection, LoRA- or PiSSA-initialised (`models.lora`); same learning rate as `tiny`
            (not tuned for adapters). Any preset takes adapters with --config.lora.rank=R.
  offpolicy the off-policy control on top of `tiny`: the teacher samples, the student scores the
            rollouts for old_logp, clipping effectively off (eps = 1.0).
  qwen3_8b  the paper's OPD (paper_facts section 4): Qwen3-8B student (after SFT) and Qwen3-32B
            teacher from local HF checkpoints, dapo-math-17k prompts (local JSONL), lr 1e-6 constant,
            Adam(0.9, 0.98), wd 0.1, 8 samples per prompt at temperature 1.0, global batch 64
            prompts (x 8 samples = 512 rollouts; "batch 64" read as prompts, veRL's convention),
            299 steps, snapshots at 63/127/191/255/299, bf16 compute, FSDP over every chip. One
            optimizer update per rollout batch (the paper does not state PPO epochs/minibatches),
            symmetric clip 0.2 (not stated either).
"""

from configs import models
from configs import sft
from opd_jax.data import tasks
from opd_jax.train import config as train_config


def _smoke(c):
  c.student = models.spec("smoke", seed=0)
  c.teacher = models.spec("smoke", seed=1)
  c.data.task = train_config.dataclass_to_dict(sft.SMOKE_TASK)
  c.data.train_examples = 256
  c.data.eval_examples = 32
  c.data.prompt_buckets = (16,)
  c.rollout.group_size = 8
  c.optim.lr = 3e-3
  c.optim.b2 = 0.98
  c.pg.pg.eps_high = 0.2
  c.loop.steps = 20
  c.loop.batch_size = 8
  c.loop.checkpoint_every = 10
  c.loop.progress = False
  c.loop.tensorboard = False


def _tiny(c):
  c.student = models.spec("tiny", seed=1)
  c.mesh = models.mesh("fsdp")
  c.teacher = models.spec("tiny", source="checkpoint", path="runs/sft_tiny/checkpoints")
  c.data.task = train_config.dataclass_to_dict(tasks.preset("default"))
  c.data.train_examples = 4096
  c.data.eval_examples = 128
  c.rollout.group_size = 8
  c.optim.lr = 1e-3
  c.optim.b2 = 0.98
  c.pg.pg.eps_high = 0.2
  c.loop.steps = 200
  c.loop.batch_size = 8
  c.loop.eval_every = 50
  c.loop.checkpoint_every = 50
  c.loop.snapshot_steps = (0, 40, 80, 120, 160, 200)


def _as_distill(c):
  c.method = "distill"
  c.pg = train_config.default_config("opd").pg  # the direct route has no PPO surrogate


def _distill_smoke(c):
  _smoke(c)
  _as_distill(c)


def _distill(c):
  _tiny(c)
  _as_distill(c)


def _moe_teacher_smoke(c):
  """`smoke` with a tiny qwen3_moe teacher (the paper's MoE-teacher variant, CPU-sized)."""
  _smoke(c)
  c.teacher = models.spec("tiny_moe", seed=1)


def _code_smoke(c):
  """`smoke` on the embedded code task: programs checked in the sandbox at eval."""
  _smoke(c)
  models.code_task(c)


def _lora_tiny(c, init="lora"):
  _tiny(c)
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.init = init


def _pissa_tiny(c):
  _lora_tiny(c, init="pissa")


def _offpolicy(c):
  _tiny(c)
  c.rollout.policy = "teacher"
  c.pg.pg.eps_low = 1.0
  c.pg.pg.eps_high = 1.0


def _two_teachers(c, teachers):
  """Routed teachers (`teachers.models`): `teachers` = ((name, spec, domains), ...)."""
  c.teacher = train_config.default_config("opd").teacher  # none: the teachers are listed below
  c.teachers.models = tuple({"name": n, "model": spec, "domains": tuple(d)}
                            for n, spec, d in teachers)
  c.teachers.route = "domain"


def _two_teacher_smoke(c):
  """`smoke` on two task families, each routed to its own teacher by domain (the task family):
  'chain' (mod_chain prompts) and 'sum' (addition prompts), two random inits."""
  _smoke(c)
  c.data.task = train_config.dataclass_to_dict(sft.SMOKE_TASK.replace(
      families=("mod_chain", "addition"), addition=tasks.AdditionConfig(1, 2)))
  _two_teachers(c, (("chain", models.spec("smoke", seed=1), ("mod_chain",)),
                    ("sum", models.spec("smoke", seed=2), ("addition",))))


def _two_teacher_tiny(c):
  """`tiny` with two teachers routed by task family: the SFT tiny checkpoint teaches the
  arithmetic families (addition, running_sum), and a second teacher (`--config.teachers.models`
  entry 'chain'; by default the same checkpoint's architecture at another random init: point its
  path at your own mod_chain teacher) takes mod_chain."""
  _tiny(c)
  _two_teachers(c, (("arith", models.spec("tiny", source="checkpoint",
                                          path="runs/sft_tiny/checkpoints"),
                     ("addition", "running_sum")),
                    ("chain", models.spec("tiny", seed=2), ("mod_chain",))))


def _qwen3_8b_moe_teacher(c):
  """The paper's MoE-teacher robustness run: Qwen3-30B-A3B distilled into Qwen3-8B."""
  _qwen3_8b(c)
  c.teacher = models.spec("qwen3_30b_a3b", source="hf", path="checkpoints/Qwen3-30B-A3B")


def _qwen3_8b_code(c):
  """The paper's code-domain run: Qwen3-32B -> Qwen3-8B on DeepCoder, LiveCodeBench v5 eval."""
  _qwen3_8b(c)
  models.paper_code_rollouts(c)


def _qwen3_8b(c):
  c.student = models.spec("qwen3_8b", source="hf", path="checkpoints/Qwen3-8B-SFT")
  c.teacher = models.spec("qwen3_32b", source="hf", path="checkpoints/Qwen3-32B")
  c.mesh = models.mesh("fsdp")
  models.paper_rollouts(c)
  c.rollout.chunk_size = 256
  c.rollout.recompute_old_logp = True
  c.optim.lr = 1e-6
  c.optim.schedule = "constant"
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.weight_decay = 0.1
  c.pg.pg.eps_low = 0.2
  c.pg.pg.eps_high = 0.2
  c.pg.micro_batches = 32
  c.pg.chunk_size = 256
  c.loop.steps = 299
  c.loop.batch_size = 64
  c.loop.eval_every = 64
  c.loop.eval_k = 8
  c.loop.eval_greedy = False
  c.loop.eval_batch_size = 32
  c.loop.checkpoint_every = 32
  c.loop.snapshot_steps = (0, 63, 127, 191, 255, 299)


PRESETS = {"smoke": _smoke, "tiny": _tiny, "distill_smoke": _distill_smoke, "distill": _distill,
           "moe_teacher_smoke": _moe_teacher_smoke, "code_smoke": _code_smoke,
           "offpolicy": _offpolicy, "lora_tiny": _lora_tiny, "pissa_tiny": _pissa_tiny,
           "two_teacher_smoke": _two_teacher_smoke, "two_teacher_tiny": _two_teacher_tiny,
           "qwen3_8b": _qwen3_8b,
           "qwen3_8b_moe_teacher": _qwen3_8b_moe_teacher, "qwen3_8b_code": _qwen3_8b_code}


def get_config(arg: str = "tiny"):
  if arg not in PRESETS:
    raise ValueError(f"configs/opd.py: unknown preset {arg!r}; valid presets: {sorted(PRESETS)}")
  c = train_config.default_config("opd")
  PRESETS[arg](c)
  c.lock()
  return c

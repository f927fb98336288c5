"""RLVR recipes (GRPO): `opd-jax train --config configs/rlvr.py:<preset> --workdir DIR`.

GRPO with G samples per prompt, binary verifier reward, advantage (R - mean_group) / std_group
broadcast to the response tokens, zero-variance groups skipped, PPO clip with clip-higher
(eps_low 0.2, eps_high 0.28), no KL term.

Presets:
  smoke     tests: the smoke task (mod-5 chains) from the SFT smoke checkpoint (warm start:
            --config.student.source=checkpoint --config.student.path=RUN/checkpoints; by default a
            random init, whose rewards are ~all 0). < 1 min on CPU.
  code_smoke `smoke` on the embedded code task (programs run in the `data.code_exec` sandbox).
  tiny      the CPU tutorial: warm start from `configs/sft.py:tiny` (runs/sft_tiny/checkpoints).
  qwen3_8b  the paper's RLVR (paper_facts section 4): Qwen3-8B (after SFT), dapo-math-17k, lr 1e-6
            constant, Adam(0.9, 0.98, eps 1e-15), global batch 512 prompts (DAPO's convention)
            x 8 samples (G is not stated in the paper), 1023 steps, bf16 compute, FSDP over every
            chip, one optimizer update per rollout batch.
  qwen3_8b_code  `qwen3_8b` on the code domain the paper's OPD code run uses (DeepCoder prompts,
            LiveCodeBench v5 eval set 'lcb_v5', sandboxed code verifier;
            `models.paper_code_rollouts`): the RLVR counterpart (not a run the paper reports).
"""

from configs import models
from configs import sft
from opd_jax.data import tasks
from opd_jax.train import config as train_config


def _smoke(c):
  # 16 training prompts, each seen ~15 times: GRPO raises the reward within 30 steps by making
  # the sometimes-correct answers reliable.
  c.student = models.spec("smoke", seed=0)
  c.data.task = train_config.dataclass_to_dict(sft.SMOKE_TASK)
  c.data.train_examples = 16
  c.data.eval_examples = 32
  c.data.prompt_buckets = (16,)
  c.rollout.group_size = 8
  c.optim.lr = 2e-3
  c.optim.b2 = 0.98
  c.loop.steps = 30
  c.loop.batch_size = 8
  c.loop.checkpoint_every = 10
  c.loop.progress = False
  c.loop.tensorboard = False


def _code_smoke(c):
  """`smoke` on the embedded code task: GRPO on the sandboxed code verifier's pass / fail."""
  _smoke(c)
  models.code_task(c)


def _tiny(c):
  c.student = models.spec("tiny", source="checkpoint", path="runs/sft_tiny/checkpoints")
  c.mesh = models.mesh("fsdp")
  c.data.task = train_config.dataclass_to_dict(tasks.preset("default"))
  c.data.train_examples = 4096
  c.data.eval_examples = 128
  c.rollout.group_size = 8
  c.optim.lr = 5e-4
  c.optim.b2 = 0.98
  c.loop.steps = 200
  c.loop.batch_size = 8
  c.loop.eval_every = 50
  c.loop.checkpoint_every = 50
  c.loop.snapshot_steps = (0, 40, 80, 120, 160, 200)


def _qwen3_8b(c):
  c.student = models.spec("qwen3_8b", source="hf", path="checkpoints/Qwen3-8B-SFT")
  c.mesh = models.mesh("fsdp")
  models.paper_rollouts(c)
  c.rollout.recompute_old_logp = True
  c.optim.lr = 1e-6
  c.optim.schedule = "constant"
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-15
  c.pg.pg.eps_low = 0.2
  c.pg.pg.eps_high = 0.28
  c.pg.micro_batches = 256
  c.pg.chunk_size = 256
  c.loop.steps = 1023
  c.loop.batch_size = 512
  c.loop.eval_every = 128
  c.loop.eval_k = 8
  c.loop.eval_greedy = False
  c.loop.eval_batch_size = 32
  c.loop.checkpoint_every = 64
  c.loop.snapshot_steps = (0, 127, 255, 383, 511, 639, 767, 895, 1023)


def _qwen3_8b_code(c):
  _qwen3_8b(c)
  models.paper_code_rollouts(c)


PRESETS = {"smoke": _smoke, "code_smoke": _code_smoke, "tiny": _tiny, "qwen3_8b": _qwen3_8b,
           "qwen3_8b_code": _qwen3_8b_code}


def get_config(arg: str = "tiny"):
  if arg not in PRESETS:
    raise ValueError(f"configs/rlvr.py: unknown preset {arg!r}; valid presets: {sorted(PRESETS)}")
  c = train_config.default_config("rlvr")
  PRESETS[arg](c)
  c.lock()
  return c

"""SFT recipes: `opd-jax train --config configs/sft.py:<preset> --workdir DIR`.

Presets:
  smoke     tests: a tiny model on the easy tasks, NLL must fall within ~30 steps (< 1 min on CPU).
  tiny      the CPU tutorial: trains the tiny model on the default tasks; its checkpoint is the
            teacher / warm start of `configs/opd.py:tiny` and `configs/rlvr.py:tiny`.
  qwen3_8b  the paper's SFT (paper_facts section 4): lr 1e-5 cosine to 1e-6, 10% warmup,
            Adam(0.9, 0.95), wd 0.1, batch 256, 5 epochs, bf16 compute with f32 master weights, on a
            TPU mesh (FSDP over every chip). Data: a local MATH-layout JSONL with worked solutions
            (the paper does not name its SFT corpus; dapo-math-17k has no solutions). The step count
            assumes 7,500 examples (MATH train): 5 * 7500 / 256 = 147 steps; set loop.steps for
            yours.
"""

from configs import models
from opd_jax.data import tasks
from opd_jax.train import config as train_config


SMOKE_TASK = tasks.TaskConfig(families=("mod_chain",),
                              mod_chain=tasks.ModChainConfig(min_ops=1, max_ops=2, modulus=5,
                                                             ops="+-"))


def _smoke(c):
  c.student = models.spec("smoke", seed=0)
  c.data.task = train_config.dataclass_to_dict(SMOKE_TASK)
  c.data.train_examples = 256
  c.data.eval_examples = 32
  c.data.prompt_buckets = (16,)
  c.optim.lr = 3e-3
  c.optim.b2 = 0.98
  c.optim.warmup_frac = 0.0
  c.loop.steps = 30
  c.loop.batch_size = 16
  c.loop.checkpoint_every = 10
  c.loop.progress = False
  c.loop.tensorboard = False


def _tiny(c):
  c.student = models.spec("tiny", seed=0)
  c.mesh = models.mesh("fsdp")
  c.data.task = train_config.dataclass_to_dict(tasks.preset("default"))
  c.data.train_examples = 8192
  c.data.eval_examples = 128
  c.optim.lr = 2e-3
  c.optim.schedule = "cosine"
  c.optim.final_lr = 2e-4
  c.optim.warmup_frac = 0.05
  c.optim.b2 = 0.98
  c.optim.weight_decay = 0.01
  c.loop.steps = 600
  c.loop.batch_size = 32
  c.loop.eval_every = 200
  c.loop.checkpoint_every = 200
  c.loop.snapshot_steps = (0, 150, 300, 450, 600)


def _qwen3_8b(c):
  c.student = models.spec("qwen3_8b", source="hf", path="checkpoints/Qwen3-8B-Base")
  c.mesh = models.mesh("fsdp")
  c.data.source = "file"
  c.data.path = "data/math_train.jsonl"
  c.data.eval_path = "data/math_test.jsonl"
  c.data.layout = "math"
  c.data.train_examples = 0
  c.data.eval_examples = 500
  c.data.tokenizer = "checkpoints/Qwen3-8B-Base"
  c.data.verifier = "math"
  c.data.max_prompt_tokens = 1024
  c.data.prompt_buckets = (256, 512, 1024)
  c.data.sft_buckets = (1024, 2048, 4096)
  c.sampler.max_new_tokens = 4096
  c.sampler.eos_ids = (151643, 151645)  # <|endoftext|>, <|im_end|>
  c.optim.lr = 1e-5
  c.optim.schedule = "cosine"
  c.optim.final_lr = 1e-6
  c.optim.warmup_frac = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.1
  c.sft.micro_batches = 8
  c.loop.steps = 147
  c.loop.batch_size = 256
  c.loop.eval_every = 49
  c.loop.eval_batch_size = 256
  c.loop.checkpoint_every = 25
  c.loop.snapshot_steps = (0, 37, 74, 111, 147)


PRESETS = {"smoke": _smoke, "tiny": _tiny, "qwen3_8b": _qwen3_8b}


def get_config(arg: str = "tiny"):
  if arg not in PRESETS:
    raise ValueError(f"configs/sft.py: unknown preset {arg!r}; valid presets: {sorted(PRESETS)}")
  c = train_config.default_config("sft")
  PRESETS[arg](c)
  c.lock()
  return c

"""Model and mesh presets shared by the recipe configs (`configs/sft.py`, `opd.py`, `rlvr.py`).

`spec(name, ...)` returns a `ModelSpec` section (a dict: source, path, model, seed) and `mesh(name)`
a `MeshConfig` section; the recipes drop them into their ConfigDicts. Every field stays overridable
from the command line (`--config.student.model.n_layers=4`).

Presets:
  smoke      2 x 64, vocab 128: the embedded tasks' char-level tokenizer (104 tokens) padded to a
             multiple of 8; runs a test in seconds.
  tiny       = smoke's shape (`models.config.tiny`), the CPU tutorial student.
  tiny_teacher 4 x 128: a teacher a bit bigger than the tiny student.
  small      8 x 512 (`models.config.small`), vocab 128 for the tasks.
  tiny_moe   = tiny with a qwen3_moe MLP (4 experts of width 32, top-2, renormalised).
  qwen3_0_6b, qwen3_8b, qwen3_32b  the Qwen3 shapes (loaded from local HF checkpoints: the
             architecture then comes from config.json, these presets only set the numerics:
             bf16 compute, f32 master weights, remat).
  qwen3_30b_a3b  the MoE teacher (128 experts, top-8); llama3_2_3b  Llama-3.2-3B (llama3 RoPE).
"""

from opd_jax.models import config as model_config
from opd_jax.train import config as train_config

TASK_VOCAB = 128  # >= len(build_task_tokenizer()) = 104, a multiple of 8

_MODELS = {
    "smoke": lambda: model_config.tiny(vocab_size=TASK_VOCAB),
    "tiny": lambda: model_config.tiny(vocab_size=TASK_VOCAB),
    "tiny_teacher": lambda: model_config.tiny(vocab_size=TASK_VOCAB, d_model=128, n_layers=4,
                                              n_heads=4, n_kv_heads=2, head_dim=32, d_ff=256),
    "tiny_moe": lambda: model_config.tiny_moe(vocab_size=TASK_VOCAB),
    "small": lambda: model_config.small(vocab_size=TASK_VOCAB),
    "qwen3_0_6b": lambda: model_config.qwen3_0_6b(dtype="bfloat16", remat=True),
    "qwen3_8b": model_config.qwen3_8b,
    "qwen3_32b": model_config.qwen3_32b,
    "qwen3_30b_a3b": model_config.qwen3_30b_a3b,
    "llama3_2_3b": model_config.llama3_2_3b,
}

_MESHES = {
    "cpu": (1, 1, 1),        # one device
    "fsdp": (1, -1, 1),      # FSDP over every device (e.g. 64 TPU chips: fsdp=64)
    "fsdp_tp": (1, -1, 4),   # FSDP x 4-way tensor parallel (large teachers)
}


def model(name: str, **overrides) -> dict:
  """The ModelConfig fields of preset `name` (a dict), with `overrides` applied."""
  if name not in _MODELS:
    raise ValueError(f"unknown model preset {name!r}; valid: {sorted(_MODELS)}")
  return train_config.dataclass_to_dict(_MODELS[name]().replace(**overrides))


def spec(name: str, *, source: str = "random", path: str = "", seed: int = 0,
         **overrides) -> dict:
  """A ModelSpec section: preset architecture `name` from `source` ('random' | 'hf' |
  'checkpoint' | 'none')."""
  return {"source": source, "path": path, "model": model(name, **overrides), "seed": seed}


def mesh(name: str) -> dict:
  """A MeshConfig section (shape only; axes and rules keep their defaults)."""
  if name not in _MESHES:
    raise ValueError(f"unknown mesh preset {name!r}; valid: {sorted(_MESHES)}")
  return {"shape": _MESHES[name]}


def paper_rollouts(c) -> None:
  """The data, sampler and group settings the paper's OPD and RLVR runs share (paper_facts
  section 4): dapo-math-17k prompts from a local JSONL (malformed rows skipped and counted), the
  math verifier, AIME-24 eval, 8 samples per prompt at temperature 1.0, up to 4,096 new tokens,
  Qwen3's EOS ids, the tokenizer of the local Qwen3-8B checkpoint."""
  c.data.source = "file"
  c.data.path = "data/dapo-math-17k.jsonl"
  c.data.layout = "dapo_math_17k"
  c.data.train_examples = 0
  c.data.eval_path = "data/aime24.jsonl"
  c.data.eval_examples = 0
  c.data.tokenizer = "checkpoints/Qwen3-8B-SFT"
  c.data.verifier = "math"
  c.data.on_error = "skip"
  c.data.max_prompt_tokens = 1024
  c.data.prompt_buckets = (256, 512, 1024)
  c.sampler.max_new_tokens = 4096
  c.sampler.temperature = 1.0
  c.sampler.eos_ids = (151643, 151645)  # <|endoftext|>, <|im_end|>
  c.rollout.group_size = 8


def paper_code_rollouts(c) -> None:
  """The paper's code-domain variant (paper_facts section 5: DeepCoder training data, evaluated on
  LiveCodeBench v5): `paper_rollouts` with DeepCoder prompts (local JSONL / Parquet of
  DeepCoder-Preview-Dataset rows, layout 'deepcoder'), LiveCodeBench v5 as the named eval set
  'lcb_v5' (layout 'livecodebench'; rows already filtered to the v5 window), the sandboxed code
  verifier (6 s per program run), and longer prompts (up to 2,048 tokens: problem statements with
  examples and starter code). The paths are placeholders to override. The paper does not state
  the code run's response budget or verifier limits: the math run's 4,096 new tokens are kept."""
  paper_rollouts(c)
  c.data.path = "data/deepcoder_train.jsonl"
  c.data.layout = "deepcoder"
  c.data.eval_path = ""
  c.data.eval_sets = (("lcb_v5", "data/livecodebench_v5.jsonl", "livecodebench"),)
  c.data.verifier = "code"
  c.data.verifier_timeout_s = 6.0
  c.data.max_prompt_tokens = 2048
  c.data.prompt_buckets = (512, 1024, 2048)


def code_task(c) -> None:
  """The embedded code task on a smoke-sized run: code prompts (buckets sized from the task's
  bounds) and the sandboxed code verifier with a short per-program timeout."""
  c.data.task.families = ("code",)
  c.data.prompt_buckets = ()
  c.data.verifier = "code"
  c.data.verifier_timeout_s = 2.0

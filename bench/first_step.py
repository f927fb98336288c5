"""Time to first step, cold and warm, for SFT and OPD on the `small` shapes, vs TRL in the same run.

    python bench/first_step.py [--quick]

Each measurement is a fresh process (`python -c ...`) timed from its launch to the end of its
first optimizer step, the way a user in Colab or a terminal waits for it:
  - opd_jax cold: an empty persistent compilation cache (`OPD_JAX_CACHE_DIR` = a new directory);
  - opd_jax warm: the same command again, reusing that cache;
  - TRL: `SFTTrainer` (SFT) and `GKDTrainer` (on-policy distillation with lambda = 1: the student
    samples, the loss is a divergence to the teacher) on a transformers Qwen3 model of the same
    shape (8 x 512, vocab 128), torch CPU, 1 step; time to its `on_step_end`.
opd_jax runs `configs/sft.py:smoke` / `configs/opd.py:smoke` with the student (and teacher)
replaced by the `small` preset, batch 8 rows (OPD: 1 prompt x 8 samples), 1 step.

Needs `pip install trl==1.16.0` in the bench environment (after `pip install torch==2.13.0`).
Prints the CPU model and one JSON object (last line) with `warm_first_step_s`,
`cold_first_step_s`, `trl_first_step_s` per method and the ratios, and the 1-minute load average
before and after (`load_avg`): on a machine shared with other jobs every time here is inflated by
the load, opd_jax's and TRL's alike.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

OPD_JAX_CHILD = r"""
import json, sys, time, dataclasses
t_import = time.time()
from opd_jax.models import config as mc
from opd_jax.train import config as C, loop
method, workdir = sys.argv[1], sys.argv[2]
spec = {"sft": "configs/sft.py:smoke", "opd": "configs/opd.py:smoke"}[method]
over = ["loop.steps=1", "loop.checkpoint_every=0", "loop.snapshot_steps=()", "loop.eval_every=0",
        "loop.progress=false", "loop.tensorboard=false"]
over += ["loop.batch_size=8"] if method == "sft" else ["loop.batch_size=1", "rollout.group_size=8"]
cfg = C.from_config_dict(C.load_config(spec, over))
small = mc.small(vocab_size=cfg.student.model.vocab_size)
cfg = cfg.replace(student=dataclasses.replace(cfg.student, model=small))
if method == "opd":
  cfg = cfg.replace(teacher=dataclasses.replace(cfg.teacher, model=small))
t0 = time.time()
summary = loop.run(cfg, workdir)
print(json.dumps({"first_step_end": t0 + summary["first_step_s"], "setup_s": summary["first_step_s"],
                  "metrics_time": summary["metrics"].get("time/step_s")}))
"""

TRL_CHILD = r"""
import json, sys, time, os
method, workdir = sys.argv[1], sys.argv[2]
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, TrainerCallback
from datasets import Dataset
from opd_jax.data.tokenizer import build_task_tokenizer
tok = build_task_tokenizer().to_transformers()  # TRL needs the transformers class
cfg = Qwen3Config(vocab_size=128, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, intermediate_size=1536,
                  tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
torch.manual_seed(0)
model = Qwen3ForCausalLM(cfg)
ends = []
class Stamp(TrainerCallback):
  def on_step_end(self, args, state, control, **kw):
    ends.append(time.time())
rows = [{"messages": [{"role": "user", "content": f"{i}+{i}%5:"},
                      {"role": "assistant", "content": f"{i} ={(2 * i) % 5}"}]} for i in range(16)]
data = Dataset.from_list(rows)
if method == "sft":
  from trl import SFTConfig, SFTTrainer
  args = SFTConfig(output_dir=workdir, max_steps=1, per_device_train_batch_size=8,
                   report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                   dataloader_num_workers=0)
  trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                       callbacks=[Stamp()])
else:
  from trl.experimental.gkd import GKDConfig, GKDTrainer
  teacher = Qwen3ForCausalLM(cfg)
  args = GKDConfig(output_dir=workdir, max_steps=1, per_device_train_batch_size=8, lmbda=1.0,
                   beta=1.0, max_new_tokens=12, report_to=[], save_strategy="no",
                   logging_strategy="no", use_cpu=True, dataloader_num_workers=0)
  trainer = GKDTrainer(model=model, teacher_model=teacher, args=args, train_dataset=data,
                       processing_class=tok, callbacks=[Stamp()])
trainer.train()
print(json.dumps({"first_step_end": ends[0]}))
"""


def _child(code: str, method: str, env: dict) -> float:
  """Seconds from launching a fresh interpreter to the end of its first step."""
  with tempfile.TemporaryDirectory() as wd:
    t_launch = time.time()
    out = subprocess.run([sys.executable, "-c", code, method, wd], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
      raise RuntimeError(f"{method} child failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["first_step_end"] - t_launch


def main(argv=None) -> int:
  from opd_jax import host_malloc
  host_malloc.tune()   # $OPD_JAX_HOST_MALLOC (on by default on CPU): before the first JAX op
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="SFT only")
  p.add_argument("--methods", default="sft,opd", help="comma-separated subset of sft,opd")
  p.add_argument("--repeats", type=int, default=1, help="warm / TRL measurements (best of)")
  args = p.parse_args(argv)
  from opd_jax.train import timing  # the parent only times its children: jax imported here
  print(f"cpu: {timing.cpu_model()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", file=sys.stderr)
  result = {"cpu": timing.cpu_model(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "load_avg": [round(os.getloadavg()[0], 2)]}
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  if set(methods) - {"sft", "opd"}:
    p.error(f"--methods: expected a subset of sft,opd, got {args.methods!r}")
  for method in ("sft",) if args.quick else methods:
    with tempfile.TemporaryDirectory() as cache:
      env = dict(os.environ, OPD_JAX_CACHE_DIR=cache, JAX_PLATFORMS="cpu",
                 PYTHONPATH=str(ROOT))
      cold = _child(OPD_JAX_CHILD, method, env)
      warm = min(_child(OPD_JAX_CHILD, method, env) for _ in range(args.repeats))
    trl = min(_child(TRL_CHILD, method, dict(os.environ, PYTHONPATH=str(ROOT)))
              for _ in range(args.repeats))
    result[method] = {"cold_first_step_s": round(cold, 2), "warm_first_step_s": round(warm, 2),
                      "trl_first_step_s": round(trl, 2), "cold_over_trl": round(cold / trl, 2),
                      "warm_over_trl": round(warm / trl, 2)}
    print(f"{method}: {result[method]}", file=sys.stderr)
  result["load_avg"].append(round(os.getloadavg()[0], 2))
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())

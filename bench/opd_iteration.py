"""One whole OPD iteration (student sampling, teacher scoring, update): opd_jax vs TRL's GKD.

    python bench/opd_iteration.py [--quick] [--no-trl]

Both sides train the same student against the same teacher on the same prompts:
  - weights: the `small` preset (8 x 512, float32) with the task tokenizer's vocabulary; student
    = random init seed 0, teacher = random init seed 1, each exported once with `hf.save` (with
    the tokenizer, so config.json carries its EOS / pad ids). opd_jax loads the two directories
    (`source='hf'`), TRL loads the same directories with `AutoModelForCausalLM`;
  - prompts: those of `configs/opd.py:distill_smoke` (the embedded smoke task, chat-formatted by
    the task tokenizer; TRL gets the very same prompt ids), `--prompts` per iteration, each
    sampled G = `--group` times, temperature 1, no top-k / top-p, up to `--max-new` tokens, EOS =
    the tokenizer's EOS (a random-init model stops at it now and then: the lengths vary);
  - objective: the direct route, fully on-policy. opd_jax: `method='distill'` with
    `distill.distill.kind='reverse_kl'`, temperature 1, mode 'token_mean' (mean over response
    tokens of KL(pS || pT) over the full vocabulary). TRL: `GKDTrainer` with lmbda = 1 (every
    step samples from the student) and beta = 1, which its `generalized_jsd_loss` special-cases
    to KL(pS || pT) over the full vocabulary, masked to the response tokens (its normalisation may
    use the collator's token count instead of the sampled one: a constant scale, same compute);
  - one optimizer update per iteration on the whole batch (opd_jax: Adam from the preset; TRL:
    its default AdamW), no gradient accumulation, no checkpoints or evals inside the timing;
  - no rematerialisation on either side: the `small` preset has remat off, and TRL runs with
    `gradient_checkpointing=False` (TRL's SFT-derived configs default to True, which also turns
    the KV cache off in GKD's generation: many times slower here, not a fair peer).

Iteration time = from the end of one iteration to the end of the next (opd_jax: `time/step_s`
of the loop's phase clock; TRL: between `on_step_end` callbacks). The first `--warmup`
iterations (opd_jax: compilation; TRL: lazy initialisation) are reported apart
(`*_first_iteration_s`); the steady state is the next `--steps` iterations.

Tokens of training data = response tokens trained on (sampled tokens up to and including EOS;
opd_jax's `distill/tokens`, TRL's labels != -100 after its on-policy generation), the same count
on both sides. `*_tok_s` = those tokens over the steady iterations / their total time.

opd_jax runs in this process, TRL (`pip install torch==2.13.0 trl==1.16.0`) in a child process
afterwards, once per `--torch-threads` count (default '0,1': torch's default and one thread;
on the shared 2-core machine at load average ~10, one thread ran TRL's iteration 2-3x faster than
torch's default two in some runs and about as fast in others; the ratio is taken against the
faster run). opd_jax's first iteration includes compilation unless the persistent compile cache
already holds it. Defaults: 2 prompts x 8, 32 new
tokens, 1 + 2 iterations (10.6 min with `--torch-threads 1` at that load); `--quick`: 1 prompt x 8,
16 new tokens, 1 + 1 iterations, torch's default threads only. Prints the CPU model, the XLA
flags, the load average around each side (the machine may be shared), and one JSON object (last
line) with `ratio_vs_trl` (opd_jax tok/s / TRL tok/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `configs` is imported from the repository root
  sys.path.insert(0, str(ROOT))

TRL_CHILD = r"""
import json, sys, time
spec = json.load(open(sys.argv[1]))
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl.experimental.gkd import GKDConfig, GKDTrainer

if spec["torch_threads"] > 0:
  torch.set_num_threads(spec["torch_threads"])
torch.manual_seed(spec["seed"])
tok = AutoTokenizer.from_pretrained(spec["student"])
student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
if student.generation_config.eos_token_id != tok.eos_token_id:
  raise SystemExit(f"EOS mismatch: generation_config {student.generation_config.eos_token_id} "
                   f"vs tokenizer {tok.eos_token_id}")
# Pre-tokenized rows: the collator takes the prompt as the ids before the first completion_mask 1
# (the one completion token is a placeholder: lmbda = 1 replaces it with the student's sample).
rows = [{"prompt": "", "input_ids": ids + [tok.eos_token_id],
         "completion_mask": [0] * len(ids) + [1]} for ids in spec["prompt_ids"]]
ends, tokens, seq_lens = [], [], []

class Stamp(TrainerCallback):
  def on_step_end(self, args, state, control, **kw):
    ends.append(time.perf_counter())

class CountingGKD(GKDTrainer):
  # Observes the on-policy batch (training_step replaces inputs' labels with the sampled ones).
  def training_step(self, model, inputs, num_items_in_batch=None):
    loss = super().training_step(model, inputs, num_items_in_batch)
    tokens.append(int((inputs["labels"] != -100).sum()))
    seq_lens.append(int(inputs["input_ids"].shape[1]))
    return loss

args = GKDConfig(output_dir=spec["workdir"], max_steps=spec["steps"],
                 per_device_train_batch_size=spec["rows"], lmbda=1.0, beta=1.0, temperature=1.0,
                 max_new_tokens=spec["max_new"], report_to=[], save_strategy="no",
                 logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
                 disable_tqdm=True, seed=spec["seed"], gradient_checkpointing=False)
trainer = CountingGKD(model=student, teacher_model=teacher, args=args,
                      train_dataset=Dataset.from_list(rows), processing_class=tok,
                      callbacks=[Stamp()])
t0 = time.perf_counter()
trainer.train()
print(json.dumps({"t0": t0, "ends": ends, "tokens": tokens, "seq_lens": seq_lens,
                  "torch_threads": torch.get_num_threads(), "torch": torch.__version__}))
"""


def _load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def _steady(times: list[float], tokens: list[int], warmup: int) -> dict:
  """Throughput of the iterations after `warmup`: total tokens / total seconds."""
  t, n = times[warmup:], tokens[warmup:]
  return {"first_iteration_s": round(sum(times[:warmup]), 3),
          "iteration_s": [round(x, 3) for x in t],
          "iteration_s_mean": round(statistics.fmean(t), 3),
          "tokens_per_iteration": n,
          "tok_s": round(sum(n) / sum(t), 2)}


def run_opd_jax(dirs, model_cfg, args, workdir) -> dict:
  """`loop.run` of `configs/opd.py:distill_smoke` with the exported student and teacher."""
  from opd_jax.train import config as C
  from opd_jax.train import loop
  over = [f"loop.steps={args.warmup + args.steps}", "loop.checkpoint_every=0",
          "loop.snapshot_steps=()", "loop.eval_every=0", "loop.log_every=1",
          "loop.progress=false", "loop.tensorboard=false", "loop.time_phases=true",
          f"loop.batch_size={args.prompts}", f"rollout.group_size={args.group}",
          f"sampler.max_new_tokens={args.max_new}", "sampler.temperature=1.0",
          "distill.distill.kind=reverse_kl", "distill.distill.temperature=1.0",
          "distill.distill.mode=token_mean", "distill.micro_batches=1"]
  cfg = C.from_config_dict(C.load_config("configs/opd.py:distill_smoke", over))
  cfg = cfg.replace(
      student=dataclasses.replace(cfg.student, model=model_cfg, source="hf",
                                  path=str(dirs["student"])),
      teacher=dataclasses.replace(cfg.teacher, model=model_cfg, source="hf",
                                  path=str(dirs["teacher"])))
  summary = loop.run(cfg, workdir)
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]
  rows = sorted((r for r in rows if "time/step_s" in r), key=lambda r: r["step"])
  if len(rows) != args.warmup + args.steps:
    raise RuntimeError(f"opd_jax: {len(rows)} timed steps in metrics.jsonl, expected "
                       f"{args.warmup + args.steps}")
  out = _steady([r["time/step_s"] for r in rows], [int(r["distill/tokens"]) for r in rows],
                args.warmup)
  steady = rows[args.warmup:]
  for phase in ("sample", "update"):
    key = f"time/{phase}_s"
    if all(key in r for r in steady):
      out[f"{phase}_s_mean"] = round(statistics.fmean(r[key] for r in steady), 3)
  out["run_setup_to_first_step_end_s"] = round(summary["first_step_s"], 2)
  return out


def run_trl(dirs, prompt_ids, args, workdir, torch_threads: int) -> dict:
  """TRL's GKDTrainer (lmbda = 1, beta = 1) in a child process on the same weights and prompts,
  with `torch_threads` intra-op threads (0: torch's default)."""
  rows = args.prompts * args.group
  steps = args.warmup + args.steps
  # Each prompt G times, enough rows for every step (the trainer shuffles rows into batches).
  need = rows * steps
  ids = [prompt_ids[i % len(prompt_ids)] for i in range(need // args.group)]
  ids = [p for p in ids for _ in range(args.group)]
  spec = {"student": str(dirs["student"]), "teacher": str(dirs["teacher"]), "rows": rows,
          "steps": steps, "max_new": args.max_new, "prompt_ids": ids, "seed": 0,
          "workdir": str(workdir), "torch_threads": torch_threads}
  spec_path = pathlib.Path(workdir) / "spec.json"
  spec_path.parent.mkdir(parents=True, exist_ok=True)
  spec_path.write_text(json.dumps(spec))
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, "-c", TRL_CHILD, str(spec_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"TRL child failed:\n{proc.stderr[-4000:]}")
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  ends = res["ends"]
  if len(ends) != steps or len(res["tokens"]) != steps:
    raise RuntimeError(f"TRL: {len(ends)} steps stamped, {len(res['tokens'])} counted, "
                       f"expected {steps}")
  times = [ends[0] - res["t0"]] + [b - a for a, b in zip(ends, ends[1:])]
  out = _steady(times, res["tokens"], args.warmup)
  out["seq_lens"] = res["seq_lens"][args.warmup:]
  out["torch_threads"] = res["torch_threads"]
  out["torch"] = res["torch"]
  return out


def main(argv=None) -> int:
  from opd_jax import host_malloc
  host_malloc.tune()   # $OPD_JAX_HOST_MALLOC (on by default on CPU): before the first JAX op
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true",
                 help="1 prompt x 8, 16 new tokens, 1 steady iteration (the smoke run)")
  p.add_argument("--no-trl", action="store_true", help="opd_jax only")
  p.add_argument("--prompts", type=int, default=None, help="prompts per iteration")
  p.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
  p.add_argument("--max-new", type=int, default=None, help="response budget (tokens)")
  p.add_argument("--steps", type=int, default=None, help="steady iterations timed")
  p.add_argument("--warmup", type=int, default=1, help="iterations reported apart")
  p.add_argument("--torch-threads", default=None,
                 help="comma-separated torch intra-op thread counts TRL is run with, one TRL run "
                      "each (0: torch's default); ratio_vs_trl uses the fastest. Default: '0' "
                      "with --quick, else '0,1' (on a loaded machine one thread can be faster)")
  args = p.parse_args(argv)
  args.prompts = args.prompts or (1 if args.quick else 2)
  args.max_new = args.max_new or (16 if args.quick else 32)
  args.steps = args.steps or (1 if args.quick else 2)
  if args.warmup < 1 or args.steps < 1:
    p.error("--warmup and --steps must be >= 1")
  try:
    threads = [int(x) for x in (args.torch_threads or ("0" if args.quick else "0,1")).split(",")]
  except ValueError:
    p.error(f"--torch-threads {args.torch_threads!r}: expected comma-separated integers")
  if not threads or min(threads) < 0:
    p.error("--torch-threads: counts must be >= 0")

  import jax

  from opd_jax.data import tokenizer as tok_lib
  from opd_jax.data import tasks as tasks_lib
  from opd_jax.models import config as mc
  from opd_jax.models import hf
  from opd_jax.models import transformer as tf
  from opd_jax.train import config as C
  from opd_jax.train import run_plan
  from opd_jax.train import timing

  xla_flags = os.environ.get("XLA_FLAGS", "")
  print(f"cpu: {timing.cpu_model()}; XLA_FLAGS={xla_flags!r}", file=sys.stderr, flush=True)
  base = C.from_config_dict(C.load_config("configs/opd.py:distill_smoke"))
  tok = run_plan.load_tokenizer(base)
  model_cfg = mc.small(vocab_size=base.student.model.vocab_size)
  examples = tasks_lib.generate(base.data.task, "train", base.data.train_examples,
                                seed=base.data.data_seed)
  prompt_ids = tok_lib.encode_prompts(tok, [e.prompt for e in examples])
  rows = args.prompts * args.group
  result = {"bench": "opd_iteration", "preset": "small", "num_params": model_cfg.num_params,
            "dtype": "float32", "vocab_size": model_cfg.vocab_size, "prompts": args.prompts,
            "group": args.group, "rows": rows, "max_new_tokens": args.max_new,
            "temperature": 1.0, "divergence": "reverse_kl (opd_jax distill kind=reverse_kl, "
            "token_mean; TRL GKD beta=1, lmbda=1)",
            "tokens_counted": "response tokens trained on (up to and including EOS)",
            "warmup": args.warmup, "steps": args.steps, "quick": args.quick,
            "prompt_len_mean": round(statistics.fmean(len(x) for x in prompt_ids), 2),
            "cpu_model": timing.cpu_model(), "cpu_count": os.cpu_count(), "xla_flags": xla_flags,
            "host_malloc_tuned": host_malloc.tune().applied,
            "jax_backend": jax.default_backend(), "jax": jax.__version__}

  with tempfile.TemporaryDirectory(prefix="opd_iteration_") as tmp:
    tmp = pathlib.Path(tmp)
    dirs = {}
    for name, seed in (("student", 0), ("teacher", 1)):
      _, params = tf.init(model_cfg, seed)
      dirs[name] = hf.save(tmp / name, model_cfg, params, tok)
      del params

    load_before = _load()
    opd = run_opd_jax(dirs, model_cfg, args, tmp / "opd_jax_run")
    opd["loadavg_before_after"] = [load_before, _load()]
    result["opd_jax"] = opd
    print(f"opd_jax: {opd['iteration_s_mean']:.2f} s/iteration, {opd['tok_s']:.1f} tok/s "
          f"(first iteration {opd['first_iteration_s']:.1f} s)", file=sys.stderr, flush=True)

    if not args.no_trl:
      runs = []
      for n in threads:
        load_before = _load()
        trl = run_trl(dirs, prompt_ids, args, tmp / f"trl_run_{n}", n)
        trl["loadavg_before_after"] = [load_before, _load()]
        runs.append(trl)
        print(f"trl ({trl['torch_threads']} torch threads): {trl['iteration_s_mean']:.2f} "
              f"s/iteration, {trl['tok_s']:.1f} tok/s (first iteration "
              f"{trl['first_iteration_s']:.1f} s)", file=sys.stderr, flush=True)
      best = max(runs, key=lambda r: r["tok_s"])
      result["trl"] = best
      if len(runs) > 1:
        result["trl_all"] = runs
      result["ratio_vs_trl"] = round(opd["tok_s"] / best["tok_s"], 3)
      print(f"ratio_vs_trl {result['ratio_vs_trl']} (vs the fastest TRL run)", file=sys.stderr)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())

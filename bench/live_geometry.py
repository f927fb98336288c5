"""Overhead of the live geometry monitor (`geometry.every`) on SFT steps of the `small` preset.

    python bench/live_geometry.py [--every 10] [--steps 40] [--repeats 2] [--quick]

The same run (`configs/sft.py:smoke` with the student replaced by the `small` preset, batch 8)
with the monitor off and with `geometry.every=N`, alternated `--repeats` times in one process
(the compiled programs are shared; the first `WARMUP` steps of each run, compilation included,
are left out). Step time is the loop's own `time/step_s` (wall time between step starts, the
monitor included where it runs); the overhead is mean(on) / mean(off) - 1 with the best
(smallest) mean of each arm. The monitor compiles at its first point (step N) of the first run
with it on; it is kept for the process (`live.make_monitor`), so later repeats time the steady
state (each repeat's numbers are printed). Prints the CPU model and one JSON object as its last line with
`overhead_fraction` (target: < 0.05 at every=10).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile

import numpy as np

from opd_jax.models import config as mc
from opd_jax.train import config as C
from opd_jax.train import loop
from opd_jax.train import metrics as metrics_lib
from opd_jax.train import timing

WARMUP = 3


def _mean_step_s(steps: int, every: int) -> float:
  over = [f"loop.steps={steps}", "loop.batch_size=8", "loop.checkpoint_every=0",
          "loop.snapshot_steps=()", "loop.eval_every=0", "loop.progress=false",
          "loop.tensorboard=false", f"geometry.every={every}"]
  cfg = C.from_config_dict(C.load_config("configs/sft.py:smoke", over))
  cfg = cfg.replace(student=dataclasses.replace(
      cfg.student, model=mc.small(vocab_size=cfg.student.model.vocab_size)))
  with tempfile.TemporaryDirectory() as wd:
    loop.run(cfg, wd)
    rows = [r for r in metrics_lib.read_jsonl(f"{wd}/metrics.jsonl") if "time/step_s" in r]
  times = [r["time/step_s"] for r in rows if r["step"] > WARMUP]
  return float(np.mean(times))


def main(argv=None) -> int:
  from opd_jax import host_malloc
  host_malloc.tune()   # $OPD_JAX_HOST_MALLOC (on by default on CPU): before the first JAX op
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--every", type=int, default=10)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--quick", action="store_true", help="12 steps, 1 repeat")
  args = p.parse_args(argv)
  steps, repeats = (12, 1) if args.quick else (args.steps, args.repeats)
  print(f"cpu: {timing.cpu_model()}", file=sys.stderr)
  off, on = [], []
  for _ in range(repeats):
    off.append(_mean_step_s(steps, 0))
    on.append(_mean_step_s(steps, args.every))
    print(f"off {off[-1]:.4f} s/step, every={args.every}: {on[-1]:.4f} s/step", file=sys.stderr)
  result = {"cpu_model": timing.cpu_model(), "every": args.every, "steps": steps,
            "step_s_off": round(min(off), 5), "step_s_on": round(min(on), 5),
            "overhead_fraction": round(min(on) / min(off) - 1, 4)}
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())

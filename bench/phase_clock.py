"""Cost of logging where the time goes (`loop.time_phases`) on OPD steps of the `small` shapes.

    python bench/phase_clock.py [--steps 30] [--repeats 3] [--quick]

The same OPD run (`configs/opd.py:smoke` with student and teacher replaced by the `small` preset,
1 prompt x 8 samples, as `bench/first_step.py` runs it) with the phase clock off
(`loop.time_phases=false`: no `time/*`, `perf/*`) and on, alternated `--repeats` times in one
process after one run that compiles everything. The clock cannot time the run without it, so step
time is measured from outside and the same way for both arms: the loop hands each step's metrics
to `metrics.LateFetcher.push` once per step, at the same point of the step; the bench stamps those
calls, and a run's step time is the median interval over the steps after `WARMUP`. Both arms run
the same computation (same seeds: the clock changes no number). The overhead is
min(on) / min(off) - 1 over the repeats.

The same runs check the split against that outside clock: the clock's mean `time/step_s` over the
steady steps divided by the mean stamped interval over the same steps (`clock_over_outside`, per
repeat; its phases add up to `time/step_s` with the remainder in `time/other_s`, so
`split_error_max` is the largest relative amount by which the named phases exceed the step).

Prints the CPU model and one JSON object as its last line with `overhead_fraction` (target < 0.02)
and `clock_over_outside` (target within 0.95-1.05).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

from opd_jax.models import config as mc
from opd_jax.train import config as C
from opd_jax.train import loop
from opd_jax.train import metrics as metrics_lib
from opd_jax.train import timing

WARMUP = 3  # steps left out of every median (the first ones warm caches and threads)


def _config(steps: int, phases: bool):
  over = [f"loop.steps={steps}", "loop.batch_size=1", "rollout.group_size=8",
          "loop.checkpoint_every=0", "loop.snapshot_steps=()", "loop.eval_every=0",
          "loop.progress=false", "loop.tensorboard=false", f"loop.time_phases={phases}"]
  cfg = C.from_config_dict(C.load_config("configs/opd.py:smoke", over))
  small = mc.small(vocab_size=cfg.student.model.vocab_size)
  return cfg.replace(student=dataclasses.replace(cfg.student, model=small),
                     teacher=dataclasses.replace(cfg.teacher, model=small))


def _run(steps: int, phases: bool) -> tuple[list[float], list[dict]]:
  """(perf_counter stamps of the loop's per-step metrics hand-over, the metrics rows)."""
  stamps = []
  push = metrics_lib.LateFetcher.push

  def stamped(self, step, metrics):
    stamps.append(time.perf_counter())
    return push(self, step, metrics)

  metrics_lib.LateFetcher.push = stamped
  try:
    with tempfile.TemporaryDirectory() as wd:
      loop.run(_config(steps, phases), wd)
      rows = list(metrics_lib.read_jsonl(f"{wd}/metrics.jsonl"))
  finally:
    metrics_lib.LateFetcher.push = push
  if len(stamps) != steps:
    raise RuntimeError(f"expected {steps} metrics hand-overs, got {len(stamps)}")
  return stamps, rows


def _split_error(rows: list[dict]) -> float:
  errs = []
  for r in rows:
    if r.get("step", 0) > WARMUP and "time/step_s" in r:
      parts = sum(v for k, v in r.items() if k.startswith("time/") and k != "time/step_s")
      errs.append(abs(parts - r["time/step_s"]) / r["time/step_s"])
  if not errs:
    raise RuntimeError("the clock logged no steady step")
  return max(errs)


def main(argv=None) -> int:
  from opd_jax import host_malloc
  host_malloc.tune()   # $OPD_JAX_HOST_MALLOC (on by default on CPU): before the first JAX op
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--quick", action="store_true", help="10 steps, 1 repeat")
  args = p.parse_args(argv)
  steps, repeats = (10, 1) if args.quick else (args.steps, args.repeats)
  if steps < WARMUP + 3:
    p.error(f"--steps: at least {WARMUP + 3}")
  print(f"cpu: {timing.cpu_model()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        file=sys.stderr)
  load = [round(os.getloadavg()[0], 2)]
  _run(WARMUP + 3, True)  # compile everything once, outside every measurement
  per_step = {False: [], True: []}
  split, clock_ratio = [], []
  for _ in range(repeats):
    for phases in (False, True):
      stamps, rows = _run(steps, phases)
      # Stamp k is taken during step k + 1 (steps count from 1): interval k is step k + 1's time.
      intervals = {k + 2: b - a for k, (a, b) in enumerate(zip(stamps, stamps[1:]))}
      steady = {s: v for s, v in intervals.items() if s > WARMUP}
      per_step[phases].append(statistics.median(steady.values()))
      if phases:
        split.append(_split_error(rows))
        clock = {r["step"]: r["time/step_s"] for r in rows if "time/step_s" in r}
        common = sorted(set(clock) & set(steady))
        clock_ratio.append(statistics.fmean(clock[s] for s in common)
                           / statistics.fmean(steady[s] for s in common))
      print(f"time_phases={phases}: {per_step[phases][-1]:.4f} s/step (median of "
            f"{len(steady)})", file=sys.stderr)
  off, on = min(per_step[False]), min(per_step[True])
  load.append(round(os.getloadavg()[0], 2))
  print(json.dumps({"bench": "phase_clock", "cpu_model": timing.cpu_model(),
                    "xla_flags": os.environ.get("XLA_FLAGS", ""), "steps": steps,
                    "repeats": repeats, "step_s_off": round(off, 5), "step_s_on": round(on, 5),
                    "step_s_off_all": [round(x, 5) for x in per_step[False]],
                    "step_s_on_all": [round(x, 5) for x in per_step[True]],
                    "overhead_fraction": round(on / off - 1, 4),
                    "clock_over_outside": [round(x, 4) for x in clock_ratio],
                    "split_error_max": round(max(split), 4), "load_avg": load}))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Time to the first step: the random-init program shared across seeds, the train step compiled
ahead in a thread (and traced once), the MFU peak measured after the first step."""

import pathlib

import jax
import numpy as np

from opd_jax.train import config as config_lib
from opd_jax.train import loop
from opd_jax.train import mesh as mesh_lib
from opd_jax.train import metrics as metrics_lib
from opd_jax.train import recipes
from opd_jax.train import run_plan
from opd_jax.train import steps
from opd_jax.train import timing

ROOT = pathlib.Path(__file__).resolve().parent.parent


def smoke(name, overrides=()):
  cd = config_lib.load_config(str(ROOT / "configs" / f"{name}.py") + ":smoke", list(overrides))
  return config_lib.from_config_dict(cd)


def test_random_init_is_one_program_for_every_seed_and_matches_init_sharded_params():
  cfg = smoke("opd", ["mesh.shape=(1, 8, 1)"])  # params sharded over the 8 fake devices
  mesh = mesh_lib.make_mesh(cfg.mesh)
  model, rules = cfg.student.model, cfg.mesh.rules
  for seed in (0, 7):
    want = mesh_lib.init_sharded_params(model, mesh, rules, seed)[1]
    got = run_plan._random_params(model, mesh, rules, seed)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert g.dtype == w.dtype and g.sharding == w.sharding
      assert np.asarray(g).tobytes() == np.asarray(w).tobytes()
  assert run_plan._random_init_fn(model, mesh, rules)._cache_size() == 1


def test_step_compiled_ahead_is_traced_once_and_the_peak_comes_after_the_first_step(
    tmp_path, monkeypatch):
  made, ahead_errors, calls, peak_after_calls = [], [], [0], []
  jit_step = recipes.SFT.jit_step

  def record_jit_step(self, ctx, shardings):
    made.append(jit_step(self, ctx, shardings))
    return made[-1]

  compile_ahead = loop._StepAhead._compile

  def record_compile(self, step_fn, args):
    compile_ahead(self, step_fn, args)
    ahead_errors.append(self.error)

  call = steps.JittedStep.__call__

  def count_call(self, *args):
    calls[0] += 1
    return call(self, *args)

  peak_flops = timing.peak_flops

  def record_peak():
    peak_after_calls.append(calls[0])
    return peak_flops()

  monkeypatch.setattr(recipes.SFT, "jit_step", record_jit_step)
  monkeypatch.setattr(loop._StepAhead, "_compile", record_compile)
  monkeypatch.setattr(steps.JittedStep, "__call__", count_call)
  monkeypatch.setattr(timing, "peak_flops", record_peak)
  summary = loop.run(smoke("sft", ["loop.steps=3", "loop.checkpoint_every=0",
                                   "loop.eval_every=0"]), tmp_path)
  assert ahead_errors == [None]          # compiled ahead, without an error
  assert len(made) == 1 and made[0].trace_count == 1   # ... and the step was traced only there
  assert calls[0] == 3 and peak_after_calls == [1]      # the peak: once, after the first step
  assert summary["peak_flops"] > 0 and summary["peak_flops_source"]
  assert 0 < summary["first_step_s"] < summary["wall_s"]
  rows = [r for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(r["perf/mfu"] > 0 and r["time/step_s"] > 0 for r in rows)


def test_a_failing_compile_ahead_leaves_the_error_to_the_step_itself(tmp_path, monkeypatch):
  # A step that cannot be lowered ahead (here: made to fail) still runs: its first call traces
  # and compiles it as usual.
  def fail(self, *args):
    raise RuntimeError("lowering failed ahead")

  monkeypatch.setattr(steps.JittedStep, "lower", fail)
  summary = loop.run(smoke("sft", ["loop.steps=2", "loop.checkpoint_every=0",
                                   "loop.eval_every=0"]), tmp_path)
  assert summary["step"] == 2 and np.isfinite(summary["metrics"]["train/loss"])

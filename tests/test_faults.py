"""Nothing lost: a run killed at any point resumes and ends bit-identical to an uninterrupted run;
nothing non-finite is saved; a resume that changes the computation is refused by name; SIGTERM
checkpoints at the next step boundary; an unreadable latest checkpoint falls back to the previous
one; user errors are one line.

Kills are injected in-process at hook points (before a step, inside / after a snapshot write,
inside / after a checkpoint write), chosen at random with a fixed seed; a kill "inside" a write
leaves what a SIGKILL would: orbax's temporary directory with part of the files. Two kills are
real SIGKILLs of a training process, and SIGTERM is sent to a real one.
"""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import xla_flags
from opd_jax import cli
from opd_jax import errors
from opd_jax.train import checkpoint as ckpt_lib
from opd_jax.train import config as config_lib
from opd_jax.train import loop
from opd_jax.train import metrics as metrics_lib
from opd_jax.train import recipes

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 8


def _config(name="sft", overrides=()):
  base = [f"loop.steps={STEPS}", "loop.batch_size=8", "loop.checkpoint_every=3",
          "loop.checkpoint_keep=2", "loop.snapshot_steps=(0,2,5,8)"]
  if name == "opd":
    base[1] = "loop.batch_size=2"
  cd = config_lib.load_config(str(ROOT / "configs" / f"{name}.py") + ":smoke",
                              base + list(overrides))
  return config_lib.from_config_dict(cd)


def _final_params(workdir):
  return jax.device_get(ckpt_lib.load_params(pathlib.Path(workdir) / "checkpoints"))


def _assert_same(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  out = {}
  for name in ("sft", "opd"):
    wd = tmp_path_factory.mktemp(f"straight_{name}")
    loop.run(_config(name), wd)
    out[name] = (_final_params(wd), {int(p.name) for p in (wd / "snapshots").iterdir()
                                     if p.name.isdigit()})
  return out


class _Kill(BaseException):
  """Stands for SIGKILL: not an Exception, so nothing in the library catches it."""


EVENTS = ("step", "snapshot_inside", "snapshot_after", "ckpt_inside", "ckpt_after")


def _arm(monkeypatch, kind: str, nth: int):
  """Raises _Kill at the nth occurrence of event `kind`. 'inside' leaves orbax's temporary
  directory with part of the files, as a kill mid-write does."""
  count = {"n": 0}

  def hit(event):
    if event == kind:
      count["n"] += 1
      if count["n"] == nth:
        raise _Kill(f"{kind} #{nth}")

  def partial_write(directory, step):
    tmp = pathlib.Path(str(directory)) / f"{step}.orbax-checkpoint-tmp-{time.time_ns()}"
    (tmp / "params").mkdir(parents=True)
    (tmp / "params" / "_partial").write_bytes(os.urandom(64))

  real_batch = {cls: cls.make_batch for cls in (recipes.SFT, recipes.PG)}

  def wrap_batch(cls):
    def make_batch(self, ctx, state, host):
      hit("step")
      return real_batch[cls](self, ctx, state, host)
    return make_batch

  for cls in real_batch:
    monkeypatch.setattr(cls, "make_batch", wrap_batch(cls))
  real_snapshot = ckpt_lib.save_snapshot

  def save_snapshot(directory, step, *a, **kw):
    if kind == "snapshot_inside" and count["n"] + 1 == nth:
      partial_write(directory, step)
    hit("snapshot_inside")
    out = real_snapshot(directory, step, *a, **kw)
    hit("snapshot_after")
    return out

  monkeypatch.setattr(ckpt_lib, "save_snapshot", save_snapshot)
  real_save = ckpt_lib.Checkpointer.save

  def save(self, step, *a, **kw):
    if kind == "ckpt_inside" and count["n"] + 1 == nth:
      partial_write(self.directory, step)
    hit("ckpt_inside")
    out = real_save(self, step, *a, **kw)
    self.wait_until_finished()
    hit("ckpt_after")
    return out

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)


CHAIN = ["loop.steps=24", "loop.snapshot_steps=(0,2,5,8,13,21,24)"]


def test_twenty_kills_at_random_points_then_resume_is_bit_identical(tmp_path):
  """Runs killed at 20 random points in all (fixed seed: before a step, inside or after a
  snapshot write, inside or after a checkpoint write), each resumed after every kill until it
  finishes: every run ends bit-identical to an uninterrupted one, with every snapshot and every
  step logged once."""
  cfg = _config("sft", CHAIN)
  straight = tmp_path / "straight"
  loop.run(cfg, straight)
  rng = np.random.default_rng(0)
  kills, chains = [], 0
  while len(kills) < 20:
    wd = tmp_path / f"chain{chains}"
    chains += 1
    while len(kills) < 20:
      kind, nth = EVENTS[int(rng.integers(len(EVENTS)))], int(rng.integers(1, 3))
      with pytest.MonkeyPatch.context() as mp:
        _arm(mp, kind, nth)
        try:
          loop.run(cfg, wd, resume=True)
        except _Kill:
          kills.append((kind, nth))
          continue
      break  # this run finished before its armed point
    summary = loop.run(cfg, wd, resume=True)
    assert summary["step"] == 24
    _assert_same(_final_params(wd), _final_params(straight))
    assert set(summary["snapshots"]) == {0, 2, 5, 8, 13, 21, 24}
    for step in (5, 21):
      _assert_same(ckpt_lib.load_params(summary["snapshots"][step]),
                   ckpt_lib.load_params(straight / "snapshots" / str(step)))
    rows = [r["step"] for r in metrics_lib.read_jsonl(wd / "metrics.jsonl") if "train/loss" in r]
    assert rows == list(range(1, 25))  # no step logged twice, none missing
  assert len(set(k for k, _ in kills)) == len(EVENTS), kills


@pytest.mark.parametrize("kind,nth", [("ckpt_inside", 2)])
def test_kill_anywhere_then_resume_is_bit_identical_opd(kind, nth, reference, tmp_path):
  cfg = _config("opd")
  with pytest.MonkeyPatch.context() as mp:
    _arm(mp, kind, nth)
    with pytest.raises(_Kill):
      loop.run(cfg, tmp_path)
  loop.run(cfg, tmp_path, resume=True)
  _assert_same(_final_params(tmp_path), reference["opd"][0])


def test_a_kill_during_an_eval_resumes_before_it(reference, tmp_path, monkeypatch):
  # The eval of step 6 runs before step 6's checkpoint: killed inside it, the run resumes from
  # step 3, and every eval row (0, 3, 6, the final 8) is there once.
  from opd_jax.train import rollout as rollout_lib
  cfg = _config("sft", ["loop.eval_every=3"])
  real, calls = rollout_lib.evaluate, {"n": 0}

  def evaluate(*a, **kw):
    calls["n"] += 1
    if calls["n"] == 3:   # evals at steps 0, 3, 6
      raise _Kill("inside the eval of step 6")
    return real(*a, **kw)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(rollout_lib, "evaluate", evaluate)
    with pytest.raises(_Kill):
      loop.run(cfg, tmp_path)
  summary = loop.run(cfg, tmp_path, resume=True)
  assert summary["resumed_from"] == 3
  rows = [r["step"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
          if any(k.startswith("eval/") for k in r)]
  assert rows == [0, 3, 6, 8]
  _assert_same(_final_params(tmp_path), reference["sft"][0])


def test_sigterm_while_the_run_loads_stops_it_at_the_first_step_with_a_checkpoint(tmp_path,
                                                                                   monkeypatch):
  # A preemption can come while the models load and the step compiles (minutes on a pod).
  real = loop.run_plan.load_model

  def load_model(*a, **kw):
    signal.raise_signal(signal.SIGTERM)
    return real(*a, **kw)

  monkeypatch.setattr(loop.run_plan, "load_model", load_model)
  summary = loop.run(_config("sft", ["loop.snapshot_steps=()"]), tmp_path)
  assert summary["preempted"] == "SIGTERM" and summary["step"] == 1
  assert ckpt_lib.Checkpointer(tmp_path / "checkpoints").all_steps() == [1]


def _train_cmd(workdir, *extra):
  return [sys.executable, "-m", "opd_jax.cli", "train", "--config",
          str(ROOT / "configs" / "sft.py") + ":smoke", "--workdir", str(workdir),
          f"--config.loop.steps={STEPS}", "--config.loop.batch_size=8",
          "--config.loop.checkpoint_every=3", "--config.loop.checkpoint_keep=2",
          "--config.loop.snapshot_steps=(0,2,5,8)", *extra]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = xla_flags.with_devices(8)
  return env


def _wait_for_step(workdir, step, proc, timeout=240):
  t0 = time.time()
  path = pathlib.Path(workdir) / "metrics.jsonl"
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      return False
    if path.is_file() and any(r.get("step", 0) >= step for r in metrics_lib.read_jsonl(path)):
      return True
    time.sleep(0.05)
  return False


def test_sigkill_and_sigterm_of_a_real_process(reference, tmp_path):
  """A real SIGKILL, then a SIGTERM: the resume continues, SIGTERM exits 0 with a checkpoint and
  says how to resume, and the end is bit-identical."""
  wd = tmp_path / "run"
  proc = subprocess.Popen(_train_cmd(wd), env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  reached = _wait_for_step(wd, 2, proc)
  proc.kill()
  proc.wait()
  assert reached, proc.stderr.read().decode()[-2000:]
  proc = subprocess.Popen(_train_cmd(wd, "--resume"), env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  assert _wait_for_step(wd, 4, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=240)
  err = err.decode()
  assert proc.returncode == 0, err[-2000:]
  summary = json.loads(pathlib.Path(wd / "summary.json").read_text())
  # The command tunes the CPU host by default (`host_malloc`): the run, its SIGTERM included,
  # ran under synchronous dispatch.
  assert summary["synchronous_dispatch"] is True
  stopped = summary["step"]
  if stopped < STEPS:  # the signal landed before the last step
    assert "SIGTERM" in err and "--resume" in err, err[-2000:]
    assert ckpt_lib.Checkpointer(wd / "checkpoints").latest_step() == stopped
    subprocess.run(_train_cmd(wd, "--resume"), env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  _assert_same(_final_params(wd), reference["sft"][0])


def test_non_finite_state_is_never_saved(tmp_path, capsys):
  """lr=1e39 keeps the loss of step 1 finite (it is computed before the update) but makes the
  parameters infinite: the guard checks what it saves, so no checkpoint or snapshot of it exists."""
  cfg = _config("sft", ["optim.lr=1e39", "loop.checkpoint_every=1", "loop.snapshot_steps=(1,)"])
  with pytest.raises(loop.NonFiniteLossError, match=r"non-finite .* at step 1\b.*no checkpoint"):
    loop.run(cfg, tmp_path)
  assert ckpt_lib.Checkpointer(tmp_path / "checkpoints").all_steps() == []
  assert not (tmp_path / "snapshots" / "1").exists()
  # from the command line: one line naming the step, exit 2
  argv = ["train", "--config", str(ROOT / "configs" / "sft.py") + ":smoke", "--workdir",
          str(tmp_path / "cli"), "--config.optim.lr=1e39", "--config.loop.steps=2",
          "--config.loop.checkpoint_every=1", "--config.loop.batch_size=8"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "non-finite" in err[0] and "step 1" in err[0], err


@pytest.mark.parametrize("optim,refused", [
    ([], False), (["optim.schedule=cosine"], True), (["optim.warmup_frac=0.1"], True)])
def test_a_longer_run_may_resume_only_where_the_schedule_does_not_span_it(optim, refused):
  saved = config_lib.dataclass_to_dict(_config("sft", optim))
  longer = _config("sft", optim + ["loop.steps=30"])
  changes = loop.config_changes(saved, longer)
  assert changes == ([f"loop.steps: {STEPS} -> 30"] if refused else [])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_hyperparameters_are_rejected_by_name(value):
  with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.lr: .* not a finite number"):
    _config("sft", [f"optim.lr={value}"])


def test_resume_refuses_a_changed_computation_naming_each_field(tmp_path):
  cfg = _config("sft", ["loop.steps=2", "loop.snapshot_steps=()"])
  loop.run(cfg, tmp_path)
  changed = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=0.1),
                                loop=dataclasses.replace(cfg.loop, steps=3, seed=7))
  with pytest.raises(errors.ResumeConfigError) as e:
    loop.run(changed, tmp_path, resume=True)
  assert "optim.lr: 0.003" in str(e.value) or "optim.lr:" in str(e.value)
  assert "loop.seed: 0 -> 7" in str(e.value) and "loop.steps" not in str(e.value)
  other_method = config_lib.from_config_dict(config_lib.load_config(
      str(ROOT / "configs" / "rlvr.py") + ":smoke", ["loop.steps=3"]))
  with pytest.raises(errors.ResumeConfigError, match=r"method: 'sft' -> 'rlvr'"):
    loop.run(other_method, tmp_path, resume=True)
  # Named changes go through; every segment's config is kept.
  lr_only = dataclasses.replace(changed, loop=dataclasses.replace(changed.loop, seed=0))
  summary = loop.run(lr_only, tmp_path, resume=True, allow_changes=("optim.lr",))
  assert summary["step"] == 3
  assert (tmp_path / "config.json").is_file() and (tmp_path / "config.resume-2.json").is_file()


@pytest.mark.parametrize("part", ["state", "meta"])
def test_unreadable_latest_checkpoint_falls_back_with_a_warning(part, tmp_path):
  cfg = _config("sft", ["loop.steps=4", "loop.checkpoint_every=2", "loop.snapshot_steps=()"])
  loop.run(cfg, tmp_path / "straight")
  loop.run(cfg, tmp_path / "run")
  for f in (tmp_path / "run" / "checkpoints" / "4" / part).rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "manifest" not in f.name:
      f.write_bytes(b"\0" * f.stat().st_size)  # zeroed: unreadable
  longer = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, steps=6))
  with pytest.warns(ckpt_lib.CorruptCheckpointWarning, match=r"checkpoints/4 is unreadable"):
    summary = loop.run(longer, tmp_path / "run", resume=True)
  assert summary["resumed_from"] == 2 and summary["step"] == 6


def test_a_fresh_start_replaces_metrics_of_an_unsaved_start(tmp_path):
  cfg = _config("sft", ["loop.steps=2", "loop.snapshot_steps=()"])
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 9.0}\n')
  loop.run(cfg, tmp_path)
  rows = [r for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
  assert [r["step"] for r in rows] == [1, 2] and rows[0]["train/loss"] != 9.0


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
  loop.run(_config("sft", ["loop.steps=1", "loop.snapshot_steps=()"]), tmp_path)
  argv = ["train", "--config", str(ROOT / "configs" / "sft.py") + ":smoke",
          "--workdir", str(tmp_path), "--config.loop.steps=1"]
  assert cli.main(argv) == 2  # checkpoints exist, no --resume
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "already holds checkpoints" in err
  assert cli.main(argv[:-1] + ["--config.optim.lr=nan"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "optim.lr" in err
  with pytest.raises(errors.UserError):
    cli.main(["--debug"] + argv)
  # more of a new user's mistakes: an unknown preset, a mesh larger than the machine, a missing
  # tokenizer directory, a directory that holds no checkpoint
  fresh = ["--workdir", str(tmp_path / "fresh"), "--config.loop.steps=1"]
  cases = [(["train", "--config", "configs/opd.py:smok"] + fresh, "unknown preset 'smok'"),
           (["train", "--config", "configs/opd.py:smoke", "--config.mesh.shape=(16,1,1)"] + fresh,
            "needs 16 devices but only 8 exist"),
           (["train", "--config", "configs/opd.py:smoke",
             f"--config.data.tokenizer={tmp_path / 'no_tok'}"] + fresh, "is not a directory"),
           (["train", "--config", "configs/sft.py:smoke",
             f"--config.data.tokenizer={tmp_path / 'empty'}"] + fresh,
            f"data.tokenizer='{tmp_path / 'empty'}': "),   # a directory without a tokenizer
           (["train", "--config", "configs/sft.py:smoke", "--config.data.sft_buckets=(8,)"] + fresh,
            "data.sft_buckets=(8,): sft pipeline: example 0 has"),
           (["train", "--config", "configs/opd.py:smoke", "--config.data.prompt_buckets=(4,)"]
            + fresh, "data.prompt_buckets=(4,): rollout pipeline: example 0 has"),
           (["diagnose", "--base", str(tmp_path / "empty"), "--tuned", str(tmp_path / "empty"),
             "--out", str(tmp_path / "diag")], "is neither a snapshot"),
           (["diagnose", "--base", str(tmp_path), "--tuned", str(tmp_path), "--out",
             str(tmp_path / "diag")], "unsupported model_type")]   # a run dir: config.json
  (tmp_path / "empty").mkdir()
  for case, want in cases:
    assert cli.main(case) == 2, case
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and want in err, (case, err)


def test_disk_full_is_one_line_and_the_run_resumes_exactly(reference, tmp_path, monkeypatch,
                                                           capsys):
  """A full disk during a checkpoint write (as tensorstore reports it from orbax's writer) ends
  the run with one line and exit 2; after space is freed, --resume ends bit-identical."""
  import orbax.checkpoint as ocp
  real_save = ocp.CheckpointManager.save
  calls = {"n": 0}

  def save(self, step, *a, **kw):
    if pathlib.Path(str(self.directory)).name == "checkpoints":
      calls["n"] += 1
      if calls["n"] == 2:
        raise ValueError(f'RESOURCE_EXHAUSTED: Failed writing: "{self.directory}/{step}.orbax-'
                         'checkpoint-tmp/state/d/0": Failed to write 1507 bytes to file 7: No space '
                         "left on device [os_error_code='28']")
    return real_save(self, step, *a, **kw)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  argv = ["train", "--config", str(ROOT / "configs" / "sft.py") + ":smoke", "--workdir",
          str(tmp_path), f"--config.loop.steps={STEPS}", "--config.loop.batch_size=8",
          "--config.loop.checkpoint_every=3", "--config.loop.checkpoint_keep=2",
          "--config.loop.snapshot_steps=(0,2,5,8)", "--config.loop.progress=false"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert "no space left on device" in err and str(tmp_path / "checkpoints") in err
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)   # space freed
  assert cli.main(argv + ["--resume"]) == 0
  _assert_same(_final_params(tmp_path), reference["sft"][0])
  chained = ValueError("write failed")
  chained.__cause__ = OSError(28, "No space left on device")
  assert ckpt_lib._is_disk_full(chained) and not ckpt_lib._is_disk_full(ValueError("bad shape"))


def test_batch_vs_mesh_is_checked_before_any_model_loads(tmp_path):
  from opd_jax.train import mesh as mesh_lib
  from opd_jax.train import run_plan
  cfg = _config("opd", ["loop.batch_size=3", "rollout.group_size=1", "mesh.shape=(1,-1,1)"])
  plan = run_plan.resolve(cfg, shapes_only=True)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  with pytest.raises(config_lib.ConfigError, match=r"loop\.batch_size x rollout\.group_size = 3 "
                     r"rows .* 8 batch shards .*fsdp=8"):
    run_plan.check_divisible(plan, mesh, cfg.mesh.rules)
  bad_teacher = _config("opd", ["loop.batch_size=3", "rollout.group_size=1",
                                "mesh.shape=(1,-1,1)", "teacher.source=checkpoint",
                                f"teacher.path={tmp_path / 'missing'}"])
  with pytest.raises(config_lib.ConfigError, match=r"batch shards"):
    loop.run(bad_teacher, tmp_path / "run")  # refused before the missing teacher is read


def test_data_report_reaches_the_run(tmp_path):
  """A prompt file with repeated prompts and a bad row: the run skips, dedups and reports."""
  src = ROOT / "tests" / "fixtures" / "repeated_dapo.jsonl"
  path = tmp_path / "prompts.jsonl"
  path.write_bytes(src.read_bytes() + b'{"prompt": [{"content": "bad \xff byte", "role": "user"}]}\n')
  cfg = _config("opd", ["loop.steps=1", "loop.snapshot_steps=()", "loop.checkpoint_every=0",
                        "rollout.group_size=2", "data.source=file", f"data.path={path}",
                        "data.on_error=skip", "data.prompt_buckets=(512,)",
                        "sampler.max_new_tokens=4", "data.train_examples=0"])
  summary = loop.run(cfg, tmp_path / "run")
  report = summary["data"]["train"]
  assert report["skipped"]["bad_utf8"] == 1 and report["duplicates"] > 0
  assert report["samples"]["bad_utf8"][0].startswith(f"{path}:")
  rows = metrics_lib.read_jsonl(tmp_path / "run" / "metrics.jsonl")
  assert rows[0]["data/skipped/bad_utf8"] == 1.0 and rows[0]["data/dedup/duplicates"] > 0


def test_diagnose_checks_every_input_before_computing(tmp_path, capsys):
  from opd_jax.geometry import report
  from opd_jax.models import config as model_config
  from opd_jax.models import transformer
  cfg = model_config.tiny(vocab_size=64, n_layers=1)
  _, p0 = transformer.init(cfg, 0)
  _, p1 = transformer.init(cfg, 1)
  ckpt_lib.save_snapshot(tmp_path / "s", 0, p0, cfg)
  poisoned = jax.tree.map(lambda x: x, p1)
  poisoned["final_norm"] = jax.tree.map(lambda x: x * np.nan, poisoned["final_norm"])
  ckpt_lib.save_snapshot(tmp_path / "s", 1, poisoned, cfg)
  out = tmp_path / "out"
  with pytest.raises(errors.UserError, match=r"--snapshots: .*missing.* does not exist"):
    report.diagnose(tmp_path / "s" / "0", p1, [tmp_path / "missing"], out)
  with pytest.raises(errors.UserError, match=r"--tuned .*final_norm.* non-finite"):
    report.diagnose(tmp_path / "s" / "0", tmp_path / "s" / "1", [], out)
  assert not out.exists()  # nothing computed, nothing written
  argv = ["diagnose", "--base", str(tmp_path / "s" / "0"), "--tuned", str(tmp_path / "nope"),
          "--out", str(out)]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--tuned" in err and "does not exist" in err

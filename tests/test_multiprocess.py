"""Two real local processes (CPU collectives via jax.distributed) give the single-process results.

* `test_two_processes_match_single_process`: the SFT step alone (tests/mp_worker.py); the
  checkpoint the two processes write collectively restores to the single-process parameters.
* `test_every_recipe_matches_across_process_layouts`: every training recipe through the public
  entry point `loop.run` (tests/mp_recipes_worker.py) on 2 processes x 4 fake CPU devices and on
  1 process x 8 fake devices, plus checkpoints written in one layout and resumed in the other.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np

import mp_recipes_worker as mpr
import mp_worker
import xla_flags
from opd_jax.models import transformer
from opd_jax.train import checkpoint as ckpt_lib
from opd_jax.train import metrics as metrics_lib
from opd_jax.train import mesh as mesh_lib
from opd_jax.train import steps

WORKER = pathlib.Path(__file__).resolve().parent / "mp_worker.py"
TIMEOUT_S = 420


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _single_process_reference():
  model_cfg, tx, step_cfg = mp_worker.setup()
  m = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(1, 1, 1)))
  graphdef, params = mesh_lib.init_sharded_params(model_cfg, m, seed=0)
  shardings = mesh_lib.state_shardings(tx, mesh_lib.param_shardings(model_cfg, m),
                                       transformer.abstract_params(model_cfg))
  state = mesh_lib.init_sharded_state(params, tx, 0, shardings)
  batches = mp_worker.global_batches()
  step = steps.jit_step(steps.sft_step, m, shardings, mesh_lib.batch_shardings(batches[0], m),
                        graphdef=graphdef, tx=tx, cfg=step_cfg)
  losses = []
  for batch in batches:
    state, metrics = step(state, mesh_lib.global_batch(batch, m))
    losses.append(float(metrics["train/loss"]))
  return losses, jax.device_get(state.params)


def test_two_processes_match_single_process(tmp_path):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags.with_devices(1),
             JAX_PLATFORMS="cpu")
  env.pop("OPD_COORDINATOR", None)
  procs = [subprocess.Popen([sys.executable, str(WORKER), str(port), str(i), "2",
                             str(tmp_path / "ckpt")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    ref_losses, ref_params = _single_process_reference()
    outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"worker {i} failed:\n{err[-4000:]}"
  result = json.loads(outs[0][0].strip().splitlines()[-1])
  assert result["devices"] == 2
  # orbax's barriers (its async writer thread's included) stay off the devices: a device barrier
  # issued from that thread can interleave with the step's collectives differently per process
  assert result["orbax_host_barriers"] is True
  # The step orders its collectives (1 device per process: the set-up where the CPU runtime's
  # launch order hung runs) and leaves no loop racing another collective.
  assert result["ordered"] is True and result["unordered_pairs"] == []
  np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-5)
  # A checkpoint whose broken file only process 1 reads: both fell back to the one before.
  assert result["fallback"] == 1
  loaded, cfg = ckpt_lib.load_params_and_config(tmp_path / "ckpt")
  assert cfg == mp_worker.setup()[0]
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  _, init = transformer.init(cfg, 0)  # and the steps did move the parameters
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(init)))
  assert moved > 1e-3


# -- every recipe, 2 processes x 4 devices vs 1 process x 8 devices -------------------------------
RECIPES_WORKER = pathlib.Path(__file__).resolve().parent / "mp_recipes_worker.py"
SUITE_TIMEOUT_S = float(os.environ.get("OPD_MP_SUITE_TIMEOUT_S", "900"))
# Parameters are compared bitwise first. They are not bitwise equal across layouts: the gradient
# all-reduce sums in another order (XLA's in-process reduction vs gloo across processes), which
# changes float32 round-off (~1e-7 relative), and Adam's g / (sqrt(v) + eps) lifts the round-off
# of near-zero gradient entries to update size. So the updates (final - initial) are compared per
# leaf: ||d_ref - d_mp|| / ||d_ref|| <= UPDATE_RTOL. Measured: ~3e-6 for most recipes, 1e-5 to
# 2e-5 for off-policy and sparsified opd (2e-4 for rank-16 when each layout took the bases from
# its own snapshots: top-k singular vectors amplify the round-off; both now use the reference's).
# A multi-host bug (wrong rows, rewards or keys on a process) moves the updates by O(1).
UPDATE_RTOL = 1e-3


def _tail(path: pathlib.Path, n: int = 15) -> str:
  try:
    return "\n".join(path.read_text(errors="replace").rstrip().splitlines()[-n:])
  except OSError:
    return "(no log)"


def _run_group(out: pathlib.Path, layout: str, nproc: int, deadline: float, notes: dict) -> None:
  """Runs `layout`'s jobs in one process group; after a failure (the failing process exits,
  its peers are killed) the group restarts with the jobs not done. `notes[job]` collects
  failures that left no record of their own (a crash, a hang past the deadline)."""
  layout_dir = out / layout
  jobs = list(mpr.jobs_for(layout))
  logs = layout_dir / "logs"
  logs.mkdir(parents=True, exist_ok=True)
  attempt = 0
  while True:
    records = mpr.read_records(layout_dir)
    todo = [j for j in jobs if mpr.job_status(records, j, nproc)[0] is None and j not in notes]
    if not todo:
      break
    if time.time() >= deadline:
      for j in todo:
        notes[j] = "not run: suite deadline reached"
      break
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", OPD_JAX_HOST_MALLOC="on",
               XLA_FLAGS=xla_flags.with_devices(8 // nproc))
    env.pop("OPD_COORDINATOR", None)
    procs, log_paths = [], []
    for i in range(nproc):
      cmd = [sys.executable, str(RECIPES_WORKER), "--out", str(out), "--layout", layout,
             "--jobs", ",".join(todo), "--attempt", str(attempt)]
      if nproc > 1:
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(nproc),
                "--process-id", str(i)]
      log_paths.append(logs / f"a{attempt}.p{i}.log")
      with open(log_paths[-1], "w") as log:
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=str(out)))
    failed = timed_out = False
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        failed = True
        break
      if time.time() >= deadline:
        timed_out = True
        break
      time.sleep(0.2)
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    failed = failed or any(p.returncode != 0 for p in procs)
    records = mpr.read_records(layout_dir)
    this = [r for r in records if r["attempt"] == attempt]
    explained = any(r["event"] == "fail" for r in this)
    if failed and not any(r["event"] in ("ok", "fail", "skip") for r in this):
      # The worker died outside any job (start-up, import, distributed init): no retry helps.
      for j in todo:
        notes[j] = "worker died before finishing any job" + "".join(
            f"\n  [process {i} log tail]\n{_tail(lp)}" for i, lp in enumerate(log_paths))
      break
    for j in todo:
      if mpr.job_status(records, j, nproc)[0] is not None:
        continue
      started = any(r["job"] == j and r["event"] == "start" for r in this)
      if started and (timed_out or (failed and not explained)):
        why = ("hung past the suite deadline" if timed_out else
               f"process group died without a Python error (exit codes "
               f"{[p.returncode for p in procs]})")
        notes[j] = why + "".join(f"\n  [process {i} log tail]\n{_tail(lp)}"
                                 for i, lp in enumerate(log_paths))
    if not failed and not timed_out:
      # Every job of this attempt recorded a result (or the worker exited early: note it).
      for j in todo:
        if mpr.job_status(mpr.read_records(layout_dir), j, nproc)[0] is None:
          notes.setdefault(j, "no result recorded" + "".join(
              f"\n  [process {i} log tail]\n{_tail(lp)}" for i, lp in enumerate(log_paths)))
    # Tell the other group about marker jobs that ended without a marker (a crash or a peer's
    # failure), so that it does not wait for them.
    for name, job in mpr.jobs_for(layout).items():
      marker = out / "markers" / f"{layout}.{name}.json"
      status = mpr.job_status(mpr.read_records(layout_dir), name, nproc)[0]
      if job.write_marker and not marker.exists() and (status not in (None, "ok") or
                                                       name in notes):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"status": status or "crashed"}))
    attempt += 1
  for name, job in mpr.jobs_for(layout).items():  # never leave the other group waiting
    marker = out / "markers" / f"{layout}.{name}.json"
    if job.write_marker and not marker.exists():
      marker.write_text(json.dumps({"status": "not run"}))


def _params_diff(final_a, final_b, initial) -> tuple[bool, float, str, float]:
  """(bitwise equal, worst per-leaf relative difference of the updates ||d_a - d_b|| / ||d_a||
  with d = final - initial, that leaf, the largest update norm) of two runs' latest params."""
  a, b = ckpt_lib.load_params(final_a), ckpt_lib.load_params(final_b)
  init = ckpt_lib.load_params(initial)
  la = jax.tree_util.tree_leaves_with_path(a)
  lb, li = jax.tree.leaves(b), jax.tree.leaves(init)
  assert len(la) == len(lb) == len(li)
  bitwise, worst, where, moved = True, 0.0, "", 0.0
  for (path, x), y, z in zip(la, lb, li):
    x, y, z = (np.asarray(t, np.float64) for t in (x, y, z))
    moved = max(moved, float(np.linalg.norm(x - z)))
    if np.array_equal(x, y):
      continue
    bitwise = False
    rel = float(np.linalg.norm(x - y) / max(np.linalg.norm(x - z), 1e-30))
    if rel > worst:
      worst, where = rel, jax.tree_util.keystr(path)
  return bitwise, worst, where, moved


def _metric_rows(workdir) -> list[dict]:
  return metrics_lib.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")


def _rows_differ(rows_a, rows_b) -> list[str]:
  """Metric keys (per step, train and eval rows) that differ beyond float32 round-off."""
  if [r.get("step") for r in rows_a] != [r.get("step") for r in rows_b]:
    return [f"steps {[r.get('step') for r in rows_a]} vs {[r.get('step') for r in rows_b]}"]
  out = []
  for ra, rb in zip(rows_a, rows_b):
    for k in sorted(set(ra) | set(rb)):
      if k.startswith(("perf/", "time/")):
        continue   # wall-clock measurements
      x, y = ra.get(k), rb.get(k)
      if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        if np.isclose(x, y, rtol=1e-5, atol=1e-6):
          continue
      elif x == y:
        continue
      out.append(f"{k}@{ra.get('step')}: {x} vs {y}")
  return out


def _compare(out: pathlib.Path, notes: dict) -> tuple[list[str], list[str]]:
  """(report lines, problems) of every recipe and both checkpoint transfers."""
  recs = {mpr.REF: mpr.read_records(out / mpr.REF), mpr.MP: mpr.read_records(out / mpr.MP)}
  nprocs = {mpr.REF: 1, mpr.MP: 2}

  def status(layout, job):
    st, rec = mpr.job_status(recs[layout], job, nprocs[layout])
    if st is None:
      return "no result", {"error": notes[layout].get(job, "")}
    return st, rec

  # (innermost project frame, message) -> (a full record of it, the runs that hit it)
  distinct: dict[tuple[str, str], tuple[str, list[str]]] = {}

  def describe(layout, job, st, rec):
    if st == "fail":
      err = rec["error"].splitlines()
      where = next((e for e in reversed(err[:-1]) if not e.startswith(".venv/")), "")
      first, runs = distinct.setdefault((where, err[-1]), (rec["error"], []))
      runs.append(f"{layout}/{job} process {rec['pid']}")
      number = list(distinct).index((where, err[-1])) + 1
      return f"  {layout} process {rec['pid']}: failure {number}: {err[-1][:200]}"
    return f"  {layout}: {rec.get('why') or rec.get('error', '')}"

  lines, problems = [], []
  # (name, run a, run b, the reference run whose snapshot 0 holds the initial params)
  pairs = [(r, (mpr.REF, r), (mpr.MP, r), (mpr.REF, r)) for r in mpr.RECIPES]
  # A checkpoint written in one layout, resumed in the other: the resumed run ends in the writer's
  # workdir; it must equal the straight `sparse` run of the layout that resumed it.
  # The branch starts from the reference opd run's step 2, the rank16 run's initial params.
  pairs.append(("rank16_branch", (mpr.REF, "rank16_branch"), (mpr.MP, "rank16_branch"),
                (mpr.REF, "rank16")))
  pairs += [("xfer 2->1", (mpr.REF, "sparse"), (mpr.REF, "xfer_resume"), (mpr.REF, "sparse")),
            ("xfer 1->2", (mpr.MP, "sparse"), (mpr.MP, "xfer_resume"), (mpr.REF, "sparse"))]
  for name, (la, ja), (lb, jb), (li, ji) in pairs:
    sa, ra = status(la, ja)
    sb, rb = status(lb, jb)
    si, ri = status(li, ji)
    if sa != "ok" or sb != "ok" or si != "ok":
      msg = f"{name}: {la}/{ja}={sa}, {lb}/{jb}={sb}"
      shown = set()
      for lay, job, st, rec in ((la, ja, sa, ra), (lb, jb, sb, rb), (li, ji, si, ri)):
        if st != "ok" and (lay, job) not in shown:
          shown.add((lay, job))
          msg += "\n" + describe(lay, job, st, rec)
      lines.append(msg)
      problems.append(name)
      continue
    wa, wb = ra["summary"], rb["summary"]
    if jb == "xfer_resume" and (wb.get("resumed_from") != 1 or wb.get("step") != 2):
      problems.append(name)
      lines.append(f"{name}: resumed_from={wb.get('resumed_from')} step={wb.get('step')}, "
                   "expected 1 -> 2")
      continue
    bitwise, worst, leaf, moved = _params_diff(
        pathlib.Path(ra["workdir"]) / "checkpoints", pathlib.Path(rb["workdir"]) / "checkpoints",
        pathlib.Path(ri["workdir"]) / "snapshots" / "0")
    rows_a, rows_b = _metric_rows(ra["workdir"]), _metric_rows(rb["workdir"])
    if jb == "xfer_resume":   # the writer's rows of step 1 + the resumer's of step 2
      rows_a = [r for r in rows_a if r.get("step", 0) >= 1]
      rows_b = [r for r in rows_b if r.get("step", 0) >= 1]
    differ = _rows_differ(rows_a, rows_b)
    ok = (bitwise or worst <= UPDATE_RTOL) and moved > 0 and not differ
    verdict = ("params bitwise equal" if bitwise else
               f"updates differ by {worst:.1e} (relative, worst leaf {leaf})")
    extra = []
    if moved == 0:
      extra.append("the parameters did not move (vacuous)")
    if name in ("rlvr", "mixed") and not any(0 < r.get("rlvr/reward_mean", 0) < 1
                                             for r in rows_a):
      extra.append("no step had a reward variance (verifier rewards untested)")
      ok = False
    lines.append(f"{name}: {'ok' if ok else 'MISMATCH'}: {verdict}; metrics "
                 f"{'equal' if not differ else 'differ: ' + '; '.join(differ[:6])}"
                 f"{''.join('; ' + e for e in extra)} "
                 f"({ra.get('wall_s', 0):.0f} s / {rb.get('wall_s', 0):.0f} s)")
    if not ok:
      problems.append(name)
  for i, (err, runs) in enumerate(distinct.values()):
    lines.append(f"failure {i + 1} ({', '.join(runs)}):\n" +
                 "\n".join("    " + e for e in err.splitlines()))
  return lines, problems


def test_every_recipe_matches_across_process_layouts(tmp_path):
  t0 = time.time()
  deadline = t0 + SUITE_TIMEOUT_S
  notes = {mpr.REF: {}, mpr.MP: {}}
  threads = [threading.Thread(target=_run_group, args=(tmp_path, layout, n, deadline,
                                                       notes[layout]))
             for layout, n in ((mpr.REF, 1), (mpr.MP, 2))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  lines, problems = _compare(tmp_path, notes)
  report = (f"recipe parity, 2 processes x 4 devices vs 1 process x 8 devices "
            f"({time.time() - t0:.0f} s wall):\n" + "\n".join(lines))
  print(report)
  assert not problems, f"failing: {problems}\n{report}"

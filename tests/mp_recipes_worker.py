"""One process of the recipe-parity suite (tests/test_multiprocess.py): every training recipe,
driven through the public entry point `loop.run`, in one layout of 8 CPU devices.

    python tests/mp_recipes_worker.py --out DIR --layout NAME --jobs a,b,c [--attempt N]
        [--coordinator HOST:PORT --num-processes N --process-id I]

The launcher sets XLA_FLAGS (device count per process) and starts the process group ONCE; the
worker runs its jobs in order inside it (jax init, in-process jit caches and the persistent
compile cache are shared by all of them). Every run uses mesh (1, -1, 1) over all 8 devices.

Results go to DIR/<layout>/results/p<process>.jsonl, one JSON line per event, written (and
flushed) as they happen so that a hang or a kill still leaves the record of what started:
  {"job", "event": "start" | "ok" | "fail" | "skip", "pid", "attempt", "workdir", "wall_s",
   "summary" (ok), "overrides" (ok), "error" (fail: the exception and the project frames it came
   through), "why" (skip)}
When a job raises in every process (e.g. the same check fails everywhere), the group goes on
with the next job. When it raises in some processes only, those exit with code 3 (their peers may
be stuck in a collective): the launcher kills the group and restarts it with the jobs not done
yet, `--attempt` + 1, so one failing recipe does not hide the others. A job that runs past JOB_TIMEOUT_S is recorded as a
failure with the main thread's stack (exit code 4).

Jobs that need another job's output (the RLVR / mixed warm start, the rank-16 bases, the
checkpoint resumed across layouts) wait for marker files DIR/markers/<layout>.<job>.json, written
by process 0 of the group that ran it (or by the launcher when that job failed).
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import linecache
import os
import pathlib
import sys
import threading
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "jax"

REF, MP = "ref_1x8", "mp_2x4"   # layout names: 1 process x 8 devices, 2 processes x 4 devices
WAIT_S = float(os.environ.get("OPD_MP_WAIT_S", "300"))   # cross-group marker waits
# A job running longer than this is a hang (e.g. processes in different collectives): the
# watchdog records where the main thread is and ends the process (cold compile caches included,
# a job takes < 2 min here).
JOB_TIMEOUT_S = float(os.environ.get("OPD_MP_JOB_TIMEOUT_S", "300"))

# Shared by every run: 2 steps, FSDP over all 8 devices, one checkpoint at the end, the project's
# transfer rule enforced (every host <-> device copy in the step loop explicit).
COMMON = ("mesh.shape=(1,-1,1)", "loop.steps=2", "loop.checkpoint_every=0",
          "loop.progress=false", "loop.tensorboard=false",
          f"loop.transfer_guard={os.environ.get('OPD_MP_TRANSFER_GUARD', 'disallow')}")
# Every PG / distill run: 2 prompts x 4 samples = 8 rows (one per device, one prompt per
# process), prompts padded to 16: the same shapes everywhere, so the sampler and the scorer
# compile once per process and are shared by all recipes.
PG_SMALL = ("loop.batch_size=2", "rollout.group_size=4", "data.train_examples=64",
            "data.eval_examples=8")
# Verifier recipes start from the warm start, so that GRPO groups have reward variance and the
# verifier's rewards move the parameters (a random init scores ~0: a vacuous comparison).
VERIFIED = ("loop.batch_size=2", "rollout.group_size=4", "student.source=checkpoint",
            "student.path={warmstart}/checkpoints", "data.eval_examples=8")
SPARSE = ("rollout.token_transforms=(('top_kl_retention', {'rho': 0.5}),)",)


@dataclasses.dataclass(frozen=True)
class Job:
  """One `loop.run` call. `overrides` may name {warmstart} / {opd} (workdirs of other jobs);
  `resume_from` = the marker of another layout's stopped run, resumed in place. A job with
  `write_marker` tells other jobs (of either layout) where its output is."""

  name: str
  config: str                           # 'opd' (its smoke preset) or 'opd.py:<preset>'
  overrides: tuple[str, ...] = ()
  markers: tuple[str, ...] = ()         # markers that must be ok before the job starts
  stop_after: int | None = None
  resume_from: str | None = None
  write_marker: bool = False            # process 0 writes markers/<layout>.<name>.json


def jobs_for(layout: str) -> dict[str, Job]:
  other = MP if layout == REF else REF
  xfer = "xfer_stop"   # the `sparse` recipe, stopped after step 1 (resumed by the other layout)
  jobs = [
      # The RLVR / mixed warm start: the SFT smoke run (30 steps, one device), in the 1-process
      # group only; both layouts start from this one checkpoint.
      Job("warmstart", "sft", ("mesh.shape=(1,1,1)", "loop.steps=30", "loop.checkpoint_every=0",
                               "loop.progress=false", "loop.tensorboard=false"),
          write_marker=True) if layout == REF else None,
      Job(xfer, "opd", COMMON + PG_SMALL + SPARSE, stop_after=1, write_marker=True),
      # Eval on (steps 0 and 2: greedy sampling, the verifier, sums across processes).
      Job("sft", "sft", COMMON + ("loop.batch_size=8", "data.train_examples=64",
                                  "data.eval_examples=8", "loop.eval_every=2",
                                  "loop.eval_batch_size=8")),
      # Its snapshots feed rank16 (delta snapshots: snapshot 2 is read back through its chain).
      Job("opd", "opd", COMMON + PG_SMALL + ("loop.snapshot_steps=(0,2)",
                                             "loop.snapshot_format=delta"),
          write_marker=layout == REF),
      # (the opd smoke preset's clip range is a pg setting, which distill refuses as unread)
      Job("distill", "opd", COMMON + PG_SMALL + ("method=distill", "pg.pg.eps_high=0.28")),
      # Two teachers, prompts routed by task family: the PG and the direct route.
      Job("teachers", "opd.py:two_teacher_smoke", COMMON + PG_SMALL),
      Job("teachers_distill", "opd.py:two_teacher_smoke",
          COMMON + PG_SMALL + ("method=distill", "pg.pg.eps_high=0.28")),
      Job("offpolicy", "opd", COMMON + PG_SMALL + ("rollout.policy=teacher", "pg.pg.eps_low=1.0",
                                                    "pg.pg.eps_high=1.0")),
      Job("sparse", "opd", COMMON + PG_SMALL + SPARSE),
      # Rank-16 projected OPD, as the study runs it: bases of W_at - W_origin (an opd run's
      # snapshots 2 and 0), the student continues from W_at, the update projected after the
      # optimizer. k = 16 fits: the smallest kernel side of the smoke model is 32 (k/v
      # projections 64 -> 2 x 16). Both layouts take the reference layout's snapshots (top-k
      # singular vectors would amplify the round-off between the two layouts' opd runs).
      Job("rank16", "opd", COMMON + PG_SMALL + (
          "student.source=checkpoint", "student.path={opd}/snapshots/2",
          "subspace.origin={opd}/snapshots/0", "subspace.at={opd}/snapshots/2", "subspace.k=16",
          "optim.transforms=(('subspace_projection', 'post', {}),)"),
          markers=(f"{REF}.opd",)),
      # The paper's shared resume (`loop.branch_from`): the reference opd run's step-2
      # checkpoint (params, Adam's moments, data position, RNG) continued for one more step
      # under the rank-16 projection of the same bases.
      Job("rank16_branch", "opd", COMMON + PG_SMALL + (
          "loop.steps=3", "loop.branch_from={opd}/checkpoints",
          "subspace.origin={opd}/snapshots/0", "subspace.at={opd}/snapshots/2", "subspace.k=16",
          "optim.transforms=(('subspace_projection', 'post', {}),)"),
          markers=(f"{REF}.opd",)),
      Job("rlvr", "rlvr", COMMON + VERIFIED, markers=(f"{REF}.warmstart",)),
      Job("mixed", "opd", COMMON + VERIFIED + ("method=mixed", "data.train_examples=16"),
          markers=(f"{REF}.warmstart",)),
      # The other layout's checkpoint after step 1, resumed here to step 2.
      Job("xfer_resume", "opd", COMMON + PG_SMALL + SPARSE, resume_from=f"{other}.{xfer}",
          markers=(f"{other}.{xfer}",)),
  ]
  jobs = [j for j in jobs if j is not None]
  if layout == REF:
    # The reference runs also save their initial parameters: the comparison measures each
    # layout's update (final - initial) against the reference's.
    jobs = [dataclasses.replace(j, overrides=j.overrides + ("loop.snapshot_steps=(0,)",))
            if j.name in RECIPES and j.name != "opd" else j for j in jobs]
  return {j.name: j for j in jobs}


RECIPES = ("sft", "opd", "rlvr", "mixed", "distill", "offpolicy", "rank16", "sparse", "teachers",
           "teachers_distill")


# -- records --------------------------------------------------------------------------------------
def read_records(layout_dir: pathlib.Path) -> list[dict]:
  out = []
  for f in sorted((layout_dir / "results").glob("p*.jsonl")):
    for line in f.read_text().splitlines():
      try:
        out.append(json.loads(line))
      except ValueError:
        pass   # a line cut by a kill
  return out


def job_status(records: list[dict], job: str, num_processes: int) -> tuple[str | None, dict]:
  """('ok' | 'fail' | 'skip' | None, the deciding record) of `job` over its latest attempt."""
  recs = [r for r in records if r["job"] == job]
  if not recs:
    return None, {}
  attempt = max(r["attempt"] for r in recs)
  recs = [r for r in recs if r["attempt"] == attempt]
  for event in ("fail", "skip"):
    hit = [r for r in recs if r["event"] == event]
    if hit:
      return event, hit[0]
  oks = [r for r in recs if r["event"] == "ok"]
  if len({r["pid"] for r in oks}) == num_processes:
    return "ok", next(r for r in oks if r["pid"] == 0)
  return None, recs[-1]


def _where(frames, project_frames: int = 8) -> list[str]:
  """The last frames inside the project (opd_jax/, configs/, tests/), then the innermost frame
  if it is elsewhere (jax, orbax, ...)."""
  ours = [f for f in frames if str(ROOT) in f.filename and "/.venv/" not in f.filename]
  shown = ours[-project_frames:]
  if frames and (not shown or frames[-1] is not shown[-1]):
    shown.append(frames[-1])
  return [f"{f.filename.replace(str(ROOT) + '/', '')}:{f.lineno} in {f.name}: {f.line}"
          for f in shown]


def _short(exc: BaseException) -> str:
  """The exception and where it came from (`_where`)."""
  lines = _where(traceback.extract_tb(exc.__traceback__))
  message = "".join(traceback.format_exception_only(type(exc), exc)).strip()
  message = message.split("\n\n")[0]   # drop jax's "--- For simplicity ..." trailer
  return "\n".join(lines + [message])


def _jsonable(x):
  try:
    json.dumps(x)
    return x
  except TypeError:
    if isinstance(x, dict):
      return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [_jsonable(v) for v in x]
    return str(x)


def _let_this_process_write_the_compile_cache() -> None:
  """Test-only speed-up: jax writes persistent-cache entries from process 0 only (to avoid write
  contention on shared filesystems), but on multi-process CPU every process's cache key differs
  (the key hashes the process's own view of the topology), so process 1 would recompile every
  program cold on every run (~2 min of this suite). Its entries never collide with process 0's,
  so let it write them. Private jax API: if it moved, the suite is only slower."""
  try:
    from jax._src import compiler, distributed
    write = compiler._cache_write
  except (ImportError, AttributeError):
    return

  def cache_write(*args, **kwargs):
    state = distributed.global_state
    real = state.process_id
    state.process_id = 0
    try:
      return write(*args, **kwargs)
    finally:
      state.process_id = real

  compiler._cache_write = cache_write


# -- main -----------------------------------------------------------------------------------------
def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--layout", required=True)
  ap.add_argument("--jobs", required=True)
  ap.add_argument("--attempt", type=int, default=0)
  ap.add_argument("--coordinator")
  ap.add_argument("--num-processes", type=int, default=1)
  ap.add_argument("--process-id", type=int, default=0)
  args = ap.parse_args(argv)

  out = pathlib.Path(args.out)
  layout_dir = out / args.layout
  (layout_dir / "results").mkdir(parents=True, exist_ok=True)
  (out / "markers").mkdir(parents=True, exist_ok=True)
  pid, nproc = args.process_id, args.num_processes
  rec_file = open(layout_dir / "results" / f"p{pid}.jsonl", "a", buffering=1)

  def record(job, event, **kw):
    rec_file.write(json.dumps(_jsonable({"job": job, "event": event, "pid": pid,
                                         "attempt": args.attempt, "t": time.time(), **kw})) + "\n")
    rec_file.flush()
    os.fsync(rec_file.fileno())

  # Tuned as the `opd-jax` command is (`opd_jax.host_malloc`, which the launcher turns on): the
  # recipes run under synchronous dispatch, their collectives across processes included.
  from opd_jax import host_malloc
  tuned = host_malloc.tune()
  assert tuned.applied, tuned.reason
  import jax
  jax.config.update("jax_compilation_cache_dir", str(CACHE))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from opd_jax.train import mesh as mesh_lib
  if nproc > 1:
    assert mesh_lib.maybe_initialize_distributed(args.coordinator, nproc, pid)
  assert jax.process_count() == nproc and jax.device_count() == 8, (
      jax.process_count(), jax.device_count())
  if pid != 0:
    _let_this_process_write_the_compile_cache()
  from opd_jax.train import config as config_lib
  from opd_jax.train import loop
  # Read the project's sources now: a traceback formatted later shows the lines that were loaded,
  # not those of a file edited meanwhile (the checkout is shared with people editing it).
  for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None) or ""
    if path.startswith(str(ROOT)) and "/.venv/" not in path:
      lines = linecache.getlines(path)
      if lines:   # mtime None: `linecache.checkcache` keeps the entry
        linecache.cache[path] = (sum(map(len, lines)), None, lines, path)

  jobs = jobs_for(args.layout)
  def marker(name: str) -> dict | None:
    path = out / "markers" / f"{name}.json"
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
      if path.is_file():
        try:
          return json.loads(path.read_text())
        except ValueError:
          pass  # being written
      time.sleep(0.5)
    return None

  def all_failed(name: str, wait_s: float = 20.0) -> bool:
    """Whether every process recorded a failure of job `name` (waits `wait_s` for the peers)."""
    deadline = time.time() + wait_s
    while True:
      failed = {r["pid"] for r in read_records(layout_dir)
                if r["job"] == name and r["attempt"] == args.attempt and r["event"] == "fail"}
      if len(failed) == nproc:
        return True
      if time.time() > deadline:
        return False
      time.sleep(0.25)

  def put_marker(job: Job, status: str, workdir=None):
    """Process 0 tells the other group how `job` ended (atomic rename)."""
    if not job.write_marker or pid != 0:
      return
    tmp = out / "markers" / f".{args.layout}.{job.name}.tmp"
    tmp.write_text(json.dumps({"status": status, "workdir": str(workdir or "")}))
    tmp.rename(out / "markers" / f"{args.layout}.{job.name}.json")

  for name in args.jobs.split(","):
    job = jobs[name]
    why = None
    marks = {}
    for m in job.markers:
      got = marker(m)
      if got is None or got.get("status") != "ok":
        why = f"marker {m!r}: {got and got.get('status') or f'missing after {WAIT_S:.0f} s'}"
      else:
        marks[m] = got
    if why:
      record(name, "skip", why=why)
      put_marker(job, "skip")
      continue
    record(name, "start")
    t0 = time.time()
    workdir = None
    done = threading.Event()
    main_thread = threading.main_thread().ident

    def watchdog(name=name, t0=t0, done=done):
      if done.wait(JOB_TIMEOUT_S):
        return
      frame = sys._current_frames().get(main_thread)
      stack = _where(traceback.extract_stack(frame)) if frame is not None else []
      record(name, "fail", workdir=str(workdir), wall_s=time.time() - t0,
             error="\n".join(stack + [f"hung: no result after {JOB_TIMEOUT_S:.0f} s "
                                      "(main thread's stack above)"]))
      put_marker(jobs[name], "fail", workdir)
      faulthandler.dump_traceback(all_threads=True)
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(4)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
      subst = {"{warmstart}": marks.get(f"{REF}.warmstart", {}).get("workdir", ""),
               "{opd}": marks.get(f"{REF}.opd", {}).get("workdir", "")}
      overrides = list(job.overrides)
      for key, value in subst.items():
        overrides = [o.replace(key, value) for o in overrides]
      if job.resume_from:
        workdir = pathlib.Path(marks[job.resume_from]["workdir"])
      else:
        workdir = layout_dir / (name if args.attempt == 0 else f"{name}.a{args.attempt}")
      preset = job.config if ":" in job.config else f"{job.config}.py:smoke"
      cd = config_lib.load_config(f"{ROOT / 'configs' / preset}", overrides)
      cfg = config_lib.from_config_dict(cd)
      run = lambda: loop.run(cfg, workdir, resume=job.resume_from is not None,  # noqa: E731
                             stop_after=job.stop_after)
      if os.environ.get("OPD_MP_PROFILE"):   # investigation aid: where a job's time goes
        import cProfile
        import pstats
        prof = cProfile.Profile()
        summary = prof.runcall(run)
        st = pstats.Stats(prof)
        st.sort_stats("cumulative").print_stats(45)
        st.sort_stats("tottime").print_stats(25)
        st.print_callers("multihost.py")
      else:
        summary = run()
    except Exception as e:  # noqa: BLE001 -- every failure is a record
      done.set()
      traceback.print_exc()
      record(name, "fail", workdir=str(workdir), wall_s=time.time() - t0, error=_short(e))
      put_marker(job, "fail", workdir)
      if all_failed(name):
        continue   # every process left the job at an exception: the group is still in step
      rec_file.close()
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(3)   # a peer may be inside a collective: the launcher restarts the group
    done.set()
    keep = {k: summary.get(k) for k in ("step", "metrics", "eval", "resumed_from", "snapshots",
                                        "wall_s", "steps_per_s")}
    record(name, "ok", workdir=str(workdir), wall_s=time.time() - t0, summary=keep,
           overrides=overrides)
    put_marker(job, "ok", workdir)
  rec_file.close()


if __name__ == "__main__":
  main()

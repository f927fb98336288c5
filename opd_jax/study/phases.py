"""A small resumable phase framework: a DAG of named phases, each writing under `WORKDIR/<phase>/`.

A phase is complete when its directory holds a completion marker (`_COMPLETE.json`, written last and
atomically: temp file + `os.replace`). The marker records

  * `config_fingerprint`: sha256 of the canonical JSON of the phase's config section,
  * `deps`: the fingerprint of each dependency's completion marker at the time the phase ran,
  * `summary`: the JSON-able dict the phase returned (accuracies, paths, ...), and `wall_s`,
  * `run_id`: a fresh random id, so every completed run has a distinct marker fingerprint.

A phase is skipped iff its marker exists, its config fingerprint equals the current one, and every
dependency's current marker fingerprint equals the recorded one. Because a re-run dependency always
gets a new marker fingerprint, everything downstream of a re-run phase re-runs too, and nothing
else does. Consequences (all tested):

  * rerunning a finished study skips every phase;
  * `redo=('x',)` re-runs `x` (from an empty directory) and, through the fingerprints, its dependents;
  * deleting `WORKDIR/x/` re-runs `x` and its dependents only;
  * changing one phase's config section re-runs that phase and its dependents only.

Interrupted phases: before running, a phase's directory gets `_STARTED.json` with the fingerprints
it runs under and the old marker is removed. If a later attempt finds `_STARTED.json` with the same
fingerprints, the directory is kept and the phase is told so (`ctx.resuming`), so a training phase
can continue from its own checkpoints; otherwise (or under `redo`) the directory is emptied first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import time
import uuid
from typing import Any, Callable, Iterable, Mapping, Sequence

MARKER = "_COMPLETE.json"
STARTED = "_STARTED.json"


def _jsonable(x: Any) -> Any:
  """Canonical JSON-able form (tuples -> lists, ConfigDicts/dataclasses -> dicts, numpy -> python)."""
  if hasattr(x, "to_dict") and callable(x.to_dict):  # ml_collections.ConfigDict
    x = x.to_dict()
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    x = dataclasses.asdict(x)
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if hasattr(x, "item") and callable(x.item) and getattr(x, "shape", None) == ():
    return x.item()
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  raise TypeError(f"cannot fingerprint value of type {type(x).__name__}: {x!r}")


def fingerprint(obj: Any) -> str:
  """sha256 (hex, 16 chars) of the canonical JSON of `obj`."""
  text = json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  """Writes JSON to `path` via a temp file in the same directory and `os.replace`."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: pathlib.Path) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: corrupt phase marker ({e}); delete the phase directory") from e


@dataclasses.dataclass(frozen=True)
class Phase:
  """One node of the study DAG.

  Attributes:
    name: directory name under the workdir (also the `--redo` name).
    fn: `fn(ctx: PhaseContext) -> dict | None`; writes its outputs under `ctx.out_dir` and returns a
      JSON-able summary stored in the completion marker.
    deps: names of phases whose outputs `fn` reads.
    config: the JSON-able config section that determines the phase's outputs (fingerprinted).
  """

  name: str
  fn: Callable[["PhaseContext"], Mapping[str, Any] | None]
  deps: tuple[str, ...] = ()
  config: Any = None


@dataclasses.dataclass(frozen=True)
class PhaseContext:
  name: str
  workdir: pathlib.Path
  out_dir: pathlib.Path
  resuming: bool
  log: Callable[[str], None]

  def dep_dir(self, dep: str) -> pathlib.Path:
    return self.workdir / dep

  def dep_summary(self, dep: str) -> dict:
    marker = read_json(self.workdir / dep / MARKER)
    if marker is None:
      raise FileNotFoundError(f"phase {self.name!r}: dependency {dep!r} has no completion marker")
    return marker["summary"]


def topological_order(phases: Sequence[Phase]) -> list[Phase]:
  """Phases in dependency order (stable w.r.t. the given order); validates names and cycles."""
  by_name: dict[str, Phase] = {}
  for p in phases:
    if p.name in by_name:
      raise ValueError(f"duplicate phase name {p.name!r}")
    if not p.name or "/" in p.name or p.name.startswith((".", "_")):
      raise ValueError(f"invalid phase name {p.name!r} (it is a directory name)")
    by_name[p.name] = p
  for p in phases:
    for d in p.deps:
      if d not in by_name:
        raise ValueError(f"phase {p.name!r} depends on unknown phase {d!r}; "
                         f"known: {sorted(by_name)}")
  order, state = [], {}

  def visit(p: Phase, stack: tuple[str, ...]):
    if state.get(p.name) == "done":
      return
    if state.get(p.name) == "visiting":
      raise ValueError(f"dependency cycle: {' -> '.join(stack + (p.name,))}")
    state[p.name] = "visiting"
    for d in p.deps:
      visit(by_name[d], stack + (p.name,))
    state[p.name] = "done"
    order.append(p)

  for p in phases:
    visit(p, ())
  return order


def dependents_closure(phases: Sequence[Phase], names: Iterable[str]) -> set[str]:
  """`names` plus every phase that depends on them, transitively."""
  names = set(names)
  known = {p.name for p in phases}
  unknown = names - known
  if unknown:
    raise ValueError(f"unknown phase(s) {sorted(unknown)}; valid phases: "
                     f"{[p.name for p in topological_order(phases)]}")
  out, changed = set(names), True
  while changed:
    changed = False
    for p in phases:
      if p.name not in out and out.intersection(p.deps):
        out.add(p.name)
        changed = True
  return out


def _expected(p: Phase, workdir: pathlib.Path) -> dict:
  deps = {}
  for d in p.deps:
    marker = read_json(workdir / d / MARKER)
    deps[d] = None if marker is None else fingerprint(marker)
  return {"config_fingerprint": fingerprint(p.config), "deps": deps}


def status(phases: Sequence[Phase], workdir) -> dict[str, str]:
  """'complete' / 'stale' / 'missing' per phase, judged as `run_phases` would (without running)."""
  workdir = pathlib.Path(workdir)
  out = {}
  for p in topological_order(phases):
    marker = read_json(workdir / p.name / MARKER)
    stale_dep = any(out[d] != "complete" for d in p.deps)
    if marker is None:
      out[p.name] = "missing"
    elif stale_dep or {k: marker.get(k) for k in ("config_fingerprint", "deps")} != _expected(
        p, workdir):
      out[p.name] = "stale"
    else:
      out[p.name] = "complete"
  return out


def run_phases(phases: Sequence[Phase], workdir, redo: Iterable[str] = (),
               log: Callable[[str], None] = print, *, writer: bool = True,
               barrier: Callable[[], None] = lambda: None) -> dict[str, dict]:
  """Runs every phase that is not complete, in dependency order; returns per-phase records.

  Each record: `{'status': 'ran' | 'skipped', 'wall_s': seconds of the run that produced the
  outputs, 'summary': the phase's summary}`. An exception in a phase propagates (its directory keeps
  `_STARTED.json` and no marker, so the next call re-runs it, resuming if the fingerprints match).

  Multi-process runs (a shared workdir): every process runs every phase function (training is
  collective), only the `writer` (process 0) prepares directories and writes markers, and
  `barrier()` is called before each decision and after each directory change, so all processes
  see the same markers.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  order = topological_order(phases)
  redo = set(redo)
  dependents_closure(phases, redo)  # validates the names
  records: dict[str, dict] = {}
  for p in order:
    barrier()
    out_dir = workdir / p.name
    expected = _expected(p, workdir)
    marker = read_json(out_dir / MARKER)
    if (p.name not in redo and marker is not None and
        {k: marker.get(k) for k in ("config_fingerprint", "deps")} == expected):
      records[p.name] = {"status": "skipped", "wall_s": marker["wall_s"],
                         "cpu_s": marker.get("cpu_s"), "summary": marker["summary"]}
      log(f"[study] {p.name}: complete, skipped ({marker['wall_s']:.1f} s when it ran)")
      continue
    started = read_json(out_dir / STARTED)
    resuming = p.name not in redo and started == expected
    if writer:
      if out_dir.exists() and not resuming:
        shutil.rmtree(out_dir)
      out_dir.mkdir(parents=True, exist_ok=True)
      if (out_dir / MARKER).exists():
        (out_dir / MARKER).unlink()
      write_json_atomic(out_dir / STARTED, expected)
    barrier()
    why = ("redo requested" if p.name in redo else "no marker" if marker is None else
           "config changed" if marker.get("config_fingerprint") != expected["config_fingerprint"]
           else "a dependency changed")
    log(f"[study] {p.name}: running ({why}{'; resuming' if resuming else ''})")
    t0, c0 = time.perf_counter(), time.process_time()
    summary = p.fn(PhaseContext(p.name, workdir, out_dir, resuming, log)) or {}
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    summary = _jsonable(summary)
    if writer:
      write_json_atomic(out_dir / MARKER, dict(expected, summary=summary, wall_s=wall, cpu_s=cpu,
                                               run_id=uuid.uuid4().hex, finished_at=time.time()))
    records[p.name] = {"status": "ran", "wall_s": wall, "cpu_s": cpu, "summary": summary}
    log(f"[study] {p.name}: done in {wall:.1f} s ({cpu:.1f} s CPU)")
  return records

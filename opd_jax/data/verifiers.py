"""Verifiers: `verifier(response_text, answer) -> Reward(score, reason, detail)`.

Every verification returns a score AND a reason from the verifier's fixed set (`verifier.REASONS`,
`reasons_of(verifier)`), so timeouts, dead workers and parse failures are counted, never silently 0:

  exact_match     correct, wrong, unparsable
  MathVerifier    correct, wrong, unparsable, timeout, worker_error
  CodeVerifier    pass, fail, timeout, crash, memory, compile_error, sandbox_error (`code_exec`)
  TaskVerifier    the union of exact_match and CodeVerifier (synthetic task mixtures)

`detail` is free text for logs (never compared: `Reward(1.0, 'correct') == Reward(1.0, 'correct', 'x')`).

- `exact_match`: the arithmetic synthetic tasks (final answer `=<integer>` at the end of the response,
  `tasks.parse_final_answer`). 1.0 iff the parsed integer string equals the ground truth exactly;
  'unparsable' when the response has no final answer.
- `MathVerifier`: boxed / free-form math answers checked with math-verify (sympy equivalence: fractions
  vs decimals, factored vs expanded, boxed vs plain). math-verify's own timeouts use `signal.alarm`
  (main thread only), so they are disabled and checks run in a pool of worker subprocesses (fresh
  interpreters, safe next to JAX's threads), each with RLIMIT_AS = `memory_mb`, checked in parallel
  (`score_many`); a check past `timeout_s` scores 0 ('timeout') and its worker is killed and replaced;
  a worker that dies (or raises / runs out of memory) mid-check gives 'worker_error' and is replaced.
  Thread-safe. Gold answers without delimiters (dapo-math-17k `ground_truth`, MATH boxed contents)
  are parsed as if written `\\boxed{answer}`; the response with math-verify's defaults.
- `CodeVerifier`: the response (its last fenced code block, or the whole text) is run in the
  `code_exec` sandbox against the answer's JSON test spec; parallel across `workers` threads.

Batches: `score_batch(verifier, responses, answers) -> float32 [B]` (the scores only, unchanged);
`score_batch_with_reasons(...) -> BatchResult` (scores_B, reasons_B, details_B, `counts()`,
`to_metrics(prefix)` -> {'verifier/correct': n, 'verifier/timeout': n, ...} with every reason of the
verifier present, zeros included; `select(valid_B)` drops filler rows, `BatchResult.concat` joins
batches). Verifiers with a `score_many(responses, answers)` method are batched through it
(parallel), others are called item by item. `build(name, **kw)` makes one by config name
(`VERIFIER_NAMES`), `close_verifier(v)` releases any of them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

import numpy as np

from opd_jax.data import code_exec, tasks

MATCH_REASONS = ("correct", "wrong", "unparsable")
MATH_REASONS = ("correct", "wrong", "unparsable", "timeout", "worker_error")
CODE_REASONS = code_exec.REASONS


@dataclasses.dataclass(frozen=True)
class Reward:
  score: float
  reason: str
  detail: str = dataclasses.field(default="", compare=False)


Verifier = Callable[[str, str], Reward]


def reasons_of(verifier) -> tuple[str, ...]:
  """The fixed reason set of a verifier (empty if it declares none)."""
  return tuple(getattr(verifier, "REASONS", ()))


def exact_match(response: str, answer: str) -> Reward:
  """Verifier for the arithmetic synthetic tasks: compare the final '=<integer>'."""
  got = tasks.parse_final_answer(response)
  if got is None:
    return Reward(0.0, "unparsable", "no final '=<integer>'")
  if got == str(answer).strip():
    return Reward(1.0, "correct")
  return Reward(0.0, "wrong")


exact_match.REASONS = MATCH_REASONS


# -- batches ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BatchResult:
  """Verification of a batch: float32 scores, one reason (and detail) per row."""

  scores_B: np.ndarray
  reasons_B: tuple[str, ...]
  details_B: tuple[str, ...] = ()
  reason_set: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.reasons_B)

  def counts(self) -> dict[str, int]:
    """Rows per reason: every reason of `reason_set` (zeros included), then any other seen."""
    out = {r: 0 for r in self.reason_set}
    for r in self.reasons_B:
      out[r] = out.get(r, 0) + 1
    return out

  def to_metrics(self, prefix: str = "verifier") -> dict[str, float]:
    """Flat per-reason counts {f'{prefix}/{reason}': float(count)} (additive across processes)."""
    return {f"{prefix}/{r}": float(n) for r, n in self.counts().items()}

  def select(self, mask_B) -> "BatchResult":
    """The rows where `mask_B` is true (e.g. an eval batch's `valid_B`, dropping filler rows)."""
    m = np.asarray(mask_B, bool).reshape(-1)
    if m.shape[0] != len(self):
      raise ValueError(f"BatchResult.select: mask of {m.shape[0]} rows for {len(self)} rows")
    pick = lambda xs: tuple(x for x, k in zip(xs, m) if k)  # noqa: E731
    return BatchResult(self.scores_B[m], pick(self.reasons_B),
                       pick(self.details_B) if self.details_B else (), self.reason_set)

  @staticmethod
  def concat(results: Sequence["BatchResult"]) -> "BatchResult":
    """One result of several batches (reason sets merged in order)."""
    reason_set = tuple(dict.fromkeys(r for res in results for r in res.reason_set))
    scores = (np.concatenate([res.scores_B for res in results]) if results
              else np.zeros((0,), np.float32))
    return BatchResult(scores.astype(np.float32), sum((res.reasons_B for res in results), ()),
                       sum((res.details_B or ("",) * len(res) for res in results), ()), reason_set)


def score_batch_with_reasons(verifier: Verifier, responses: Sequence[str],
                             answers: Sequence[str]) -> BatchResult:
  """Scores and reasons of `verifier` over aligned responses and answers."""
  if len(responses) != len(answers):
    raise ValueError(f"score_batch: {len(responses)} responses but {len(answers)} answers")
  many = getattr(verifier, "score_many", None)
  rewards = (list(many(list(responses), list(answers))) if many is not None
             else [verifier(r, a) for r, a in zip(responses, answers)])
  return BatchResult(np.asarray([w.score for w in rewards], np.float32).reshape(len(rewards)),
                     tuple(w.reason for w in rewards), tuple(w.detail for w in rewards),
                     reasons_of(verifier))


def score_batch(verifier: Verifier, responses: Sequence[str], answers: Sequence[str]) -> np.ndarray:
  """Scores of `verifier` over aligned responses and answers, as a float32 [B] array."""
  return score_batch_with_reasons(verifier, responses, answers).scores_B


VERIFIER_NAMES = ("exact_match", "math", "code", "task")


def build(name: str, **kw) -> Verifier:
  """A verifier by config name: 'exact_match' (arithmetic tasks), 'math' (`MathVerifier(**kw)`),
  'code' (`CodeVerifier(**kw)`), 'task' (`TaskVerifier`: arithmetic + code task mixtures; kw go to
  its CodeVerifier). Release any of them with `close_verifier(v)` (stops MathVerifier's workers; a
  no-op for the others, which hold no processes between calls)."""
  if name == "exact_match":
    if kw:
      raise ValueError(f"verifier 'exact_match' takes no options, got {sorted(kw)}")
    return exact_match
  if name == "math":
    return MathVerifier(**kw)
  if name == "code":
    return CodeVerifier(**kw)
  if name == "task":
    return TaskVerifier(CodeVerifier(**kw))
  raise ValueError(f"unknown verifier {name!r}; valid: {VERIFIER_NAMES}")


def close_verifier(verifier) -> None:
  """Release a verifier's worker processes, if it has any (safe on every verifier)."""
  close = getattr(verifier, "close", None)
  if callable(close):
    close()


def _parallel(fn, responses, answers, workers: int) -> list[Reward]:
  if len(responses) != len(answers):
    raise ValueError(f"score_batch: {len(responses)} responses but {len(answers)} answers")
  if workers <= 1 or len(responses) <= 1:
    return [fn(r, a) for r, a in zip(responses, answers)]
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(responses))) as ex:
    return list(ex.map(fn, responses, answers))


def _default_workers() -> int:
  return max(1, min(4, os.cpu_count() or 1))


# -- math-verify in a pool of worker processes -----------------------------------------------------
def _gold_text(answer: str) -> str:
  """The gold answer as math-verify parses it: boxed unless already boxed or between math
  delimiters (an unescaped '$'; '\\$' is a dollar sign inside the answer, as in '\\$18.90')."""
  a = answer.strip()
  return a if ("\\boxed" in a or re.search(r"(?<!\\)\$", a)) else "\\boxed{" + a + "}"


def math_check(response: str, answer: str) -> Reward:
  """The math-verify check itself, without a time bound (runs inside a worker process)."""
  from math_verify import parse, verify  # heavy import (sympy): only in the worker
  gold = parse(_gold_text(answer), parsing_timeout=None)
  if not gold:
    return Reward(0.0, "unparsable", "gold answer")
  pred = parse(response, parsing_timeout=None)
  if not pred:
    return Reward(0.0, "unparsable", "no answer found")
  ok = verify(gold, pred, timeout_seconds=None)
  return Reward(1.0, "correct") if ok else Reward(0.0, "wrong")


def _math_warmup() -> None:
  import math_verify  # noqa: F401  (imported before 'ready', so startup is not billed to a check)


math_check.warmup = _math_warmup


def _worker_loop(check_spec: str, memory_mb: int) -> None:
  """Entry point of a worker process: JSON lines in (response, answer), JSON lines out
  ([score, reason, detail, exiting]); the process caps its own address space first."""
  import logging
  import resource
  if memory_mb > 0:
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
  logging.disable(logging.WARNING)  # math-verify warns on every call that its timeouts are off
  module, _, name = check_spec.partition(":")
  fn = getattr(importlib.import_module(module), name)
  if hasattr(fn, "warmup"):
    fn.warmup()
  out = sys.stdout
  sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol
  out.write("ready\n")
  out.flush()
  for line in sys.stdin:
    response, answer = json.loads(line)
    fatal = False
    try:
      r = fn(response, answer)
    except MemoryError:
      r, fatal = Reward(0.0, "worker_error", f"MemoryError (RLIMIT_AS {memory_mb} MB)"), True
    except Exception as e:  # noqa: BLE001 -- any failure of the check is reported, not raised
      r = Reward(0.0, "worker_error", f"{type(e).__name__}: {e}"[:200])
    out.write(json.dumps([float(r.score), r.reason, r.detail, fatal]) + "\n")
    out.flush()
    if fatal:
      os._exit(3)  # memory may be fragmented past recovery: the pool starts a fresh worker


class _Worker:
  """One worker subprocess and the thread pumping its stdout into a queue."""

  def __init__(self, check_spec: str, memory_mb: int, pythonpath: Sequence[str],
               startup_timeout_s: float):
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (*pythonpath, pkg_root, env.get("PYTHONPATH")) if p)
    code = (f"from opd_jax.data.verifiers import _worker_loop; "
            f"_worker_loop({check_spec!r}, {int(memory_mb)})")
    self.proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, bufsize=1, env=env, start_new_session=True)
    self.lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._pump, daemon=True, name="opd_jax-verifier-reader").start()
    try:
      first = self.lines.get(timeout=startup_timeout_s)
    except queue.Empty:
      first = None
    if first != "ready\n":
      self.kill()
      raise RuntimeError(f"verifier worker ({check_spec}) did not start within "
                         f"{startup_timeout_s}s (got {first!r}); is its package installed, and is "
                         f"memory_mb={memory_mb} enough to import it?")

  def _pump(self):
    for line in self.proc.stdout:
      self.lines.put(line)
    self.lines.put(None)  # EOF: the worker exited

  def alive(self) -> bool:
    return self.proc.poll() is None

  def kill(self) -> None:
    try:
      os.killpg(self.proc.pid, 9)
    except (ProcessLookupError, PermissionError):
      pass
    self.proc.kill()
    self.proc.wait()
    for f in (self.proc.stdin, self.proc.stdout):
      try:
        f.close()
      except OSError:
        pass


class MathVerifier:
  """Math answer verifier: a pool of memory-capped worker processes with a per-check time bound.

  timeout_s: wall-clock bound of one check (response parse + gold parse + equivalence).
  workers: worker processes (= checks in flight); default min(4, cpus). Started lazily.
  memory_mb: RLIMIT_AS of each worker (sympy needs a few hundred MB; 0 = no cap).
  startup_timeout_s: bound on starting a worker (imports sympy; not counted in timeout_s).
  check: 'module:function' run by the workers (tests inject fakes); pythonpath: extra entries for it.
  Workers are plain subprocesses (`python -c ...`), so no `__main__` guard is needed in scripts and
  notebooks. Use as a context manager or call `close()` to stop them.
  """

  REASONS = MATH_REASONS

  def __init__(self, timeout_s: float = 5.0, startup_timeout_s: float = 120.0, *,
               workers: int | None = None, memory_mb: int = 2048,
               check: str = "opd_jax.data.verifiers:math_check", pythonpath: Sequence[str] = ()):
    if timeout_s <= 0:
      raise ValueError(f"MathVerifier.timeout_s must be positive, got {timeout_s}")
    self.workers = _default_workers() if workers is None else int(workers)
    if self.workers < 1:
      raise ValueError(f"MathVerifier.workers must be >= 1, got {workers}")
    if memory_mb < 0:
      raise ValueError(f"MathVerifier.memory_mb must be >= 0, got {memory_mb}")
    self.timeout_s = float(timeout_s)
    self.startup_timeout_s = float(startup_timeout_s)
    self.memory_mb = int(memory_mb)
    self.check = check
    self.pythonpath = tuple(pythonpath)
    self._idle: queue.Queue = queue.Queue()
    for _ in range(self.workers):
      self._idle.put(None)  # a token: None = not started (or replaced)
    self._all: set[_Worker] = set()
    self._lock = threading.Lock()
    self._closed = False
    self._started = False

  def _take(self) -> _Worker:
    w = self._idle.get()
    if w is not None and w.alive():
      return w
    if w is not None:
      self._discard(w)
    try:
      w = _Worker(self.check, self.memory_mb, self.pythonpath, self.startup_timeout_s)
    except BaseException:
      self._idle.put(None)
      raise
    with self._lock:
      self._all.add(w)
      self._started = True
    return w

  def _discard(self, w: _Worker) -> None:
    w.kill()
    with self._lock:
      self._all.discard(w)

  def __call__(self, response: str, answer: str) -> Reward:
    if self._closed:
      raise RuntimeError("MathVerifier is closed")
    try:
      w = self._take()
    except RuntimeError as e:
      if not self._started:
        raise  # the very first start failed: a setup problem (package missing, memory cap too low)
      return Reward(0.0, "worker_error", f"worker restart failed: {e}"[:200])
    back: _Worker | None = w
    try:
      t0 = time.monotonic()
      try:
        w.proc.stdin.write(json.dumps([str(response), str(answer)]) + "\n")
        w.proc.stdin.flush()
        line = w.lines.get(timeout=self.timeout_s)
      except queue.Empty:
        back = None
        self._discard(w)
        return Reward(0.0, "timeout", f"after {time.monotonic() - t0:.1f}s")
      except OSError:
        line = None
      if line is None:
        back = None
        self._discard(w)
        return Reward(0.0, "worker_error", "worker died")
      score, reason, detail, exiting = json.loads(line)
      if exiting:  # the worker exits after this reply: replace it now, not on the next check
        back = None
        self._discard(w)
      return Reward(float(score), reason, detail)
    finally:
      self._idle.put(back)

  def score_many(self, responses: Sequence[str], answers: Sequence[str]) -> list[Reward]:
    """Rewards of aligned responses and answers, checked in parallel across the workers."""
    return _parallel(self, responses, answers, self.workers)

  def close(self) -> None:
    self._closed = True
    with self._lock:
      workers, self._all = list(self._all), set()
    for w in workers:
      w.kill()

  def __enter__(self) -> "MathVerifier":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 -- interpreter shutdown
      pass


# -- code ------------------------------------------------------------------------------------------
class CodeVerifier:
  """Runs the program in a response against the answer's tests in the `code_exec` sandbox.

  limits: `code_exec.Limits` of one run (wall / CPU time, memory, file size, processes, output).
  workers: programs run in parallel by `score_many` (default min(4, cpus)).
  partial_credit: a 'fail' scores the fraction of passed cases instead of 0.
  The answer is the JSON test spec (`code_exec.parse_tests`); a malformed spec raises ValueError
  (it is trusted data, so that is a data bug, not a model failure).
  """

  REASONS = CODE_REASONS

  def __init__(self, limits: code_exec.Limits = code_exec.Limits(), *, workers: int | None = None,
               partial_credit: bool = False):
    self.limits = limits
    self.workers = _default_workers() if workers is None else int(workers)
    if self.workers < 1:
      raise ValueError(f"CodeVerifier.workers must be >= 1, got {workers}")
    self.partial_credit = partial_credit

  def __call__(self, response: str, answer: str) -> Reward:
    tests = code_exec.parse_tests(answer)
    out = code_exec.check(code_exec.extract_program(response), tests, self.limits)
    if out.reason == "pass":
      score = 1.0
    elif out.reason == "fail" and self.partial_credit:
      score = out.fraction
    else:
      score = 0.0
    return Reward(score, out.reason, out.detail or f"{out.passed}/{out.total} cases")

  def score_many(self, responses: Sequence[str], answers: Sequence[str]) -> list[Reward]:
    return _parallel(self, responses, answers, self.workers)

  def close(self) -> None:
    """Nothing is held between calls (each run is its own process); for a uniform API."""

  def __enter__(self) -> "CodeVerifier":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class TaskVerifier:
  """The synthetic task mixture: code answers (a JSON test spec, `tasks.is_code_answer`) go to the
  CodeVerifier, every other answer to `exact_match`."""

  REASONS = tuple(dict.fromkeys(MATCH_REASONS + CODE_REASONS))

  def __init__(self, code: CodeVerifier | None = None):
    self.code = code or CodeVerifier()

  def __call__(self, response: str, answer: str) -> Reward:
    if tasks.is_code_answer(answer):
      return self.code(response, answer)
    return exact_match(response, answer)

  def score_many(self, responses: Sequence[str], answers: Sequence[str]) -> list[Reward]:
    return _parallel(self, responses, answers, self.code.workers)

  def close(self) -> None:
    self.code.close()

  def __enter__(self) -> "TaskVerifier":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

"""Verifiers: `verifier(response_text, answer) -> Reward(score, reason)`.

- `exact_match`: the synthetic tasks (all families share the final-answer format `=<integer>` at
  the end of the response, see `tasks.parse_final_answer`). Score 1.0 iff the parsed integer string
  equals the ground truth exactly; a response without a final answer scores 0 ('no_final_answer').
- `MathVerifier`: boxed / free-form math answers checked with math-verify (sympy equivalence:
  fractions vs decimals, factored vs expanded, boxed vs plain). math-verify's own timeouts use
  `signal.alarm`, which only works on the main thread, so they are disabled and the check instead
  runs in a dedicated worker subprocess (a fresh interpreter, so it is safe next to JAX's threads)
  with a per-check deadline; a check that overruns scores 0 ('timeout ...') and its worker is
  killed and replaced (the next call pays the ~1-3 s restart). The verifier can be called from any
  thread (calls are serialised; one worker per MathVerifier).
- `score_batch(verifier, responses, answers) -> float32 array of scores`.

Gold answers without delimiters (dapo-math-17k `ground_truth`, MATH boxed contents) are parsed as if
written `\\boxed{answer}`; the response is parsed with math-verify's defaults (last boxed expression
first, else the last LaTeX / plain expression).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

import numpy as np

from opd_jax.data import tasks


@dataclasses.dataclass(frozen=True)
class Reward:
  score: float
  reason: str


Verifier = Callable[[str, str], Reward]


def exact_match(response: str, answer: str) -> Reward:
  """Verifier for the synthetic tasks (every family): compare the final '=<integer>'."""
  got = tasks.parse_final_answer(response)
  if got is None:
    return Reward(0.0, "no_final_answer")
  if got == str(answer).strip():
    return Reward(1.0, "correct")
  return Reward(0.0, "wrong_answer")


def score_batch(verifier: Verifier, responses: Sequence[str], answers: Sequence[str]) -> np.ndarray:
  """Scores of `verifier` over aligned responses and answers, as a float32 [B] array."""
  if len(responses) != len(answers):
    raise ValueError(f"score_batch: {len(responses)} responses but {len(answers)} answers")
  return np.asarray([verifier(r, a).score for r, a in zip(responses, answers)], np.float32)


# ----------------------------------------------------------------------------------------------
# math-verify in a worker process


def _gold_text(answer: str) -> str:
  a = answer.strip()
  return a if ("\\boxed" in a or "$" in a) else "\\boxed{" + a + "}"


def math_check(response: str, answer: str) -> Reward:
  """The math-verify check itself, without a time bound (runs inside the worker process)."""
  from math_verify import parse, verify  # heavy import (sympy): only in the worker
  gold = parse(_gold_text(answer), parsing_timeout=None)
  if not gold:
    return Reward(0.0, "unparseable_gold")
  pred = parse(response, parsing_timeout=None)
  if not pred:
    return Reward(0.0, "no_answer_found")
  ok = verify(gold, pred, timeout_seconds=None)
  return Reward(1.0, "correct") if ok else Reward(0.0, "wrong_answer")


def _worker_loop() -> None:
  """Entry point of the worker process: JSON lines in (response, answer), JSON lines out."""
  import logging
  logging.disable(logging.WARNING)  # math-verify warns on every call that its timeouts are off
  import math_verify  # noqa: F401  (import before reporting ready, so startup is not billed)
  out = sys.stdout
  sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol
  out.write("ready\n")
  out.flush()
  for line in sys.stdin:
    response, answer = json.loads(line)
    try:
      r = math_check(response, answer)
    except Exception as e:  # noqa: BLE001 -- any sympy failure is a failed check, reported
      r = Reward(0.0, f"verifier_error: {type(e).__name__}: {e}"[:200])
    out.write(json.dumps([r.score, r.reason]) + "\n")
    out.flush()


class MathVerifier:
  """Math answer verifier with a hard per-check time bound (see module docstring).

  timeout_s: wall-clock bound of one check (response parse + gold parse + equivalence).
  startup_timeout_s: bound on starting the worker (imports sympy; not counted in timeout_s).
  The worker is a plain subprocess (`python -c ...`), so no `__main__` guard is needed in scripts
  and notebooks. Use as a context manager or call `close()` to stop it.
  """

  def __init__(self, timeout_s: float = 5.0, startup_timeout_s: float = 120.0):
    if timeout_s <= 0:
      raise ValueError(f"MathVerifier.timeout_s must be positive, got {timeout_s}")
    self.timeout_s = float(timeout_s)
    self.startup_timeout_s = float(startup_timeout_s)
    self._lock = threading.Lock()
    self._proc: subprocess.Popen | None = None
    self._lines: queue.Queue | None = None

  def _start(self) -> None:
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from opd_jax.data.verifiers import _worker_loop; _worker_loop()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        bufsize=1, env=env)
    lines: queue.Queue = queue.Queue()

    def pump():
      for line in proc.stdout:
        lines.put(line)
      lines.put(None)  # EOF: the worker exited

    threading.Thread(target=pump, daemon=True, name="opd_jax-math-verify-reader").start()
    self._proc, self._lines = proc, lines
    try:
      first = lines.get(timeout=self.startup_timeout_s)
    except queue.Empty:
      first = None
    if first != "ready\n":
      self._kill()
      raise RuntimeError(f"MathVerifier: worker did not start within {self.startup_timeout_s}s "
                         f"(got {first!r}); is math-verify installed?")

  def _kill(self) -> None:
    if self._proc is not None:
      self._proc.kill()
      self._proc.wait()
      for f in (self._proc.stdin, self._proc.stdout):
        try:
          f.close()
        except OSError:
          pass
    self._proc = self._lines = None

  def __call__(self, response: str, answer: str) -> Reward:
    with self._lock:
      if self._proc is None or self._proc.poll() is not None:
        self._kill()
        self._start()
      t0 = time.monotonic()
      try:
        self._proc.stdin.write(json.dumps([str(response), str(answer)]) + "\n")
        self._proc.stdin.flush()
        line = self._lines.get(timeout=self.timeout_s)
      except queue.Empty:
        self._kill()
        return Reward(0.0, f"timeout after {time.monotonic() - t0:.1f}s")
      except OSError:
        line = None
      if line is None:
        self._kill()
        return Reward(0.0, "verifier_error: worker died")
      score, reason = json.loads(line)
      return Reward(float(score), reason)

  def close(self) -> None:
    with self._lock:
      self._kill()

  def __enter__(self) -> "MathVerifier":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 -- interpreter shutdown
      pass

"""Verifiers: exact match for the synthetic tasks, math-verify in a bounded worker pool, per-reason
accounting of batches."""

import concurrent.futures
import os
import pathlib
import time

import numpy as np
import pytest

from opd_jax.data import datasets, tasks
from opd_jax.data import verifiers
from opd_jax.data.verifiers import (MathVerifier, Reward, exact_match, score_batch,
                                    score_batch_with_reasons)

FIX = pathlib.Path(__file__).resolve().parent / "fixtures"
TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def math_verifier():
  with MathVerifier(timeout_s=TIMEOUT_S) as v:
    yield v


def test_exact_match_reasons():
  assert exact_match("12 13 04 =432", "432") == Reward(1.0, "correct")
  assert exact_match("12 13 04 =433", "432") == Reward(0.0, "wrong")
  assert exact_match("12 13 04 =0432", "432").score == 0.0  # exact: no leading zeros
  assert exact_match("12 13 04", "432") == Reward(0.0, "unparsable")
  assert exact_match("", "1") == Reward(0.0, "unparsable")
  assert verifiers.reasons_of(exact_match) == ("correct", "wrong", "unparsable")


def test_score_batch_on_generated_tasks():
  ex = tasks.generate(tasks.preset("default"), "eval", 40, seed=4)
  rng = np.random.default_rng(0)
  corrupt = rng.random(40) < 0.5
  responses = [e.solution if not c else e.solution + "1" for e, c in zip(ex, corrupt)]
  scores = score_batch(exact_match, responses, [e.answer for e in ex])
  assert scores.dtype == np.float32 and scores.shape == (40,)
  assert np.array_equal(scores, (~corrupt).astype(np.float32))
  with pytest.raises(ValueError, match="2 responses but 1 answers"):
    score_batch(exact_match, ["a", "b"], ["c"])
  # The typed result: the same scores, one reason per row, flat per-reason counts.
  res = score_batch_with_reasons(exact_match, responses + ["no answer"], [e.answer for e in ex] + ["1"])
  assert np.array_equal(res.scores_B[:40], scores) and len(res) == 41
  n_ok = int((~corrupt).sum())
  assert res.counts() == {"correct": n_ok, "wrong": 40 - n_ok, "unparsable": 1}
  assert res.to_metrics() == {"verifier/correct": float(n_ok), "verifier/wrong": float(40 - n_ok),
                              "verifier/unparsable": 1.0}
  assert score_batch_with_reasons(exact_match, ["=1"], ["1"]).to_metrics("eval/verifier") == {
      "eval/verifier/correct": 1.0, "eval/verifier/wrong": 0.0, "eval/verifier/unparsable": 0.0}
  empty = score_batch_with_reasons(exact_match, [], [])
  assert empty.scores_B.dtype == np.float32 and empty.scores_B.shape == (0,)


EQUIVALENT = [
    ("The answer is $\\boxed{\\frac{1}{2}}$.", "0.5"),               # fraction vs decimal
    ("So the result is 0.5", "\\frac{1}{2}"),                          # plain vs fraction
    ("\\boxed{0.75}", "\\frac{3}{4}"),
    ("We get $\\boxed{(x+1)^2}$", "x^2+2x+1"),                        # factored vs expanded
    ("\\boxed{x^2-1}", "(x+1)(x-1)"),
    ("Answer: 34", "34"),                                              # plain vs boxed gold
    ("$\\boxed{34}$", "\\boxed{34}"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}"),
    ("The total is $\\boxed{\\$18.90}$.", "\\$18.90"),                 # escaped dollar in gold
    ("\\boxed{32348}", "\\$32,\\!348"),
]
WRONG = [
    ("\\boxed{18.80}", "\\$18.90", "wrong"),
    ("\\boxed{3}", "4", "wrong"),
    ("\\boxed{x^2+1}", "(x+1)^2", "wrong"),
    ("The answer is 0.51", "\\frac{1}{2}", "wrong"),
    ("I do not know.", "7", "unparsable"),
]


def test_math_verifier_equivalences_and_wrong_answers(math_verifier):
  for response, gold in EQUIVALENT:
    assert math_verifier(response, gold) == Reward(1.0, "correct"), (response, gold)
  for response, gold, reason in WRONG:
    assert math_verifier(response, gold) == Reward(0.0, reason), (response, gold)
  # MATH fixture: every reference solution verifies against its extracted boxed answer.
  ex, _ = datasets.load_prompt_set(FIX / "math_sample.jsonl", "math")
  scores = score_batch(math_verifier, [e.solution for e in ex], [e.answer for e in ex])
  assert scores.tolist() == [1.0] * len(ex)


def test_math_verifier_bounds_pathological_inputs_and_recovers(math_verifier):
  math_verifier("\\boxed{1}", "1")  # worker started: its startup is not part of the bound
  t0 = time.monotonic()
  r = math_verifier("\\boxed{9^{9^{9^{9}}}}", "2")  # sympy would evaluate this for hours
  elapsed = time.monotonic() - t0
  assert (r.score, r.reason) == (0.0, "timeout"), r
  assert elapsed < TIMEOUT_S + 5.0  # the bound plus process kill/restart slack on a loaded machine
  assert math_verifier("\\boxed{2}", "2").score == 1.0  # a fresh worker took over


def test_math_verifier_works_off_the_main_thread(math_verifier):
  pairs = EQUIVALENT[:3] + [(w[0], w[1]) for w in WRONG[:2]]
  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    got = list(pool.map(lambda p: math_verifier(*p).score, pairs))
  assert got == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_math_verifier_rejects_bad_timeout():
  with pytest.raises(ValueError, match="timeout_s"):
    MathVerifier(timeout_s=0)


def test_math_verifier_batches_in_parallel_with_reasons(math_verifier):
  pairs = [(r, g) for r, g in EQUIVALENT] + [(w[0], w[1]) for w in WRONG]
  res = score_batch_with_reasons(math_verifier, [p[0] for p in pairs], [p[1] for p in pairs])
  assert res.scores_B.tolist() == [1.0] * len(EQUIVALENT) + [0.0] * len(WRONG)
  assert list(res.reasons_B) == ["correct"] * len(EQUIVALENT) + [w[2] for w in WRONG]
  assert res.to_metrics() == {"verifier/correct": float(len(EQUIVALENT)),
                              "verifier/wrong": float(len(WRONG) - 1),
                              "verifier/unparsable": 1.0, "verifier/timeout": 0.0,
                              "verifier/worker_error": 0.0}


# -- the worker pool with fake checks (imported by the workers from this module) -------------------
def fake_check(response: str, answer: str) -> Reward:
  """'sleep:S' sleeps S seconds then is correct; 'die' kills the worker; 'hog' allocates past the
  worker's memory cap; 'raise' raises; otherwise correct iff response == answer."""
  if response.startswith("sleep:"):
    time.sleep(float(response[6:]))
    return Reward(1.0, "correct")
  if response == "die":
    os._exit(1)
  if response == "hog":
    return Reward(1.0, "correct", str(len(bytearray(4 << 30))))
  if response == "raise":
    raise ZeroDivisionError("boom")
  return Reward(1.0, "correct") if response == answer else Reward(0.0, "wrong")


def _fake_verifier(**kw):
  return MathVerifier(check="test_data_verifiers:fake_check", pythonpath=[str(FIX.parent)],
                      memory_mb=kw.pop("memory_mb", 1024), **kw)


def test_pool_counts_timeouts_deaths_and_errors_and_replaces_workers():
  with _fake_verifier(timeout_s=1.0, workers=2) as v:
    v("a", "a")  # start a worker (startup is not part of the bound)
    responses = ["a", "b", "sleep:30", "die", "raise", "hog", "sleep:0.1", "a"]
    answers = ["a", "a", "x", "x", "x", "x", "x", "a"]
    t0 = time.monotonic()
    res = score_batch_with_reasons(v, responses, answers)
    elapsed = time.monotonic() - t0
    assert list(res.reasons_B) == ["correct", "wrong", "timeout", "worker_error", "worker_error",
                                   "worker_error", "correct", "correct"], res
    assert res.scores_B.tolist() == [1, 0, 0, 0, 0, 0, 1, 1]
    assert "MemoryError" in res.details_B[5] and "ZeroDivisionError" in res.details_B[4]
    assert res.counts() == {"correct": 3, "wrong": 1, "unparsable": 0, "timeout": 1,
                            "worker_error": 3}
    assert elapsed < 30  # the sleeper was cut at the bound, not waited for
    # Dead / hung workers were replaced: the pool still has its two workers and works.
    assert v("b", "b") == Reward(1.0, "correct")
    assert len(v._all) <= 2


def test_pool_checks_in_parallel():
  with _fake_verifier(timeout_s=5.0, workers=2) as v:
    v.score_many(["a", "a"], ["a", "a"])  # both workers started
    t0 = time.monotonic()
    res = score_batch_with_reasons(v, ["sleep:1.0"] * 4, ["x"] * 4)
    elapsed = time.monotonic() - t0
    assert res.reasons_B == ("correct",) * 4
    assert elapsed < 3.5, elapsed  # 4 x 1 s over 2 workers: ~2 s, not 4


def test_pool_hung_worker_from_many_threads():
  with _fake_verifier(timeout_s=0.5, workers=2) as v:
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
      got = list(pool.map(lambda r: v(r, "a").reason, ["sleep:10", "a", "sleep:10", "a", "b"]))
    assert got == ["timeout", "correct", "timeout", "correct", "wrong"]


def test_code_verifier_reasons_in_a_parallel_batch():
  from opd_jax.data import code_exec
  tests = '{"fn": "f", "calls": [[[1], 2], [[2], 3]]}'
  responses = ["def f(x):\n  return x + 1\n", "def f(x):\n  return x\n", "while True: pass\n",
               "def f(x) return x\n", "x = bytearray(1 << 33)\n", "raise SystemExit(1)\n",
               "```python\ndef f(x):\n  return x + 1\n```"]
  v = verifiers.CodeVerifier(code_exec.Limits(timeout_s=1.0, memory_mb=256), workers=2)
  res = score_batch_with_reasons(v, responses, [tests] * len(responses))
  assert list(res.reasons_B) == ["pass", "fail", "timeout", "compile_error", "memory", "crash",
                                 "pass"]
  assert res.scores_B.tolist() == [1, 0, 0, 0, 0, 0, 1]
  assert res.to_metrics()["verifier/pass"] == 2.0 and res.to_metrics()["verifier/sandbox_error"] == 0
  assert set(res.to_metrics()) == {f"verifier/{r}" for r in code_exec.REASONS}
  partial = verifiers.CodeVerifier(workers=1, partial_credit=True)
  assert partial("def f(x):\n  return 2\n", tests).score == 0.5
  with pytest.raises(ValueError):
    v("def f(x): return x", "not a test spec")


def test_batch_result_select_concat_and_build():
  a = score_batch_with_reasons(exact_match, ["=1", "=2", "x"], ["1", "1", "1"])
  b = score_batch_with_reasons(exact_match, ["=3"], ["3"])
  valid = a.select([True, False, True])
  assert valid.reasons_B == ("correct", "unparsable") and valid.scores_B.tolist() == [1.0, 0.0]
  both = verifiers.BatchResult.concat([valid, b])
  assert both.scores_B.dtype == np.float32 and len(both) == 3
  assert both.counts() == {"correct": 2, "wrong": 0, "unparsable": 1}
  with pytest.raises(ValueError, match="mask"):
    a.select([True])
  assert verifiers.build("exact_match") is exact_match
  assert isinstance(verifiers.build("code", workers=1), verifiers.CodeVerifier)
  tv = verifiers.build("task")
  assert set(verifiers.reasons_of(tv)) >= {"correct", "pass", "timeout", "compile_error"}
  for v in (exact_match, tv):
    verifiers.close_verifier(v)
  with pytest.raises(ValueError, match="unknown verifier"):
    verifiers.build("nope")

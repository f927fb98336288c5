"""Verifiers: exact match for the synthetic tasks, math-verify with its own time bound."""

import concurrent.futures
import pathlib
import time

import numpy as np
import pytest

from opd_jax.data import datasets, tasks
from opd_jax.data.verifiers import MathVerifier, Reward, exact_match, score_batch

FIX = pathlib.Path(__file__).resolve().parent / "fixtures"
TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def math_verifier():
  with MathVerifier(timeout_s=TIMEOUT_S) as v:
    yield v


def test_exact_match_reasons():
  assert exact_match("12 13 04 =432", "432") == Reward(1.0, "correct")
  assert exact_match("12 13 04 =433", "432") == Reward(0.0, "wrong_answer")
  assert exact_match("12 13 04 =0432", "432").score == 0.0  # exact: no leading zeros
  assert exact_match("12 13 04", "432") == Reward(0.0, "no_final_answer")
  assert exact_match("", "1") == Reward(0.0, "no_final_answer")


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


EQUIVALENT = [
    ("The answer is $\\boxed{\\frac{1}{2}}$.", "0.5"),               # fraction vs decimal
    ("So the result is 0.5", "\\frac{1}{2}"),                          # plain vs fraction
    ("\\boxed{0.75}", "\\frac{3}{4}"),
    ("We get $\\boxed{(x+1)^2}$", "x^2+2x+1"),                        # factored vs expanded
    ("\\boxed{x^2-1}", "(x+1)(x-1)"),
    ("Answer: 34", "34"),                                              # plain vs boxed gold
    ("$\\boxed{34}$", "\\boxed{34}"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}"),
]
WRONG = [
    ("\\boxed{3}", "4", "wrong_answer"),
    ("\\boxed{x^2+1}", "(x+1)^2", "wrong_answer"),
    ("The answer is 0.51", "\\frac{1}{2}", "wrong_answer"),
    ("I do not know.", "7", "no_answer_found"),
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
  assert r.score == 0.0 and r.reason.startswith("timeout"), r
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

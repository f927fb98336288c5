"""Synthetic tasks: determinism, disjoint splits, traces checked against independent arithmetic;
the code family checked by running its reference solutions in the sandbox."""

import hashlib
import json
import re

import pytest

from opd_jax.data import tasks
from opd_jax.data.verifiers import CodeVerifier, TaskVerifier, exact_match


def _reference(ex: tasks.Example) -> tuple[str, list[str], str]:
  """Independent re-derivation of (family, trace steps, answer) from the prompt alone."""
  p = ex.prompt
  if m := re.fullmatch(r"(\d+)\+(\d+)=", p):
    a, b = m.group(1), m.group(2)
    n = max(len(a), len(b))
    a, b = a.zfill(n), b.zfill(n)
    steps, carry = [], 0
    for i in range(n - 1, -1, -1):  # units first
      s = int(a[i]) + int(b[i]) + carry
      steps.append(f"{s // 10}{s % 10}")
      carry = s // 10
    return "addition", steps, str(int(m.group(1)) + int(m.group(2)))
  if m := re.fullmatch(r"(\d+(?: \d+)+):", p):
    vals = [int(v) for v in m.group(1).split()]
    return "running_sum", [str(sum(vals[:i + 1])) for i in range(len(vals))], str(sum(vals))
  if m := re.fullmatch(r"(\d+)((?:[-+*]\d+)+)%(\d+):", p):
    x, mod = int(m.group(1)), int(m.group(3))
    steps = []
    for op, v in re.findall(r"([-+*])(\d+)", m.group(2)):
      x = eval(f"({x}){op}({v})") % mod  # noqa: S307 -- test-only arithmetic on parsed digits
      steps.append(str(x))
    return "mod_chain", steps, str(x)
  raise AssertionError(f"unrecognised prompt {p!r}")


@pytest.mark.parametrize("name", sorted(tasks.PRESETS))  # the arithmetic families
def test_demonstrations_match_independent_arithmetic_and_verify(name):
  cfg = tasks.preset(name)
  examples = tasks.generate(cfg, "train", 300, seed=3)
  families = set()
  for ex in examples:
    family, steps, answer = _reference(ex)
    assert ex.answer == answer, ex
    assert ex.solution == " ".join(steps) + f" ={answer}", ex
    assert exact_match(ex.solution, ex.answer).score == 1.0
    # Corrupted answers fail: wrong final number, missing final answer, trailing garbage.
    wrong = str(int(answer) + 1)
    assert exact_match(ex.solution[:ex.solution.rindex("=") + 1] + wrong, ex.answer).score == 0.0
    assert exact_match(ex.solution.rsplit("=", 1)[0], ex.answer).reason == "unparsable"
    assert exact_match(ex.solution + "7", ex.answer).score == 0.0
    families.add(family)
  assert families == set(cfg.families)  # all three families are drawn


def test_generation_is_deterministic_per_seed():
  cfg = tasks.preset("default")
  a = tasks.generate(cfg, "train", 200, seed=11)
  assert a == tasks.generate(cfg, "train", 200, seed=11)
  assert a != tasks.generate(cfg, "train", 200, seed=12)
  # A prefix of a longer request is the shorter request (same stream).
  assert tasks.generate(cfg, "train", 50, seed=11) == a[:50]


def test_splits_partition_an_enumerable_problem_space():
  # 1-digit addition: exactly 100 problems. Generating every unique problem of each split must
  # return exactly that split's share of the enumeration, and asking for one more must fail.
  cfg = tasks.TaskConfig(families=("addition",), addition=tasks.AdditionConfig(1, 1),
                         eval_fraction=0.3)
  space = {f"{a}+{b}=" for a in range(10) for b in range(10)}
  by_split = {s: {p for p in space if tasks.split_of(p, cfg) == s} for s in tasks.SPLITS}
  assert by_split["train"] and by_split["eval"]
  assert by_split["train"].isdisjoint(by_split["eval"])
  for split in tasks.SPLITS:
    got = tasks.generate(cfg, split, len(by_split[split]), seed=0)
    assert {e.prompt for e in got} == by_split[split]
    with pytest.raises(ValueError, match="too small"):
      tasks.generate(cfg, split, len(by_split[split]) + 1, seed=0, max_attempts=5000)


def test_train_and_eval_never_overlap_for_default_and_easy():
  for name in ("easy", "default"):
    cfg = tasks.preset(name)
    train = tasks.generate(cfg, "train", 3000, seed=0)
    evals = tasks.generate(cfg, "eval", 400, seed=0)
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in evals})
    assert all(tasks.split_of(e.prompt, cfg) == "train" for e in train)
    assert all(tasks.split_of(e.prompt, cfg) == "eval" for e in evals)
    if name == "easy":
      # Sensitivity: at these sizes two draws of the SAME split do collide, so a split that leaked
      # problems across train/eval would have been caught above.
      other = tasks.generate(cfg, "train", 400, seed=1)
      assert {e.prompt for e in train} & {e.prompt for e in other}
  salted = tasks.preset("default", split_salt="other")
  prompts = [e.prompt for e in tasks.generate(salted, "train", 300, seed=0)]
  assert any(tasks.split_of(p, tasks.preset("default")) == "eval" for p in prompts)


def test_max_lengths_bound_every_example_and_is_tight_for_addition():
  for name in sorted(tasks.PRESETS):
    cfg = tasks.preset(name)
    pmax, smax = tasks.max_lengths(cfg)
    examples = tasks.generate(cfg, "train", 500, seed=1, unique=False)
    assert max(len(e.prompt) for e in examples) <= pmax
    assert max(len(e.solution) for e in examples) <= smax
    n = cfg.addition.max_digits
    worst = tasks.render_addition(10**n - 1, 10**n - 1)
    only_add = cfg.replace(families=("addition",))
    assert (len(worst.prompt), len(worst.solution)) == tasks.max_lengths(only_add)
  p, s = tasks.max_lengths(tasks.preset("default"))
  assert p + s <= 40  # the documented budget of the default preset


def test_unique_and_non_unique_generation():
  cfg = tasks.preset("easy")
  ex = tasks.generate(cfg, "eval", 300, seed=0)
  assert len({e.prompt for e in ex}) == 300
  many = tasks.generate(cfg.replace(families=("addition",), addition=tasks.AdditionConfig(1, 1)),
                        "train", 500, seed=0, unique=False)
  assert len({e.prompt for e in many}) < 500


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="families"):
    tasks.TaskConfig(families=("nope",))
  with pytest.raises(ValueError, match="eval_fraction"):
    tasks.TaskConfig(eval_fraction=1.0)
  with pytest.raises(ValueError, match="min_digits"):
    tasks.AdditionConfig(3, 2)
  with pytest.raises(ValueError, match="modulus"):
    tasks.ModChainConfig(modulus=1)
  with pytest.raises(ValueError, match="unknown task preset"):
    tasks.preset("medium")
  with pytest.raises(ValueError, match="split"):
    tasks.generate(tasks.preset("easy"), "test", 1)


def test_parse_final_answer():
  assert tasks.parse_final_answer("12 13 04 =432") == "432"
  assert tasks.parse_final_answer("1 =2 =-3 ") == "-3"
  assert tasks.parse_final_answer("=432 x") is None
  assert tasks.parse_final_answer("") is None


def test_arithmetic_families_are_bit_identical_to_before_the_code_family():
  # Digest of the examples generated before the code family existed (same seeds and presets).
  h = hashlib.sha256()
  for name in ("easy", "default", "hard"):
    for split in ("train", "eval"):
      for e in tasks.generate(tasks.preset(name), split, 300, seed=7):
        h.update(f"{e.prompt}\x00{e.solution}\x00{e.answer}\x01".encode())
  assert h.hexdigest() == "dfcd9c5ed5de316c11ef0a3a9a5a14d4ad56541c8a093bd5e9d63ad874b7b3e8"
  assert "code" not in tasks.TaskConfig().families


CODE = tasks.TaskConfig(families=("code",))


def test_code_family_is_deterministic_split_and_bounded():
  a = tasks.generate(CODE, "train", 300, seed=5)
  assert a == tasks.generate(CODE, "train", 300, seed=5)
  assert a != tasks.generate(CODE, "train", 300, seed=6)
  ev = tasks.generate(CODE, "eval", 100, seed=5)
  assert {e.prompt for e in a}.isdisjoint({e.prompt for e in ev})
  # A prompt determines its problem: the same prompt always renders the same tests.
  again = tasks.generate(CODE, "train", 300, seed=6)
  by_prompt = {e.prompt: e for e in a}
  assert any(e.prompt in by_prompt for e in again)
  for e in again:
    if e.prompt in by_prompt:
      assert e == by_prompt[e.prompt]
  pmax, smax = tasks.max_lengths(CODE)
  many = tasks.generate(CODE, "train", 2000, seed=1, unique=False)
  assert max(len(e.prompt) for e in many) <= pmax and max(len(e.solution) for e in many) <= smax
  assert {e.prompt.split(" = ")[1].split()[0] for e in many} >= {"x", "s", "count", "sum",
                                                                  "largest"}
  for e in a:
    spec = json.loads(e.answer)
    assert tasks.is_code_answer(e.answer) and spec["fn"] == "f"
    assert len(spec["calls"]) == CODE.code.n_tests
  assert not tasks.is_code_answer("432")
  # Enough distinct problems for the default 4096 training examples.
  assert len(tasks.generate(CODE, "train", 4096, seed=0)) == 4096
  with pytest.raises(ValueError, match="templates"):
    tasks.CodeTaskConfig(templates=("nope",))
  with pytest.raises(ValueError, match="n_tests"):
    tasks.CodeTaskConfig(n_tests=0)


def _mutant(solution: str) -> str:
  """A plausible wrong solution: the last integer literal of the body off by one."""
  m = list(re.finditer(r"\d+", solution))[-1]
  return solution[:m.start()] + str(int(m.group()) + 1) + solution[m.end():]


def test_code_reference_solutions_pass_the_sandbox_and_wrong_ones_fail():
  per_template = {}
  for e in tasks.generate(CODE, "train", 400, seed=2):
    per_template.setdefault(re.sub(r"-?\d+", "N", e.prompt), e)  # one example per template
  examples = list(per_template.values())
  assert len(examples) == len(tasks.CODE_TEMPLATES)
  v = CodeVerifier(workers=2)
  answers = [e.answer for e in examples]
  good = v.score_many([e.solution for e in examples], answers)
  assert [r.reason for r in good] == ["pass"] * len(examples), good
  # Fenced responses (as a chat model writes them) are extracted.
  fenced = v(f"Sure:\n```python\n{examples[0].solution}\n```\n", answers[0])
  assert fenced.reason == "pass"
  bad = v.score_many([_mutant(e.solution) for e in examples], answers)
  # An off-by-one mutant can still agree on the 5 hidden cases (e.g. 'divisible by k+1' on [0, 20]).
  assert sum(r.reason == "fail" and r.score == 0.0 for r in bad) >= len(examples) - 1, bad
  none = v.score_many(["def f(*args):\n  return None\n"] * len(examples), answers)
  assert [(r.score, r.reason) for r in none] == [(0.0, "fail")] * len(examples)
  # A mixture: the task verifier routes arithmetic answers to exact_match, code to the sandbox.
  mixed = tasks.generate(tasks.TaskConfig(families=("addition", "code")), "train", 6, seed=0)
  tv = TaskVerifier(v)
  assert [tv(e.solution, e.answer).score for e in mixed] == [1.0] * 6


def test_code_examples_round_trip_through_the_task_tokenizer():
  # The char-level task tokenizer covers the code family (newlines, brackets, '%', '='), and a
  # decoded response is the exact program the verifier runs (how OPD / RLVR on code sees it).
  from opd_jax.data import tokenizer as tokenizer_lib
  tok = tokenizer_lib.build_task_tokenizer()
  v = CodeVerifier(workers=2)
  examples = tasks.generate(CODE, "eval", 6, seed=0)
  decoded = []
  for e in examples:
    ids, mask = tokenizer_lib.encode_example(tok, e.prompt, e.solution)  # raises on unknown chars
    decoded.append(tokenizer_lib.decode_response(tok, [i for i, m in zip(ids, mask) if m]))
  assert decoded == [e.solution for e in examples]
  assert [r.reason for r in v.score_many(decoded, [e.answer for e in examples])] == ["pass"] * 6

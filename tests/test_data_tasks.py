"""Synthetic tasks: determinism, disjoint splits, traces checked against independent arithmetic."""

import re

import pytest

from opd_jax.data import tasks
from opd_jax.data.verifiers import exact_match


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


@pytest.mark.parametrize("name", sorted(tasks.PRESETS))
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
    assert exact_match(ex.solution.rsplit("=", 1)[0], ex.answer).reason == "no_final_answer"
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
